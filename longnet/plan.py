"""The plan of dilated attention: the dense kernel calls that compute it, in plain Python ints.

One planner serves one device (world = 1), a shard of a sequence-parallel group and one step of
cached decoding (`decode_plan`). The design document (docs/algorithm.md) explains the
decomposition.

Notation (shared by longnet/engine.py and distributed/sequence_parallel.py)
    b   batch                  n   tokens this process holds (the shard, on one device all)
    h   query heads            g   kv heads; query head j reads kv head j // (h/g)
    d   head dim               t   head shift (0: the paper)
    w   segment length         r   dilation rate of a pattern
    o   offset class: in every segment head j keeps the positions p with p mod r == o, where
        o = (j + t) mod r (the paper's s_j = j mod r); the heads of one class keep the same ones
    m   segments of one block  L   tokens of each of those segments held here
    c   kept positions per segment of a block      hb  heads of a block
    P   ranks of a sequence-parallel group         entry  one (position, kv head) of sparse K/V

A BLOCK is segments of one length times the heads of one offset class: its queries, keys and
values are strided VIEWS of the (b, n, heads, d) tensors (segments folded into the batch), so
nothing is gathered. A CALL is one dense kernel call: one block, or small blocks of one shape
side by side. Everything here is plain ints and tuples, built once per layout (cached), so the
plan costs nothing per step and torch.compile never sees a data-dependent value.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, replace

import torch

# Most (query, head) pairs one call handles per batch element: bounds what a packed call copies.
MAX_BLOCK_QUERIES = 1 << 19
# A call with fewer (segment, head) pairs than this per batch element starves the cores (torch's
# CPU flash backward runs one thread per (batch, head)): such blocks are packed.
MIN_CALL_PAIRS = 32


def offset_class(head, rate: int, shift: int = 0):
    """The positions head keeps in each segment are those with (p mod w) mod r == this."""
    return (head + shift) % rate


@dataclass(frozen=True)
class Block:
    """The heads first_head, first_head + r, ... keep positions first_position, + r, ... of
    each of num_segments segments of segment_length tokens starting at token `start`."""

    start: int
    num_segments: int  # m
    segment_length: int  # L
    first_position: int
    first_head: int
    rate: int  # r
    kv_heads: tuple[int, ...]  # the kv head of each of the block's query heads

    @property
    def num_heads(self) -> int:  # hb
        return len(self.kv_heads)

    @property
    def position_step(self) -> int:
        """r, or L where r >= L (one position per segment): a step torch can always stride."""
        return min(self.rate, self.segment_length)

    @property
    def head_step(self) -> int:
        """r, or 1 where the block has one head."""
        return self.rate if self.num_heads > 1 else 1

    @property
    def count(self) -> int:  # c
        return len(range(self.first_position, self.segment_length, self.position_step))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """What blocks must share to run in one call."""
        return self.start, self.num_segments, self.segment_length, self.count

    @property
    def kv_step(self) -> int | None:
        """The stride of kv_heads (0: one kv head for all), None where no stride describes it."""
        steps = {b - a for a, b in itertools.pairwise(self.kv_heads)} or {1}
        return steps.pop() if len(steps) == 1 else None

    def kept(self, x: torch.Tensor, heads: tuple[int, int, int] | None = None) -> torch.Tensor:
        """(b, m, c, ...) view of the kept positions of x (b, n, ...); with heads = (first, step,
        count), of those heads of dim 2 only: (b, m, c, count, ...).

        NOTE: one as_strided, since the block is a lattice of x's strides; the equivalent chain of
        slices and unflatten is ~8 ops per view, which decoding pays ~13 times per token and
        layer."""
        size, stride = list(x.shape), list(x.stride())
        offset = x.storage_offset() + (self.start + self.first_position) * stride[1]
        size[1:2] = self.num_segments, self.count
        stride[1:2] = self.segment_length * stride[1], self.position_step * stride[1]
        if heads is not None:
            first, step, size[3] = heads
            offset, stride[3] = offset + first * stride[3], step * stride[3]
        return x.as_strided(size, stride, offset)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """(b, m, c, hb, ...) view of x (b, n, h, ...)."""
        return self.kept(x, (self.first_head, self.head_step, self.num_heads))

    def select_kv(self, x: torch.Tensor) -> torch.Tensor:
        """(b, m, c, hb, d) of x (b, n, g, d): each query head's kv head; a view (stride 0 where
        one kv head serves all: multi-query) unless no stride describes the kv heads (a copy)."""
        if self.kv_step is None:
            return self.kept(x).index_select(3, kv_index(self.kv_heads, x.device))
        return self.kept(x, (self.kv_heads[0], self.kv_step, self.num_heads))

    def add(self, total: torch.Tensor, part: torch.Tensor, first: bool) -> None:
        """total (b, n, h, d) += a kernel result (b*m, hb, c, d); `first`: nothing was added
        at these entries yet."""
        value, view = to_blocks(self, part, total.shape[0]), self.select(total)
        view.copy_(value) if first else view.add_(value)

    def add_kv(self, total: torch.Tensor, part: torch.Tensor, first: bool) -> None:
        """total (b, n, g, d) += a kernel result (b*m, hb, c, d), summing the query heads that
        share a kv head; `first`: nothing was added at these entries yet."""
        value = to_blocks(self, part, total.shape[0])
        if not self.kv_step:  # several query heads per kv head: accumulate
            index = kv_index(self.kv_heads, total.device)
            self.kept(total).index_add_(3, index, value.to(total.dtype))
        elif first:
            self.select_kv(total).copy_(value)
        else:
            self.select_kv(total).add_(value)


@functools.lru_cache(maxsize=512)
def kv_index(kv_heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(kv_heads, device=device)


def to_kernel(view: torch.Tensor) -> torch.Tensor:
    """(b, m, c, hb, ...) -> (b*m, hb, c, ...): the kernels' layout, a view."""
    return view.flatten(0, 1).transpose(1, 2)


