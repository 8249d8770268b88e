"""The attention cost of a configuration: computed (query, key) pairs per token.

What a kernel that skips everything the semantics exclude computes (docs/semantics.md): for a
dilated pattern (w, r), each head's kept queries against the kept keys of their segment (the
causal half with `causal`); for the content-selected pattern, each query's score against every
candidate block (one pooled key each) plus the select_top_k * select_block_size keys it
attends; the pooled pattern (select_pooled) attends those same scored pooled keys, so it adds
no pair. Averaged over heads and tokens, summed over patterns. Dense causal attention over n
tokens costs (n + 1) / 2.
"""

from __future__ import annotations

from longnet.plan import offset_class
from longnet.selection import candidate_window


def _kept(length: int, offset: int, rate: int) -> int:
    """Positions p < length of a segment with p mod r == offset."""
    return max(0, -(-(length - offset) // rate))


def dilated_pairs(seq_len: int, heads: int, w: int, r: int, causal: bool, shift: int = 0) -> int:
    """Pairs one dilated pattern computes over a sequence, summed over heads."""
    w = min(w, seq_len)
    lengths = [w] * (seq_len // w) + ([seq_len % w] if seq_len % w else [])
    total = 0
    for head in range(heads):
        offset = offset_class(head, r, shift)
        for length in lengths:
            kept = _kept(length, offset, r)
            total += kept * (kept + 1) // 2 if causal else kept * kept
    return total


def selected_pairs(seq_len: int, top_k: int, block_size: int, window: int) -> int:
    """Pairs the content-selected pattern computes per head over a sequence: scores against
    the candidate blocks (those that end by the start of the query's segment of `window`
    tokens) and the chosen blocks' keys."""
    total = 0
    for segment in range(-(-seq_len // window)):
        queries = min(window, seq_len - segment * window)
        blocks = segment * window // block_size
        total += queries * (blocks + min(top_k, blocks) * block_size)
    return total


def pairs_per_token(
    seq_len: int,
    heads: int,
    segment_lengths,
    dilation_rates,
    *,
    causal: bool = True,
    head_shift: int = 0,
    select_top_k: int = 0,
    select_block_size: int = 32,
    select_within_segment: bool = False,
) -> float:
    """Computed (query, key) pairs per token, averaged over heads (see the module docstring)."""
    total = sum(
        dilated_pairs(seq_len, heads, w, r, causal, head_shift)
        for w, r in zip(segment_lengths, dilation_rates, strict=True)
    )
    if select_top_k:
        window = candidate_window(segment_lengths, select_block_size, select_within_segment)
        total += heads * selected_pairs(seq_len, select_top_k, select_block_size, window)
    return total / (heads * seq_len)
