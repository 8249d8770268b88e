"""The content-selected pattern (longnet/selection.py), with and without the pooled pattern
beside it: exact against the float64 reference (longnet.reference.selected, an independent loop
over queries and blocks) on one device in both of its forms, under sequence parallelism on real
gloo ranks, in cached decoding, and refused where it is not defined."""

from __future__ import annotations

import functools

import distributed_utils
import pytest
import torch
from conftest import TOLERANCE, make_qkv, max_error, outputs_and_grads, randn

from longnet import DilatedAttention, LongNetConfig, LongNetLM, dilated_attention, selection
from longnet.cost import pairs_per_token
from longnet.distributed import sequence_parallel_dilated_attention, shard_sequence
from longnet.generation import KVCache
from longnet.reference import dense_dilated_attention, multiplicity, selected

# (batch, seq, heads, kv_heads, dim, segment_lengths, dilation_rates, top_k, block_size)
CASES = {
    "local_plus_choice": (2, 64, 4, 4, 8, [16], [1], 2, 8),
    "paper_patterns": (1, 64, 4, 2, 8, [8, 16, 32], [1, 2, 4], 3, 8),
    "odd_length_and_block": (2, 53, 2, 1, 4, [8], [1], 3, 5),
    "top_k_above_blocks": (1, 40, 3, 3, 6, [8], [4], 10, 7),
    "shorter_than_a_block": (1, 9, 2, 2, 4, [4], [1], 2, 16),
    "dilated_first_pattern": (1, 48, 4, 4, 8, [12, 48], [3, 6], 1, 4),
    "window_not_a_multiple_of_the_block": (1, 50, 2, 2, 4, [10], [1], 2, 4),
}


# (select_pooled, select_query_span, select_within_segment, select_ranking_dims,
# select_span_max) of each variant
VARIANTS = {"chosen": (False, 1, False, 0, False), "pooled": (True, 1, False, 0, False),
            "chosen_span3": (False, 3, False, 0, False),
            "pooled_span4": (True, 4, False, 0, False),
            "chosen_near": (False, 1, True, 0, False),
            "pooled_span4_near": (True, 4, True, 0, False),
            "chosen_ranking_dims": (False, 1, False, 2, False),
            "pooled_span3_ranking_dims": (True, 3, False, 2, False),
            "chosen_span3_max": (False, 3, False, 0, True),
            "pooled_span5_ranking_dims_max": (True, 5, False, 2, True),
            # a span longer than the queries before the first that chooses
            "pooled_span13_near_max": (True, 13, True, 0, True)}  # fmt: skip


