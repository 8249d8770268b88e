"""The executor of a plan (longnet/plan.py): forward and exact backward of dilated attention.

One executor serves one device and sequence parallelism; the latter hands in an `exchange`
that moves sparse K/V between ranks (longnet/ makes no torch.distributed call itself) and gets
the local calls run while the exchange is in flight.

Notation as in longnet/plan.py; `received` (2, b, N_recv, d) holds the K and V entries that
other ranks sent.

NOTE (paper Eq. 10): the patterns' outputs mix with weights proportional to their softmax
denominators, i.e. by their log-sum-exps. The official code computes those weights under
no_grad, which drops part of the gradient. Here every call's output and log-sum-exp merge in
float32 (float64 for float64), and the backward runs every call's fused backward with the
MERGED output and log-sum-exp: the exact gradient, storing nothing larger than the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from longnet.kernels import (
    accumulation_dtype,
    attention_backward,
    attention_forward,
    mark_nan_readers,
    reads_values_on_host,
)
from longnet.plan import Block, Call, Plan, remote_index, send_index, to_blocks, to_kernel


class Pending(Protocol):
    def wait(self) -> torch.Tensor: ...


# exchange(x (2, b, N_send, d), send_counts, recv_counts) -> Pending of (2, b, N_recv, d): what
# each rank of the group sent this one, in source-rank order.
Exchange = Callable[[torch.Tensor, tuple[int, ...], tuple[int, ...]], Pending]


def queries(call: Call, x: torch.Tensor) -> torch.Tensor:
    """(b*m, call heads, c, ...) of x (b, n, h, ...): a view for one block, else a copy."""
    parts = [to_kernel(block.select(x)) for block in call.blocks]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def own_keys(call: Call, x: torch.Tensor) -> torch.Tensor:
    """(b*m, call heads, c, d) of x (b, n, g, d): each query head's kv head, at the positions
    of call.keys where the call names them (decoding), else at the queries' own."""
    parts = [to_kernel(block.select_kv(x)) for block in call.keys or call.blocks]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def received_keys(call: Call, received: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, call heads, s, d) keys and values of a remote call."""
    keys, values = received[:, :, remote_index(call.remote, received.device)]
    return keys, values


def split(call: Call, part: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A call's (b*m, call heads, c, ...) result as one (b*m, hb, c, ...) view per block."""
    return (part,) if len(call.blocks) == 1 else part.split(call.head_counts, dim=1)


def merge(out, lse, block: Block, part_out, part_lse, first: bool) -> None:
    """Fold one block's kernel result into the running out (b, n, h, d) and lse (b, n, h), in
    place; lse is -inf where nothing was merged yet."""
    part_out = to_blocks(block, part_out, out.shape[0])  # (b, m, c, hb, d)
    part_lse = to_blocks(block, part_lse, out.shape[0])  # (b, m, c, hb)
    out_view, lse_view = block.select(out), block.select(lse)
    if first:
        out_view.copy_(part_out)
        lse_view.copy_(part_lse)
        return
    new_lse = torch.logaddexp(lse_view, part_lse)
    out_view.mul_(torch.exp(lse_view - new_lse).unsqueeze(-1))
    out_view.add_(part_out * torch.exp(part_lse - new_lse).unsqueeze(-1))
    lse_view.copy_(new_lse)


def adopt(block: Block | None, parts, shapes, dtype) -> list[torch.Tensor] | None:
    """The kernel results (b*m, h, L, ...) of the plan's whole block as the (b, n, h, ...)
    tensors they lay out, or None unless every one has the dtype and a contiguous layout."""
    if block is None:
        return None
    wholes = []
    for part, shape in zip(parts, shapes, strict=True):
        whole = to_blocks(block, part, shape[0]).flatten(1, 2)
        if part.dtype != dtype or tuple(whole.shape) != tuple(shape) or not whole.is_contiguous():
            return None
        wholes.append(whole)
    return wholes


def new_accumulator(plan: Plan, shape, like: torch.Tensor, dtype, fill: float = 0.0):
    """A tensor the first pattern's calls overwrite entirely (no fill) where it has r = 1."""
    if plan.covers_all:
        return torch.empty(shape, dtype=dtype, device=like.device)
    return torch.full(shape, fill, dtype=dtype, device=like.device)


