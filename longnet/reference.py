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


def dense_dilated_attention(
    q, k, v, segment_lengths, dilation_rates, *, causal=False, softmax_scale=None, head_shift=0
):
    """q (b, n, h, d), k and v (b, n, g, d) -> (b, n, h, d) in float64."""
    q, k, v = q.double(), k.double(), v.double()
    batch, seq_len, heads, dim = q.shape
    group = heads // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scale = 1.0 / math.sqrt(dim) if softmax_scale is None else softmax_scale
    counts = multiplicity(
        seq_len, heads, segment_lengths, dilation_rates, causal=causal, head_shift=head_shift
    )
    counts = counts.to(q.device)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + counts.log()
    # A query no pattern keeps has no key at all: its row is zero (and its gradient too).
    covered = (counts.sum(-1, keepdim=True) > 0).expand_as(scores)
    probs = torch.softmax(scores.masked_fill(~covered, 0.0), dim=-1) * covered
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)
