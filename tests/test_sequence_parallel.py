"""Sequence-parallel dilated attention on real gloo process groups (docs/sequence-parallel.md).

The invariant: concatenating the ranks' outputs and q/k/v gradients gives what single-process
longnet.dilated_attention (and the dense reference) gives on the whole sequence. Four worker
processes run groups of 2 (ranks 0-1 and 2-3 at once), 3 (ranks 0-2) and 4 (the world, group=None).
"""

from __future__ import annotations

import dataclasses
import functools

import distributed_utils
import pytest
import torch
from conftest import (
    LAYOUTS,
    TOLERANCE,
    assert_matches,
    make_qkv,
    max_error,
    outputs_and_grads,
    randn,
    reference_fn,
)

from longnet import DilatedAttention, LongNetConfig, LongNetLM, dilated_attention
from longnet.distributed import (
    Communication,
    communication,
    sequence_parallel_dilated_attention,
    shard_sequence,
)
from longnet.reference import dense_dilated_attention

DIM = 8
FLOAT64_BYTES = 8
GROUP_SIZES = (2, 3, 4)

# (batch, shard_len, heads, kv_heads, segment_lengths, dilation_rates); the global sequence is
# group size x shard_len, so 1000 is longer than every sequence here.
CASES = {
    "shorter_and_equal_to_shard": (1, 8, 4, 4, [4, 8], [1, 2]),
    "two_shards": (1, 8, 4, 4, [16], [2]),
    "longer_than_sequence": (1, 8, 4, 4, [1000], [4]),
    "r_not_dividing_w": (1, 8, 4, 4, [4, 8, 16, 1000], [1, 3, 3, 4]),
    "grouped_query": (1, 8, 4, 2, [8, 16, 1000], [1, 2, 4]),
    "multi_query": (1, 8, 4, 1, [16, 1000], [1, 3]),
    "batch": (2, 8, 4, 4, [8, 32], [2, 2]),
    "shards_shorter_than_r": (1, 2, 4, 2, [2, 1000], [1, 4]),
    "paper_scaled_down": (1, 8, 6, 3, [2, 4, 8, 16, 32], [1, 2, 4, 6, 12]),
}


def sp_group(size: int):
    """(group, is member) in a worker; group None means the world (the default argument)."""
    if size == distributed_utils.WORLD_SIZE:
        return None, True
    group = distributed_utils.consecutive_group(size)
    return group, group is not None


def run_sequence_parallel(size, inputs, lengths, rates, causal):
    """Worker: this rank's shard of the output and of the q, k, v gradients, and the bytes."""
    group, member = sp_group(size)
    if not member:
        return None
    q, k, v, grad_out = (shard_sequence(x, group) for x in inputs)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = sequence_parallel_dilated_attention(q, k, v, lengths, rates, group=group, causal=causal)
    out.backward(grad_out)
    rank = torch.distributed.get_rank(group)
    tensors = (out.detach(), q.grad, k.grad, v.grad)
    sent = communication(q, k, v, lengths, rates, group=group, causal=causal)
    return rank, tensors, dataclasses.asdict(sent)


def by_group(results: list) -> list[list]:
    """Worker results as lists of (tensors, bytes) per group, in group-rank order."""
    groups, current = [], {}
    for result in results:
        if result is None:
            continue
        rank, tensors, sent_and_received = result
        if rank in current:
            groups.append([current[r] for r in sorted(current)])
            current = {}
        current[rank] = (tensors, sent_and_received)
    return groups + [[current[r] for r in sorted(current)]]