def run(
    case, form, dtype=torch.float64, pooled=False, span=1, near=False, ranking_dims=0,
    span_max=False,
):  # fmt: skip
    batch, n, heads, kv_heads, dim, lengths, rates, top_k, block = CASES[case]
    generator = torch.Generator().manual_seed(len(case))
    q, k, v = make_qkv(generator, batch, n, heads, kv_heads, dim, dtype=dtype)
    grad_out = randn(generator, *q.shape, dtype=dtype)
    choice = dict(select_top_k=top_k, select_block_size=block, select_pooled=pooled,
                  select_query_span=span, select_within_segment=near,
                  select_ranking_dims=ranking_dims, select_span_max=span_max)  # fmt: skip
    fn = functools.partial(
        dilated_attention, segment_lengths=lengths, dilation_rates=rates, causal=True, **choice
    )
    reference = functools.partial(
        dense_dilated_attention, segment_lengths=lengths, dilation_rates=rates, causal=True,
        **choice,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(selection, "masks", lambda *args: form == "masked")
        actual = outputs_and_grads(fn, q, k, v, grad_out)
    return actual, outputs_and_grads(reference, q, k, v, grad_out)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("form", ["masked", "gathered"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, form, variant):
    actual, expected = run(case, form, *(torch.float64, *VARIANTS[variant]))
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
        assert max_error(a, e) <= TOLERANCE[torch.float64], name


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("form", ["masked", "gathered"])
def test_float32_on_the_fused_kernel(form, variant):
    actual, expected = run("paper_patterns", form, torch.float32, *VARIANTS[variant])
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
        assert max_error(a, e) <= TOLERANCE[torch.float32], name


def test_the_choice_and_the_means_change_the_output():
    """Not no-ops: the chosen blocks change what the local pattern alone gives, and the pooled
    pattern changes what the chosen blocks give, gradients of the keys included."""
    (chosen, _, chosen_dk, _), _ = run("local_plus_choice", "masked")
    (pooled, _, pooled_dk, _), _ = run("local_plus_choice", "masked", pooled=True)
    batch, n, heads, kv_heads, dim, lengths, rates, *_ = CASES["local_plus_choice"]
    q, k, v = make_qkv(
        torch.Generator().manual_seed(len("local_plus_choice")), batch, n, heads, kv_heads, dim
    )
    local = dilated_attention(q, k, v, lengths, rates, causal=True)
    assert max_error(chosen, local.detach()) > 1e-3
    assert max_error(pooled, chosen) > 1e-3 and max_error(pooled_dk, chosen_dk) > 1e-3


def test_the_pooled_pattern_trains_the_scores_of_unchosen_blocks():
    """The point of the pooled pattern: a block the top-k choice leaves out still passes a
    gradient to its keys (through its mean), so the score that ranks it can rise."""
    q = torch.zeros(1, 12, 1, 2, dtype=torch.float64)
    k = torch.zeros(1, 12, 1, 2, dtype=torch.float64, requires_grad=True)
    v = torch.arange(24, dtype=torch.float64).view(1, 12, 1, 2)
    q[0, 11, 0] = torch.tensor([1.0, 0.0])
    with torch.no_grad():
        k[0, 4:8, 0] = torch.tensor([5.0, 0.0])  # block 1 of 4 tokens: the one chosen
    for pooled, expected in ((False, False), (True, True)):
        k.grad = None
        out = dilated_attention(
            q, k, v, [8], [1], causal=True, select_top_k=1, select_block_size=4,
            select_pooled=pooled,
        )  # fmt: skip
        out[0, 11].sum().backward()
        assert bool(k.grad[0, 0:4].abs().sum() > 0) == expected  # block 0: never chosen


def test_reference_choice_is_by_content():
    """A key block equal to the query's direction is chosen over the others."""
    q = torch.zeros(1, 12, 1, 2, dtype=torch.float64)
    k = torch.zeros(1, 12, 1, 2, dtype=torch.float64)
    q[0, 11, 0] = torch.tensor([1.0, 0.0])
    k[0, 4:8, 0] = torch.tensor([5.0, 0.0])  # block 1 of 4 tokens
    means = selection.block_means(k, 4)
    chosen = selection.select_blocks(q[:, 11:], means, torch.tensor([11]), 4, 1, 8)
    assert chosen[0].flatten().tolist() == [1]
    assert selected(q, k, 4, 1, 8)[0, 0, 11].nonzero().flatten().tolist() == [4, 5, 6, 7]


def test_near_blocks_are_candidates_with_select_within_segment():
    """A query's own segment of the first pattern holds candidates only within_segment: there
    the key block that matches it is chosen (and read twice, locally and as a choice)."""
    q = torch.zeros(1, 16, 1, 2, dtype=torch.float64)
    k = torch.zeros(1, 16, 1, 2, dtype=torch.float64)
    v = torch.arange(32, dtype=torch.float64).view(1, 16, 1, 2)
    q[0, 13, 0] = torch.tensor([1.0, 0.0])
    k[0, 4:8, 0] = torch.tensor([5.0, 0.0])  # block 1 of 4 tokens, in the segment [0, 16)
    local = dilated_attention(q, k, v, [16], [1], causal=True)
    choice = dict(causal=True, select_top_k=1, select_block_size=4)
    far = dilated_attention(q, k, v, [16], [1], **choice)
    near = dilated_attention(q, k, v, [16], [1], select_within_segment=True, **choice)
    assert torch.allclose(far, local)  # no complete block before the segment
    assert torch.allclose(near[0, :4], local[0, :4])  # no complete block before their own
    assert (near[0, 13] - local[0, 13]).abs().max() > 1e-3
    assert selected(q, k, 4, 1, 4)[0, 0, 13].nonzero().flatten().tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(select_top_k=-1), "select_top_k must be an int >= 0, got -1"),
        (dict(select_top_k=2, select_block_size=0), "select_block_size must be an int >= 1, got 0"),
        (dict(select_top_k=True), "select_top_k must be an int >= 0, got True"),
        (dict(select_top_k=2, causal=False), "needs causal=True"),
        (dict(select_pooled=True), "select_pooled=True .* got select_top_k=0"),
        (dict(select_top_k=2, select_pooled=1), "select_pooled must be True or False, got 1"),
        (dict(select_top_k=2, select_query_span=0), "select_query_span must be an int >= 1, got 0"),
        (dict(select_top_k=2, select_query_span=2.0), "select_query_span must be an int >= 1"),
        (dict(select_query_span=4), "select_query_span=4 .* needs select_top_k > 0"),
        (dict(select_within_segment=True), "select_within_segment=True .* got select_top_k=0"),
        (dict(select_top_k=2, select_within_segment="yes"), "select_within_segment must be True"),
        (dict(select_top_k=2, select_ranking_dims=-1), "select_ranking_dims must be an int >= 0"),
        (dict(select_top_k=2, select_span_max=True), "select_span_max=True .* select_query_span=1"),
        (
            dict(select_top_k=2, select_query_span=3, select_span_max=1),
            "select_span_max must be True or False, got 1",
        ),
        (dict(select_ranking_dims=2), "select_ranking_dims=2 .* got select_top_k=0"),
        (
            dict(select_top_k=2, select_ranking_dims=5),
            "select_ranking_dims=5 exceeds the head dim 4",
        ),
    ],
)
def test_bad_arguments(arguments, message):
    q = torch.zeros(1, 8, 2, 4)
    arguments = {"causal": True} | arguments
    with pytest.raises(ValueError, match=message):
        dilated_attention(q, q, q, [4], [1], **arguments)


