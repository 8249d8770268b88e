"""Variable-length sequences: packed documents and padding (docs/semantics.md, "Documents").

Each document is its own sequence for LongNet: its segments start at its first token, no key
crosses a document boundary, and tokens of no document (padding) are never keys and output zero.
Documents come as flash-attn's `cu_seqlens` (offsets over the flattened (b * n) tokens: a packed
row, or the rows of a batch) or as a (b, n) padding mask whose True tokens are one contiguous run
per row (left or right padding).

How it runs: the documents are gathered into rows of a batch and the one-device op runs on the
batch, one call per padded length, and the rows are scattered back. Causal: a document is padded
at its end to a length of at most 5/4 of its own (4 lengths per octave), since no query of a
document sees a key after it; padding therefore costs < 25% and the number of calls grows with
log(longest / shortest), not with the number of documents. Not causal: padding would be seen, so
documents are grouped by exact length (one call per distinct length).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Documents:
    """Where each document lies in the flattened (b * n) tokens of q, k and v."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    batch: int
    seq_len: int

    def positions(self, device=None) -> torch.Tensor:
        """(b, n) int64: each token's position in its document (0 on padding)."""
        starts, lengths = (torch.tensor(x, device=device) for x in (self.starts, self.lengths))
        first = torch.repeat_interleave(starts, lengths)  # (tokens,): its document's start
        within = torch.arange(len(first), device=device) - torch.repeat_interleave(
            lengths.cumsum(0) - lengths, lengths
        )
        positions = torch.zeros(self.batch * self.seq_len, dtype=torch.long, device=device)
        positions[first + within] = within
        return positions.view(self.batch, self.seq_len)

    def row_starts(self) -> list[int]:
        """Where each row's tokens start within the row, for one document per row in row order
        (what from_attention_mask gives when no row is all padding): [start - i * n for the
        i-th document], a list of b ints in [0, n) (0: no left padding). ValueError when a row
        has no token (its document is missing: every later row would read the next row's start);
        a caller that needs left padding checks that."""
        starts = [start - row * self.seq_len for row, start in enumerate(self.starts)]
        if len(starts) != self.batch or any(not 0 <= s < self.seq_len for s in starts):
            held = sorted({start // self.seq_len for start in self.starts})
            empty = sorted(set(range(self.batch)) - set(held))
            raise ValueError(
                f"attention_mask: row(s) {empty or held} hold no token (each row needs one)"
            )
        return starts

    def are_the_rows(self) -> bool:
        """Every row is one whole document: the plain batch."""
        rows = tuple(range(0, self.batch * self.seq_len, self.seq_len))
        return self.starts == rows and set(self.lengths) == {self.seq_len}


def _host_ints(name: str, values) -> list:
    """values (a tensor or a sequence) as a Python list. NOTE: one host sync for a CUDA tensor;
    the layout of the documents decides which kernel calls run, so the host must know it."""
    if isinstance(values, torch.Tensor):
        return values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a tensor or a list, got {type(values).__name__}")
    return list(values)


def from_cu_seqlens(cu_seqlens, batch: int, seq_len: int) -> Documents:
    """Documents from offsets 0 = o_0 <= o_1 <= ... <= o_D = batch * seq_len (flash-attn's
    cu_seqlens over the flattened tokens); ValueError naming the value otherwise."""
    if isinstance(cu_seqlens, torch.Tensor) and (
        cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.is_complex()
    ):
        raise ValueError(
            f"cu_seqlens must be a 1-D integer tensor, got shape {tuple(cu_seqlens.shape)} "
            f"and dtype {cu_seqlens.dtype}"
        )
    offsets = _host_ints("cu_seqlens", cu_seqlens)
    total = batch * seq_len
    if (
        len(offsets) < 2
        or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets)
        or offsets[0] != 0
        or offsets[-1] != total
        or any(b < a for a, b in zip(offsets, offsets[1:], strict=False))
    ):
        raise ValueError(
            f"cu_seqlens must be non-decreasing ints from 0 to batch * seq_len = {total} "
            f"(flash-attn's offsets of each document in the flattened tokens), got "
            f"{_shorten(offsets)}"
        )
    pairs = [(a, b - a) for a, b in zip(offsets, offsets[1:], strict=False) if b > a]
    return _documents(pairs, batch, seq_len)


def from_attention_mask(attention_mask, batch: int, seq_len: int) -> Documents:
    """Documents from a (b, n) mask, True (or 1) on tokens and False (0) on padding: each row's
    tokens, one contiguous run (left or right padding); ValueError otherwise."""
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            f"attention_mask must be a (batch, seq) tensor, got {type(attention_mask).__name__}"
        )
    if tuple(attention_mask.shape) != (batch, seq_len):
        raise ValueError(
            f"attention_mask must have shape (batch, seq) = {(batch, seq_len)}, got "
            f"{tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool:
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise ValueError(f"attention_mask must be bool or 0/1 ints, got {attention_mask.dtype}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1 (or False and True)")
        attention_mask = attention_mask.bool()
    counts = attention_mask.sum(1)  # (b,)
    first = attention_mask.int().argmax(1)  # (b,): the first token of each row
    last = seq_len - 1 - attention_mask.flip(1).int().argmax(1)  # (b,): the last one
    # One contiguous run: as many tokens as from the first to the last (host reads of (b,) only).
    split_rows = ((counts > 0) & (counts != last - first + 1)).nonzero().flatten().tolist()
    if split_rows:
        row = split_rows[0]
        tokens = attention_mask[row].int().tolist()
        raise ValueError(
            f"attention_mask row {row}: its tokens (True) must be one contiguous run (left or "
            f"right padding), got {_shorten(tokens)}"
        )
    pairs = [
        (row * seq_len + start, count)
        for row, (count, start) in enumerate(zip(counts.tolist(), first.tolist(), strict=True))
        if count
    ]
    return _documents(pairs, batch, seq_len)


def _documents(pairs, batch: int, seq_len: int) -> Documents:
    starts, lengths = (tuple(p[i] for p in pairs) for i in (0, 1))
    return Documents(starts, lengths, batch, seq_len)


def _shorten(values: list) -> str:
    return repr(values) if len(values) <= 20 else f"{values[:10]} ... {values[-5:]}"


def padded_length(length: int, causal: bool) -> int:
    """The row length a document runs in: causal, rounded up to 4 lengths per octave."""
    if not causal:
        return length
    step = 1 << max(0, length.bit_length() - 3)
    return -(-length // step) * step


def groups(documents: Documents, causal: bool) -> dict[int, list[int]]:
    """{row length: indices of the documents that run in rows of that length}."""
    found: dict[int, list[int]] = {}
    for index, length in enumerate(documents.lengths):
        found.setdefault(padded_length(length, causal), []).append(index)
    return found


def run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    documents: Documents,
    causal: bool,
    attend_rows: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """attend_rows (the one-device op on a batch of rows) on each document alone: q (b, n, h, d),
    k and v (b, n, g, d) -> (b, n, h, d), zero on padding."""
    if (documents.batch, documents.seq_len) != tuple(q.shape[:2]):
        raise ValueError(
            f"documents lie in rows {(documents.batch, documents.seq_len)}, q has "
            f"{tuple(q.shape[:2])}: documents of global rows take a sequence-parallel attention"
        )
    if documents.are_the_rows():
        return attend_rows(q, k, v)
    batch, n, heads, dim = q.shape
    total = batch * n
    flat = [x.flatten(0, 1) for x in (q, k, v)]  # (b*n, ., d)
    out = q.new_zeros(total + 1, heads, dim)  # the last row collects the padding, dropped
    starts = torch.tensor(documents.starts, device=q.device)
    lengths = torch.tensor(documents.lengths, device=q.device)
    for row_len, members in groups(documents, causal).items():
        chosen = torch.tensor(members, device=q.device)
        offsets = torch.arange(row_len, device=q.device)  # (P,)
        real = offsets < lengths[chosen, None]  # (rows, P)
        index = starts[chosen, None] + offsets  # (rows, P)
        rows = [
            torch.where(real[..., None, None], x[index.clamp(max=total - 1)], 0.0) for x in flat
        ]  # (rows, P, ., d); causal: the padding comes after every query of its document
        part = attend_rows(*rows)  # (rows, P, h, d)
        out = out.index_add(0, torch.where(real, index, total).flatten(), part.flatten(0, 1))
    return out[:total].view(batch, n, heads, dim)
