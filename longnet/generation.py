"""Incremental decoding for LongNetLM: a ring-buffer key/value cache and the exact dilated
attention of one new token against it.

Notation
    b   batch        t   position of the new token    s   cached keys the token may see
    h   query heads  g   key/value heads              d   head dim of q and k (v may be narrower)

The new query at position t is what dilated causal attention makes of the last row. It runs
through the same planner and executor as the full forward: longnet.plan.decode_plan lays out,
per pattern, the heads that keep t against the kept keys of t's segment up to t, and
longnet.engine.forward runs those calls on the fused kernels and mixes them by Eq. 10
(docs/semantics.md); a head no pattern keeps outputs zero. Every key a token can see lies in
the segment of t of some pattern, so a step reads keys from the earliest of those segment
starts on: fewer than max(w) positions, however long the text. The cache keeps just those.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from longnet import engine, selection
from longnet.dilated import kernel_for
from longnet.kernels import accumulation_dtype
from longnet.plan import decode_plan


class LayerCache:
    """The keys (after positional encoding) and values of one layer's last `capacity` positions,
    in a ring buffer: position p lives in slot p mod capacity."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.keys: torch.Tensor | None = None  # (b, capacity, g, d)
        self.values: torch.Tensor | None = None  # (b, capacity, g, dv)
        # Each row's first token (its document's start; later with left padding), or None: 0.
        self.starts: list[int] | None = None
        # The last queries (b, t, h, d) before the next token's (select_query_span > 1: the
        # content-selected blocks are ranked by a query's mean with those before it, or by
        # their best log-probability).
        self.queries: torch.Tensor | None = None

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> LayerCache:
        """A cache of exactly these keys (b, n, g, d) and values (b, n, g, dv), positions
        0 .. n - 1, as views (another library's cache, read by decode_attention)."""
        cache = cls(keys.shape[1])
        cache.keys, cache.values, cache.length = keys, values, keys.shape[1]
        return cache

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k (b, n, g, d) and v (b, n, g, dv) of the next n positions (only the last
        `capacity` of them stay)."""
        if self.keys is None:
            self.keys = k.new_empty(k.shape[0], self.capacity, *k.shape[2:])
            self.values = v.new_empty(v.shape[0], self.capacity, *v.shape[2:])
        n = k.shape[1]
        kept = min(n, self.capacity)
        slots = torch.arange(self.length + n - kept, self.length + n, device=k.device)
        self.keys.index_copy_(1, slots % self.capacity, k[:, n - kept :])
        self.values.index_copy_(1, slots % self.capacity, v[:, n - kept :])
        self.length += n

    def keep_queries(self, q: torch.Tensor, count: int) -> None:
        """Keep the last `count` of the kept queries followed by q (b, n, h, d)."""
        held = q if self.queries is None else torch.cat([self.queries, q], dim=1)
        # a copy: a view would keep the whole prompt's queries alive
        self.queries = held[:, max(0, held.shape[1] - count) :].clone()

    def window(self, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (b, s, g, d) and values (b, s, g, dv) of positions first .. length - 1: views
        of the buffer where they do not wrap around its end (always, when the segment lengths
        divide the longest), else copies."""
        if self.length - first > self.capacity:
            raise ValueError(
                f"the cache holds {self.capacity} positions; decoding position "
                f"{self.length - 1} needs {self.length - first} (the longest segment)"
            )
        start = first % self.capacity
        if start + self.length - first <= self.capacity:
            end = start + self.length - first
            return self.keys[:, start:end], self.values[:, start:end]
        slots = torch.arange(first, self.length, device=self.keys.device) % self.capacity
        return self.keys.index_select(1, slots), self.values.index_select(1, slots)