def test_config_refuses_xpos():
    with pytest.raises(ValueError, match="xpos"):
        LongNetConfig.preset("longnet-tiny", position="xpos", select_top_k=2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(position="alibi"), "select_ranking_dims=8 needs position='rotary' or 'none'"),
        (
            dict(select_ranking_dims=7),
            "leaves 25 of the 32 head dims to rotate: rotary needs an even",
        ),
        (dict(select_ranking_dims=32), "leaves none of the 32 head dims to rotate"),
        (dict(select_ranking_dims=33), "select_ranking_dims=33 exceeds the head dim 32"),
        (dict(select_top_k=0), "select_ranking_dims=8 .* needs select_top_k > 0"),
    ],
)
def test_config_refuses_ranking_dims_it_cannot_leave_unencoded(overrides, message):
    with pytest.raises(ValueError, match=message):
        LongNetConfig.preset(
            "longnet-tiny", **({"position": "rotary", "select_top_k": 2, "select_ranking_dims": 8}
                               | overrides),
        )  # fmt: skip
    with pytest.raises(ValueError, match="exceeds the head dim 32"):
        DilatedAttention(128, 4, 1, 16, causal=True, select_top_k=2, select_ranking_dims=33)


def test_ranking_dims_choose_by_those_dims_alone():
    """With select_ranking_dims D the choice ignores the other dims, where a bias toward block 0
    (as a position's slow rotary components would give) decides it when all dims rank."""
    generator = torch.Generator().manual_seed(5)
    n, block, dim, ranking_dims = 64, 8, 8, 4
    q, k = randn(generator, 1, n, 1, dim), randn(generator, 1, n, 1, dim)
    q[..., :4], k[..., :4] = 3.0, 0.0
    k[:, :block, :, :4] = 3.0  # block 0's keys align with every query in the first dims
    v = torch.eye(n // block, dtype=q.dtype).repeat_interleave(block, 0)[
        None, :, None
    ]  # (1, n, 1, m)
    for dims in (0, ranking_dims):
        out, _ = selection.forward(
            q, k, v, block, 1, block, scale=1.0, ranking_dims=dims
        )  # out[..., j]: the weight on block j, 1 on the one block chosen
        chosen = out[0, block:, 0].argmax(-1)  # queries from the second block on choose
        part = selection.ranking_part
        means = part(k, dims)[0, :, 0].unflatten(0, (-1, block)).mean(1)  # (m, D)
        scores = part(q, dims)[0, block:, 0] @ means.T  # (n - block, m)
        earlier = torch.arange(n // block) < (torch.arange(block, n) // block)[:, None]
        expected = scores.masked_fill(~earlier, -torch.inf).argmax(-1)
        assert torch.equal(chosen, expected)
        assert (chosen == 0).all() == (dims == 0)


def test_config_refuses_the_pooled_pattern_without_a_choice():
    with pytest.raises(ValueError, match="select_pooled=True .* got select_top_k=0"):
        LongNetConfig.preset("longnet-tiny", select_pooled=True)


def tiny_model(**overrides):
    torch.manual_seed(0)
    config = LongNetConfig.preset(
        "longnet-tiny", position="rotary", segment_lengths=(16, 32), dilation_rates=(1, 2),
        select_top_k=2, select_block_size=8, **overrides,
    )  # fmt: skip
    return LongNetLM(config).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_equals_recompute(variant):
    pooled, span, near, ranking_dims, span_max = VARIANTS[variant]
    model = tiny_model(
        select_pooled=pooled, select_query_span=span, select_within_segment=near,
        select_ranking_dims=ranking_dims, select_span_max=span_max,
    )  # fmt: skip
    prompt = torch.randint(0, 264, (2, 30), generator=torch.Generator().manual_seed(0))
    cached = model.generate(prompt, 50, top_k=1)
    assert torch.equal(cached, model.generate(prompt, 50, top_k=1, use_cache=False))


@pytest.mark.parametrize("span_max", [False, True])
def test_cached_decoding_of_left_padded_prompts_with_a_query_span(span_max):
    """Each row's ranking queries average (or rank by their best) its own queries only, never
    its padding's: a batch of left-padded prompts decodes as each prompt alone."""
    model = tiny_model(
        select_pooled=True, select_query_span=6, select_within_segment=True,
        select_span_max=span_max,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 264, (n,), generator=generator) for n in (30, 21, 3)]
    batch = torch.zeros(3, 30, dtype=torch.long)  # the last row holds fewer than 5 queries
    mask = torch.zeros(3, 30, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        batch[row, 30 - len(prompt) :], mask[row, 30 - len(prompt) :] = prompt, True
    together = model.generate(batch, 40, top_k=1, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], 40, top_k=1)
        assert torch.equal(together[row, 30 - len(prompt) :], alone[0])


