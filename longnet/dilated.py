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
from functools import partial

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
    """Segments of one length and the heads of one offset: one dense attention call.

    Head j keeps positions p with p mod r == j mod r, so the heads o, o+r, o+2r, ... share the
    kept positions o, o+r, o+2r, ... of every segment: both are strided slices, and a block's
    queries, outputs and log-sum-exps are VIEWS of the (b, n, h, ...) tensors. The kernels take
    them as strided (b*m, hb, c, d) tensors and nothing is gathered or scattered.
    """

    start: int  # token position of the first segment
    num_segments: int  # m
    segment_length: int  # L
    offset: int  # o: first kept position in each segment, and first query head
    rate: int  # r: step between kept positions, and between query heads
    kv_heads: torch.Tensor  # (hb,) the key/value head each query head reads
    kv_step: int | None  # kv_heads is first + kv_step * j, or None if no stride describes it

    @property
    def num_heads(self) -> int:  # hb
        return len(self.kv_heads)

    @property
    def count(self) -> int:  # c
        return len(range(self.offset, self.segment_length, self.rate))

    def segments(self, x: torch.Tensor) -> torch.Tensor:
        """View of x (b, n, ...) as (b, m, L, ...) over this block's segments."""
        end = self.start + self.num_segments * self.segment_length
        return x[:, self.start : end].unflatten(1, (self.num_segments, self.segment_length))

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """View (b, m, c, hb, ...) of x (b, n, h, ...)."""
        o, r = self.offset, self.rate
        return self.segments(x)[:, :, o::r, o::r]

    def select_kv(self, x: torch.Tensor) -> torch.Tensor:
        """(b, m, c, hb, d) of x (b, n, g, d): each query head's key/value head."""
        kept = self.segments(x)[:, :, self.offset :: self.rate]  # (b, m, c, g, d)
        first, count = int(self.kv_heads[0]), len(self.kv_heads)
        if self.kv_step is None:  # grouped heads that no stride describes: copy
            return kept.index_select(3, self.kv_heads)
        if self.kv_step == 0:  # one kv head for all (multi-query): a stride-0 view
            return kept[:, :, :, first : first + 1].expand(-1, -1, -1, count, -1)
        return kept[:, :, :, first : first + self.kv_step * (count - 1) + 1 : self.kv_step]

    def gather(self, x: torch.Tensor, kv: bool = False) -> torch.Tensor:
        """(b, n, heads, d) -> (b*m, hb, c, d), the layout of the attention kernels.

        A view, unless b > 1 and the segments do not span the sequence (then a copy).
        """
        return (self.select_kv(x) if kv else self.select(x)).flatten(0, 1).transpose(1, 2)

    def gather_lse(self, lse: torch.Tensor) -> torch.Tensor:
        """(b, n, h) -> (b*m, hb, c)."""
        return self.select(lse).flatten(0, 1).transpose(1, 2)

    def unfold(self, part: torch.Tensor, batch: int) -> torch.Tensor:
        """A kernel result (b*m, hb, c, ...) as (b, m, c, hb, ...)."""
        return part.transpose(1, 2).unflatten(0, (batch, self.num_segments))

    def add(self, total: torch.Tensor, part: torch.Tensor, first: bool = False) -> None:
        """total (b, n, h, d) += part (b*m, hb, c, d); `first`: nothing was added there yet."""
        value = self.unfold(part, total.shape[0])
        if first:
            self.select(total).copy_(value)
        else:
            self.select(total).add_(value)

    def add_kv(self, total: torch.Tensor, part: torch.Tensor, first: bool = False) -> None:
        """total (b, n, g, d) += part (b*m, hb, c, d), summing query heads that share a kv head.

        `first`: nothing was added at these positions yet.
        """
        value = self.unfold(part, total.shape[0])
        if not self.kv_step:  # several query heads per kv head: accumulate
            kept = self.segments(total)[:, :, self.offset :: self.rate]  # (b, m, c, g, d)
            kept.index_add_(3, self.kv_heads, value.to(total.dtype))
        elif first:
            self.select_kv(total).copy_(value)
        else:
            self.select_kv(total).add_(value)


