"""Cached decoding runs through the planner (longnet.plan.decode_plan) and the executor
(longnet.engine): each decoded step equals the last row of the float64 reference, and a NaN in the
cache reaches a decoded query exactly when the query reads it."""

import math

import pytest
import torch
from conftest import TOLERANCE, max_error, randn

from longnet.generation import LayerCache, decode_attention
from longnet.plan import decode_plan
from longnet.reference import dense_dilated_attention, multiplicity, selected

# (segment_lengths, dilation_rates, heads, kv_heads, head_shift, value dim < head dim,
#  select_top_k, select_block_size)
CASES = {
    "nested_gqa": ((4, 8, 16), (1, 2, 4), 4, 2, 0, False, 0, 0),
    "rates_not_dividing": ((5, 7), (3, 2), 2, 2, 1, False, 0, 0),  # windows wrap in the ring
    "heads_below_rate_mqa": ((6,), (4,), 2, 1, 3, False, 0, 0),  # offsets no head keeps
    "rate_above_length": ((8, 3), (1, 5), 3, 3, 0, True, 0, 0),
    "narrow_values": ((4, 12), (2, 3), 6, 3, 2, True, 0, 0),
    "selected": ((4, 8), (1, 2), 4, 2, 1, False, 2, 3),
    "selected_narrow": ((6, 12), (2, 4), 2, 1, 0, True, 1, 2),
}


def decode_all(q, k, v, lengths, rates, prompt, capacity, **options):
    """(b, n - prompt, h, dv): the prompt's k, v cached, then every later position decoded."""
    cache, steps = LayerCache(capacity), []
    cache.append(k[:, :prompt], v[:, :prompt])
    patterns = tuple(zip(lengths, rates, strict=True))
    for t in range(prompt, q.shape[1]):
        cache.append(k[:, t : t + 1], v[:, t : t + 1])
        steps.append(decode_attention(q[:, t : t + 1], cache, patterns, **options))
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_each_decoded_step_is_the_last_row_of_the_reference(case, dtype):
    """Every position from 1 on (so every segment boundary of every pattern) over three periods
    of the longest segment: the cache holds max(w) positions (all of them with selection)."""
    lengths, rates, heads, kv_heads, shift, narrow, top_k, block = CASES[case]
    generator = torch.Generator().manual_seed(0)
    n, dim = 3 * max(lengths) + 2, 8
    q = randn(generator, 2, n, heads, dim, dtype=dtype)
    k = randn(generator, 2, n, kv_heads, dim, dtype=dtype)
    v = randn(generator, 2, n, kv_heads, dim - 3 if narrow else dim, dtype=dtype)
    selection = dict(select_top_k=top_k, select_block_size=block) if top_k else {}
    scale = 0.7
    capacity = n if top_k else max(lengths)
    out = decode_all(
        q, k, v, lengths, rates, 1, capacity, softmax_scale=scale, head_shift=shift, **selection
    )
    padded = torch.nn.functional.pad(v, (0, dim - v.shape[-1]))  # the reference takes one width
    expected = dense_dilated_attention(
        q, k, padded, lengths, rates, causal=True, softmax_scale=scale, head_shift=shift,
        **selection,
    )[:, 1:, :, : v.shape[-1]]  # fmt: skip
    assert out.dtype == dtype and out.shape == expected.shape
    assert max_error(out, expected) <= TOLERANCE[dtype]


# A NaN key under the selected pattern changes the choice (its block ranks first): that case is
# tests/test_selection.py's.
@pytest.mark.parametrize(
    "case, which", [(case, x) for case in ("nested_gqa", "rates_not_dividing") for x in "kv"]
    + [("selected", "v")],
)  # fmt: skip
def test_a_nan_in_the_cache_reaches_exactly_the_queries_that_read_it(case, which):
    """docs/semantics.md, "NaN stays where it belongs": a NaN key or value at (s, kv head c)
    reaches the decoded (t, j) for the heads j of c with m_j(t, s) > 0 (or, with the selected
    pattern, that chose s's block), and no other decoded output."""
    lengths, rates, heads, kv_heads, shift, _, top_k, block = CASES[case]
    generator = torch.Generator().manual_seed(1)
    n, dim, group = 3 * max(lengths) + 2, 8, heads // kv_heads
    selection = dict(select_top_k=top_k, select_block_size=block) if top_k else {}
    counts = multiplicity(n, heads, lengths, rates, causal=True, head_shift=shift)  # (h, n, n)
    for s in range(0, n, 3):
        q, k, v = (randn(generator, 1, n, x, dim) for x in (heads, kv_heads, kv_heads))
        chosen = 0
        if top_k:  # a NaN value leaves the choice as it is; chosen (h, n, n)
            chosen = selected(q, k.repeat_interleave(group, dim=2), block, top_k, lengths[0])[0]
        dict(k=k, v=v)[which][0, s, 1] = math.nan
        capacity = n if top_k else max(lengths)
        out = decode_all(
            q, k, v, lengths, rates, 1, capacity, softmax_scale=0.5, head_shift=shift, **selection
        )
        readers = torch.zeros(n, heads, dtype=torch.bool)
        heads_of_c = slice(group, 2 * group)  # the query heads that read kv head 1
        readers[:, heads_of_c] = ((counts + chosen)[heads_of_c, :, s] > 0).T
        assert torch.equal(out[0].isnan().any(-1), readers[1:]), s


def test_decode_plans_repeat_with_the_period_of_the_segment_lengths():
    """The plan of position t holds positions relative to its window, so t and t + lcm(w) share
    one cached plan; the window moves by lcm(w)."""
    patterns = ((4, 1), (6, 2))
    for t in range(30):
        first, plan = decode_plan(t, 4, 2, patterns)
        later, same = decode_plan(t + 12, 4, 2, patterns)
        assert same is plan and later == first + 12
        assert first == min(t // w * w for w, _ in patterns)