def test_a_query_span_needs_every_query_before_it():
    """Too few (or too many) earlier queries would shift every mean: refused, not averaged."""
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="span of 4 at offset 10 needs the 3 queries before it"):
        selection.ranking_queries(q, 4, q[:, :1], query_offset=10)
    means = selection.ranking_queries(torch.ones(1, 4, 2, 8), 4, q[:, :2], query_offset=2)
    assert torch.equal(means[0, :, 0, 0], torch.tensor([1 / 3, 2 / 4, 3 / 4, 1.0]))


def test_decoding_keeps_only_the_last_queries():
    """keep_queries holds copies of the last span - 1 queries, not views of the prompt's."""
    model = tiny_model(select_query_span=3)
    cache = KVCache(len(model.blocks), 64)
    model.hidden_states(torch.zeros(1, 40, dtype=torch.long), cache=cache)
    for layer in cache.layers:
        assert layer.queries.shape[1] == 2
        assert layer.queries.untyped_storage().nbytes() == layer.queries.nbytes


def test_the_query_span_changes_the_choice_and_trains_earlier_queries():
    """Not a no-op: ranking by the mean of 4 queries changes the output, and through the
    pooled pattern a query's gradient reaches the outputs of the 3 queries after it."""
    (one, *_), _ = run("local_plus_choice", "masked", pooled=True)
    (four, *_), _ = run("local_plus_choice", "masked", pooled=True, span=4)
    assert max_error(four, one) > 1e-3
    batch, n, heads, kv_heads, dim, lengths, rates, top_k, block = CASES["local_plus_choice"]
    q, k, v = make_qkv(torch.Generator().manual_seed(3), batch, n, heads, kv_heads, dim)
    for span, reached in ((1, False), (4, True)):
        q.grad = None
        out = dilated_attention(
            q, k, v, lengths, rates, causal=True, select_top_k=top_k, select_block_size=block,
            select_pooled=True, select_query_span=span,
        )  # fmt: skip
        out[:, 40].sum().backward()  # query 40 scores the pooled keys with queries 37 .. 40
        assert bool(q.grad[:, 37:40].abs().sum() > 0) == reached
        assert not q.grad[:, :37].any() and not q.grad[:, 41:].any()