# Most (query, head) pairs one attention call handles per batch element.
MAX_BLOCK_QUERIES = 1 << 19


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
        # An offset past a short segment, or past the last head, keeps nothing.
        for offset in range(min(r, length, heads)):
            count = len(range(offset, length, r))
            block_heads = torch.arange(offset, heads, r, device=device)
            block_kv_heads = block_heads // group_size
            steps = set(block_kv_heads.diff().tolist()) or {1}
            kv_step = steps.pop() if len(steps) == 1 else None
            # Bound the gathered copies of one call, so memory stays linear in seq_len.
            per_call = max(1, MAX_BLOCK_QUERIES // (count * len(block_heads)))
            for first in range(0, num_segments, per_call):
                blocks.append(
                    Block(
                        start=start + first * length,
                        num_segments=min(per_call, num_segments - first),
                        segment_length=length,
                        offset=offset,
                        rate=r,
                        kv_heads=block_kv_heads,
                        kv_step=kv_step,
                    )
                )
    return tuple(blocks)


def merge_block(
    out: torch.Tensor,
    lse: torch.Tensor,
    block: Block,
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
    first: bool = False,
) -> None:
    """Fold one block's (out, lse) into the running (out, lse) in place (paper Eq. 10).

    out (b, n, h, d) and lse (b, n, h) are in the accumulation dtype; lse is -inf where nothing
    was merged yet, and `first` says that holds at every position of the block.
    """
    part_out = block.unfold(block_out, out.shape[0])  # (b, m, c, hb, d)
    part_lse = block.unfold(block_lse, out.shape[0])  # (b, m, c, hb)
    out_view, lse_view = block.select(out), block.select(lse)  # views: updated in place
    if first:
        out_view.copy_(part_out)
        lse_view.copy_(part_lse)
        return
    new_lse = torch.logaddexp(lse_view, part_lse)
    out_view.mul_(torch.exp(lse_view - new_lse).unsqueeze(-1))
    out_view.add_(part_out * torch.exp(part_lse - new_lse).unsqueeze(-1))
    lse_view.copy_(new_lse)


# A kernel call with fewer (segment, head) pairs than this per batch element starves the cores
# (torch's CPU flash backward runs one thread per (batch, head)).
MIN_CALL_PAIRS = 32


def pack(blocks: tuple[Block, ...]) -> tuple[tuple[Block, ...], ...]:
    """The kernel calls of one pattern: a block alone, or small blocks of one shape together.

    NOTE: a pattern with a large r has few heads per offset (one when r >= h), so alone its
    blocks would be (segments, 1 head) calls; packing copies their sparse, hence small, inputs
    into one call over all heads.
    """
    calls, small = [], {}
    for block in blocks:
        if block.num_segments * block.num_heads >= MIN_CALL_PAIRS:
            calls.append((block,))
        else:
            shape = (block.start, block.num_segments, block.segment_length, block.count)
            small.setdefault(shape, []).append(block)
    return tuple(calls) + tuple(tuple(group) for group in small.values())


def gather_call(call: tuple[Block, ...], x: torch.Tensor, kv: bool = False) -> torch.Tensor:
    """(b*m, heads of the call, c, d): a view for one block, else the blocks' heads concatenated."""
    if len(call) == 1:
        return call[0].gather(x, kv)
    return torch.cat([block.gather(x, kv) for block in call], dim=1)


def gather_call_lse(call: tuple[Block, ...], lse: torch.Tensor) -> torch.Tensor:
    return torch.cat([block.gather_lse(lse) for block in call], dim=1)


def split_call(call: tuple[Block, ...], part: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A call's (b*m, heads, c, ...) result as one (b*m, hb, c, ...) view per block."""
    return part.split([block.num_heads for block in call], dim=1)


def plan(q: torch.Tensor, k: torch.Tensor, patterns) -> list[tuple[tuple[Block, ...], ...]]:
    """The kernel calls of every pattern, the pattern that keeps the most (least r) first."""
    _, seq_len, heads, _ = q.shape
    ordered = sorted(patterns, key=lambda pattern: pattern[1])
    return [pack(pattern_blocks(seq_len, w, r, heads, k.shape[2], q.device)) for w, r in ordered]


def spanning_call(calls, seq_len: int) -> Block | None:
    """The block of the first pattern when one call of it covers every (position, head).

    NOTE: its kernel result is then laid out exactly as a (b, n, h, ...) tensor, and becomes the
    running result instead of being copied into a fresh one: at the paper's patterns (r = 1
    first) that saves an allocation and a full read and write per accumulated tensor.
    """
    if len(calls[0]) != 1 or len(calls[0][0]) != 1:
        return None
    block = calls[0][0][0]
    spans = block.start == 0 and block.num_segments * block.segment_length == seq_len
    return block if spans and block.rate == 1 else None


def adopt(block: Block, part: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor | None:
    """A spanning block's kernel result (b*m, h, L, ...) as the (b, n, h, ...) tensor it lays
    out, or None where its dtype or memory layout differ."""
    whole = block.unfold(part, shape[0]).flatten(1, 2)  # (b, n, h, ...)
    if part.dtype != dtype or tuple(whole.shape) != tuple(shape) or not whole.is_contiguous():
        return None
    return whole


def adopt_all(block: Block | None, parts, shapes, dtype: torch.dtype) -> list[torch.Tensor] | None:
    """adopt() for each of a call's results, or None unless there is a spanning block and every
    result can be adopted."""
    if block is None:
        return None
    wholes = [adopt(block, part, shape, dtype) for part, shape in zip(parts, shapes, strict=True)]
    return None if any(whole is None for whole in wholes) else wholes


def covers_all(calls) -> bool:
    """Whether the first pattern writes every (position, head): r = 1 in some pattern (sorted
    first), so accumulators need no fill."""
    return calls[0][0][0].rate == 1


class _DilatedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, patterns, causal, scale, kernel):
        calls = plan(q, k, patterns)
        acc = accumulation_dtype(q.dtype)
        spanning = spanning_call(calls, q.shape[1])
        out = lse = None
        for index, pattern in enumerate(calls):
            for call in pattern:
                call_out, call_lse = attention_forward(
                    gather_call(call, q),
                    gather_call(call, k, kv=True),
                    gather_call(call, v, kv=True),
                    causal=causal,
                    scale=scale,
                    kernel=kernel,
                )
                if out is None:
                    adopted = adopt_all(spanning, (call_out, call_lse), (q.shape, q.shape[:3]), acc)
                    if adopted is not None:
                        out, lse = adopted
                        continue
                    new = torch.empty if covers_all(calls) else torch.zeros
                    out = new(q.shape, dtype=acc, device=q.device)  # (b, n, h, d)
                    lse = torch.full(q.shape[:3], -math.inf, dtype=acc, device=q.device)
                for block, block_out, block_lse in zip(
                    call, split_call(call, call_out), split_call(call, call_lse), strict=True
                ):
                    merge_block(out, lse, block, block_out, block_lse, first=index == 0)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.calls, ctx.causal, ctx.scale, ctx.kernel = calls, causal, scale, kernel
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        acc, calls = lse.dtype, ctx.calls
        spanning = spanning_call(calls, q.shape[1])
        grad_q = grad_k = grad_v = None
        for index, pattern in enumerate(calls):
            for call in pattern:
                grads = attention_backward(
                    gather_call(call, grad_out),
                    gather_call(call, q),
                    gather_call(call, k, kv=True),
                    gather_call(call, v, kv=True),
                    gather_call(call, out),
                    gather_call_lse(call, lse),
                    causal=ctx.causal,
                    scale=ctx.scale,
                    kernel=ctx.kernel,
                )
                if grad_q is None:
                    adopted = adopt_all(spanning, grads, (q.shape, k.shape, v.shape), acc)
                    if adopted is not None:
                        grad_q, grad_k, grad_v = adopted
                        continue
                    new_q = torch.empty if covers_all(calls) else torch.zeros
                    new_kv = new_q if k.shape[2] == q.shape[2] else torch.zeros
                    grad_q = new_q(q.shape, dtype=acc, device=q.device)  # (b, n, h, d)
                    grad_k = new_kv(k.shape, dtype=acc, device=k.device)  # (b, n, g, d)
                    grad_v = new_kv(v.shape, dtype=acc, device=v.device)
                for block, dq, dk, dv in zip(
                    call, *map(partial(split_call, call), grads), strict=True
                ):
                    block.add(grad_q, dq, first=index == 0)
                    block.add_kv(grad_k, dk, first=index == 0)
                    block.add_kv(grad_v, dv, first=index == 0)
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


def resolve_softmax_scale(softmax_scale, head_dim: int) -> float:
    """The scale of the scores: 1/sqrt(head_dim) by default; ValueError for a non-number."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale must be a number, got {softmax_scale!r}")
    return float(softmax_scale)


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
    softmax_scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    queries = q.transpose(1, 2)  # (b, h, n, d): what the kernels see, for the backend check
    kernel = resolve_backend(backend, queries, queries, queries, causal)
    return _DilatedAttentionFunction.apply(
        q, k, v, patterns, bool(causal), float(softmax_scale), kernel
    )
