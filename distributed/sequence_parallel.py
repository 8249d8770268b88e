"""Sequence-parallel dilated attention (LongNet, Ding et al. 2023, section 3.1).

Notation (as in longnet/dilated.py, plus)
    P   ranks of the sequence-parallel group        p   this rank's index in it
    L   shard length, the tokens each rank holds    n   global length, P * L
    W   a pattern's effective segment length, min(w, n); a segment is "spanning" when W > L
    i   this rank's position inside a spanning segment (the segment holds tokens i*L.. of it)
    slot  a (kv head, offset) pair: the positions of one kv head kept by the query heads with
        that offset; query head j reads slot (j // (h/g), j mod r)
    N   sparse (position, kv head) entries sent or received; they arrive as
        `received` (2, b, N_recv, d), K and V

Token positions are global: a rank at position i of a segment keeps local token t for head j
when (i*L + t) mod r == j mod r, so its first kept token shifts with i.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from longnet.dilated import (
    Block,
    check_patterns,
    check_qkv,
    dilated_attention,
    merge_block,
    pattern_blocks,
    resolve_softmax_scale,
)
from longnet.kernels import (
    accumulation_dtype,
    attention_backward,
    attention_forward,
    resolve_backend,
)


@dataclass(frozen=True)
class Communication:
    """Bytes this rank sent and received in the last sequence-parallel attention call.

    Forward: the sparse K and V, in the input dtype. Backward: their gradients, in the
    accumulation dtype (float32 for 16-bit inputs), so the sum over ranks is not rounded.
    """

    forward_sent: int = 0
    forward_received: int = 0
    backward_sent: int = 0
    backward_received: int = 0


_last_communication = Communication()


def last_communication() -> Communication:
    """The bytes of the last forward (and of the backward after it, once it ran)."""
    return _last_communication


def _record(communication: Communication) -> None:
    global _last_communication
    _last_communication = communication


@dataclass(frozen=True)
class _ShardBlock(Block):
    """A Block over a shard that starts `first` tokens into a segment. Positions are global, so
    the heads head_offset, head_offset + r, ... keep the shard's tokens offset, offset + r, ...
    with offset = (head_offset - first) mod r; Block assumes offset == head_offset."""

    head_offset: int = 0

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """View (b, m, c, hb, ...) of x (b, n, h, ...)."""
        return self.segments(x)[:, :, self.offset :: self.rate, self.head_offset :: self.rate]


@dataclass(frozen=True)
class _Call:
    """One dense attention: the queries of a block against the keys of its own shard (block's
    kv view) or against keys received from other ranks."""

    queries: Block
    received_keys: torch.Tensor | None  # (1, hb, s) entries of `received`; None: own keys
    causal: bool


@dataclass(frozen=True)
class _Plan:
    """Everything one rank runs for one layout, computed once (see _plan)."""

    calls: tuple[_Call, ...]
    send_index: torch.Tensor  # (N_send,) entries (position * g + kv head), by destination rank
    send_counts: tuple[int, ...]  # entries sent to each rank of the group
    recv_counts: tuple[int, ...]  # entries received from each rank of the group


def _effective_segment_lengths(patterns, shard_len: int, world: int) -> tuple[int, ...]:
    """W = min(w, n) per pattern; ValueError for a segment that straddles shard boundaries."""
    seq_len = shard_len * world
    lengths = []
    for w, r in patterns:
        length = min(w, seq_len)
        if world == 1:  # one device takes any length (the last segment may be short)
            lengths.append(length)
            continue
        if length <= shard_len and shard_len % length:
            raise ValueError(
                f"pattern (segment_length={w}, dilation_rate={r}) cannot run on {world} ranks of "
                f"{shard_len} tokens: its segments straddle shard boundaries (the shard length "
                f"{shard_len} is not a multiple of {length})"
            )
        if length > shard_len and length % shard_len:
            raise ValueError(
                f"pattern (segment_length={w}, dilation_rate={r}) cannot run on {world} ranks of "
                f"{shard_len} tokens: a segment of {length} tokens does not cover whole shards "
                f"({length} is not a multiple of {shard_len})"
            )
        lengths.append(length)
    return tuple(lengths)


def _segment(rank: int, shard_len: int, seq_len: int, length: int) -> tuple[int, range]:
    """(index of the shard's first token inside its segment, the ranks the segment spans)."""
    start = rank * shard_len // length * length
    end = min(start + length, seq_len)
    return rank * shard_len - start, range(start // shard_len, end // shard_len)


def _kept(first: int, shard_len: int, offset: int, r: int) -> torch.Tensor:
    """Tokens t of a shard starting at segment index `first` with (first + t) % r == offset."""
    return torch.arange(shard_len)[(offset - first) % r :: r]


def _slots(heads: int, kv_heads: int, r: int) -> list[tuple[int, int]]:
    # NOTE: one entry per (kv head, offset), not per query head: query heads of one kv head that
    # keep the same positions share what is sent (SPEC's byte formula counts query heads, which is
    # the same number when kv_heads == heads).
    group = heads // kv_heads
    return sorted({(head // group, head % r) for head in range(heads)})


@functools.lru_cache(maxsize=256)
def _plan(
    rank: int,
    world: int,
    shard_len: int,
    heads: int,
    kv_heads: int,
    patterns: tuple[tuple[int, int], ...],  # (W, r), W already effective
    causal: bool,
    device: torch.device,
) -> _Plan:
    seq_len, group = world * shard_len, heads // kv_heads
    spanning = [(index, w, r) for index, (w, r) in enumerate(patterns) if w > shard_len]

    def sparse(owner: int, w: int, r: int) -> list[torch.Tensor]:
        """Entries (position * g + kv head) of owner's sparse K/V for one pattern, per slot."""
        first = _segment(owner, shard_len, seq_len, w)[0]
        return [
            _kept(first, shard_len, offset, r) * kv_heads + kv
            for kv, offset in _slots(heads, kv_heads, r)
        ]

    # Who sends what to whom. all_to_all_single lays out what it receives by source rank, and
    # each source sends its patterns in order, so both sides agree on where a region lies.
    send_index, send_counts, recv_counts = [], [0] * world, [0] * world
    regions = {}  # (source rank, pattern index) -> where its entries start in `received`
    next_entry = 0
    for other in range(world):
        for index, w, r in spanning:
            if other == rank or rank not in _segment(other, shard_len, seq_len, w)[1]:
                continue
            # NOTE: with causal masking a rank needs only the keys of EARLIER ranks, so keys
            # are sent forward only (the paper all-gathers the whole segment).
            if other < rank or not causal:
                count = sum(map(len, sparse(other, w, r)))
                regions[other, index] = next_entry
                next_entry += count
                recv_counts[other] += count
            if rank < other or not causal:
                entries = sparse(rank, w, r)
                send_index.extend(entries)
                send_counts[other] += sum(map(len, entries))

    calls = []
    for index, (w, r) in enumerate(patterns):
        first, ranks = _segment(rank, shard_len, seq_len, w)
        if w <= shard_len or len(ranks) == 1:  # segments inside the shard: single-device plan
            # (len(ranks) == 1: the short last segment of a spanning pattern is this shard)
            blocks = pattern_blocks(shard_len, min(w, shard_len), r, heads, kv_heads, device)
            calls.extend(_Call(block, None, causal) for block in blocks)
            continue
        # Where each slot of each source lies in `received`.
        remote: dict[tuple[int, int], list[torch.Tensor]] = {}
        for source in ranks:
            if (source, index) not in regions:
                continue
            start = regions[source, index]
            for slot, entries in zip(_slots(heads, kv_heads, r), sparse(source, w, r), strict=True):
                if len(entries):  # a shard shorter than r may hold none of a slot's positions
                    remote.setdefault(slot, []).append(start + torch.arange(len(entries)))
                start += len(entries)
        for head_offset in range(min(r, heads)):
            offset = (head_offset - first) % r
            if offset >= shard_len:  # these heads keep no token of this shard
                continue
            block_heads = torch.arange(head_offset, heads, r)
            block_kv_heads = block_heads // group
            steps = set(block_kv_heads.diff().tolist()) or {1}  # as in pattern_blocks
            block = _ShardBlock(
                start=0,
                num_segments=1,
                segment_length=shard_len,
                offset=offset,
                rate=r,
                kv_heads=block_kv_heads.to(device),
                kv_step=steps.pop() if len(steps) == 1 else None,
                head_offset=head_offset,
            )
            # Own keys: causal if masking. Earlier ranks' keys (the only ones received when
            # causal) are all visible: a second, non-causal call, merged by log-sum-exp.
            calls.append(_Call(block, None, causal))
            keys = [remote.get((kv, head_offset), []) for kv in block_kv_heads.tolist()]
            if keys[0]:
                received_keys = torch.stack([torch.cat(parts) for parts in keys])[None]
                calls.append(_Call(block, received_keys.to(device), False))

    empty = torch.zeros(0, dtype=torch.long)
    return _Plan(
        calls=tuple(calls),
        send_index=torch.cat([empty, *send_index]).to(device),
        send_counts=tuple(send_counts),
        recv_counts=tuple(recv_counts),
    )


def _exchange(x: torch.Tensor, send_counts, recv_counts, group) -> torch.Tensor:
    """All-to-all of the entries of x (2, b, N_send, d) -> (2, b, N_recv, d).

    One collective for all patterns; ranks outside a segment exchange zero entries, so only the
    ranks of a segment move data. all_to_all_single with uneven splits runs on gloo and NCCL.
    """
    send = x.permute(2, 0, 1, 3).contiguous()  # (N_send, 2, b, d): splits run along dim 0
    received = send.new_empty((sum(recv_counts), *send.shape[1:]))
    dist.all_to_all_single(received, send, list(recv_counts), list(send_counts), group=group)
    return received.permute(1, 2, 0, 3)


class _SequenceParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, group, scale, kernel):
        sparse_kv = torch.stack([x.flatten(1, 2)[:, plan.send_index] for x in (k, v)])
        received = _exchange(sparse_kv, plan.send_counts, plan.recv_counts, group)
        acc = accumulation_dtype(q.dtype)
        out = q.new_zeros(q.shape, dtype=acc)  # (b, L, h, d)
        lse = q.new_full(q.shape[:3], -math.inf, dtype=acc)  # (b, L, h)
        for call in plan.calls:
            block_out, block_lse = attention_forward(
                call.queries.gather(q),
                *_keys_and_values(call, k, v, received),
                causal=call.causal,
                scale=scale,
                kernel=kernel,
            )
            merge_block(out, lse, call.queries, block_out, block_lse)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, received)
        ctx.plan, ctx.group, ctx.scale, ctx.kernel = plan, group, scale, kernel
        entry_bytes = 2 * q.shape[0] * q.shape[-1] * q.element_size()  # K and V of one entry
        _record(
            Communication(
                forward_sent=sum(plan.send_counts) * entry_bytes,
                forward_received=sum(plan.recv_counts) * entry_bytes,
            )
        )
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, received = ctx.saved_tensors
        plan, acc = ctx.plan, lse.dtype
        grad_q = q.new_zeros(q.shape, dtype=acc)  # (b, L, h, d)
        grad_k = k.new_zeros(k.shape, dtype=acc)  # (b, L, g, d)
        grad_v = v.new_zeros(v.shape, dtype=acc)
        grad_received = received.new_zeros(received.shape, dtype=acc)  # (2, b, N_recv, d)
        for call in plan.calls:
            queries = call.queries
            # Each call's backward takes the MERGED out and lse, as in longnet/dilated.py.
            dq, dk, dv = attention_backward(
                queries.gather(grad_out),
                queries.gather(q),
                *_keys_and_values(call, k, v, received),
                queries.gather(out),
                queries.gather_lse(lse),
                causal=call.causal,
                scale=ctx.scale,
                kernel=ctx.kernel,
            )
            queries.add(grad_q, dq)
            if call.received_keys is None:
                queries.add_kv(grad_k, dk)
                queries.add_kv(grad_v, dv)
            else:  # (2, b, hb, s, d) -> (2, b, hb*s, d); heads sharing an entry add up
                grad_kv = torch.stack([dk, dv]).flatten(2, 3).to(acc)
                grad_received.index_add_(2, call.received_keys.flatten(), grad_kv)
        # The gradient of the all-gather: a reduce-scatter (sum) of dK/dV to their owners.
        returned = _exchange(grad_received, plan.recv_counts, plan.send_counts, ctx.group)
        for grad, returned_grad in zip((grad_k, grad_v), returned, strict=True):
            grad.flatten(1, 2).index_add_(1, plan.send_index, returned_grad)
        entry_bytes = 2 * q.shape[0] * q.shape[-1] * grad_received.element_size()
        _record(
            dataclasses.replace(
                _last_communication,
                backward_sent=sum(plan.recv_counts) * entry_bytes,
                backward_received=sum(plan.send_counts) * entry_bytes,
            )
        )
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None, None


def _keys_and_values(call: _Call, k, v, received) -> tuple[torch.Tensor, torch.Tensor]:
    """(b*m, hb, s, d) keys and values of one call."""
    if call.received_keys is None:
        return call.queries.gather(k, kv=True), call.queries.gather(v, kv=True)
    keys, values = received[:, :, call.received_keys].flatten(1, 2)
    return keys, values


def _group_size_and_rank(group) -> tuple[int, int]:
    if group is None and not dist.is_initialized():
        return 1, 0
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not in group {group}")
    return dist.get_world_size(group), rank


def check_layout(segment_lengths, dilation_rates, seq_len: int, world: int) -> None:
    """ValueError unless a sequence of seq_len tokens splits over `world` ranks for these
    patterns (checked before any process group exists)."""
    if seq_len % world:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by the {world} sequence-parallel ranks"
        )
    _effective_segment_lengths(
        check_patterns(segment_lengths, dilation_rates), seq_len // world, world
    )


def shard_sequence(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous slice of x along dim (the sequence) over the ranks of group."""
    world, rank = _group_size_and_rank(group)
    seq_len = x.shape[dim]
    if seq_len % world:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by the {world} ranks of the "
            f"sequence-parallel group"
        )
    shard_len = seq_len // world
    return x.narrow(dim, rank * shard_len, shard_len)


def sequence_parallel_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths,
    dilation_rates,
    *,
    group=None,
    causal: bool = False,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """longnet.dilated_attention over a sequence split across the ranks of `group`.

    q (b, L, h, d) and k, v (b, L, g, d) are this rank's shard of a global sequence of P * L
    tokens split evenly in rank order over the P ranks of group (default: the world; a single
    process when torch.distributed is not initialized). Returns this rank's shard of what
    longnet.dilated_attention returns for the whole sequence; gradients likewise. Every rank of
    the group must call it with the same shapes and arguments.
    """
    patterns = check_patterns(segment_lengths, dilation_rates)
    check_qkv(q, k, v)
    world, rank = _group_size_and_rank(group)
    batch, shard_len, heads, _ = q.shape
    lengths = _effective_segment_lengths(patterns, shard_len, world)
    if all(length <= shard_len for length in lengths):  # also P = 1: nothing spans ranks
        _record(Communication())
        return dilated_attention(
            q,
            k,
            v,
            segment_lengths,
            dilation_rates,
            causal=causal,
            softmax_scale=softmax_scale,
            backend=backend,
        )
    softmax_scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    queries = q.transpose(1, 2)  # (b, h, L, d): what the kernels see, for the backend check
    kernel = resolve_backend(backend, queries, queries, queries, causal)
    rates = [r for _, r in patterns]
    plan = _plan(
        rank,
        world,
        shard_len,
        heads,
        k.shape[2],
        tuple(zip(lengths, rates, strict=True)),
        bool(causal),
        q.device,
    )
    return _SequenceParallelFunction.apply(q, k, v, plan, group, float(softmax_scale), kernel)