def test_span_max_keeps_the_block_an_earlier_query_found():
    """With select_span_max a query reads the block that one of the span - 1 queries before it
    gives the highest probability, though its own query (and the mean of the span) ranks
    another first; the choice passes no gradient to those earlier queries."""
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None, :, None]  # (1, m=2, g=1, d=2)
    q = torch.tensor([[1.5, 0.0], [0.0, 1.0], [0.0, 1.0]])[None, :, None]  # (1, 3, 1, 2)
    positions = torch.tensor([8, 9, 10])  # queries 8 .. 10, both blocks of 4 before them
    mean_first = selection.select_blocks(q.mean(1, keepdim=True), means, positions[2:], 4, 1, 8)
    best_first = selection.select_blocks(q, means, positions[2:], 4, 1, 8, best_of=3)
    own_first = selection.select_blocks(q[:, 2:], means, positions[2:], 4, 1, 8, best_of=1)
    assert mean_first[0].item() == 1 and best_first[0].item() == 0 and own_first[0].item() == 1
    short = selection.select_blocks(q[:, 1:], means, positions[2:], 4, 1, 8, best_of=2)
    assert short[0].item() == 1  # query 8 is out of a span of 2
    batch, n, heads, kv_heads, dim, lengths, rates, top_k, block = CASES["local_plus_choice"]
    q, k, v = make_qkv(torch.Generator().manual_seed(3), batch, n, heads, kv_heads, dim)
    out = dilated_attention(
        q, k, v, lengths, rates, causal=True, select_top_k=top_k, select_block_size=block,
        select_pooled=True, select_query_span=4, select_span_max=True,
    )  # fmt: skip
    out[:, 40].sum().backward()
    assert q.grad[:, 37:40].abs().sum() == 0 and q.grad[:, 40].abs().sum() > 0


