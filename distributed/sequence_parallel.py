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

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._guards import detect_fake_mode
from torch.distributed.distributed_c10d import _resolve_process_group

from longnet import engine, selection
from longnet.checks import flag
from longnet.dilated import attend, check_arguments, check_patterns, kernel_for
from longnet.distributed.documents import attention as documents_attention
from longnet.kernels import accumulation_dtype, register_attention_autograd
from longnet.plan import make_plan
from longnet.varlen import Documents


@dataclass(frozen=True)
class Communication:
    """Bytes one rank sends and receives in a sequence-parallel attention call (`communication`).

    Forward: the sparse K and V, in the input dtype. Backward: their gradients, in the
    accumulation dtype (float32 for 16-bit inputs), so the sum over ranks is not rounded.
    """

    forward_sent: int = 0
    forward_received: int = 0
    backward_sent: int = 0
    backward_received: int = 0


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


def _exchange(group, overlap: bool) -> engine.Exchange:
    """engine's exchange over group, for the forward and the backward alike: exchange(x,
    send_counts, recv_counts) starts an _AllToAll (in flight when overlap)."""
    return functools.partial(_AllToAll, group=group, overlap=overlap)


def _keys_before(k, v, group, rank: int, world: int) -> torch.Tensor:
    """K and V (2, b, (rank + 1) * L, g, d) of every position up to this shard's end: what the
    content-selected pattern's queries may choose from (an all_gather of the shards).

    NOTE: this moves whole shards, O(n) bytes per rank; fetching only the chosen blocks from
    their owners would bound it by top_k blocks per query (not built yet)."""
    stacked = torch.stack([k, v]).contiguous()  # (2, b, L, g, d)
    gathered = [torch.empty_like(stacked) for _ in range(world)]
    dist.all_gather(gathered, stacked, group=group)
    return torch.cat(gathered[: rank + 1], dim=2)


