"""Packed rows of a split's token stream, the exactly resumable sampler, and documents' offsets."""

from __future__ import annotations

import copy

import datasets
import numpy as np
import pyarrow.compute as pc
import torch


class TokenStream:
    """The concatenated token ids of one split, as memory-mapped numpy chunks."""

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset  # keeps the memory map alive
        chunks = [
            pc.list_flatten(c).to_numpy(zero_copy_only=True)
            for c in dataset.data.column("ids").chunks
        ]
        self.chunks = [c for c in chunks if len(c)]
        self.starts = np.cumsum([0] + [len(c) for c in self.chunks])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            offset = start - self.starts[i]
            piece = self.chunks[i][offset : stop - self.starts[i]]
            pieces.append(piece)
            start += len(piece)
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def document_offsets(input_ids: torch.Tensor, eos_id: int) -> list[int]:
    """cu_seqlens of the documents of packed rows input_ids (b, n): a document ends after each
    EOS and at each row's end (rows are separate sequences)."""
    batch, n = input_ids.shape
    ends = (input_ids.flatten() == eos_id).nonzero().flatten() + 1  # (e,): after each EOS
    rows = torch.arange(0, batch * n + 1, n)  # (b + 1,)
    return torch.cat([rows, ends]).unique().tolist()  # sorted, distinct


class PackedDataset(torch.utils.data.Dataset):
    """Rows of seq_len + 1 tokens cut from a split's stream with stride seq_len (see the docstring
    of longnet.launch.data)."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int, split: str):
        self.stream, self.seq_len, self.seed, self.split = stream, seq_len, seed, split
        self.num_rows = (len(stream) - 1) // seq_len
        if self.num_rows < 1:
            raise ValueError(
                f"empty corpus: the {split} split has {len(stream)} tokens, fewer than seq_len + "
                f"1 = {seq_len + 1}; use more data or a smaller seq_len"
                + (" or a larger data.validation_fraction" if split == "validation" else "")
            )
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} out of range for {self.num_rows} rows")
        return {k: v[0] for k, v in self.rows([index]).items()}

    def rows(self, indices) -> dict[str, torch.Tensor]:
        """input_ids and labels, (len(indices), seq_len) int64 each."""
        block = np.stack(
            [self.stream.slice(i * self.seq_len, (i + 1) * self.seq_len + 1) for i in indices]
        ).astype(np.int64)
        block = torch.from_numpy(block)  # (rows, seq_len + 1)
        return {"input_ids": block[:, :-1].contiguous(), "labels": block[:, 1:].contiguous()}

    def at_seq_len(self, seq_len: int) -> PackedDataset:
        """The same split, sampler seed and class at another seq_len (a curriculum stage)."""
        other = copy.copy(self)
        other.__dict__.update(PackedDataset(self.stream, seq_len, self.seed, self.split).__dict__)
        return other

    def permutation(self, epoch: int) -> np.ndarray:
        """The row order of an epoch: a pure function of (seed, epoch)."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(self.num_rows)
        return self._permutations[epoch]

    def indices_for(
        self,
        step: int,
        micro_step: int,
        dp_rank: int,
        dp_size: int,
        micro_batch_size: int,
        grad_accum: int,
    ) -> np.ndarray:
        """The rows of one micro-batch of one data-parallel rank.

        Optimizer step s consumes positions [s*B, (s+1)*B) of the endless sequence permutation(0),
        permutation(1), ... with B = dp_size * grad_accum * micro_batch_size, micro-step k of rank
        r taking ((s*grad_accum + k)*dp_size + r)*micro_batch_size onwards. So one step reads
        the same rows however B is split into ranks, micro-batches and accumulation steps, and
        resuming needs only the step.
        """
        for name, value, low in (
            ("dp_size", dp_size, 1),
            ("micro_batch_size", micro_batch_size, 1),
            ("grad_accum", grad_accum, 1),
            ("step", step, 0),
        ):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if not 0 <= micro_step < grad_accum:
            raise ValueError(f"micro_step must be in [0, {grad_accum}), got {micro_step}")
        first = ((step * grad_accum + micro_step) * dp_size + dp_rank) * micro_batch_size
        epochs, offsets = np.divmod(first + np.arange(micro_batch_size), self.num_rows)
        return np.array([self.permutation(int(e))[o] for e, o in zip(epochs, offsets, strict=True)])

    def batch_for(
        self,
        step: int,
        micro_step: int,
        dp_rank: int,
        dp_size: int,
        micro_batch_size: int,
        grad_accum: int,
    ) -> dict[str, torch.Tensor]:
        """input_ids and labels, (micro_batch_size, seq_len) int64; see indices_for. Every rank
        of a sequence-parallel group passes the same dp_rank and gets the same rows."""
        return self.rows(
            self.indices_for(step, micro_step, dp_rank, dp_size, micro_batch_size, grad_accum)
        )
