"""Sequence-parallel dilated attention (LongNet, Ding et al. 2023, section 3.1).

P ranks hold contiguous, equal shards of L tokens of one sequence of n = P * L tokens; token
positions are global everywhere. Patterns whose segments fit in a shard run as on one device.
For a pattern whose segments span ranks, each rank sparsifies its own K and V (only what its
heads keep), the ranks of a segment exchange those entries in one all_to_all, and local queries
attend own and received keys; the planner (longnet/plan.py) lays all of it out and the executor
(longnet/engine.py) runs it, the local calls while the exchange is in flight. The algorithm and
its byte formula: docs/sequence-parallel.md. Notation as in longnet/plan.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from longnet import engine, selection
from longnet.checks import flag
from longnet.dilated import attend, check_arguments, check_patterns, kernel_for
from longnet.kernels import accumulation_dtype
from longnet.plan import make_plan


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


class _AllToAll:
    """An all_to_all of the entries of x (2, b, N_send, d) in flight; wait() -> (2, b, N_recv, d).

    One collective for all spanning patterns; ranks outside a segment exchange zero entries.
    all_to_all_single with uneven splits runs on gloo and NCCL."""

    def __init__(self, x, send_counts, recv_counts, group, overlap: bool):
        self.send = x.permute(2, 0, 1, 3).contiguous()  # (N_send, 2, b, d): splits along dim 0
        self.received = self.send.new_empty((sum(recv_counts), *self.send.shape[1:]))
        self.work = dist.all_to_all_single(
            self.received,
            self.send,
            list(recv_counts),
            list(send_counts),
            group=group,
            async_op=overlap,
        )

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        return self.received.permute(1, 2, 0, 3)


def _keys_before(k, v, group, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V (b, (rank + 1) * L, g, d) of every position up to this shard's end: what the
    content-selected pattern's queries may choose from (an all_gather of the shards).

    NOTE: this moves whole shards, O(n) bytes per rank; fetching only the chosen blocks from
    their owners would bound it by top_k blocks per query (not built yet)."""
    stacked = torch.stack([k, v]).contiguous()  # (2, b, L, g, d)
    gathered = [torch.empty_like(stacked) for _ in range(world)]
    dist.all_gather(gathered, stacked, group=group)
    prefix = torch.cat(gathered[: rank + 1], dim=2)  # (2, b, (rank + 1) * L, g, d)
    return prefix[0], prefix[1]


def _return_to_owners(grads: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
    """This shard's part of the gradients (2, b, (rank + 1) * L, g, d) every rank computed for
    the keys before its end, summed over the ranks."""
    shard_len = grads.shape[2] // (rank + 1)
    total = torch.nn.functional.pad(grads, (0, 0, 0, 0, 0, (world - rank - 1) * shard_len))
    dist.all_reduce(total, group=group)
    return total[:, :, rank * shard_len : (rank + 1) * shard_len]


class _SequenceParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, group, scale, kernel, overlap, chosen_blocks):
        def exchange(x, send_counts, recv_counts):
            return _AllToAll(x, send_counts, recv_counts, group, overlap)

        acc = accumulation_dtype(q.dtype) if chosen_blocks else None
        out, lse, received = engine.forward(
            q, k, v, plan, scale=scale, kernel=kernel, exchange=exchange, out_dtype=acc
        )
        entry_bytes = 2 * q.shape[0] * q.shape[-1] * q.element_size()  # K and V of one entry
        sent, got = sum(plan.send_counts) * entry_bytes, sum(plan.recv_counts) * entry_bytes
        keys = values = None
        if chosen_blocks:
            top_k, block_size, window, rank, world = chosen_blocks
            keys, values = _keys_before(k, v, group, rank, world)
            offset = rank * q.shape[1]
            part = selection.forward(
                q, keys, values, block_size, top_k, window, scale, kernel, offset
            )
            out, lse = selection.mix(out, lse, *part)
            out = out.to(q.dtype)
            shard_bytes = k.numel() * 2 * k.element_size()
            sent, got = sent + (world - 1) * shard_bytes, got + (world - 1) * shard_bytes
        ctx.save_for_backward(q, k, v, out, lse, received, keys, values)
        ctx.plan, ctx.scale, ctx.kernel, ctx.exchange = plan, scale, kernel, exchange
        ctx.group, ctx.chosen_blocks = group, chosen_blocks
        _record(Communication(forward_sent=sent, forward_received=got))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, received, keys, values = ctx.saved_tensors
        plan = ctx.plan
        grads = engine.backward(
            grad_out,
            q,
            k,
            v,
            out,
            lse,
            received,
            plan,
            scale=ctx.scale,
            kernel=ctx.kernel,
            exchange=ctx.exchange,
        )
        entry_bytes = 2 * q.shape[0] * q.shape[-1] * lse.element_size()
        sent, got = sum(plan.recv_counts) * entry_bytes, sum(plan.send_counts) * entry_bytes
        if ctx.chosen_blocks:
            top_k, block_size, window, rank, world = ctx.chosen_blocks
            offset = rank * q.shape[1]
            grad_q, grad_keys, grad_values = selection.backward(
                grad_out, q, keys, values, out, lse, block_size, top_k, window, ctx.scale,
                ctx.kernel, offset,
            )  # fmt: skip
            grad_k, grad_v = _return_to_owners(
                torch.stack([grad_keys, grad_values]), ctx.group, rank, world
            )
            grads = tuple(
                (a + b).to(a.dtype) for a, b in zip(grads, (grad_q, grad_k, grad_v), strict=True)
            )
            all_reduced = 2 * grad_keys.numel() // (rank + 1) * world
            sent, got = (
                sent + all_reduced * lse.element_size(),
                got + all_reduced * lse.element_size(),
            )
        _record(dataclasses.replace(_last_communication, backward_sent=sent, backward_received=got))
        return *grads, None, None, None, None, None, None