def sparse_kv(k: torch.Tensor, v: torch.Tensor, plan: Plan) -> torch.Tensor:
    """(2, b, N_send, d): the entries of this shard's K and V that other ranks read."""
    index = send_index(plan.send, k.device)
    return torch.stack([x.flatten(1, 2)[:, index] for x in (k, v)])


def reads(flags: torch.Tensor, causal: bool, count: int) -> torch.Tensor:
    """(b*m, call heads, count): whether each of a call's `count` queries reads a flagged key,
    from the flags (b*m, call heads, s) of its keys in the call's order (causal: key j <= query
    j)."""
    if causal:
        return flags.cumsum(-1) > 0
    return flags.any(-1, keepdim=True).expand(-1, -1, count)


def forward(
    q,
    k,
    v,
    plan: Plan,
    *,
    scale: float,
    kernel: str,
    exchange: Exchange | None = None,
    out_dtype: torch.dtype | None = None,
):
    """(out (b, n, h, d) in out_dtype (default q's), lse (b, n, h) in the accumulation dtype,
    received). k, v (b, n, g, d), or (b, s, g, d) where the plan's calls name their key blocks
    (decoding: a window of cached keys)."""
    acc = accumulation_dtype(q.dtype)
    pending = None
    if plan.exchanges:  # in flight while the local calls run
        pending = exchange(sparse_kv(k, v, plan), plan.send_counts, plan.recv_counts)
    # NOTE: a causal kernel multiplies the zero weights of LATER keys by their values too, so a
    # NaN value would reach queries that never read it, and torch's CPU flash kernel turns a row
    # whose only key is NaN into a zero output; NaN keys and values enter the kernels as 0 and
    # their readers are marked NaN below. On CPU only: elsewhere the test would be a host sync
    # per call, so NaN spreads there as in SDPA (to more outputs, never to fewer). The sums
    # test for NaN ~15 times faster than a boolean reduction on CPU, which decoding pays per
    # step (+inf meeting -inf makes them NaN too: then no entry is flagged).
    exact = reads_values_on_host(v.device)
    nan_entries = nan_readers = None
    if exact and bool((k.sum() + v.sum()).isnan()):
        nan_entries = k.isnan().any(-1) | v.isnan().any(-1)  # (b, n, g)
        nan_readers = torch.zeros(q.shape[:3], dtype=torch.bool, device=q.device)
        k, v = (x.masked_fill(x.isnan(), 0.0) for x in (k, v))
    out = lse = None
    for call in plan.local:
        call_out, call_lse = attention_forward(
            queries(call, q),
            own_keys(call, k),
            own_keys(call, v),
            causal=call.causal,
            scale=scale,
            kernel=kernel,
        )
        if nan_entries is not None:
            flags = own_keys(call, nan_entries.unsqueeze(-1)).squeeze(-1)  # (b*m, heads, s)
            mark(nan_readers, call, reads(flags, call.causal, call_out.shape[-2]))
        if out is None:
            adopted = adopt(plan.whole_block, (call_out, call_lse), (q.shape, q.shape[:3]), acc)
            if adopted is not None:
                out, lse = adopted
                continue
            out = new_accumulator(plan, q.shape, q, acc)  # (b, n, h, d)
            lse = new_accumulator(plan, q.shape[:3], q, acc, -math.inf)  # (b, n, h)
        for block, part_out, part_lse in zip(
            call.blocks, split(call, call_out), split(call, call_lse), strict=True
        ):
            merge(out, lse, block, part_out, part_lse, call.first_write)
    if out is None:  # this shard holds no token of the first pattern
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], -math.inf, dtype=acc, device=q.device)
    received = pending.wait() if pending is not None else None
    nan_received = None
    if plan.remote:
        nan_entries = received.isnan()  # (2, b, N_recv, d): keys and values, as above
        if exact and bool(nan_entries.any()):
            nan_received = nan_entries.any(-1).any(0)  # (b, N_recv)
            received = received.masked_fill(nan_entries, 0.0)
            if nan_readers is None:
                nan_readers = torch.zeros(q.shape[:3], dtype=torch.bool, device=q.device)
    for call in plan.remote:
        keys, call_values = received_keys(call, received)
        call_out, call_lse = attention_forward(
            queries(call, q), keys, call_values, causal=False, scale=scale, kernel=kernel
        )
        if nan_received is not None:
            flags = nan_received[:, remote_index(call.remote, q.device)]  # (b, heads, s)
            mark(nan_readers, call, reads(flags, False, call_out.shape[-2]))
        for block, part_out, part_lse in zip(
            call.blocks, split(call, call_out), split(call, call_lse), strict=True
        ):
            merge(out, lse, block, part_out, part_lse, first=False)
    mark_nan_readers(out, lse, q, nan_readers)
    return out.to(out_dtype or q.dtype), lse, received