def exchanged_entries(source, dest, world, shard_len, heads, kv_heads, lengths, rates, causal):
    """(global position, kv head) pairs of rank `source` that rank `dest` needs, counted from
    the definition (docs/sequence-parallel.md): same spanning segment, kept by some query head
    of that kv head, and with causal masking only from earlier ranks."""
    if source == dest or (causal and source > dest):
        return 0
    seq_len, group = world * shard_len, heads // kv_heads
    count = 0
    for w, r in zip(lengths, rates, strict=True):
        w = min(w, seq_len)
        for position in range(source * shard_len, (source + 1) * shard_len):
            if w <= shard_len or position // w != dest * shard_len // w:
                continue
            for kv in range(kv_heads):
                offsets = {head % r for head in range(kv * group, (kv + 1) * group)}
                count += (position % w) % r in offsets
    return count


def single_device(q, k, v, grad_out, lengths, rates, causal):
    """(out, grad q, grad k, grad v) of longnet.dilated_attention and of the dense reference."""
    fn = functools.partial(dilated_attention, segment_lengths=lengths, dilation_rates=rates)
    expected = outputs_and_grads(functools.partial(fn, causal=causal), q, k, v, grad_out)
    reference = outputs_and_grads(reference_fn(lengths, rates, causal), q, k, v, grad_out)
    return expected, reference


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("size", GROUP_SIZES)
def test_matches_single_device(size, case, causal):
    batch, shard_len, heads, kv_heads, lengths, rates = CASES[case]
    generator = torch.Generator().manual_seed(size)
    q, k, v = make_qkv(generator, batch, size * shard_len, heads, kv_heads, DIM)
    grad_out = randn(generator, *q.shape)
    inputs = tuple(x.detach() for x in (q, k, v, grad_out))
    results = distributed_utils.run(run_sequence_parallel, size, inputs, lengths, rates, causal)
    expected, reference = single_device(q, k, v, grad_out, lengths, rates, causal)

    groups = by_group(results)
    assert len(groups) == distributed_utils.WORLD_SIZE // size
    for shards in groups:
        actual = [torch.cat(parts, dim=1) for parts in zip(*(s[0] for s in shards), strict=True)]
        for name, a, e, ref in zip(
            ("out", "dq", "dk", "dv"), actual, expected, reference, strict=True
        ):
            assert max_error(a, e) <= TOLERANCE[torch.float64], name
            assert max_error(a, ref) <= TOLERANCE[torch.float64], name
        entry_bytes = 2 * batch * DIM * FLOAT64_BYTES  # K and V of one (position, kv head)
        layout = (size, shard_len, heads, kv_heads, lengths, rates, causal)
        for rank, (_, sent_and_received) in enumerate(shards):
            received = sum(exchanged_entries(j, rank, *layout) for j in range(size))
            sent = sum(exchanged_entries(rank, j, *layout) for j in range(size))
            assert sent_and_received == {
                "forward_sent": sent * entry_bytes,
                "forward_received": received * entry_bytes,
                "backward_sent": received * entry_bytes,
                "backward_received": sent * entry_bytes,
            }
            if min(max(lengths), size * shard_len) <= shard_len:  # every segment in a shard
                assert received == sent == 0


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_bytes_follow_the_formula(causal):
    """docs/sequence-parallel.md: 2 (W / r) H d b (1 - L / W) bytes received per rank and
    spanning pattern, W = min(w, n), here with kv_heads == heads; with causal masking a rank at
    position i of its segment receives from the i earlier ranks only. Patterns inside a shard
    receive nothing."""
    size, batch, shard_len, heads = 4, 2, 8, 4
    lengths, rates = [8, 16, 1000], [2, 2, 4]  # in a shard, over 2 shards, over all 4
    generator = torch.Generator().manual_seed(0)
    q, k, v = make_qkv(generator, batch, size * shard_len, heads, heads, DIM)
    inputs = tuple(x.detach() for x in (q, k, v, randn(generator, *q.shape)))
    results = distributed_utils.run(run_sequence_parallel, size, inputs, lengths, rates, causal)
    for rank, _, sent_and_received in results:
        expected = 0.0
        for w, r in zip(lengths, rates, strict=True):
            w = min(w, size * shard_len)
            if w <= shard_len:
                continue
            if causal:
                earlier = rank * shard_len % w // shard_len  # ranks before this one in its segment
                expected += 2 * (earlier * shard_len / r) * heads * DIM * FLOAT64_BYTES * batch
            else:
                expected += 2 * (w / r) * heads * DIM * FLOAT64_BYTES * batch * (1 - shard_len / w)
        assert sent_and_received["forward_received"] == expected
        assert sent_and_received["backward_sent"] == expected


