"""Documents (packed, or padding) under sequence parallelism equal one process and the dense
reference on each document alone: outputs and gradients of every rank's shard, with documents
inside one shard, across several ranks and across rows, on 2, 3 and 4 gloo ranks."""

from __future__ import annotations

import functools
import random

import distributed_utils
import pytest
import torch
from conftest import TOLERANCE, make_qkv, max_error, outputs_and_grads, randn
from test_sequence_parallel import sp_group
from test_varlen import per_document

from longnet import LongNetConfig, LongNetLM, dilated_attention
from longnet.dilated import check_documents
from longnet.distributed import sequence_parallel_dilated_attention, shard_sequence
from longnet.distributed.documents import shard_of_row, split
from longnet.varlen import Documents, from_cu_seqlens

SHARD_LEN = 8
# Patterns that split over shards of 8: segments within a shard, across shards, longer than all.
PATTERNS = [
    ([4, 8], [1, 2]),
    ([8, 16, 1000], [1, 2, 4]),
    ([4, 16, 32], [1, 3, 4]),
    ([2, 4, 8, 16, 32], [1, 2, 4, 6, 12]),
]


def random_case(seed: int):
    """A random layout over P ranks: (P, shape), options (patterns, head shift, the selected
    pattern) and documents from random cuts of the flattened rows (some cross shards and rows)."""
    r = random.Random(seed)
    size, batch, kv_heads = r.choice([2, 3, 4]), r.choice([1, 2]), r.choice([1, 2])
    lengths, rates = r.choice(PATTERNS)
    options = dict(
        segment_lengths=lengths,
        dilation_rates=rates,
        causal=True,
        head_shift=r.choice([0, 1]),
        select_top_k=r.choice([0, 0, 2]),
        select_block_size=4,
    )
    if options["select_top_k"]:  # ranked by the mean of up to 5 queries, with the pooled keys
        options.update(select_pooled=True, select_query_span=r.choice([1, 5]))
        options.update(select_within_segment=r.random() < 0.5)
        options.update(select_ranking_dims=r.choice([0, 2]))
    total = batch * size * SHARD_LEN
    cu_seqlens = [0, *sorted(r.sample(range(1, total), r.randint(0, 5))), total]
    shape = (batch, size * SHARD_LEN, kv_heads * r.choice([1, 2]), kv_heads, 4)
    return size, shape, options, cu_seqlens


def run_documents(size, inputs, documents, options):
    """Worker: this rank's shard of the output and of the q, k, v gradients."""
    group, member = sp_group(size)
    if not member:
        return None
    q, k, v, grad_out = (shard_sequence(x, group) for x in inputs)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = sequence_parallel_dilated_attention(q, k, v, group=group, documents=documents, **options)
    out.backward(grad_out)
    return torch.distributed.get_rank(group), (out.detach(), q.grad, k.grad, v.grad)


def check(size, shape, options, seed, **documents_as):
    """Every rank's shards against one process (dilated_attention with the same cu_seqlens or
    attention_mask, documents_as) and against the dense reference on each document alone."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(generator, *shape)
    grad_out = randn(generator, *q.shape)
    documents = check_documents(
        shape[:2], documents_as.get("cu_seqlens"), documents_as.get("attention_mask")
    )
    inputs = tuple(x.detach() for x in (q, k, v, grad_out))
    results = distributed_utils.run(run_documents, size, inputs, documents, options)
    one = functools.partial(dilated_attention, **documents_as, **options)
    spans = list(zip(documents.starts, documents.lengths, strict=True))
    dense = functools.partial(per_document, spans=spans, **options)
    expected = [outputs_and_grads(fn, q, k, v, grad_out) for fn in (one, dense)]
    answered = 0
    for result in results:
        if result is None:
            continue
        rank, shards = result
        answered += 1
        for name, got, *wanted in zip(("out", "dq", "dk", "dv"), shards, *expected, strict=True):
            for want in wanted:
                part = want.narrow(1, rank * SHARD_LEN, SHARD_LEN)
                assert max_error(got, part) <= TOLERANCE[torch.float64], (rank, name, options)
    assert answered >= size


@pytest.mark.parametrize("seed", range(16))
def test_packed_documents_equal_one_process(seed):
    size, shape, options, cu_seqlens = random_case(seed)
    check(size, shape, options, seed, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padded_rows_equal_one_process(padding):
    """Rows of 32 tokens over 4 ranks, 3, 17 and 30 of them real: a row's document starts on
    another rank than its first token's (left padding) or ends before the last rank (right)."""
    real = torch.tensor([3, 17, 30])[:, None]
    positions = torch.arange(4 * SHARD_LEN)
    mask = positions >= 32 - real if padding == "left" else positions < real  # (3, 32)
    options = dict(segment_lengths=[8, 16, 32], dilation_rates=[1, 2, 4], causal=True)
    check(4, (3, 32, 4, 2, 4), options, seed=5, attention_mask=mask)


