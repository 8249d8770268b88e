"""The training step makes no host sync where one would stall an accelerator: forward and
backward of LongNetLM under FakeTensorMode, with the device policy of an accelerator
(longnet.kernels.reads_values_on_host False), on every data-dependent operation raise
DataDependentOutputException. (A CPU build of torch cannot run autograd on fake CUDA tensors,
so the fake tensors are CPU tensors with CUDA's policy.)"""

from __future__ import annotations

import functools

import distributed_utils
import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from longnet import LongNetConfig, LongNetLM, engine, model, selection
from longnet.distributed import sequence_parallel_dilated_attention

CASES = {
    "paper_patterns": dict(segment_lengths=(8, 16, 32), dilation_rates=(1, 2, 4)),
    "content_selected": dict(
        segment_lengths=(8, 16), dilation_rates=(1, 2), select_top_k=2, select_block_size=4
    ),
    "content_selected_and_pooled": dict(
        segment_lengths=(8, 16),
        dilation_rates=(1, 2),
        select_top_k=2,
        select_block_size=4,
        select_pooled=True,
        select_query_span=6,  # the queries before a shard come from the rank before it
        select_within_segment=True,
        select_ranking_dims=4,  # of 8: the queries before a shard are sliced after the gather
    ),
}
CASES["content_selected_by_the_best_of_a_span"] = CASES["content_selected_and_pooled"] | dict(
    select_within_segment=False, select_span_max=True
)


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_has_no_host_sync(case, monkeypatch):
    for module in (engine, model, selection):
        monkeypatch.setattr(module, "reads_values_on_host", lambda device: False)
    config = LongNetConfig(
        vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
        position="rotary", activation_checkpointing=True, **CASES[case],
    )  # fmt: skip
    with FakeTensorMode():
        lm = LongNetLM(config).train()
        tokens = torch.randint(0, 40, (2, 64))
        out = lm(tokens, tokens, return_logits=False)
        out.loss.backward()
        assert all(p.grad is not None for p in lm.parameters())


def test_the_policy_is_what_the_check_catches(monkeypatch):
    """Not vacuous: with the CPU policy, the step reads token ids on the host, which
    FakeTensorMode refuses."""
    config = LongNetConfig(vocab_size=40, d_model=32, num_layers=1, num_heads=4, ffn_dim=48)
    with (
        FakeTensorMode(),
        pytest.raises(DataDependentOutputException),
    ):
        LongNetLM(config)(torch.randint(0, 40, (1, 16)))


def run_sequence_parallel_step(case):
    """Worker (groups of 2 ranks): this rank's training step under FakeTensorMode."""
    group = distributed_utils.consecutive_group(2)
    if group is None:
        return None
    config = LongNetConfig(
        vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
        position="rotary", **CASES[case],
    )  # fmt: skip
    attention = functools.partial(sequence_parallel_dilated_attention, group=group)
    with pytest.MonkeyPatch.context() as patch, FakeTensorMode():
        for module in (engine, model, selection):  # undone: the workers serve other tests
            patch.setattr(module, "reads_values_on_host", lambda device: False)
        lm = LongNetLM(config, attention_fn=attention).train()
        tokens = torch.randint(0, 40, (2, 16))  # this rank's shard of 32 tokens
        offset = torch.distributed.get_rank(group) * 16
        out = lm(tokens, tokens, position_offset=offset, return_logits=False)
        out.loss.backward()
        return all(p.grad is not None for p in lm.parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_sequence_parallel_step_has_no_host_sync(case):
    """The same on real gloo ranks, with patterns whose segments span them (w = 32 over shards
    of 16 tokens; the selected pattern reads earlier shards): no data-dependent operation."""
    results = distributed_utils.run(run_sequence_parallel_step, case)
    assert [r for r in results if r is not None] == [True] * len(results)