def to_blocks(block: Block, part: torch.Tensor, batch: int) -> torch.Tensor:
    """A kernel result (b*m, hb, c, ...) as the (b, m, c, hb, ...) view block.select gives."""
    return part.transpose(1, 2).unflatten(0, (batch, block.num_segments))


@dataclass(frozen=True)
class Call:
    """One dense kernel call: the queries of `blocks` (heads side by side) against their own
    keys, against the keys of `keys` (blocks of the key tensor, one per block: decoding), or
    against received entries. remote: per call head, (start, length) ranges of `received`
    (its sparse keys, in source-rank order); None for own keys."""

    blocks: tuple[Block, ...]
    causal: bool
    first_write: bool  # no earlier call wrote these (position, head): copy instead of merge
    remote: tuple[tuple[tuple[int, int], ...], ...] | None = None
    keys: tuple[Block, ...] | None = None

    @property
    def head_counts(self) -> list[int]:
        return [block.num_heads for block in self.blocks]


@dataclass(frozen=True)
class Plan:
    """All calls one process runs, and what it sends and receives (sequence parallelism).

    send: (first, step, count) runs of entries (position * g + kv head) of this shard's K/V, in
    destination-rank order; the counts are entries per rank of the group."""

    local: tuple[Call, ...]
    remote: tuple[Call, ...] = ()
    send: tuple[tuple[int, int, int], ...] = ()
    send_counts: tuple[int, ...] = (0,)
    recv_counts: tuple[int, ...] = (0,)

    @property
    def exchanges(self) -> bool:
        """A segment spans ranks: this rank takes part in the exchange, even with nothing to
        send or receive."""
        return len(self.send_counts) > 1

    @property
    def covers_all(self) -> bool:
        """The first pattern has r = 1, so its calls write every (position, head)."""
        return bool(self.local) and self.local[0].first_write and self.local[0].blocks[0].rate == 1

    @property
    def whole_block(self) -> Block | None:
        """The block of the first pattern where it alone covers all n positions and h heads:
        its kernel results ARE (b, n, h, ...) tensors and become the accumulators."""
        first = [call for call in self.local if call.first_write]
        if len(first) != 1 or len(first[0].blocks) != 1 or first[0].blocks[0].rate != 1:
            return None
        return first[0].blocks[0] if first[0].blocks[0].start == 0 else None


