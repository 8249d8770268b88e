"""Documents under sequence parallelism: packed documents and padding over a sequence split
across ranks (docs/semantics.md, "Documents"; docs/sequence-parallel.md).

The documents are given over the global rows (b, P * L): flash-attn's cu_seqlens over the
flattened b * P * L tokens, or a (b, P * L) padding mask. Global token g (of the flattened rows)
lies in chunk c = g // L of L tokens, held by rank c % P at index (c // P) * L + g % L of its
flattened (b * L) shard.

- A document inside one chunk runs on the rank that holds it, as on one device (longnet.varlen).
- A document across chunks is moved: its tokens are laid out evenly over the P ranks as one row
  of P * S tokens (S: the document's length over P, rounded so that every pattern splits over
  the ranks; the tail is padding, which only padding reads since the attention is causal), the
  sequence-parallel op runs on the rows of all such documents, one call per S, and the outputs
  go back to the ranks that hold the tokens. Each move is one all_to_all of the moved tokens
  only (torch.distributed.nn's, whose backward is the reverse move): at most b * P * L / P
  tokens' q, k and v per rank.

Causal only: a non-causal document would read the padding of its row. Every rank of the group
must pass the same documents.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed.nn.functional as dist_nn

from longnet.varlen import Documents, padded_length


@dataclass(frozen=True)
class _Piece:
    """Tokens of a moved document that go from one rank to one rank, contiguous on both."""

    document: int  # index into documents.starts
    first: int  # its first token's position in the document
    length: int
    source: int  # the rank that holds it
    held_at: int  # its first token in the source's flattened (b * L) shard
    dest: int  # the rank that runs it
    slot: int  # its first token in the dest's flattened rows of moved documents


def shard_of_row(length: int, world: int, segment_lengths) -> int:
    """S, a row's tokens per rank for a document of `length` tokens: at least length / world,
    rounded up to 4 lengths per octave (few distinct row lengths, so few calls), then to what
    every pattern splits over: a segment shorter than S divides it, a longer one (up to the row)
    is a multiple of it."""
    shard = padded_length(-(-length // world), causal=True)
    while True:  # shard only grows: at a multiple of every length past the longest, it returns
        short = [w for w in segment_lengths if w <= shard]
        step = math.lcm(*short) if short else 1
        if shard % step:
            shard = -(-shard // step) * step  # more lengths may now be short: again
        elif all(min(w, world * shard) % shard == 0 for w in segment_lengths if w > shard):
            return shard
        else:
            shard += step


def split(documents: Documents, shard_len: int, world: int, rank: int):
    """(this rank's documents that lie in one chunk, as Documents of its (b, L) shard; the
    indices of the documents that span chunks)."""
    starts, lengths, moved = [], [], []
    for index, (start, length) in enumerate(zip(documents.starts, documents.lengths, strict=True)):
        chunk = start // shard_len
        if chunk != (start + length - 1) // shard_len:
            moved.append(index)
        elif chunk % world == rank:
            starts.append(chunk // world * shard_len + start % shard_len)
            lengths.append(length)
    return Documents(tuple(starts), tuple(lengths), documents.batch, shard_len), moved


def _pieces(documents: Documents, moved: list[int], shard_len: int, world: int, segment_lengths):
    """The pieces of every moved document, and {S: number of rows} of the moved rows (the rows of
    one S, in the order of the documents, then the next S, ascending)."""
    shards = {i: shard_of_row(documents.lengths[i], world, segment_lengths) for i in moved}
    rows = {shard: 0 for shard in sorted(set(shards.values()))}
    row_of = {}
    for index in moved:
        row_of[index] = rows[shards[index]]
        rows[shards[index]] += 1
    # Where each S's rows start in a destination's flattened buffer (S's rows, then the next S).
    base, offset = {}, 0
    for shard, count in rows.items():
        base[shard], offset = offset, offset + count * shard
    pieces = []
    for index in moved:
        start, length, shard = documents.starts[index], documents.lengths[index], shards[index]
        cuts = {0, length}
        cuts.update(range(-start % shard_len or shard_len, length, shard_len))  # chunk edges
        cuts.update(range(shard, length, shard))  # the row's shard edges
        edges = sorted(cuts)
        for first, end in zip(edges, edges[1:], strict=False):
            chunk, within = divmod(start + first, shard_len)
            pieces.append(
                _Piece(
                    document=index, first=first, length=end - first, source=chunk % world,
                    held_at=chunk // world * shard_len + within, dest=first // shard,
                    slot=base[shard] + row_of[index] * shard + first % shard,
                )
            )  # fmt: skip
    return pieces, rows


@functools.lru_cache(maxsize=64)
def _layout(documents: Documents, shard_len: int, world: int, rank: int, segment_lengths):
    """(this rank's own documents, and None when no document moves, else (the pieces it sends,
    those it receives, send and receive counts per rank, {S: rows})). Every layer of a step
    asks for the same documents: computed once."""
    own, moved = split(documents, shard_len, world, rank)
    if not moved:
        return own, None
    pieces, rows = _pieces(documents, moved, shard_len, world, segment_lengths)
    # Both sides order a pair's tokens by (document, position): the receiver's order is the
    # sender's.
    sent = [p for p in pieces if p.source == rank]
    sent.sort(key=lambda p: (p.dest, p.document, p.first))
    got = [p for p in pieces if p.dest == rank]
    got.sort(key=lambda p: (p.source, p.document, p.first))
    send_counts = [sum(p.length for p in sent if p.dest == r) for r in range(world)]
    recv_counts = [sum(p.length for p in got if p.source == r) for r in range(world)]
    return own, (sent, got, send_counts, recv_counts, rows)


def _indices(pieces, attribute: str, device) -> torch.Tensor:
    """The token indices the pieces cover, from each piece's `attribute` on, in their order."""
    if not pieces:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([
        torch.arange(getattr(p, attribute), getattr(p, attribute) + p.length, device=device)
        for p in pieces
    ])  # fmt: skip


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    documents: Documents,
    segment_lengths,
    group,
    world: int,
    rank: int,
    attend_shard: Callable[..., torch.Tensor],
    attend_rows: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """Each document's attention, for q (b, L, h, d), k (b, L, g, d), v (b, L, g, dv), this
    rank's shard of documents over the global (b, P * L) rows: (b, L, h, dv), zero on padding.

    attend_shard(q, k, v, documents): the one-device op on this shard's own documents;
    attend_rows(q, k, v): the sequence-parallel op on rows split over the ranks of group."""
    batch, shard_len, heads, _ = q.shape
    own, layout = _layout(documents, shard_len, world, rank, tuple(segment_lengths))
    out = attend_shard(q, k, v, own)  # (b, L, h, dv), zero on the moved tokens
    if layout is None:
        return out
    sent, got, send_counts, recv_counts, rows = layout
    held, slots = _indices(sent, "held_at", q.device), _indices(got, "slot", q.device)
    widths = [x.shape[2] * x.shape[3] for x in (q, k, v)]
    tokens = torch.cat([x.flatten(2) for x in (q, k, v)], dim=2).flatten(0, 1)  # (b*L, F)
    received = dist_nn.all_to_all_single(
        tokens.new_empty(sum(recv_counts), tokens.shape[1]), tokens[held], recv_counts,
        send_counts, group=group,
    )  # fmt: skip
    buffer = tokens.new_zeros(sum(count * shard for shard, count in rows.items()), tokens.shape[1])
    buffer = buffer.index_copy(0, slots, received)  # (rows * S summed over S, F)
    outs, offset = [], 0
    for shard, count in rows.items():
        part = buffer[offset : offset + count * shard].view(count, shard, -1)  # (rows, S, F)
        row_q, row_k, row_v = part.split(widths, dim=2)
        out_rows = attend_rows(
            row_q.unflatten(2, q.shape[2:]),
            row_k.unflatten(2, k.shape[2:]),
            row_v.unflatten(2, v.shape[2:]),
        )  # (rows, S, h, dv)
        outs.append(out_rows.flatten(0, 1).flatten(1))
        offset += count * shard
    results = torch.cat(outs)[slots]  # (received tokens, h * dv), in the order they came
    returned = dist_nn.all_to_all_single(
        results.new_empty(sum(send_counts), results.shape[1]), results, send_counts,
        recv_counts, group=group,
    )  # fmt: skip
    out = out.flatten(0, 1).flatten(1).index_add(0, held, returned)  # (b*L, h*dv)
    return out.view(batch, shard_len, heads, -1)