class KVCache:
    """One LayerCache per layer; `length` is the number of positions decoded so far. A capacity
    of max(segment_lengths) suffices for any length of text."""

    def __init__(self, num_layers: int, capacity: int):
        self.layers = [LayerCache(capacity) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def starts(self) -> list[int] | None:
        """Each row's first token (left padding before it), or None: every row starts at 0."""
        return self.layers[0].starts

    @starts.setter
    def starts(self, starts: list[int] | None) -> None:
        for layer in self.layers:
            layer.starts = starts


def decode_attention(
    q: torch.Tensor,
    cache: LayerCache,
    patterns: Sequence[tuple[int, int]],
    softmax_scale: float,
    head_shift: int = 0,
    select_top_k: int = 0,
    select_block_size: int = 32,
    select_pooled: bool = False,
    select_query_span: int = 1,
    select_within_segment: bool = False,
    select_ranking_dims: int = 0,
    select_span_max: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Dilated causal attention of the last cached position: q (b, 1, h, d) -> (b, 1, h, dv),
    with the content-selected pattern when select_top_k > 0 (the cache then holds every key), and
    the pooled one beside it when select_pooled, ranked by the last select_ranking_dims dims (all
    for 0); with select_query_span > 1 the cache also holds the queries before q
    (LayerCache.keep_queries), whose mean ranks the blocks, or their best log-probability with
    select_span_max.
    A row whose tokens start later (cache.starts: left padding) is its own sequence from there:
    rows are decoded in groups of equal start."""
    options = (tuple(patterns), softmax_scale, head_shift, select_top_k, select_block_size)
    options += (select_pooled, select_query_span, select_within_segment, select_ranking_dims)
    options += (select_span_max,)
    options += (cache.keys.shape[2], backend)
    position, starts, queries = cache.length - 1, cache.starts, cache.queries
    if select_query_span > 1 and queries is None:
        raise ValueError("select_query_span > 1: keep the queries in the cache (keep_queries)")
    if starts is None or len(set(starts)) == 1:
        start = 0 if starts is None else starts[0]
        return _decode_document(q, cache.window, queries, position - start, start, *options)
    out = None
    for start in sorted(set(starts)):
        rows = torch.tensor([i for i, s in enumerate(starts) if s == start], device=q.device)

        def window(first, rows=rows):
            return tuple(x.index_select(0, rows) for x in cache.window(first))

        held = None if queries is None else queries[rows]
        part = _decode_document(q[rows], window, held, position - start, start, *options)
        out = part.new_empty((q.shape[0], *part.shape[1:])) if out is None else out
        out[rows] = part
    return out


def _decode_document(
    q, window, queries, position, start, patterns, softmax_scale, head_shift, select_top_k,
    select_block_size, select_pooled, select_query_span, select_within_segment, select_ranking_dims,
    select_span_max, kv_heads, backend,
) -> torch.Tensor:  # fmt: skip
    """decode_attention of rows whose documents start at `start`: `position` is the new
    token's within its document, window(first) the keys and values from absolute position
    first on, queries (b, t, h, d) the last queries before q (or None)."""
    first, plan = decode_plan(position, q.shape[2], kv_heads, patterns, head_shift)
    held = 0 if select_top_k else first  # the selected pattern reads keys from 0 on
    keys, values = window(start + held)  # (b, s, g, .)
    # An encoding that widens q and k (ALiBi) leaves v narrower: the kernels take one width.
    width, extra = values.shape[-1], q.shape[-1] - values.shape[-1]
    values = F.pad(values, (0, extra)) if extra else values
    kernel = kernel_for(backend, q, causal=True)
    acc = accumulation_dtype(q.dtype) if select_top_k else None
    plan_keys = (x[:, first - held :] for x in (keys, values))  # first .. t
    out, lse, _ = engine.forward(
        q, *plan_keys, plan, scale=softmax_scale, kernel=kernel, out_dtype=acc
    )  # (b, 1, h, d)
    if select_top_k:
        lengths = [w for w, _ in patterns]
        segment = selection.candidate_window(lengths, select_block_size, select_within_segment)
        count = min(select_query_span - 1, position)  # the document's queries before q
        before = None if queries is None else queries[:, queries.shape[1] - count :]
        chosen = selection.forward(
            q, keys, values, select_block_size, select_top_k, segment, softmax_scale, kernel,
            query_offset=position, pooled=select_pooled, query_span=select_query_span,
            queries_before=before, ranking_dims=select_ranking_dims, span_max=select_span_max,
        )  # fmt: skip
        out, _ = selection.mix(out, lse, *chosen)
    return out[..., :width].to(q.dtype)


def check_sampling(max_new_tokens, temperature, top_k) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 < temperature < math.inf
    ):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """(b, V) logits -> (b, 1) tokens; top_k=1 is greedy (argmax), with no randomness."""
    if top_k == 1:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