def offset_blocks(start, num_segments, length, first, rate, heads, kv_heads, shift):
    """The blocks of segments that start `first` tokens into a segment of the pattern (0 but
    for a shard inside a longer segment), one per offset class that keeps something here."""
    group = heads // kv_heads
    result = []
    for first_head in range(min(rate, heads)):
        first_position = (offset_class(first_head, rate, shift) - first) % rate
        if first_position >= length:  # this class keeps no token of these segments
            continue
        head_ids = range(first_head, heads, rate)
        count = len(range(first_position, length, rate))
        # Bound one call's size, so a packed call's copies stay linear in n.
        per_call = max(1, MAX_BLOCK_QUERIES // (count * len(head_ids)))
        for chunk in range(0, num_segments, per_call):
            result.append(
                Block(
                    start=start + chunk * length,
                    num_segments=min(per_call, num_segments - chunk),
                    segment_length=length,
                    first_position=first_position,
                    first_head=first_head,
                    rate=rate,
                    kv_heads=tuple(j // group for j in head_ids),
                )
            )
    return result


def pack(items: list, key, small) -> list[tuple]:
    """Items alone, or the small ones with equal keys together (one call)."""
    alone, together = [], {}
    for item in items:
        if small(item):
            together.setdefault(key(item), []).append(item)
        else:
            alone.append((item,))
    return alone + [tuple(group) for group in together.values()]


def is_small(block: Block) -> bool:
    # NOTE: a pattern with a large r has few heads per offset class (one when r >= h), so alone
    # its blocks would be (segments, 1 head) calls; packed, their sparse inputs are copied once.
    return block.num_segments * block.num_heads < MIN_CALL_PAIRS


def segment_of(rank: int, shard_len: int, seq_len: int, length: int) -> tuple[int, range]:
    """(index of the shard's first token inside its segment, the ranks the segment spans)."""
    start = rank * shard_len // length * length
    end = min(start + length, seq_len)
    return rank * shard_len - start, range(start // shard_len, -(-end // shard_len))


def slots(heads: int, kv_heads: int, rate: int, shift: int) -> list[tuple[int, int]]:
    # NOTE: one entry per (kv head, offset class), not per query head: query heads of one kv
    # head that keep the same positions share what is sent (with g == h the counts agree).
    group = heads // kv_heads
    return sorted({(j // group, offset_class(j, rate, shift)) for j in range(heads)})


def sparse_runs(owner, shard_len, seq_len, pattern, heads, kv_heads, shift):
    """(first entry, step, count) per slot of the owner's sparse K/V for a spanning pattern."""
    length, rate = pattern
    first = segment_of(owner, shard_len, seq_len, length)[0]
    runs = []
    for kv, offset in slots(heads, kv_heads, rate, shift):
        position = (offset - first) % rate
        count = len(range(position, shard_len, rate))
        runs.append((position * kv_heads + kv, rate * kv_heads, count))
    return runs


@functools.lru_cache(maxsize=512)
def make_plan(
    shard_len: int,
    heads: int,
    kv_heads: int,
    patterns: tuple[tuple[int, int], ...],
    causal: bool,
    head_shift: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Plan:
    """The plan of this rank's shard of world * shard_len tokens (one device: world = 1, any
    length, the last segment may be short). Patterns run in order of r, the one keeping the
    most first (its calls write rather than merge). The caller validated the layout."""
    seq_len = world * shard_len
    shape = (heads, kv_heads, head_shift)
    local, spanning = [], []
    for index, (w, r) in enumerate(sorted(patterns, key=lambda pattern: pattern[1])):
        length = min(w, seq_len)
        first, ranks = segment_of(rank, shard_len, seq_len, length)
        if len(ranks) == 1:  # segments inside the shard (all of them on one device)
            length = min(length, shard_len)
            full, tail = divmod(shard_len, length)
            found = offset_blocks(0, full, length, 0, r, *shape)
            found += offset_blocks(full * length, 1, tail, 0, r, *shape) if tail else []
        else:  # the shard is part of a segment that spans ranks
            found = offset_blocks(0, 1, shard_len, first, r, *shape)
            spanning.append((index, (length, r), ranks, found))
        groups = pack(found, lambda block: block.shape, is_small)
        local += [Call(group, causal, first_write=index == 0) for group in groups]
    if world == 1 or all(min(w, seq_len) <= shard_len for w, _ in patterns):
        return Plan(local=tuple(local))
    # Some segment spans ranks: every rank takes part in the exchange, this one too.
    return Plan(
        local=tuple(local), **exchange_plan(rank, world, shard_len, spanning, causal, shape)
    )


def decode_plan(
    position: int,
    heads: int,
    kv_heads: int,
    patterns: tuple[tuple[int, int], ...],
    head_shift: int = 0,
) -> tuple[int, Plan]:
    """(first, plan): the plan of one query at `position` (q (b, 1, h, d)) against the keys
    first .. position (k, v (b, position + 1 - first, g, d)); first is the earliest segment
    start of the patterns, so fewer than max(w) keys are read however long the text."""
    # The layout repeats with period lcm(w): plan the phase (cached) and shift the window.
    phase = position % math.lcm(*(w for w, _ in patterns))
    first, plan = _decode_plan(phase, heads, kv_heads, patterns, head_shift)
    return position - phase + first, plan


@functools.lru_cache(maxsize=2048)
def _decode_plan(position, heads, kv_heads, patterns, head_shift) -> tuple[int, Plan]:
    first = min(position // w * w for w, _ in patterns)
    calls = []
    for index, (w, r) in enumerate(sorted(patterns, key=lambda pattern: pattern[1])):
        start = position // w * w
        # The heads that keep the query: one offset class, the block of a one-token shard
        # position - start tokens into its segment (none where r > h leaves the class empty).
        for block in offset_blocks(0, 1, 1, position - start, r, heads, kv_heads, head_shift):
            # Their keys: the class's positions in the segment up to the query. All lie at or
            # before it, so the call needs no causal mask.
            keys = replace(
                block,
                start=start - first,
                segment_length=position + 1 - start,
                first_position=(position - start) % r,
            )
            calls.append(Call((block,), causal=False, first_write=index == 0, keys=(keys,)))
    return first, Plan(local=tuple(calls))


def exchange_plan(rank, world, shard_len, spanning, causal, shape) -> dict:
    """The remote calls and the all-to-all layout for the spanning patterns."""
    heads, kv_heads, shift = shape
    seq_len = world * shard_len
    # all_to_all lays out what arrives by source rank, and every source sends its patterns in
    # order, so both sides agree on where a region lies.
    # NOTE: with causal masking a rank needs only the keys of EARLIER ranks, so keys travel
    # forward only (the paper all-gathers the whole segment): half the traffic.
    send, send_counts, recv_counts = [], [0] * world, [0] * world
    regions = {}  # (source, pattern index) -> {slot: (start, length)} in `received`
    for other in range(world):
        for index, pattern, ranks, _ in spanning:
            if other == rank or other not in ranks:
                continue
            if other < rank or not causal:
                runs = sparse_runs(other, shard_len, seq_len, pattern, *shape)
                region = regions[other, index] = {}
                for slot, (_, _, count) in zip(
                    slots(heads, kv_heads, pattern[1], shift), runs, strict=True
                ):
                    region[slot] = (sum(recv_counts), count)
                    recv_counts[other] += count
            if rank < other or not causal:
                runs = sparse_runs(rank, shard_len, seq_len, pattern, *shape)
                send += runs
                send_counts[other] += sum(count for _, _, count in runs)
    remote = []
    for index, (_, rate), ranks, found in spanning:
        keyed = []  # (block, per head: ranges of its keys, keys per head)
        for block in found:
            offset = offset_class(block.first_head, rate, shift)
            ranges = tuple(
                tuple(
                    regions[source, index][kv, offset]
                    for source in ranks
                    if (source, index) in regions and regions[source, index][kv, offset][1]
                )
                for kv in block.kv_heads
            )
            keys = sum(length for _, length in ranges[0])
            if keys:  # a shard shorter than r may hold none of a slot's positions
                keyed.append((block, ranges, keys))
        for group in pack(keyed, lambda item: (item[0].count, item[2]), lambda item: True):
            ranges = tuple(head for _, block_ranges, _ in group for head in block_ranges)
            blocks = tuple(block for block, _, _ in group)
            remote.append(Call(blocks, causal=False, first_write=False, remote=ranges))
    return dict(
        remote=tuple(remote),
        send=tuple(send),
        send_counts=tuple(send_counts),
        recv_counts=tuple(recv_counts),
    )


@functools.lru_cache(maxsize=512)
def send_index(runs: tuple[tuple[int, int, int], ...], device: torch.device) -> torch.Tensor:
    """(N_send,) the entries of (first, step, count) runs, on device (cached)."""
    parts = [torch.arange(first, first + step * count, step) for first, step, count in runs]
    return torch.cat([torch.zeros(0, dtype=torch.long), *parts]).to(device)


@functools.lru_cache(maxsize=512)
def remote_index(remote: tuple, device: torch.device) -> torch.Tensor:
    """(call heads, s) entries of `received` that a remote call reads (cached)."""
    rows = [torch.cat([torch.arange(start, start + n) for start, n in ranges]) for ranges in remote]
    return torch.stack(rows).to(device)