def test_how_documents_split_and_move():
    """split: a document inside one chunk of 8 stays on the rank holding it, in that rank's
    flattened (b, L) tokens; one across chunks moves. shard_of_row: a row's tokens per rank that
    every pattern splits over."""
    # 2 rows of 24 over 3 ranks: chunk c = g // 8 is rank c % 3's, row c // 3.
    documents = from_cu_seqlens([0, 5, 8, 20, 30, 32, 48], 2, 24)
    own, moved = split(documents, 8, 3, rank=0)
    # [30, 32) lies in chunk 3 (row 1 on rank 0), at 8 + 6; [20, 30) crosses into row 1.
    assert (own.starts, own.lengths, moved) == ((0, 5, 14), (5, 3, 2), [2, 3, 5])
    for rank in (1, 2):  # chunks 1, 2, 4, 5: parts of moved documents only
        own, _ = split(documents, 8, 3, rank)
        assert (own.starts, own.lengths) == ((), ())
    assert shard_of_row(12, 3, [4, 8]) == 4  # 8 covers two shards of 4
    assert shard_of_row(12, 2, [4, 16]) == 8  # 6 -> 8: 4 divides it, 16 is two of them
    assert shard_of_row(10, 2, [4, 6]) == 12  # 5 -> 8 (4 divides it) -> 12 (so do 4 and 6)
    assert shard_of_row(9, 4, [4, 6]) == 12  # no shard from 3 to 11 suits both 4 and 6


def run_refusals(options, documents):
    q = k = v = torch.zeros(1, SHARD_LEN, 2, 4, dtype=torch.float64)
    try:
        sequence_parallel_dilated_attention(q, k, v, documents=documents, **options)
    except ValueError as error:
        return str(error)
    return None


def test_bad_documents_are_refused_on_every_rank():
    causal = dict(segment_lengths=[8], dilation_rates=[1], causal=True)
    world = distributed_utils.WORLD_SIZE
    global_rows = from_cu_seqlens([0, 12, world * SHARD_LEN], 1, world * SHARD_LEN)
    not_causal = dict(causal, causal=False)
    assert all(
        "causal only" in m for m in distributed_utils.run(run_refusals, not_causal, global_rows)
    )
    shard_rows = Documents((0,), (SHARD_LEN,), 1, SHARD_LEN)
    messages = distributed_utils.run(run_refusals, causal, shard_rows)
    assert all("lie in the global rows" in m for m in messages), messages


MODEL = dict(
    vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
    segment_lengths=(4, 8, 32), dilation_rates=(1, 2, 4), position="rotary",
)  # fmt: skip


def model_loss_and_grads(model, tokens, targets, offset, **documents):
    """(logits, loss sum, parameter gradients) of this slice of the rows."""
    model.zero_grad()
    out = model(tokens, targets, position_offset=offset, **documents)
    out.loss_sum.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return out.logits.detach(), out.loss_sum.detach(), grads


def run_model(size, tokens, documents):
    """Worker: a LongNetLM on this rank's shard of the rows, the documents of the global rows."""
    group, member = sp_group(size)
    if not member:
        return None
    torch.manual_seed(0)
    attention = functools.partial(sequence_parallel_dilated_attention, group=group)
    model = LongNetLM(LongNetConfig(**MODEL), attention_fn=attention).double()
    inputs, targets = (shard_sequence(x, group) for x in (tokens[:, :-1], tokens[:, 1:]))
    offset = torch.distributed.get_rank(group) * inputs.shape[1]
    return torch.distributed.get_rank(group), model_loss_and_grads(
        model, inputs, targets, offset, **documents
    )


@pytest.mark.parametrize("documents", ["cu_seqlens", "attention_mask"])
def test_model_on_shards_equals_one_process(documents):
    """LongNetLM under 4 ranks with the global rows' documents (packed documents crossing ranks
    and rows; left padding, whose labels are ignored): each rank's logits are its part of one
    process's, the loss sums and the parameter gradients add up to one process's."""
    tokens = torch.randint(0, 40, (2, 33), generator=torch.Generator().manual_seed(1))
    given = {
        "cu_seqlens": [0, 5, 13, 30, 41, 64],
        "attention_mask": torch.arange(32) >= torch.tensor([[3], [20]]),
    }[documents]
    results = distributed_utils.run(run_model, 4, tokens, {documents: given})
    torch.manual_seed(0)
    one = LongNetLM(LongNetConfig(**MODEL)).double()
    logits, loss_sum, grads = model_loss_and_grads(
        one, tokens[:, :-1], tokens[:, 1:], 0, **{documents: given}
    )
    shards = dict(r for r in results if r is not None)
    assert sorted(shards) == [0, 1, 2, 3]
    for rank, (part, _, _) in shards.items():
        assert max_error(part, logits[:, 8 * rank : 8 * rank + 8]) <= 1e-10, rank
    assert abs(sum(s[1] for s in shards.values()) - loss_sum) <= 1e-9
    for i, grad in enumerate(grads):
        assert max_error(sum(s[2][i] for s in shards.values()), grad) <= 1e-9, i