def run_layer(size, state, x, grad_out, options):
    """Worker: a DilatedAttention layer on this rank's shard, the sequence-parallel attention
    injected as attention_fn; its output, input gradient and parameter gradients."""
    group, member = sp_group(size)
    if not member:
        return None
    attention = functools.partial(sequence_parallel_dilated_attention, group=group)
    layer = DilatedAttention(**options, attention_fn=attention).double()
    layer.load_state_dict(state)
    x = shard_sequence(x, group).clone().requires_grad_()
    out = layer(x)
    out.backward(shard_sequence(grad_out, group))
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return torch.distributed.get_rank(group), (out.detach(), x.grad, grads), None


@pytest.mark.parametrize("size", [2, 4])
def test_layer_with_sequence_parallel_attention_fn(size):
    """The layer's output, input gradient and (summed over ranks) parameter gradients."""
    options = dict(
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        segment_lengths=[4, 16, 64],
        dilation_rates=[1, 2, 4],
        causal=True,
    )
    torch.manual_seed(0)
    layer = DilatedAttention(**options).double()
    generator = torch.Generator().manual_seed(1)
    x = randn(generator, 1, size * 8, 32).requires_grad_()
    grad_out = randn(generator, *x.shape)
    layer(x).backward(grad_out)
    state = {name: t.detach() for name, t in layer.state_dict().items()}
    results = distributed_utils.run(run_layer, size, state, x.detach(), grad_out, options)
    for shards in by_group(results):
        outs, x_grads, param_grads = zip(*(tensors for tensors, _ in shards), strict=True)
        tolerance = TOLERANCE[torch.float64]
        assert max_error(torch.cat(outs, dim=1), layer(x).detach()) <= tolerance
        assert max_error(torch.cat(x_grads, dim=1), x.grad) <= tolerance
        for name, p in layer.named_parameters():
            assert max_error(sum(grads[name] for grads in param_grads), p.grad) <= tolerance, name


def run_bad_layouts():
    """Worker (world of 4, shards of 8 tokens): the ValueError messages of bad layouts."""
    q = torch.zeros(1, 8, 4, DIM, dtype=torch.float64)
    messages = []
    for lengths in ([4, 6], [12]):  # 6 straddles shard boundaries; 12 covers 1.5 shards
        try:
            sequence_parallel_dilated_attention(q, q, q, lengths, [1] * len(lengths))
        except ValueError as error:
            messages.append(str(error))
    try:
        shard_sequence(torch.zeros(1, 9, 4, DIM))
    except ValueError as error:
        messages.append(str(error))
    return messages


def test_bad_layouts_raise():
    for messages in distributed_utils.run(run_bad_layouts):
        straddles, partial_shards, indivisible = messages
        assert "segment_length=6" in straddles and "straddle" in straddles
        assert "segment_length=12" in partial_shards and "whole shards" in partial_shards
        assert "sequence length 9" in indivisible and "4 ranks" in indivisible


def test_single_process_matches_reference():
    """No process group: P = 1, the whole sequence on this process, nothing communicated."""
    assert not torch.distributed.is_initialized()
    generator = torch.Generator().manual_seed(0)
    q, k, v = make_qkv(generator, 2, 24, 4, 2, DIM)
    lengths, rates = [8, 64], [1, 3]
    fn = functools.partial(sequence_parallel_dilated_attention, causal=True)
    assert_matches(
        lambda *x: fn(*x, lengths, rates),
        q,
        k,
        v,
        reference_fn(lengths, rates, True),
        TOLERANCE[torch.float64],
    )
    assert communication(q, k, v, lengths, rates, causal=True) == Communication()


