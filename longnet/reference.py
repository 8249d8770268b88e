"""The dense float64 reference of dilated attention (docs/semantics.md): slow, quadratic, exact.

It builds, per head, the multiplicity m(q, k) = number of patterns in which q and k share a
segment and are both kept (and k <= q when causal), and runs ONE softmax over the scores plus
log(m). Tests compare every fast path against it.
"""

from __future__ import annotations

import math

import torch


def multiplicity(
    seq_len: int,
    heads: int,
    segment_lengths,
    dilation_rates,
    *,
    causal: bool = False,
    position_offset: int = 0,
    head_shift: int = 0,
) -> torch.Tensor:
    """(heads, seq, seq) count of the patterns that let query position i see key position j."""
    positions = torch.arange(seq_len) + position_offset
    counts = torch.zeros(heads, seq_len, seq_len, dtype=torch.float64)
    for w, r in zip(segment_lengths, dilation_rates, strict=True):
        segment, inner = positions // w, positions % w
        same_segment = segment[:, None] == segment[None, :]
        if causal:
            same_segment &= positions[None, :] <= positions[:, None]
        for head in range(heads):
            kept = inner % r == (head + head_shift) % r
            counts[head] += same_segment & kept[:, None] & kept[None, :]
    return counts


def selected(
    q, k, block_size: int, top_k: int, window: int, best_of: int = 1, scale: float = 1.0
) -> torch.Tensor:
    """(b, h, seq, seq) 1 where the content-selected pattern lets query i see key j: j lies in one
    of the top_k complete blocks that end by the start of i's segment of `window` tokens (the
    first pattern's), ranked by q_i . mean(k of the block), or with best_of > 1 by the largest
    log-probability log_softmax(scale * q_s . mean(k of each candidate block of s)) over
    s = i - best_of + 1 .. i (s >= 0); float64 q (b, n, h, d) (the ranking queries) and k
    (b, n, h, d) (kv heads already repeated)."""
    q, k = q.detach(), k.detach()  # the choice is piecewise constant: no gradient through it
    batch, seq_len, heads, _ = q.shape
    counts = torch.zeros(batch, heads, seq_len, seq_len, dtype=torch.float64)
    for b in range(batch):
        for head in range(heads):
            means = [
                k[b, j * block_size : (j + 1) * block_size, head].mean(0)
                for j in range(seq_len // block_size)
            ]
            candidate_scores = [  # each query's scores of its candidate blocks
                [float(q[b, s, head] @ means[j]) for j in range((s - s % window) // block_size)]
                for s in range(seq_len)
            ]
            for i in range(seq_len):
                earlier = (i - i % window) // block_size  # blocks 0 .. earlier - 1
                scores = candidate_scores[i]
                if best_of > 1:
                    span = candidate_scores[max(0, i - best_of + 1) : i + 1]
                    scores = best_log_probabilities(span, scale)
                # NaN (a NaN key or query) ranks above every number, as in torch.topk.
                rank = [(not math.isnan(s), -s) for s in scores]
                best = sorted(range(earlier), key=lambda j: rank[j])[:top_k]
                for j in best:
                    counts[b, head, i, j * block_size : (j + 1) * block_size] = 1
    return counts


def best_log_probabilities(span_scores: list[list[float]], scale: float) -> list[float]:
    """For the blocks of the last query's candidates, the largest log-probability any query of
    the span gives them: span_scores holds each query's scores of its own candidate blocks
    (a prefix of the last one's), the log-probabilities log_softmax(scale * scores) over the
    non-NaN scores; a NaN score of a block makes its best NaN."""
    best = [-math.inf] * len(span_scores[-1])
    for scores in span_scores:
        scaled = [scale * s for s in scores]
        numbers = [s for s in scaled if not math.isnan(s)]
        top = max(numbers, default=-math.inf)
        lse = top + math.log(sum(math.exp(s - top) for s in numbers)) if numbers else 0.0
        for j, s in enumerate(scaled):
            best[j] = math.nan if math.isnan(s) or math.isnan(best[j]) else max(best[j], s - lse)
    return best


def dense_dilated_attention(
    q,
    k,
    v,
    segment_lengths,
    dilation_rates,
    *,
    causal=False,
    softmax_scale=None,
    head_shift=0,
    select_top_k=0,
    select_block_size=None,
    select_pooled=False,
    select_query_span=1,
    select_within_segment=False,
    select_ranking_dims=0,
    select_span_max=False,
):
    """q (b, n, h, d), k and v (b, n, g, d) -> (b, n, h, d) in float64; select_top_k > 0 adds
    the content-selected pattern (causal only) as one more pattern, select_pooled the pooled one:
    one more key per candidate block, the block's mean key with its mean value; both rank (score)
    by the mean of each query and the select_query_span - 1 queries before it, or with
    select_span_max the blocks by the best log-probability (log_softmax of the scaled scores over
    a query's candidate blocks) those queries give them and the pooled keys by each
    query alone; their candidates end by the start of the query's segment of the first pattern,
    or of its own block with select_within_segment; with select_ranking_dims D > 0 both use the
    last D dims of q and k only."""
    q, k, v = q.double(), k.double(), v.double()
    batch, seq_len, heads, dim = q.shape
    group = heads // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scale = 1.0 / math.sqrt(dim) if softmax_scale is None else softmax_scale
    counts = multiplicity(
        seq_len, heads, segment_lengths, dilation_rates, causal=causal, head_shift=head_shift
    )
    counts = counts.to(q.device)
    if select_top_k:  # the queries and keys that rank the blocks (and score the pooled keys)
        first = dim - select_ranking_dims if select_ranking_dims else 0
        mean_span = 1 if select_span_max else select_query_span
        ranking = torch.stack(
            [q[:, max(0, i - mean_span + 1) : i + 1, :, first:].mean(1) for i in range(seq_len)],
            1,
        )  # (b, n, h, D)
        ranking_keys = k[..., first:]
        window = select_block_size if select_within_segment else segment_lengths[0]
        best_of = select_query_span if select_span_max else 1
        chosen = selected(
            ranking, ranking_keys, select_block_size, select_top_k, window, best_of, scale
        )
        counts = counts + chosen.to(q.device)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + counts.log()  # counts: (h|b h, q, k)
    if select_pooled:  # the block means as m more keys and values
        m = seq_len // select_block_size
        means_k, means_v = (
            x[:, : m * select_block_size].unflatten(1, (m, select_block_size)).mean(2)
            for x in (ranking_keys, v)
        )  # (b, m, h, D), (b, m, h, d)
        positions = torch.arange(seq_len, device=q.device)
        earlier = (positions - positions % window) // select_block_size  # (n,)
        candidate = torch.arange(m, device=q.device) < earlier[:, None]  # (n, m)
        pooled = torch.einsum("bqhd,bmhd->bhqm", ranking, means_k) * scale
        scores = torch.cat([scores.expand(batch, -1, -1, -1), pooled + candidate.log()], dim=-1)
        counts = torch.cat([counts.expand(batch, -1, -1, -1), candidate.expand_as(pooled)], -1)
        v = torch.cat([v, means_v], dim=1)
    # A query no pattern keeps has no key at all: its row is zero (and its gradient too).
    covered = (counts.sum(-1, keepdim=True) > 0).expand_as(scores)
    probs = torch.softmax(scores.masked_fill(~covered, 0.0), dim=-1) * covered
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)