def test_span_max_pads_before_the_first_query_with_minus_infinity():
    """Near position 0 a span holds fewer queries, and queries before the first that chooses
    give no block a probability: they rank nothing (-inf). A zero there would tie every block
    at the best log-probability, 0."""
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)[None, :, None]
    q = torch.tensor([[-3.0, -1.0]] * 3, dtype=torch.float64)[None, :, None]  # (1, 3, 1, 2)
    # window 2: query 2 chooses from blocks 0 and 1, queries 0 and 1 from none
    index, _ = selection.select_blocks(q, means, torch.tensor([2]), 1, 1, 2, best_of=4)
    assert index.item() == 1
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], dtype=torch.float64)[None, :, None]
    assert selected(q, keys, 1, 1, 2, best_of=4)[0, 0, 2].tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("form", ["masked", "gathered"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_nan_reaches_exactly_the_queries_that_read_it(which, form):
    """Through the chosen blocks too: a NaN key or value reaches the queries of its kv head that
    chose its block (a NaN key's block scores NaN, which ranks first), and no other; a NaN
    query reaches its own output."""
    batch, n, heads, kv_heads, dim, lengths, rates, top_k, block = CASES["paper_patterns"]
    generator = torch.Generator().manual_seed(3)
    through_choice = 0  # readers that no dilated pattern gives
    for position in (2, 21, 35, 50, 63):
        q, k, v = (x.detach() for x in make_qkv(generator, batch, n, heads, kv_heads, dim))
        tensors = dict(q=q, k=k, v=v)
        tensors[which][0, position, 1, 2] = float("nan")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(selection, "masks", lambda *args: form == "masked")
            out = dilated_attention(
                q, k, v, lengths, rates, causal=True, select_top_k=top_k, select_block_size=block
            )
        dilated = multiplicity(n, heads, lengths, rates, causal=True)  # (h, n, n)
        group = heads // kv_heads
        chosen = selected(q, k.repeat_interleave(group, dim=2), block, top_k, lengths[0])[0]
        readers = torch.zeros(n, heads, dtype=torch.bool)
        if which == "q":
            readers[position, 1] = True
        else:
            for head in range(group * 1, group * 2):  # the query heads of kv head 1
                by_pattern, by_choice = dilated[head, :, position], chosen[head, :, position]
                readers[:, head] = by_pattern + by_choice > 0
                through_choice += int(((by_choice > 0) & (by_pattern == 0)).sum())
        assert torch.equal(out[0].isnan().any(-1), readers), position
    assert through_choice > 0 or which == "q"


@pytest.mark.parametrize("which", ["k", "v"])
def test_nan_through_the_means_reaches_every_query_that_may_choose_its_block(which):
    """Every query of the kv head whose candidates include the NaN's block reads its mean, so
    with the pooled pattern those queries are NaN too, and no other beyond the patterns' own."""
    batch, n, heads, kv_heads, dim, lengths, rates, top_k, block = CASES["paper_patterns"]
    generator = torch.Generator().manual_seed(4)
    position = 21  # block 2 of 8 tokens; queries from 32 on (the next segment of 8) read it
    q, k, v = (x.detach() for x in make_qkv(generator, batch, n, heads, kv_heads, dim))
    tensors = dict(q=q, k=k, v=v)
    tensors[which][0, position, 1, 2] = float("nan")
    out = dilated_attention(
        q, k, v, lengths, rates, causal=True, select_top_k=top_k, select_block_size=block,
        select_pooled=True,
    )  # fmt: skip
    dilated = multiplicity(n, heads, lengths, rates, causal=True)  # (h, n, n)
    group = heads // kv_heads
    chosen = selected(q, k.repeat_interleave(group, dim=2), block, top_k, lengths[0])[0]
    readers = torch.zeros(n, heads, dtype=torch.bool)
    queries = torch.arange(n)
    by_means = selection.candidates(queries, lengths[0], block) > position // block  # (n,)
    for head in range(group * 1, group * 2):  # the query heads of kv head 1
        by_pattern, by_choice = dilated[head, :, position], chosen[head, :, position]
        readers[:, head] = (by_pattern + by_choice > 0) | by_means
    assert by_means.any() and not readers.all()
    assert torch.equal(out[0].isnan().any(-1), readers)


def test_positions_are_not_wrapped():
    """Keys at any distance interact: the period that bounds positions for the dilated
    patterns must not fold distances beyond it."""
    assert tiny_model().config.position_period is None


def run_sequence_parallel(
    size, inputs, lengths, rates, top_k, block, pooled, span, near, dims, span_max
):  # fmt: skip
    group = (
        None if size == distributed_utils.WORLD_SIZE else distributed_utils.consecutive_group(size)
    )
    if size != distributed_utils.WORLD_SIZE and group is None:
        return None
    q, k, v, grad_out = (shard_sequence(x, group) for x in inputs)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = sequence_parallel_dilated_attention(
        q, k, v, lengths, rates, group=group, causal=True, select_top_k=top_k,
        select_block_size=block, select_pooled=pooled, select_query_span=span,
        select_within_segment=near, select_ranking_dims=dims, select_span_max=span_max,
    )  # fmt: skip
    out.backward(grad_out)
    return torch.distributed.get_rank(group), (out.detach(), q.grad, k.grad, v.grad)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize(
    "lengths, rates, top_k, block, pooled, span, near, dims, span_max",
    [
        ([8], [1], 2, 4, False, 1, False, 0, False),
        ([8, 16, 32], [1, 2, 4], 3, 8, False, 1, False, 0, False),
        ([32], [4], 1, 8, False, 1, False, 0, False),
        ([8, 16, 32], [1, 2, 4], 2, 4, True, 1, False, 0, False),
        ([8, 16, 32], [1, 2, 4], 2, 4, True, 6, False, 0, False),
        ([8], [1], 2, 4, True, 13, False, 0, False),
        ([32], [4], 2, 4, True, 3, True, 0, False),
        ([8, 16], [1, 2], 2, 4, True, 6, False, 3, False),
        ([8, 16], [1, 2], 2, 4, True, 11, False, 3, True),
    ],
    ids=[
        "local", "spanning_patterns", "blocks_across_ranks", "pooled", "pooled_span",
        "span_longer_than_a_shard",  # 12 queries before: two shards of 8 at size 4
        "near_blocks",  # the blocks of a segment that spans ranks
        "ranking_dims",  # the queries before a shard's and their gradients, in 3 of 8 dims
        "span_max",  # the best of 11 queries, those before a shard's from two ranks
    ],
)  # fmt: skip
def test_sequence_parallel_equals_one_device(
    size, lengths, rates, top_k, block, pooled, span, near, dims, span_max
):
    generator = torch.Generator().manual_seed(size)
    q, k, v = make_qkv(generator, 2, 32, 4, 2, 8)
    grad_out = randn(generator, *q.shape)
    inputs = tuple(x.detach() for x in (q, k, v, grad_out))
    results = distributed_utils.run(
        run_sequence_parallel, size, inputs, lengths, rates, top_k, block, pooled, span, near, dims,
        span_max,
    )  # fmt: skip
    fn = functools.partial(
        dilated_attention, segment_lengths=lengths, dilation_rates=rates, causal=True,
        select_top_k=top_k, select_block_size=block, select_pooled=pooled, select_query_span=span,
        select_within_segment=near, select_ranking_dims=dims, select_span_max=span_max,
    )  # fmt: skip
    expected = outputs_and_grads(fn, q, k, v, grad_out)
    members = [r for r in results if r is not None]  # groups of consecutive workers
    for first in range(0, len(members), size):
        shards = members[first : first + size]
        assert [rank for rank, _ in shards] == list(range(size))
        actual = [torch.cat(parts, dim=1) for parts in zip(*(s[1] for s in shards), strict=True)]
        for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
            assert max_error(a, e) <= TOLERANCE[torch.float64], name


def run_nan(inputs, top_k, block):
    q, k, v = (shard_sequence(x) for x in inputs)
    return sequence_parallel_dilated_attention(
        q, k, v, [8], [1], causal=True, select_top_k=top_k, select_block_size=block
    )


@pytest.mark.parametrize("which", ["k", "v"])
def test_nan_under_sequence_parallelism_reaches_the_same_outputs(which):
    """A NaN on rank 1 reaches later ranks' queries through the chosen blocks only (the local
    pattern of 8 tokens never crosses a rank), and the same outputs as on one device."""
    generator = torch.Generator().manual_seed(7)
    q, k, v = (x.detach() for x in make_qkv(generator, 1, 4 * 8, 4, 2, 8))
    tensors = dict(q=q, k=k, v=v)
    tensors[which][0, 9, 1, 3] = float("nan")
    results = distributed_utils.run(run_nan, tuple(tensors.values()), 2, 4)
    expected = dilated_attention(
        *tensors.values(), [8], [1], causal=True, select_top_k=2, select_block_size=4
    ).isnan()
    assert expected[:, 16:].any() and not expected.all()
    assert torch.equal(torch.cat(results, dim=1).isnan(), expected)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "n, lengths, rates, shift", [(37, [8, 16, 64], [1, 3, 4], 0), (64, [16, 32], [2, 8], 1)]
)
def test_pairs_count_what_the_reference_lets_through(n, lengths, rates, shift, causal):
    """Dilated pairs: the sum of the reference's multiplicities (each pattern computes its own)."""
    heads = 4
    counts = multiplicity(n, heads, lengths, rates, causal=causal, head_shift=shift)
    expected = counts.sum().item() / (heads * n)
    assert pairs_per_token(n, heads, lengths, rates, causal=causal, head_shift=shift) == expected


@pytest.mark.parametrize("near", [False, True])
def test_selected_pairs_and_the_issue_figures(near):
    n, heads, top_k, block, first = 45, 2, 3, 4, 6
    window = block if near else first  # where the candidates end
    q = torch.randn(1, n, heads, 4, dtype=torch.float64)
    attended = selected(q, q, block, top_k, window).sum().item()
    scored = heads * sum(p // window * window // block for p in range(n))
    total = pairs_per_token(
        n, heads, [first], [6], select_top_k=top_k, select_block_size=block,
        select_within_segment=near,
    )  # fmt: skip
    local = pairs_per_token(n, heads, [first], [6])
    assert total == local + (attended + scored) / (heads * n)
    assert pairs_per_token(8192, 4, [8192], [1]) == 4096.5  # dense causal
    paper = pairs_per_token(8192, 4, [256, 512, 1024, 2048, 4096, 8192], [1, 2, 4, 8, 16, 32])
    assert 250 < paper < 255