def _return_to_owners(grads: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
    """This shard's part of the gradients (2, b, (rank + 1) * L, g, d) every rank computed for
    the keys before its end, summed over the ranks."""
    shard_len = grads.shape[2] // (rank + 1)
    total = torch.nn.functional.pad(grads, (0, 0, 0, 0, 0, (world - rank - 1) * shard_len))
    dist.all_reduce(total, group=group)
    return total[:, :, rank * shard_len : (rank + 1) * shard_len]


def _queries_before(q, span: int, group, rank: int, world: int) -> torch.Tensor:
    """The min(span - 1, rank * L) queries (b, t, h, d) before this shard's: what the ranking
    queries of its first span - 1 positions average (selection.ranking_queries), from the last
    T = min(L, span - 1) queries of every shard (an all_gather; T = L when one shard is not
    enough). Empty for span 1."""
    if span == 1:
        return q.new_empty((q.shape[0], 0, *q.shape[2:]))
    tail = q[:, q.shape[1] - _tail_len(q, span) :].contiguous()  # (b, T, h, d)
    gathered = [torch.empty_like(tail) for _ in range(world)]
    dist.all_gather(gathered, tail, group=group)
    held = min(span - 1, rank * q.shape[1])
    before = torch.cat(gathered[:rank] + [tail[:, :0]], dim=1)[:, rank * tail.shape[1] - held :]
    return before.contiguous()  # as the fake kernel's, and without the rest of the buffer


def _tail_len(q, span: int) -> int:
    """T: how many of a shard's last queries the shards after it may average."""
    return min(q.shape[1], span - 1)


def _return_query_grads(grad_before, q, span: int, group, rank: int, world: int):
    """(b, T, h, d): the gradients every rank computed for this shard's last T queries (their
    queries_before), summed over the ranks; grad_before (b, t, h, d) this rank's for its
    queries_before."""
    tail = _tail_len(q, span)
    total = grad_before.new_zeros((q.shape[0], world * tail, *q.shape[2:]))
    end = rank * tail  # queries_before: the last t rows of the tails of the ranks before
    total[:, end - grad_before.shape[1] : end] = grad_before
    dist.all_reduce(total, group=group)
    return total[:, end : end + tail]


def _selection(select_top_k, select_block_size, within_segment, segment_lengths, rank, world):
    """(top_k, block size, window, rank, world) of the content-selected pattern, or None."""
    if not select_top_k:
        return None
    window = selection.candidate_window(segment_lengths, select_block_size, within_segment)
    return select_top_k, select_block_size, window, rank, world


def _shard_plan(q, k, segment_lengths, dilation_rates, causal, head_shift, rank, world):
    patterns = tuple(zip(segment_lengths, dilation_rates, strict=True))
    return make_plan(q.shape[1], q.shape[2], k.shape[2], patterns, causal, head_shift, rank, world)


@torch.library.custom_op("longnet::sequence_parallel_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: list[int],
    dilation_rates: list[int],
    causal: bool,
    scale: float,
    kernel: str,
    head_shift: int,
    select_top_k: int,
    select_block_size: int,
    select_pooled: bool,
    select_query_span: int,
    select_within_segment: bool,
    select_ranking_dims: int,
    select_span_max: bool,
    group_name: str,
    overlap: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (b, L, h, d), lse (b, L, h), received (2, b, N_recv, d): the exchanged K and V,
    keys_before (2, b, (rank + 1) * L, g, d): the K and V the selected pattern chose from,
    queries_before (b, min(span - 1, rank * L), h, d): the queries its ranking averages, or
    whose best log-probabilities rank with select_span_max)."""
    group = _resolve_process_group(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    # Checked here too (once per layout), since a compiled caller skips the wrapper's check.
    _agree(group_name, _describe(q, k, v, segment_lengths, dilation_rates, causal, scale, kernel,
                                 head_shift, select_top_k, select_block_size,
                                 select_pooled, select_query_span,
                                 select_within_segment, select_ranking_dims,
                                 select_span_max))  # fmt: skip
    plan = _shard_plan(q, k, segment_lengths, dilation_rates, causal, head_shift, rank, world)
    chosen = _selection(
        select_top_k, select_block_size, select_within_segment, segment_lengths, rank, world
    )
    acc = accumulation_dtype(q.dtype) if chosen else None
    exchange = _exchange(group, overlap)
    out, lse, received = engine.forward(
        q, k, v, plan, scale=scale, kernel=kernel, exchange=exchange, out_dtype=acc
    )
    received = q.new_empty(0) if received is None else received
    if not chosen:
        return out, lse, received, q.new_empty(0), q.new_empty(0)
    top_k, block_size, window, _, _ = chosen
    keys_before = _keys_before(k, v, group, rank, world)
    queries_before = _queries_before(q, select_query_span, group, rank, world)
    part = selection.forward(
        q, *keys_before, block_size, top_k, window, scale, kernel, rank * q.shape[1],
        pooled=select_pooled, query_span=select_query_span, queries_before=queries_before,
        ranking_dims=select_ranking_dims, span_max=select_span_max,
    )  # fmt: skip
    out, lse = selection.mix(out, lse, *part)
    return out.to(q.dtype), lse, received, keys_before, queries_before


@_attention_op.register_fake
def _(q, k, v, segment_lengths, dilation_rates, causal, scale, kernel, head_shift, select_top_k,
      select_block_size, select_pooled, select_query_span, select_within_segment,
      select_ranking_dims, select_span_max, group_name, overlap):  # fmt: skip
    group = _resolve_process_group(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    plan = _shard_plan(q, k, segment_lengths, dilation_rates, causal, head_shift, rank, world)
    batch, shard_len, _, dim = q.shape
    lse = q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))
    received = q.new_empty((2, batch, sum(plan.recv_counts), dim) if plan.exchanges else (0,))
    if not select_top_k:
        return torch.empty_like(q), lse, received, q.new_empty(0), q.new_empty(0)
    keys_before = q.new_empty((2, batch, (rank + 1) * shard_len, *k.shape[2:]))
    queries_before = q.new_empty(
        (batch, min(select_query_span - 1, rank * shard_len), *q.shape[2:])
    )
    return torch.empty_like(q), lse, received, keys_before, queries_before


@torch.library.custom_op("longnet::sequence_parallel_attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    received: torch.Tensor,
    keys_before: torch.Tensor,
    queries_before: torch.Tensor,
    segment_lengths: list[int],
    dilation_rates: list[int],
    causal: bool,
    scale: float,
    kernel: str,
    head_shift: int,
    select_top_k: int,
    select_block_size: int,
    select_pooled: bool,
    select_query_span: int,
    select_within_segment: bool,
    select_ranking_dims: int,
    select_span_max: bool,
    group_name: str,
    overlap: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    group = _resolve_process_group(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    plan = _shard_plan(q, k, segment_lengths, dilation_rates, causal, head_shift, rank, world)
    exchange = _exchange(group, overlap)
    grads = engine.backward(
        grad_out, q, k, v, out, lse, received if plan.exchanges else None, plan,
        scale=scale, kernel=kernel, exchange=exchange,
    )  # fmt: skip
    chosen = _selection(
        select_top_k, select_block_size, select_within_segment, segment_lengths, rank, world
    )
    if not chosen:
        return grads
    top_k, block_size, window, _, _ = chosen
    grad_q, grad_keys, grad_values, grad_before = selection.backward(
        grad_out, q, *keys_before, out, lse, block_size, top_k, window, scale, kernel,
        rank * q.shape[1], pooled=select_pooled, query_span=select_query_span,
        queries_before=queries_before, ranking_dims=select_ranking_dims,
        span_max=select_span_max,
    )  # fmt: skip
    if _trains_queries_before(select_query_span, select_pooled, select_span_max):
        tail = _return_query_grads(grad_before, q, select_query_span, group, rank, world)
        grad_q[:, q.shape[1] - tail.shape[1] :] += tail
    grad_k, grad_v = _return_to_owners(torch.stack([grad_keys, grad_values]), group, rank, world)
    return tuple((a + b).to(a.dtype) for a, b in zip(grads, (grad_q, grad_k, grad_v), strict=True))


register_attention_autograd(_attention_op, _attention_backward_op)


def communication(
    q, k, v, segment_lengths, dilation_rates, *, group=None, causal=False, head_shift=0,
    select_top_k=0, select_block_size=32, select_pooled=False, select_query_span=1,
    select_span_max=False,
) -> Communication:  # fmt: skip
    """The bytes this rank sends and receives when it calls sequence_parallel_dilated_attention
    with these arguments (forward and backward), from the plan: nothing runs."""
    world, rank = _group_size_and_rank(group)
    lengths, rates = list(segment_lengths), list(dilation_rates)
    if not _communicates(lengths, q.shape[1], world, select_top_k):
        return Communication()
    plan = _shard_plan(q, k, lengths, rates, causal, head_shift, rank, world)
    acc_size = torch.empty(0, dtype=accumulation_dtype(q.dtype)).element_size()
    entry = 2 * q.shape[0] * q.shape[-1]  # K and V of one exchanged (position, kv head)
    sent, received = sum(plan.send_counts) * entry, sum(plan.recv_counts) * entry
    forward = [sent * q.element_size(), received * q.element_size()]
    backward = [received * acc_size, sent * acc_size]  # the reverse exchange
    if select_top_k:
        # all_gather of the K and V shards, all_reduce of their gradients (world shards each)
        shard = 2 * k.numel()
        forward = [b + (world - 1) * shard * k.element_size() for b in forward]
        backward = [b + world * shard * acc_size for b in backward]
        # and the same of the queries' tails that rank the blocks (their gradients only through
        # the pooled pattern's mean ranking queries)
        tail = q.shape[0] * _tail_len(q, select_query_span) * q.shape[2] * q.shape[3]
        forward = [b + (world - 1) * tail * q.element_size() for b in forward]
        if _trains_queries_before(select_query_span, select_pooled, select_span_max):
            backward = [b + world * tail * acc_size for b in backward]
    return Communication(*forward, *backward)


def _trains_queries_before(select_query_span, select_pooled, select_span_max) -> bool:
    """Whether the queries before a shard get a gradient: through the pooled pattern's scores
    by the mean ranking queries only."""
    return select_query_span > 1 and select_pooled and not select_span_max


def _communicates(segment_lengths, shard_len: int, world: int, select_top_k: int) -> bool:
    """Whether a key comes from another rank (a segment spans ranks, or the selected pattern
    chooses from earlier shards): else one device's op runs on the shard."""
    seq_len = world * shard_len
    spans = any(min(w, seq_len) > shard_len for w in segment_lengths)
    return world > 1 and (spans or bool(select_top_k))


def _describe(
    q, k, v, segment_lengths, dilation_rates, causal, softmax_scale, backend, head_shift,
    select_top_k, select_block_size, select_pooled=False, select_query_span=1,
    select_within_segment=False, select_ranking_dims=0, select_span_max=False,
) -> tuple[tuple[str, str], ...]:  # fmt: skip
    """(name, text) of what every rank of a group must pass alike."""

    def tensor(x):
        if not isinstance(x, torch.Tensor):
            return type(x).__name__
        return f"{tuple(x.shape)} {x.dtype} {x.device.type}"

    def values(x):
        return repr(list(x) if isinstance(x, (list, tuple)) else x)

    return (
        ("q (shape, dtype, device)", tensor(q)),
        ("k (shape, dtype, device)", tensor(k)),
        ("v (shape, dtype, device)", tensor(v)),
        ("segment_lengths", values(segment_lengths)),
        ("dilation_rates", values(dilation_rates)),
        ("causal", repr(causal)),
        ("softmax_scale", repr(softmax_scale)),
        ("backend", repr(backend)),
        ("head_shift", repr(head_shift)),
        ("select_top_k", repr(select_top_k)),
        ("select_block_size", repr(select_block_size)),
        ("select_pooled", repr(select_pooled)),
        ("select_query_span", repr(select_query_span)),
        ("select_within_segment", repr(select_within_segment)),
        ("select_ranking_dims", repr(select_ranking_dims)),
        ("select_span_max", repr(select_span_max)),
    )


@functools.lru_cache(maxsize=256)
def _agree(group_name: str, description: tuple[tuple[str, str], ...]) -> None:
    """ValueError on EVERY rank of the group, naming what differs, unless all ranks pass the
    same description: ranks that disagree would otherwise hang, abort or compute wrong numbers.
    One small collective per new layout (a layout that passed is remembered; a failure is not)."""
    group = _resolve_process_group(group_name)
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, dict(description), group=group)
    differing = [name for name, _ in description if len({d[name] for d in gathered}) > 1]
    if differing:
        details = "; ".join(
            f"{name}: " + ", ".join(f"rank {i} {d[name]}" for i, d in enumerate(gathered))
            for name in differing
        )
        raise ValueError(f"the ranks of the sequence-parallel group differ in {details}")


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
    select_pooled: bool = False,
    select_query_span: int = 1,
    select_within_segment: bool = False,
    select_ranking_dims: int = 0,
    select_span_max: bool = False,
    documents: Documents | None = None,
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
    select_top_k > 0 adds the content-selected pattern, select_pooled the pooled one, ranked by
    select_query_span queries (by their last select_ranking_dims dims; by their best
    log-probability with
    select_span_max), near blocks too with select_within_segment, as in dilated_attention.
    documents (longnet.varlen.Documents, each its own sequence) lie in the global rows
    (b, P * L): from cu_seqlens over the b * P * L tokens or a (b, P * L) padding mask, the same
    on every rank; causal only (longnet/distributed/documents.py).
    """
    arguments = (
        q, k, v, segment_lengths, dilation_rates, causal, softmax_scale, backend, head_shift,
        select_top_k, select_block_size, select_pooled, select_query_span, select_within_segment,
        select_ranking_dims, select_span_max,
    )  # fmt: skip
    world, rank = _group_size_and_rank(group)
    group_name = _group_name(group) if world > 1 else ""
    if world > 1 and not torch.compiler.is_compiling() and detect_fake_mode() is None:
        # First, before any check one rank alone could fail: every rank raises alike. (Not
        # while tracing or under FakeTensorMode: nothing runs then; the op checks when it does.)
        _agree(group_name, _describe(*arguments))
    patterns, scale = check_arguments(*arguments)
    kernel = kernel_for(backend, q, causal)
    overlap = default_overlap(group) if overlap is None else flag("overlap", overlap)
    _effective_segment_lengths(patterns, q.shape[1], world)
    lengths, rates = ([pattern[i] for pattern in patterns] for i in (0, 1))
    if documents is not None and world > 1:
        return _attention_of_documents(
            q, k, v, documents, patterns, scale, arguments, group, overlap
        )
    if not _communicates(lengths, q.shape[1], world, select_top_k):
        # no key comes from another rank (also P = 1): one device's op on the shard, on the
        # arguments checked above
        return attend(
            q, k, v, patterns, causal=causal, scale=scale, backend=backend,
            head_shift=head_shift, select_top_k=select_top_k, select_block_size=select_block_size,
            select_pooled=select_pooled, select_query_span=select_query_span,
            select_within_segment=select_within_segment, select_ranking_dims=select_ranking_dims,
            select_span_max=select_span_max, documents=documents,
        )  # fmt: skip
    out, *_ = _attention_op(
        q, k, v, lengths, rates, causal, scale, kernel, head_shift, select_top_k,
        select_block_size, select_pooled, select_query_span, select_within_segment,
        select_ranking_dims, select_span_max, group_name, overlap,
    )  # fmt: skip
    return out


def _attention_of_documents(q, k, v, documents, patterns, scale, arguments, group, overlap):
    """sequence_parallel_dilated_attention's answer for documents over the global rows."""
    world, rank = _group_size_and_rank(group)
    *_, causal, _, backend, head_shift, top_k, block_size, pooled, span, within, dims, span_max = (
        arguments
    )
    if not causal:
        raise ValueError(
            "documents (cu_seqlens or attention_mask) under sequence parallelism run causal only: "
            "a document moved to a row of its own would read that row's padding"
        )
    if (documents.batch, documents.seq_len) != (q.shape[0], world * q.shape[1]):
        raise ValueError(
            f"documents under sequence parallelism lie in the global rows (batch, {world} x "
            f"{q.shape[1]}) = {(q.shape[0], world * q.shape[1])}, got "
            f"{(documents.batch, documents.seq_len)}"
        )
    lengths, rates = ([pattern[i] for pattern in patterns] for i in (0, 1))
    options = dict(backend=backend, head_shift=head_shift, select_top_k=top_k,
                   select_block_size=block_size, select_pooled=pooled,
                   select_query_span=span, select_within_segment=within,
                   select_ranking_dims=dims, select_span_max=span_max)  # fmt: skip

    def attend_shard(q, k, v, own):
        return attend(q, k, v, patterns, causal=True, scale=scale, documents=own, **options)

    def attend_rows(q, k, v):
        return sequence_parallel_dilated_attention(
            q, k, v, lengths, rates, group=group, causal=True, softmax_scale=scale,
            overlap=overlap, **options,
        )  # fmt: skip

    return documents_attention(
        q, k, v, documents, lengths, group, world, rank, attend_shard, attend_rows
    )


def _group_name(group) -> str:
    """The name custom ops take for a process group (they cannot take the object)."""
    return (group if group is not None else dist.group.WORLD).group_name