def mark(total: torch.Tensor, call: Call, part: torch.Tensor) -> None:
    """total (b, n, h) |= a call's (b*m, heads, c) flags."""
    for block, block_part in zip(call.blocks, split(call, part), strict=True):
        block.select(total).logical_or_(to_blocks(block, block_part, total.shape[0]))


def backward(grad_out, q, k, v, out, lse, received, plan: Plan, *, scale, kernel, exchange=None):
    """(dq, dk, dv) in the inputs' dtypes. Remote calls run first, so that the gradients of the
    received entries travel back to their owners while the local calls run."""
    acc = lse.dtype
    grad_q = grad_k = grad_v = pending = None
    if plan.exchanges:
        grad_q = torch.zeros(q.shape, dtype=acc, device=q.device)
        grad_received = torch.zeros(received.shape, dtype=acc, device=q.device)
        for call in plan.remote:
            dq, dk, dv = attention_backward(
                queries(call, grad_out),
                queries(call, q),
                *received_keys(call, received),
                queries(call, out),
                queries(call, lse),
                causal=False,
                scale=scale,
                kernel=kernel,
            )
            for block, part in zip(call.blocks, split(call, dq), strict=True):
                block.add(grad_q, part, first=False)
            # (2, b, heads, s, d) -> (2, b, heads*s, d); heads that share an entry add up
            grad_kv = torch.stack([dk, dv]).flatten(2, 3).to(acc)
            index = remote_index(call.remote, q.device).flatten()
            grad_received.index_add_(2, index, grad_kv)
        # The gradient of the exchange: the reverse exchange, summed at the owners.
        pending = exchange(grad_received, plan.recv_counts, plan.send_counts)
    for call in plan.local:
        grads = attention_backward(
            queries(call, grad_out),
            queries(call, q),
            own_keys(call, k),
            own_keys(call, v),
            queries(call, out),
            queries(call, lse),
            causal=call.causal,
            scale=scale,
            kernel=kernel,
        )
        if grad_k is None:
            whole = None if plan.exchanges else plan.whole_block
            adopted = adopt(whole, grads, (q.shape, k.shape, v.shape), acc)
            if adopted is not None:
                grad_q, grad_k, grad_v = adopted
                continue
            if grad_q is None:
                grad_q = new_accumulator(plan, q.shape, q, acc)  # (b, n, h, d)
            grad_k, grad_v = (
                new_accumulator(plan, x.shape, x, acc)
                if k.shape[2] == q.shape[2]
                else torch.zeros(x.shape, dtype=acc, device=x.device)
                for x in (k, v)
            )  # (b, n, g, d)
        for block, dq, dk, dv in zip(call.blocks, *(split(call, g) for g in grads), strict=True):
            block.add(grad_q, dq, first=call.first_write and not plan.exchanges)
            block.add_kv(grad_k, dk, first=call.first_write)
            block.add_kv(grad_v, dv, first=call.first_write)
    if grad_k is None:  # no local call
        grad_q = torch.zeros(q.shape, dtype=acc, device=q.device) if grad_q is None else grad_q
        grad_k, grad_v = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (k, v))
    if pending is not None:
        index = send_index(plan.send, k.device)
        for grad, returned in zip((grad_k, grad_v), pending.wait(), strict=True):
            grad.flatten(1, 2).index_add_(1, index, returned)
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)
