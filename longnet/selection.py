"""The content-selected pattern: each query reads the top-k key blocks of its causal past.

A pattern beside LongNet's dilated ones (a model option; docs/semantics.md), after MoBA and NSA:
the sequence is cut into blocks of `block_size` tokens; a query at position p scores every
complete block that ends by the start of its segment of the first pattern (w_1: the keys it
sees anyway; blocks j < (p // w_1 * w_1) // B) by q . mean(k of block j) and attends, densely,
the keys of its `top_k` best blocks (all of them while fewer exist). Its output and log-sum-exp mix
with the dilated patterns' by Eq. 10, as one more pattern. The dilated patterns reach far keys at
fixed positions; this one reaches them by content, so the long jump is the same circuit as a
short one. Cost per query: the candidate blocks scored plus top_k * B keys attended, linear in n.

The choice of blocks is piecewise constant in q and k, so the exact gradient flows through the
attention on the chosen blocks only (almost everywhere: not at exact ties of two scores).

With query_span S > 1 a query ranks the blocks by the mean of its own and the S - 1 queries
before it (ranking_queries) instead of its own alone, so that neighbouring queries (the digits
of one answer) choose alike; the pooled pattern scores with that mean too, so its gradient
reaches all S queries. With span_max, a query ranks each block by the best log-probability
any of those S queries gives it instead (log softmax over each query's candidate blocks of
scale * q_s . mean(k of the block), s = p - S + 1 .. p: the pooled pattern's weights, so a
query's norm does not decide its neighbours' choice): a block that one of them is confident
of stays a candidate for the next S - 1 queries, so the answer's later digits can read the
block its first query found; the pooled pattern then scores with each query's own q.

With ranking_dims D > 0 only the last D dims of each head of q and k rank the blocks (and score
the pooled keys): dims a model leaves without positional encoding, so that the choice follows
content; a block's mean after a rotary encoding keeps the positions' slow components.

Notation: b batch, n tokens, h query heads, g kv heads, d head dim, B block size, m = n // B
complete blocks, k top_k (at most m), c queries in a chunk.
"""

from __future__ import annotations

import math

import torch

from longnet.kernels import (
    MASKED_KERNELS,
    accumulation_dtype,
    attention_backward,
    attention_forward,
    mark_nan_readers,
    reads_values_on_host,
)

# Most gathered key (or value) elements a chunk of queries holds at once: 64 MiB in float32.
CHUNK_ELEMENTS = 1 << 24


def block_means(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """(b, m, g, d) mean key of each complete block of k (b, n, g, d), in the accumulation dtype."""
    m = k.shape[1] // block_size
    blocks = k[:, : m * block_size].unflatten(1, (m, block_size))  # (b, m, B, g, d)
    return blocks.to(accumulation_dtype(k.dtype)).mean(2)


def candidate_window(segment_lengths, block_size: int, within_segment: bool) -> int:
    """The `window` of the functions here: the first pattern's w_1 (a query's candidates end by
    the start of its segment, whose keys that pattern shows anyway) or, within_segment, the block
    size (every complete block before the query's own: the near keys reached by the same circuit
    as the far ones, as in dense attention)."""
    return block_size if within_segment else segment_lengths[0]


def candidates(positions, window: int, block_size: int):
    """How many complete blocks a query at each position chooses from: those that end by the
    start of its segment of `window` tokens (the first pattern's, whose keys it sees anyway)."""
    return positions // window * window // block_size


def candidate_mask(positions, blocks: int, window: int, block_size: int) -> torch.Tensor:
    """(c, blocks) whether a query at each of the positions (c,) may read each complete block."""
    limit = candidates(positions, window, block_size)  # (c,)
    return torch.arange(blocks, device=positions.device) < limit[:, None]


def ranking_part(x: torch.Tensor, dims: int) -> torch.Tensor:
    """x (..., d)'s last `dims` dims, those that rank the blocks (all d for dims = 0)."""
    return x[..., x.shape[-1] - dims :] if dims else x


def _widen(grad: torch.Tensor, dims: int) -> torch.Tensor:
    """The gradient (..., D) of ranking_part's result as one of its input (..., dims)."""
    if grad.shape[-1] == dims:  # all dims rank: no copy
        return grad
    return torch.nn.functional.pad(grad, (dims - grad.shape[-1], 0))


def ranking_queries(
    q: torch.Tensor, span: int, before: torch.Tensor | None = None, query_offset: int = 0
) -> torch.Tensor:
    """(b, n, h, d): the mean of each query of q (b, n, h, d), at positions query_offset ..
    query_offset + n - 1, and the span - 1 queries before it (all of them near position 0), in
    the accumulation dtype; q itself for span 1 (the callers cast it a chunk at a time). before
    (b, t, h, d) holds the t = min(span - 1, query_offset) queries that precede q (another
    rank's, or a decoding cache's)."""
    if span == 1:
        return q
    check_queries_before(before, span, query_offset)  # the counts below assume them all
    acc = accumulation_dtype(q.dtype)
    x = q.to(acc) if before is None else torch.cat([before.to(acc), q.to(acc)], dim=1)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 0, span - 1, 0))  # zeros before position 0
    sums = padded.unfold(1, span, 1).sum(-1)[:, -q.shape[1] :]  # (b, n, h, d)
    return sums / _span_counts(q, span, query_offset)