def run_layouts(inputs, lengths, rates, causal):
    """Worker (the world, 4 ranks): max error over q/k/v/grad_out layouts of this rank's output
    and gradients against the same shard passed contiguous."""
    shards = [shard_sequence(x) for x in inputs]

    def run(layout, contiguous):
        transformed = [LAYOUTS[layout](x) for x in shards]
        if contiguous:
            transformed = [x.contiguous() for x in transformed]
        leaves = [x.detach().requires_grad_() for x in transformed[:3]]
        out = sequence_parallel_dilated_attention(*leaves, lengths, rates, causal=causal)
        out.backward(transformed[3])
        return (out.detach(), *(x.grad for x in leaves))

    return {
        layout: max(
            max_error(a, e) for a, e in zip(run(layout, False), run(layout, True), strict=True)
        )
        for layout in LAYOUTS
    }


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_memory_layout_gives_the_contiguous_numbers(causal):
    generator = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(generator, 2, 4 * 8, 4, 2, DIM)
    grad_out = randn(generator, *q.shape)
    inputs = tuple(x.detach() for x in (q, k, v, grad_out))
    lengths, rates = [4, 16, 32], [1, 2, 3]  # local, spanning 2 and spanning 4 ranks
    for errors in distributed_utils.run(run_layouts, inputs, lengths, rates, causal):
        assert errors.keys() == LAYOUTS.keys()
        for layout, error in errors.items():
            assert error <= TOLERANCE[torch.float64], layout


def run_head_shift(inputs, lengths, rates, shift, overlap):
    q, k, v, grad_out = (shard_sequence(x) for x in inputs)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = sequence_parallel_dilated_attention(
        q, k, v, lengths, rates, causal=True, head_shift=shift, overlap=overlap
    )
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no_overlap"])
@pytest.mark.parametrize("shift", [0, 3])
def test_head_shift_and_overlap_match_reference(shift, overlap):
    generator = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(generator, 1, 4 * 6, 4, 2, DIM)
    grad_out = randn(generator, *q.shape)
    lengths, rates = [6, 12, 24], [1, 2, 5]
    inputs = tuple(x.detach() for x in (q, k, v, grad_out))
    results = distributed_utils.run(run_head_shift, inputs, lengths, rates, shift, overlap)
    actual = [torch.cat(parts, dim=1) for parts in zip(*results, strict=True)]

    def reference(q, k, v):
        return dense_dilated_attention(q, k, v, lengths, rates, causal=True, head_shift=shift)

    expected = outputs_and_grads(reference, q, k, v, grad_out)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
        assert max_error(a, e) <= TOLERANCE[torch.float64], name


# What one rank passes differently: (name in the error, the arguments of rank 1).
DISAGREEMENTS = {
    "q (shape": dict(shard_len=9),
    "segment_lengths": dict(lengths=[4, 32]),
    "k (shape": dict(kv_heads=1),
    "q (shape, dtype": dict(dtype=torch.float32),
    "causal": dict(causal=False),
}


def run_disagreement(odd: dict):
    """Worker: rank 1 passes `odd`; every rank returns its error message, then all run a call
    they agree on (the group must still work: no hang, no half-finished collective)."""
    rank = torch.distributed.get_rank()
    options = dict(shard_len=8, lengths=[4, 16], kv_heads=2, dtype=torch.float64, causal=True)
    if rank == 1:
        options.update(odd)
    q = torch.ones(1, options["shard_len"], 4, DIM, dtype=options["dtype"])
    k = torch.ones(1, options["shard_len"], options["kv_heads"], DIM, dtype=options["dtype"])
    try:
        sequence_parallel_dilated_attention(
            q, k, k, options["lengths"], [1, 2], causal=options["causal"]
        )
        message = None
    except ValueError as error:
        message = str(error)
    q = torch.ones(1, 8, 4, DIM, dtype=torch.float64)
    out = sequence_parallel_dilated_attention(q, q, q, [4, 16], [1, 2], causal=True)
    return message, out.sum().item()


