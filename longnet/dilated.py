"""Dilated attention (LongNet, Ding et al. 2023, section 2.2), exact and on fused kernels.

Notation
    b   batch                       n   sequence length
    h   query heads                 g   key/value heads; query head i reads kv head i // (h/g)
    d   head dim                    w   segment length of a pattern, r its dilation rate
    o   head offset, o = head mod r (the paper's s_j = j mod r)
    m   segments of one length      L   their length (w, or the shorter last segment)
    c   kept positions per segment for one head: len(range(o, L, r))
    hb  heads of one block (the heads of a pattern that keep the same count c)

Semantics (../shared/SPEC.md): for pattern i, head j keeps the positions p of each segment with
(p mod w_i) mod r_i == j mod r_i; kept queries attend kept keys of their segment (causal by token
position); the per-pattern outputs O_i are mixed with weights proportional to their softmax
denominators s_i (paper Eq. 10), i.e. by their log-sum-exps.

How it runs: per pattern, the (segment, head) pairs fall into at most four BLOCKS (full segments
and the short last one, times heads keeping ceil(L/r) or floor(L/r) positions). A block is one
gather (segments folded into the batch, each head at its offset), one fused attention call that
returns the log-sum-exp, and one merge into the running output. Blocks hold only real tokens, so
no padding exists that could leak into the softmax.

NOTE: the paper computes the mixing weights from the denominators; the official code does so
under no_grad, which drops part of the gradient. Here the backward runs every block's attention
backward with the MERGED output and log-sum-exp, which is the exact gradient of Eq. 10, and stores
nothing larger than the inputs (no n x n or (w/r) x (w/r) matrix).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from longnet.kernels import (
    accumulation_dtype,
    attention_backward,
    attention_forward,
    resolve_backend,
)


@dataclass(frozen=True)
class Block:
    """Segments of one length and heads of one kept count: one dense attention call."""

    start: int  # token position of the first segment
    num_segments: int  # m
    segment_length: int  # L
    positions: torch.Tensor  # (hb, c) kept positions inside a segment, one row per head
    heads: torch.Tensor  # (hb, 1) query heads
    kv_heads: torch.Tensor  # (hb, 1) the key/value head each of them reads

    def segments(self, x: torch.Tensor) -> torch.Tensor:
        """View of x (b, n, ...) as (b, m, L, ...) over this block's segments."""
        end = self.start + self.num_segments * self.segment_length
        return x[:, self.start : end].unflatten(1, (self.num_segments, self.segment_length))

    def index(self, kv: bool = False) -> tuple:
        """Index of (b, m, L, heads, ...) that selects (b, m, hb, c, ...)."""
        return (slice(None), slice(None), self.positions, self.kv_heads if kv else self.heads)

    def gather(self, x: torch.Tensor, kv: bool = False) -> torch.Tensor:
        """(b, n, heads, d) -> (b*m, hb, c, d), the layout of the attention kernels."""
        return self.segments(x)[self.index(kv)].flatten(0, 1)

    def gather_lse(self, lse: torch.Tensor) -> torch.Tensor:
        """(b, n, h) -> (b*m, hb, c)."""
        return self.segments(lse)[self.index()].flatten(0, 1)

    def add(self, total: torch.Tensor, part: torch.Tensor) -> None:
        """total (b, n, h, d) += part (b*m, hb, c, d) at this block's positions."""
        view, index = self.segments(total), self.index()
        view[index] = view[index] + part.unflatten(0, (total.shape[0], self.num_segments))