def check_queries_before(before: torch.Tensor | None, span: int, query_offset: int) -> None:
    """ValueError unless before holds the min(span - 1, query_offset) queries before the first."""
    held = 0 if before is None else before.shape[1]
    if held != min(span - 1, query_offset):
        raise ValueError(
            f"a query span of {span} at offset {query_offset} needs the "
            f"{min(span - 1, query_offset)} queries before it, got {held}"
        )


def _span_counts(q: torch.Tensor, span: int, query_offset: int) -> torch.Tensor:
    """(n, 1, 1) how many queries each ranking query averages."""
    positions = torch.arange(q.shape[1], device=q.device) + query_offset
    return positions.clamp(max=span - 1).add(1).to(accumulation_dtype(q.dtype))[:, None, None]


def ranking_backward(
    grad: torch.Tensor, q: torch.Tensor, span: int, before_len: int, query_offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq (b, n, h, d), d_before (b, t, h, d)) from the gradient (b, n, h, d) of
    ranking_queries's result: each query's share of the means it is part of."""
    if span == 1:
        return grad, grad[:, :0]
    shares = grad / _span_counts(q, span, query_offset)  # (b, n, h, d)
    shares = torch.nn.functional.pad(shares, (0, 0, 0, 0, before_len, span - 1))
    total = shares.unfold(1, span, 1).sum(-1)  # (b, t + n, h, d): the means each row is in
    return total[:, before_len:], total[:, :before_len]


def select_blocks(
    q: torch.Tensor,
    means: torch.Tensor,
    positions: torch.Tensor,
    block_size: int,
    top_k: int,
    window: int,
    best_of: int = 1,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks each query reads: index (b, c, h, k) into the m blocks, and whether each slot is
    a real choice (b, c, h, k) (False where fewer than k blocks lie before the query's block).

    q (b, e + c, h, d): the ranking queries of the c token positions (c,) (consecutive), after
    the e <= best_of - 1 queries before them (all there are); means (b, m, g, d) from
    block_means. A query ranks a block by its score q . mean; with best_of > 1 by the best
    log-probability that its own and the best_of - 1 queries before it give the block (log
    softmax of scale * q . mean over each query's own candidates).
    """
    heads, kv_heads, m = q.shape[2], means.shape[2], means.shape[1]
    means = means.repeat_interleave(heads // kv_heads, dim=2)  # (b, m, h, d)
    scores = torch.einsum("bchd,bmhd->bchm", q.to(means.dtype), means)  # (b, e + c, h, m)
    if best_of > 1:
        scores = _best_log_probability(scores, positions, window, block_size, best_of, scale)
    candidate = candidate_mask(positions, m, window, block_size)  # (c, m)
    scores = scores.masked_fill(~candidate[:, None], -math.inf)
    index = scores.topk(min(top_k, m), dim=-1).indices  # (b, c, h, k)
    return index, index < candidates(positions, window, block_size)[:, None, None]


def _best_log_probability(scores, positions, window, block_size, best_of, scale):
    """(b, c, h, m) the best over best_of queries of each block's log-probability, from the
    scores (b, e + c, h, m) of the c queries at positions (c,) and the e before them."""
    before = scores.shape[1] - len(positions)
    earlier = positions[0] - torch.arange(before, 0, -1, device=positions.device)
    held = torch.cat([earlier, positions])  # (e + c,)
    candidate = candidate_mask(held, scores.shape[-1], window, block_size)  # (e + c, m)
    scores = scores.masked_fill(~candidate[:, None], -math.inf) * scale
    # A NaN score (a NaN key or query) stays NaN and is left out of its query's normaliser.
    numbers = scores.masked_fill(scores.isnan(), -math.inf)
    lse = torch.logsumexp(numbers, dim=-1, keepdim=True)  # (b, e + c, h, 1); -inf: no candidate
    scores = scores - lse.masked_fill(lse == -math.inf, 0.0)
    # -inf for the queries before position 0; max propagates NaN, which topk ranks first
    missing = best_of - 1 - before
    scores = torch.nn.functional.pad(scores, (0, 0, 0, 0, missing, 0), value=-math.inf)
    return scores.unfold(1, best_of, 1).amax(-1)  # (b, c, h, m)


def _flat_index(index: torch.Tensor, kv_heads: int, m: int) -> torch.Tensor:
    """(b*c*h*k,) rows of the (b*g*m, B*d) block table that index (b, c, h, k) names."""
    batch, _, heads, _ = index.shape
    kv_of_head = torch.arange(heads, device=index.device) // (heads // kv_heads)  # (h,)
    batch_ids = torch.arange(batch, device=index.device)[:, None, None, None]
    return ((batch_ids * kv_heads + kv_of_head[:, None]) * m + index).flatten()


def _table(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(b*g*m, B*d): x (b, n, g, d)'s complete blocks, one row per (batch, kv head, block)."""
    batch, n, kv_heads, dim = x.shape
    m = n // block_size
    blocks = x[:, : m * block_size].unflatten(1, (m, block_size))  # (b, m, B, g, d)
    return blocks.permute(0, 3, 1, 2, 4).reshape(batch * kv_heads * m, block_size * dim)


def masks(n: int, block_size: int, top_k: int, kernel: str) -> bool:
    """Whether queries read every complete earlier block through a mask on a fused kernel
    (quadratic, but one fused call per chunk) rather than gathering their chosen blocks (linear,
    but memory-bound): on CPU the mask is faster up to about 64 times the keys a query reads
    (measured: 6.5x faster at n = 2048, k*B = 128; benchmarks/selection.py)."""
    return kernel in MASKED_KERNELS and n <= 64 * top_k * block_size


class _Choice:
    """What ranks the blocks for the queries of one call: queries (b, t + n, h, D), the ranking
    queries of the n queries after the t held before them (t = 0 unless best_of > 1), ranking
    each block by its best log-probability over best_of of them at `scale` (1: each query's own
    score)."""

    def __init__(self, queries: torch.Tensor, before: int, best_of: int, scale: float):
        self.queries, self.before, self.best_of, self.scale = queries, before, best_of, scale

    def blocks(self, start, end, means, positions, block_size, top_k, window):
        """select_blocks for the queries start .. end - 1 of the call."""
        first = max(0, self.before + start - self.best_of + 1)
        queries = self.queries[:, first : self.before + end]
        return select_blocks(
            queries, means, positions, block_size, top_k, window, self.best_of, self.scale
        )


class _Chunk:
    """The queries start .. end - 1 with the blocks they chose (choice: a _Choice)."""

    def __init__(self, q, choice, means, start, end, block_size, top_k, window, query_offset):
        self.end, self.block_size, self.window = query_offset + end, block_size, window
        self.q = q[:, start:end]  # (b, c, h, d)
        positions = torch.arange(start, end, device=q.device) + query_offset
        self.index, self.valid = choice.blocks(
            start, end, means, positions, block_size, top_k, window
        )
        self.blocks = means.shape[1]

    def mask(self, dtype) -> torch.Tensor:
        """(b, h, c, S) 0 on the chosen blocks' keys, -inf elsewhere, over the S = blocks * B
        keys of the complete blocks before the chunk's last query."""
        blocks = min(self.blocks, candidates(self.end - 1, self.window, self.block_size))
        index = torch.where(self.valid, self.index, self.blocks).transpose(1, 2)  # (b, h, c, k)
        shape = (*index.shape[:3], self.blocks + 1)
        per_block = torch.full(shape, -math.inf, dtype=dtype, device=index.device)
        per_block.scatter_(-1, index, 0.0)
        return per_block[..., :blocks].repeat_interleave(self.block_size, dim=-1)

    def rows(self, kv_heads: int) -> torch.Tensor:
        """(b*c*h*k,) rows of the block table holding each query's chosen blocks."""
        return _flat_index(self.index, kv_heads, self.blocks)

    def reads(self, flags: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """(b, c, h) whether each query chose a flagged block; flags (b*g*m,) in block-table
        order."""
        return (flags[self.rows(kv_heads)].view(self.index.shape) & self.valid).any(-1)

    def gather(self, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(b, c, h, S, d) with S = k*B: the block table (b*g*m, B*d)'s `rows`, per query."""
        shape = (*self.index.shape, self.block_size, table.shape[1] // self.block_size)
        return table.index_select(0, rows).view(shape).flatten(3, 4)


def _kernel_layout(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, h, s, d) view of x (b, s, g, d), each query head reading its kv head."""
    x = x.transpose(1, 2)
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


def _chunks(q: torch.Tensor, keys: int, query_offset: int, block_size, top_k, window, masked):
    """Ranges of q's rows from the first that has a candidate block on (earlier ones choose
    nothing) whose masks or gathered keys stay within CHUNK_ELEMENTS."""
    batch, n, heads, dim = q.shape
    per_query = batch * heads * (keys if masked else 2 * top_k * block_size * dim)
    step = max(1, CHUNK_ELEMENTS // max(1, per_query))
    first = max(0, -(-block_size // window) * window - query_offset)
    return [(start, min(start + step, n)) for start in range(first, n, step)]


def forward(
    q, k, v, block_size: int, top_k: int, window: int, scale: float, kernel="math", query_offset=0,
    pooled=False, query_span=1, queries_before=None, ranking_dims=0, span_max=False,
):  # fmt: skip
    """The pattern alone, causal: q (b, n, h, d), k and v (b, s, g, d) -> out (b, n, h, d) and
    lse (b, n, h) in the accumulation dtype; lse is -inf (and out 0) for the queries with no
    candidate block (those of the first segment of `window` = w_1 tokens). k and v hold the
    keys of positions 0 .. s - 1,
    q the queries of positions query_offset .. query_offset + n - 1 (sequence parallelism:
    the shard's queries against the keys up to its end). kernel: longnet.kernels' name of the
    fused kernel for the masked form. pooled: mixed with the pooled pattern (pooled_forward).
    query_span, queries_before, ranking_dims, span_max: how the blocks are ranked (by the mean
    of query_span queries, ranking_queries, or by their best log-probability with span_max; by
    ranking_part of q and k)."""
    ranking, ranking_keys, choice = _ranking(
        q, k, query_span, queries_before, query_offset, ranking_dims, span_max, scale
    )
    means = block_means(ranking_keys, block_size)
    chosen = _chosen_forward(
        q, choice, k, v, means, block_size, top_k, window, scale, kernel, query_offset
    )
    if not pooled:
        return chosen
    pooled_part = pooled_forward(ranking, means, v, block_size, window, scale, query_offset)
    return mix(*chosen, *pooled_part)


def _ranking(q, k, query_span, queries_before, query_offset, ranking_dims, span_max, scale):
    """(ranking queries (b, n, h, D), ranking keys (b, s, g, D), the _Choice of the blocks):
    what scores the pooled keys and what ranks the blocks."""
    before = None if queries_before is None else ranking_part(queries_before, ranking_dims)
    own, keys = ranking_part(q, ranking_dims), ranking_part(k, ranking_dims)
    if not span_max:
        ranking = ranking_queries(own, query_span, before, query_offset)
        return ranking, keys, _Choice(ranking, 0, 1, scale)
    check_queries_before(before, query_span, query_offset)
    held = own if before is None else torch.cat([before.to(own.dtype), own], dim=1)
    return own, keys, _Choice(held, held.shape[1] - own.shape[1], query_span, scale)


def _chosen_forward(q, choice, k, v, means, block_size, top_k, window, scale, kernel, query_offset):
    """forward without the pooled pattern, the blocks ranked by `choice` (a _Choice) against
    the block means (b, m, g, D) of the ranking keys."""
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], -math.inf, dtype=acc, device=q.device)
    # A NaN in a block's ranking keys makes it score NaN: topk ranks it first.
    heads, kv_heads = q.shape[2], k.shape[2]
    # NOTE: both forms multiply zero weights by the keys and values of blocks a query did not
    # choose, so a NaN would reach queries that never read it. On CPU, NaN entries enter as 0
    # and the queries that chose their blocks are marked NaN below; elsewhere that would cost a
    # host sync per call, so NaN spreads as in SDPA (to more outputs, never dropped).
    exact = reads_values_on_host(k.device)
    nan_entries = k.isnan().any(-1) | v.isnan().any(-1) if exact else None  # (b, s, g)
    nan_blocks = readers = None
    if nan_entries is not None and bool(nan_entries.any()):
        m = k.shape[1] // block_size
        blocks = nan_entries[:, : m * block_size].unflatten(1, (m, block_size)).any(2)
        nan_blocks = blocks.transpose(1, 2).flatten()  # (b*g*m,): block-table order
        readers = torch.zeros(q.shape[:3], dtype=torch.bool, device=q.device)
        k, v = (x.masked_fill(x.isnan(), 0.0) for x in (k, v))
    masked = masks(k.shape[1], block_size, top_k, kernel)
    tables = None if masked else tuple(_table(x.to(acc), block_size) for x in (k, v))
    for start, end in _chunks(q, k.shape[1], query_offset, block_size, top_k, window, masked):
        chunk = _Chunk(q, choice, means, start, end, block_size, top_k, window, query_offset)
        if nan_blocks is not None:
            readers[:, start:end] = chunk.reads(nan_blocks, kv_heads)
        if masked:
            mask = chunk.mask(q.dtype)
            keys, values = (_kernel_layout(x[:, : mask.shape[-1]], heads) for x in (k, v))
            part_out, part_lse = attention_forward(
                chunk.q.transpose(1, 2), keys, values, causal=False, scale=scale,
                kernel=kernel, mask=mask,
            )  # fmt: skip
            out[:, start:end] = part_out.transpose(1, 2)
            lse[:, start:end] = part_lse.transpose(1, 2)
            continue
        rows = chunk.rows(kv_heads)
        keys, values = (chunk.gather(table, rows) for table in tables)  # (b, c, h, S, d)
        scores = torch.einsum("bchd,bchsd->bchs", chunk.q.to(acc), keys) * scale
        scores = scores.masked_fill(~_allowed(chunk), -math.inf)
        part_lse = torch.logsumexp(scores, dim=-1)  # (b, c, h): finite, every row has a candidate
        out[:, start:end] = torch.einsum(
            "bchs,bchsd->bchd", torch.exp(scores - part_lse.unsqueeze(-1)), values
        )
        lse[:, start:end] = part_lse
    mark_nan_readers(out, lse, q, readers)
    return out, lse


def _allowed(chunk: _Chunk) -> torch.Tensor:
    """(b, c, h, k*B): whether each gathered key belongs to a real choice."""
    return chunk.valid.repeat_interleave(chunk.block_size, dim=-1)


def backward(
    grad_out, q, k, v, out, lse, block_size: int, top_k: int, window: int, scale: float,
    kernel="math", query_offset=0, pooled=False, query_span=1, queries_before=None, ranking_dims=0,
    span_max=False,
):  # fmt: skip
    """(dq, dk, dv, d_before) in the accumulation dtype of the pattern's part of the MIXED
    attention, from the mixed out (b, n, h, d) and lse (b, n, h): the softmax over all patterns'
    keys; with the pooled pattern's part when pooled. d_before (b, t, h, d): the gradient of
    queries_before (the pooled pattern's, through the mean ranking queries; zeros without it,
    and with span_max, whose ranking passes no gradient)."""
    ranking, ranking_keys, choice = _ranking(
        q, k, query_span, queries_before, query_offset, ranking_dims, span_max, scale
    )
    before_len = 0 if queries_before is None else queries_before.shape[1]
    means = block_means(ranking_keys, block_size)
    grad_q, grad_k, grad_v = _chosen_backward(
        grad_out, q, choice, k, v, means, out, lse, block_size, top_k, window, scale,
        kernel, query_offset,
    )  # fmt: skip
    if not pooled:
        return grad_q, grad_k, grad_v, grad_q.new_zeros((q.shape[0], before_len, *q.shape[2:]))
    arguments = (grad_out, ranking, means, v, out, lse, block_size, window, scale)
    grad_ranking, pooled_k, pooled_v = pooled_backward(*arguments, query_offset)
    if span_max:  # each query's own q scored the pooled keys; the choice passes no gradient
        pooled_q = grad_ranking
        grad_before = grad_ranking.new_zeros((q.shape[0], before_len, *ranking.shape[2:]))
    else:
        pooled_q, grad_before = ranking_backward(
            grad_ranking, ranking, query_span, before_len, query_offset
        )
    dim = q.shape[-1]
    return (
        grad_q + _widen(pooled_q, dim),
        grad_k + _widen(pooled_k, dim),
        grad_v + pooled_v,
        _widen(grad_before, dim),
    )


def _chosen_backward(
    grad_out, q, choice, k, v, means, out, lse, block_size, top_k, window, scale, kernel,
    query_offset,
):  # fmt: skip
    """backward's part of the chosen blocks, (dq, dk, dv), the blocks ranked by `choice` (a
    _Choice) against the block means `means` (as in _chosen_forward)."""
    acc = accumulation_dtype(q.dtype)
    grad_q = torch.zeros(q.shape, dtype=acc, device=q.device)
    grad_k = torch.zeros(k.shape, dtype=acc, device=k.device)
    grad_v = torch.zeros(v.shape, dtype=acc, device=v.device)
    (batch, n, kv_heads, dim), heads = k.shape, q.shape[2]
    masked = masks(n, block_size, top_k, kernel)
    if not masked:
        tables = tuple(_table(x.to(acc), block_size) for x in (k, v))
        grad_tables = tuple(torch.zeros_like(table) for table in tables)
    for start, end in _chunks(q, n, query_offset, block_size, top_k, window, masked):
        chunk = _Chunk(q, choice, means, start, end, block_size, top_k, window, query_offset)
        if masked:
            mask = chunk.mask(q.dtype)
            size = mask.shape[-1]
            keys, values = (_kernel_layout(x[:, :size], heads) for x in (k, v))
            dq, dk, dv = attention_backward(
                *(x[:, start:end].transpose(1, 2) for x in (grad_out, q)), keys, values,
                out[:, start:end].transpose(1, 2), lse[:, start:end].transpose(1, 2),
                causal=False, scale=scale, kernel=kernel, mask=mask,
            )  # fmt: skip
            grad_q[:, start:end] = dq.transpose(1, 2)
            for total, part in ((grad_k, dk), (grad_v, dv)):  # (b, h, S, d) -> kv heads
                part = part.unflatten(1, (kv_heads, heads // kv_heads)).sum(2)
                total[:, :size] += part.transpose(1, 2)
            continue
        rows = chunk.rows(kv_heads)
        keys, values = (chunk.gather(table, rows) for table in tables)  # (b, c, h, S, d)
        queries, d_out = chunk.q.to(acc), grad_out[:, start:end].to(acc)  # (b, c, h, d)
        scores = torch.einsum("bchd,bchsd->bchs", queries, keys) * scale
        scores = scores.masked_fill(~_allowed(chunk), -math.inf)
        probs = torch.exp(scores - lse[:, start:end].to(acc).unsqueeze(-1))  # (b, c, h, S)
        delta = (d_out * out[:, start:end].to(acc)).sum(-1, keepdim=True)  # (b, c, h, 1)
        grad_probs = torch.einsum("bchd,bchsd->bchs", d_out, values)
        grad_scores = probs * (grad_probs - delta) * scale
        grad_q[:, start:end] = torch.einsum("bchs,bchsd->bchd", grad_scores, keys)
        for table, weights, x in (
            (grad_tables[0], grad_scores, queries),
            (grad_tables[1], probs, d_out),
        ):
            part = torch.einsum("bchs,bchd->bchsd", weights, x)  # (b, c, h, k*B, d)
            table.index_add_(0, rows, part.unflatten(3, (-1, block_size)).flatten(0, 3).flatten(1))
    if not masked:
        for total, table in zip((grad_k, grad_v), grad_tables, strict=True):
            m = n // block_size
            blocks = table.view(batch, kv_heads, m, block_size, dim).permute(0, 2, 3, 1, 4)
            total[:, : m * block_size] = blocks.flatten(1, 2)
    return grad_q, grad_k, grad_v


def _pooled_chunks(q: torch.Tensor, blocks: int) -> list[tuple[int, int]]:
    """Ranges of q's rows whose scores against `blocks` pooled keys stay within CHUNK_ELEMENTS."""
    batch, n, heads, _ = q.shape
    step = max(1, CHUNK_ELEMENTS // max(1, batch * heads * blocks))
    return [(start, min(start + step, n)) for start in range(0, n, step)]


class _Pooled:
    """The block means of the keys (given: key_means (b, m, g, D) from block_means) and of v per
    query head, (b, m, h, D) and (b, m, h, d) in the accumulation dtype, with the blocks whose
    mean is NaN (b, m, h) zeroed where NaN is tracked exactly (CPU)."""

    def __init__(self, q, key_means, v, block_size, window: int, scale: float, query_offset: int):
        heads = q.shape[2]
        self.keys, self.values = (
            means.repeat_interleave(heads // means.shape[2], dim=2)
            for means in (key_means, block_means(v, block_size))
        )
        self.nan_blocks = None
        if reads_values_on_host(q.device):
            nan_blocks = self.keys.isnan().any(-1) | self.values.isnan().any(-1)  # (b, m, h)
            if bool(nan_blocks.any()):
                self.nan_blocks = nan_blocks
                self.keys = self.keys.masked_fill(self.keys.isnan(), 0.0)
                self.values = self.values.masked_fill(self.values.isnan(), 0.0)
        self.q, self.block_size, self.window, self.scale = q, block_size, window, scale
        self.query_offset = query_offset

    def candidate(self, start: int, end: int) -> torch.Tensor:
        """(c, m) whether each query of rows start .. end - 1 may read each block."""
        positions = torch.arange(start, end, device=self.q.device) + self.query_offset
        return candidate_mask(positions, self.keys.shape[1], self.window, self.block_size)

    def scores(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, c, h, m) scaled scores of rows start .. end - 1, -inf off their candidates, and
        the (c, m) candidates."""
        candidate = self.candidate(start, end)
        queries = self.q[:, start:end].to(self.keys.dtype)
        scores = torch.einsum("bchd,bmhd->bchm", queries, self.keys) * self.scale
        return scores.masked_fill(~candidate[:, None], -math.inf), candidate


def pooled_forward(q, key_means, v, block_size: int, window: int, scale: float, query_offset=0):
    """The pooled pattern alone (select_pooled; NSA's compressed attention, pooled by the mean):
    each query attends one key per candidate block, the block's mean key with its mean value.
    Its scores are the ones the top-k choice ranks (q: the ranking queries), so through this
    pattern the choice's scores get a gradient. Arguments and results as in forward, with the
    keys' block means key_means (b, m, g, D) in place of k (q and the means may hold the D
    ranking dims only, v all d): out (b, n, h, d) and lse (b, n, h) in the accumulation dtype,
    lse -inf where a query has no candidate block."""
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros((*q.shape[:3], v.shape[-1]), dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], -math.inf, dtype=acc, device=q.device)
    pooled = _Pooled(q, key_means, v, block_size, window, scale, query_offset)
    readers = None if pooled.nan_blocks is None else torch.zeros_like(lse, dtype=torch.bool)
    for start, end in _pooled_chunks(q, pooled.keys.shape[1]):
        scores, candidate = pooled.scores(start, end)
        part_lse = torch.logsumexp(scores, dim=-1)  # (b, c, h)
        probs = torch.exp(scores - _finite(part_lse).unsqueeze(-1))
        out[:, start:end] = torch.einsum("bchm,bmhd->bchd", probs, pooled.values)
        lse[:, start:end] = part_lse
        if readers is not None:  # every candidate is read with a positive weight
            read = candidate[None, :, None] & pooled.nan_blocks.transpose(1, 2)[:, None]
            readers[:, start:end] = read.any(-1)
    mark_nan_readers(out, lse, q, readers)
    return out, lse


def pooled_backward(
    grad_out, q, key_means, v, out, lse, block_size: int, window: int, scale: float,
    query_offset=0,
):  # fmt: skip
    """(dq, dk, dv) in the accumulation dtype of the pooled pattern's part of the MIXED attention
    (out (b, n, h, d) and lse (b, n, h) of all patterns), dq that of the queries it scored with
    (the ranking queries), dk (b, s, g, D) that of the keys whose block means key_means are: a
    block's mean passes its gradient to each of its B keys (values) divided by B."""
    acc = accumulation_dtype(q.dtype)
    pooled = _Pooled(q, key_means, v, block_size, window, scale, query_offset)
    grad_q = torch.zeros(q.shape, dtype=acc, device=q.device)
    grad_keys, grad_values = torch.zeros_like(pooled.keys), torch.zeros_like(pooled.values)
    for start, end in _pooled_chunks(q, pooled.keys.shape[1]):
        scores, _ = pooled.scores(start, end)
        d_out, mixed = grad_out[:, start:end].to(acc), out[:, start:end].to(acc)
        probs = torch.exp(scores - _finite(lse[:, start:end].to(acc)).unsqueeze(-1))
        delta = (d_out * mixed).sum(-1, keepdim=True)  # (b, c, h, 1)
        grad_probs = torch.einsum("bchd,bmhd->bchm", d_out, pooled.values)
        grad_scores = probs * (grad_probs - delta) * scale
        grad_q[:, start:end] = torch.einsum("bchm,bmhd->bchd", grad_scores, pooled.keys)
        grad_keys += torch.einsum("bchm,bchd->bmhd", grad_scores, q[:, start:end].to(acc))
        grad_values += torch.einsum("bchm,bchd->bmhd", probs, d_out)
    kv_heads = key_means.shape[2]
    grads = []
    for dim, grad in ((key_means.shape[-1], grad_keys), (v.shape[-1], grad_values)):
        per_kv_head = grad.unflatten(2, (kv_heads, -1)).sum(3) / block_size  # (b, m, g, d)
        total = torch.zeros((*v.shape[:3], dim), dtype=acc, device=v.device)
        total[:, : per_kv_head.shape[1] * block_size] = per_kv_head.repeat_interleave(
            block_size, dim=1
        )
        grads.append(total)
    return grad_q, *grads


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf replaced by 0, so that exp(x - lse) is 0, not NaN, on empty rows."""
    return lse.masked_fill(lse == -math.inf, 0.0)


def mix(out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10 for two groups of patterns: (out, lse) of their union; out (b, n, h, d), lse
    (b, n, h); a row either group leaves empty (lse -inf) takes the other's result."""
    lse = torch.logaddexp(lse_a, lse_b)
    base = _finite(lse)
    weight_a, weight_b = torch.exp(lse_a - base), torch.exp(lse_b - base)
    return out_a * weight_a.unsqueeze(-1) + out_b * weight_b.unsqueeze(-1), lse