@pytest.mark.parametrize("name", list(DISAGREEMENTS))
def test_ranks_that_disagree_raise_on_every_rank(name):
    results = distributed_utils.run(run_disagreement, DISAGREEMENTS[name])
    for rank, (message, total) in enumerate(results):
        assert message is not None, f"rank {rank} raised nothing"
        assert "differ" in message and name in message, message
        assert total == 8 * 4 * DIM  # the agreed call afterwards: ones attend ones


def run_nan(inputs, lengths, rates):
    q, k, v = (shard_sequence(x) for x in inputs)
    return sequence_parallel_dilated_attention(q, k, v, lengths, rates, causal=True)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_nan_reaches_the_same_outputs_as_on_one_device(which):
    """A NaN planted on rank 1 reaches rank 2's queries through the exchange, and only the
    queries that read it, as on one device."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = (x.detach() for x in make_qkv(generator, 1, 4 * 8, 4, 2, DIM))
    tensors = dict(q=q, k=k, v=v)
    tensors[which][0, 9, 1, 3] = float("nan")
    lengths, rates = [4, 16, 32], [1, 2, 3]
    results = distributed_utils.run(run_nan, tuple(tensors.values()), lengths, rates)
    expected = dilated_attention(*tensors.values(), lengths, rates, causal=True).isnan()
    assert expected.any() and not expected.all()
    assert torch.equal(torch.cat(results, dim=1).isnan(), expected)


def backend_default(_):
    from longnet.distributed.sequence_parallel import default_overlap

    return default_overlap(), default_overlap(distributed_utils.consecutive_group(2))


def test_overlap_is_off_by_default_on_gloo():
    """gloo's communication thread competes with the CPU kernels: no overlap unless asked."""
    results = distributed_utils.run(backend_default, None)
    assert all(not world and not pair for world, pair in results)


def run_compiled_model(backend):
    """Worker (groups of 2 ranks): a LongNetLM's loss and parameter gradients on this rank's
    shard, eager and compiled with fullgraph; the exchange and the selected pattern's gather run
    inside the custom op."""
    group, member = sp_group(2)
    if not member:
        return None
    config = LongNetConfig(
        vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
        segment_lengths=(4, 8, 32), dilation_rates=(1, 2, 4), select_top_k=2,
        select_block_size=4, position="rotary",
    )  # fmt: skip
    torch.manual_seed(0)
    attention = functools.partial(sequence_parallel_dilated_attention, group=group)
    model = LongNetLM(config, attention_fn=attention)
    tokens = torch.randint(
        0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0)
    )
    inputs, targets = (shard_sequence(x, group) for x in (tokens[:, :-1], tokens[:, 1:]))
    offset = torch.distributed.get_rank(group) * inputs.shape[1]

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn(inputs, targets, position_offset=offset, return_logits=False).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    torch._dynamo.reset()
    compiled = loss_and_grads(torch.compile(model, fullgraph=True, backend=backend))
    return compiled, loss_and_grads(model)


def test_whole_model_compiles_with_fullgraph_under_sequence_parallelism():
    """torch.compile(fullgraph=True) of a LongNetLM whose layers run the sequence-parallel op
    (2 ranks, a pattern spanning them, the content-selected pattern): no graph break, the eager
    loss and gradients on every rank."""
    for result in distributed_utils.run(run_compiled_model, "aot_eager"):
        (compiled_loss, compiled_grads), (eager_loss, eager_grads) = result
        assert abs(compiled_loss - eager_loss) < 1e-5
        for compiled_grad, eager_grad in zip(compiled_grads, eager_grads, strict=True):
            assert max_error(compiled_grad, eager_grad) < 1e-5