@functools.lru_cache(maxsize=1024)
def pattern_blocks(
    seq_len: int,
    segment_length: int,
    dilation_rate: int,
    heads: int,
    kv_heads: int,
    device: torch.device,
) -> tuple[Block, ...]:
    """The blocks of one pattern (w, r) over a sequence of seq_len tokens."""
    w, r = min(segment_length, seq_len), dilation_rate
    full, tail = divmod(seq_len, w)
    segment_classes = ([(0, full, w)] if full else []) + ([(full * w, 1, tail)] if tail else [])
    group_size = heads // kv_heads
    blocks = []
    for start, num_segments, length in segment_classes:
        heads_by_count: dict[int, list[int]] = {}
        for head in range(heads):
            count = len(range(head % r, length, r))
            if count:  # a head whose offset lies past a short segment keeps nothing there
                heads_by_count.setdefault(count, []).append(head)
        for count, block_heads in heads_by_count.items():
            head_index = torch.tensor(block_heads, device=device)
            offsets = head_index % r
            blocks.append(
                Block(
                    start=start,
                    num_segments=num_segments,
                    segment_length=length,
                    positions=offsets[:, None] + r * torch.arange(count, device=device),
                    heads=head_index[:, None],
                    kv_heads=(head_index // group_size)[:, None],
                )
            )
    return tuple(blocks)


def merge_block(
    out: torch.Tensor,
    lse: torch.Tensor,
    block: Block,
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
) -> None:
    """Fold one block's (out, lse) into the running (out, lse) in place (paper Eq. 10).

    out (b, n, h, d) and lse (b, n, h) are in the accumulation dtype; lse is -inf where nothing
    was merged yet. Blocks of one pattern are disjoint, so a gather-update-scatter is exact.
    """
    batch = out.shape[0]
    index = block.index()
    out_view, lse_view = block.segments(out), block.segments(lse)
    old_lse = lse_view[index]  # (b, m, hb, c)
    part_lse = block_lse.unflatten(0, (batch, block.num_segments)).to(lse.dtype)
    new_lse = torch.logaddexp(old_lse, part_lse)
    part_out = block_out.unflatten(0, (batch, block.num_segments))  # (b, m, hb, c, d)
    out_view[index] = out_view[index] * torch.exp(old_lse - new_lse).unsqueeze(
        -1
    ) + part_out * torch.exp(part_lse - new_lse).unsqueeze(-1)
    lse_view[index] = new_lse


def _blocks(q: torch.Tensor, k: torch.Tensor, patterns) -> list[Block]:
    batch, seq_len, heads, _ = q.shape
    return [
        block
        for w, r in patterns
        for block in pattern_blocks(seq_len, w, r, heads, k.shape[2], q.device)
    ]


class _DilatedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, patterns, causal, scale, kernel):
        blocks = _blocks(q, k, patterns)
        acc = accumulation_dtype(q.dtype)
        out = q.new_zeros(q.shape, dtype=acc)  # (b, n, h, d)
        lse = q.new_full(q.shape[:3], -math.inf, dtype=acc)  # (b, n, h)
        for block in blocks:
            block_out, block_lse = attention_forward(
                block.gather(q),
                block.gather(k, kv=True),
                block.gather(v, kv=True),
                causal=causal,
                scale=scale,
                kernel=kernel,
            )
            merge_block(out, lse, block, block_out, block_lse)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.blocks, ctx.causal, ctx.scale, ctx.kernel = blocks, causal, scale, kernel
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        acc = lse.dtype
        grad_q = q.new_zeros(q.shape, dtype=acc)  # (b, n, h, d)
        # Key/value gradients per QUERY head, summed over each kv head's group at the end:
        # heads of one group may keep the same positions, which a scatter would collide on.
        grad_k = q.new_zeros(q.shape, dtype=acc)
        grad_v = q.new_zeros(q.shape, dtype=acc)
        for block in ctx.blocks:
            dq, dk, dv = attention_backward(
                block.gather(grad_out),
                block.gather(q),
                block.gather(k, kv=True),
                block.gather(v, kv=True),
                block.gather(out),
                block.gather_lse(lse),
                causal=ctx.causal,
                scale=ctx.scale,
                kernel=ctx.kernel,
            )
            block.add(grad_q, dq)
            block.add(grad_k, dk)
            block.add(grad_v, dv)
        batch, seq_len, heads, dim = q.shape
        kv_heads = k.shape[2]
        if kv_heads != heads:  # (b, n, g, h/g, d) -> (b, n, g, d)
            grad_k = grad_k.view(batch, seq_len, kv_heads, heads // kv_heads, dim).sum(3)
            grad_v = grad_v.view(batch, seq_len, kv_heads, heads // kv_heads, dim).sum(3)
        return (grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None, None)


def _positive_ints(name: str, values) -> tuple[int, ...]:
    if isinstance(values, (str, bytes, torch.Tensor)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of positive ints, got {values!r}")
    try:
        ints = tuple(operator.index(x) for x in values if not isinstance(x, bool))
    except TypeError:
        ints = ()
    if len(ints) != len(values) or any(x < 1 for x in ints):
        raise ValueError(f"{name} must be a list of positive ints, got {list(values)!r}")
    return ints


def check_patterns(segment_lengths, dilation_rates) -> tuple[tuple[int, int], ...]:
    """Validated ((w_1, r_1), ...); ValueError naming the bad argument otherwise."""
    lengths = _positive_ints("segment_lengths", segment_lengths)
    rates = _positive_ints("dilation_rates", dilation_rates)
    if not lengths:
        raise ValueError("segment_lengths must hold at least one pattern, got []")
    if len(lengths) != len(rates):
        raise ValueError(
            f"segment_lengths and dilation_rates must have the same length, got "
            f"{len(lengths)} segment_lengths {list(lengths)} and {len(rates)} dilation_rates "
            f"{list(rates)}"
        )
    return tuple(zip(lengths, rates, strict=True))


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q (b, n, h, d), k and v (b, n, g, d) with g dividing h, on one device in one dtype."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{name} must have shape (batch, seq, heads, head_dim), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    batch, seq_len, heads, dim = q.shape
    if k.shape[0] != batch or k.shape[1] != seq_len or k.shape[3] != dim:
        raise ValueError(
            f"k and v must have q's batch, seq and head_dim {batch, seq_len, dim}, "
            f"got {tuple(k.shape)}"
        )
    if batch < 1 or seq_len < 1 or heads < 1 or dim < 1:
        raise ValueError(f"q must have non-empty dimensions, got {tuple(q.shape)}")
    if heads % k.shape[2] != 0:
        raise ValueError(
            f"heads of q ({heads}) must be a multiple of the kv_heads of k and v ({k.shape[2]})"
        )


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """LongNet dilated attention, exactly as ../shared/SPEC.md defines it.

    q (b, n, h, d); k, v (b, n, g, d) with g dividing h (multi-query and grouped-query attention).
    Pattern i cuts the sequence into segments of segment_lengths[i] (the last may be shorter) and
    keeps every dilation_rates[i]-th position of each, at offset head mod r. Returns (b, n, h, d)
    in q's dtype. backend: "auto", "fused" (torch's fused kernels) or "math" (see kernels.py).
    """
    patterns = check_patterns(segment_lengths, dilation_rates)
    check_qkv(q, k, v)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale must be a number, got {softmax_scale!r}")
    queries = q.transpose(1, 2)  # (b, h, n, d): what the kernels see, for the backend check
    kernel = resolve_backend(backend, queries, queries, queries, causal)
    return _DilatedAttentionFunction.apply(
        q, k, v, patterns, bool(causal), float(softmax_scale), kernel
    )