# Layouts every rank of a group agreed on: checked once each (one small collective).
_agreed: set = set()


def _describe(
    q, k, v, segment_lengths, dilation_rates, causal, softmax_scale, backend, head_shift
) -> dict:
    """What every rank of a group must pass alike, as comparable text."""

    def tensor(x):
        if not isinstance(x, torch.Tensor):
            return type(x).__name__
        return f"{tuple(x.shape)} {x.dtype} {x.device.type}"

    return {
        "q (shape, dtype, device)": tensor(q),
        "k (shape, dtype, device)": tensor(k),
        "v (shape, dtype, device)": tensor(v),
        "segment_lengths": repr(_as_list(segment_lengths)),
        "dilation_rates": repr(_as_list(dilation_rates)),
        "causal": repr(causal),
        "softmax_scale": repr(softmax_scale),
        "backend": repr(backend),
        "head_shift": repr(head_shift),
    }


def _as_list(values):
    return list(values) if isinstance(values, (list, tuple)) else values


def _check_ranks_agree(description: dict, group, world: int) -> None:
    """ValueError on EVERY rank of the group, naming what differs, unless all ranks pass the
    same layout. Ranks that disagree would otherwise hang, abort or compute wrong numbers."""
    key = (group, tuple(description.values()))
    if key in _agreed:
        return
    gathered = [None] * world
    dist.all_gather_object(gathered, description, group=group)
    differing = [name for name in description if len({d[name] for d in gathered}) > 1]
    if differing:
        details = "; ".join(
            f"{name}: " + ", ".join(f"rank {i} {d[name]}" for i, d in enumerate(gathered))
            for name in differing
        )
        raise ValueError(f"the ranks of the sequence-parallel group differ in {details}")
    _agreed.add(key)


def _group_size_and_rank(group) -> tuple[int, int]:
    if group is None and not dist.is_initialized():
        return 1, 0
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not in group {group}")
    return dist.get_world_size(group), rank


def default_overlap(group=None) -> bool:
    """Whether the exchange overlaps the local calls by default: on NCCL only."""
    world, _ = _group_size_and_rank(group)
    return world > 1 and dist.get_backend(group) == "nccl"


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
    head_shift: int = 0,
    overlap: bool | None = None,
    select_top_k: int = 0,
    select_block_size: int = 32,
) -> torch.Tensor:
    """longnet.dilated_attention over a sequence split across the ranks of `group`.

    q (b, L, h, d) and k, v (b, L, g, d) are this rank's shard of a global sequence of P * L
    tokens split evenly in rank order over the P ranks of group (default: the world; a single
    process when torch.distributed is not initialized). Returns this rank's shard of what
    longnet.dilated_attention returns for the whole sequence; gradients likewise. Every rank of
    the group must pass the same shapes and arguments: the first call with a new layout checks
    that with one small collective and raises ValueError on every rank otherwise. overlap: run
    the local calls while the exchange is in flight; None (default) decides by the group's
    backend: on for NCCL, off for gloo, whose communication thread competes with the CPU
    kernels for the same cores (measured at P = 2 on 2 cores: efficiency 0.942-0.973 with it,
    0.986 without).
    select_top_k > 0 adds the content-selected pattern, as in dilated_attention.
    """
    arguments = (q, k, v, segment_lengths, dilation_rates, causal, softmax_scale, backend)
    world, rank = _group_size_and_rank(group)
    if world > 1:
        description = _describe(*arguments, head_shift)
        description["select_top_k, select_block_size"] = repr((select_top_k, select_block_size))
        _check_ranks_agree(description, group, world)
    patterns, scale = check_arguments(*arguments, head_shift, select_top_k, select_block_size)
    kernel = kernel_for(backend, q, causal)
    overlap = default_overlap(group) if overlap is None else flag("overlap", overlap)
    shard_len, heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
    _effective_segment_lengths(patterns, shard_len, world)
    plan = make_plan(shard_len, heads, kv_heads, patterns, causal, head_shift, rank, world)
    chosen_blocks = None
    if select_top_k:  # the pattern's arguments, the first segment length and this rank's place
        chosen_blocks = (select_top_k, select_block_size, patterns[0][0], rank, world)
    if not plan.exchanges and (world == 1 or not chosen_blocks):
        # no key comes from another rank (also P = 1): one device's op on the shard, on the
        # arguments checked above
        _record(Communication())
        return attend(
            q,
            k,
            v,
            patterns,
            causal=causal,
            scale=scale,
            backend=backend,
            head_shift=head_shift,
            select_top_k=select_top_k,
            select_block_size=select_block_size,
        )
    return _SequenceParallelFunction.apply(
        q, k, v, plan, group, scale, kernel, overlap, chosen_blocks
    )
