"""Retrieval rows: a pass key planted in corpus text, for training and for evaluation.

    row      the n + 1 corpus tokens of a row, with KEY written over them at a chosen depth and
             QUESTION plus the answer written over its end:
             ... text ... "\\n# the pass key is 12345.\\n" ... text ...
             "\\n# what is the pass key? the pass key is " 1 2 3 4 5
             The question ends as the key's line begins: retrieval is copying what followed the
             same words, at any distance (what induction heads do).
    labels   the row's next tokens, as for the corpus; the answer's labels together weigh as much
             as all the others (loss_weights), so retrieval is not drowned by language modelling
    choice   whether a training row holds a key, the key and its depth are pure functions of
             (seed, row index) and, with a distance curriculum, of the step's longest distance:
             a resumed run reads the same rows

Depth d in [0, 1] puts the key's first token at round(d * room), room = n + 1 - len(KEY) -
len(QUESTION + answer): d = 0 is the start of the window, d = 1 right before the question.
The key's distance is the number of tokens from its first token to the question's first
(len(KEY) at d = 1). A distance curriculum (data.passkey_distance_schedule) caps it: the depth
is drawn uniformly from the depths whose distance is at most the cap (the nearest, depth 1,
where the cap is shorter than the key's line), so the rows keep their length while the lookup
starts near and reaches farther as training goes on.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from .config import stage_at
from .packing import PackedDataset
from .tokenizer import Tokenizer

KEY = "\n# the pass key is {}.\n"
QUESTION = "\n# what is the pass key? the pass key is "
DIGITS = 5


def random_key(rng: np.random.Generator) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, DIGITS))


def prompt_parts(tokenizer: Tokenizer, key: str) -> tuple[list[int], list[int], list[int]]:
    """(key text, question, answer) token ids; the answer is the key alone, encoded apart, so
    every tokenizer ends the question at the same token."""
    return tokenizer.encode(KEY.format(key)), tokenizer.encode(QUESTION), tokenizer.encode(key)


def lowest_depth(length: int, tokenizer: Tokenizer, key: str, max_distance: int) -> float:
    """The smallest depth at which `key` planted in a row of `length` tokens lies at most
    max_distance tokens before the question (module notes); 1 (the nearest) where even depth 1
    is farther: a tokenizer may encode some keys' lines longer than the one checked at load."""
    key_ids, question, answer = prompt_parts(tokenizer, key)
    room = length - len(key_ids) - len(question) - len(answer)
    if room <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - (max_distance - len(key_ids)) / room))


def plant(row: np.ndarray, tokenizer: Tokenizer, key: str, depth: float) -> tuple[np.ndarray, int]:
    """row (n + 1,) with the key at `depth` and the question and answer at its end: (the new row,
    where the answer starts in it). ValueError when the row is too short to hold them."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    key_ids, question, answer = prompt_parts(tokenizer, key)
    tail = question + answer
    room = len(row) - len(key_ids) - len(tail)
    if room < 0:
        raise ValueError(
            f"a pass key needs {len(key_ids) + len(tail)} tokens, the row holds {len(row)}"
        )
    row = row.copy()
    start = round(depth * room)
    row[start : start + len(key_ids)] = key_ids
    row[len(row) - len(tail) :] = tail
    return row, len(row) - len(answer)


class PasskeyDataset(PackedDataset):
    """A PackedDataset whose rows hold a pass key with probability `fraction` (per row index, see
    the module notes); rows carry loss_weights (1 everywhere but on a planted answer).
    distance_schedule [[step, tokens], ...] (DataConfig.passkey_distance_schedule): from `step`
    on, the training batches' keys lie at most `tokens` before the question; None: anywhere."""

    def __init__(
        self, packed: PackedDataset, tokenizer: Tokenizer, fraction: float, distance_schedule=None
    ):
        self.__dict__.update(copy.copy(packed).__dict__)
        self.tokenizer, self.fraction = tokenizer, fraction
        self.distance_schedule = distance_schedule

    def batch_for(self, step: int, *args, **kwargs) -> dict[str, torch.Tensor]:
        """PackedDataset.batch_for, the keys within the step's distance cap."""
        cap = None if self.distance_schedule is None else stage_at(self.distance_schedule, step)
        return self.rows(self.indices_for(step, *args, **kwargs), cap)

    def rows(self, indices, max_distance: int | None = None) -> dict[str, torch.Tensor]:
        """PackedDataset.rows with the keys planted; max_distance caps the keys' distance."""
        rows = super().rows(indices)
        block = torch.cat([rows["input_ids"], rows["labels"][:, -1:]], dim=1).numpy()
        weights = torch.ones(rows["labels"].shape, dtype=torch.float32)  # (rows, n)
        for i, index in enumerate(indices):
            rng = np.random.default_rng([self.seed, 0x9A55, int(index)])
            if rng.random() >= self.fraction:
                continue
            key, depth = random_key(rng), rng.random()
            if max_distance is not None:  # uniform over the depths within the cap
                lowest = lowest_depth(len(block[i]), self.tokenizer, key, max_distance)
                depth = lowest + (1.0 - lowest) * depth
            block[i], answer = plant(block[i], self.tokenizer, key, depth)
            labeled = len(block[i]) - 1  # labels of the row: positions 0 .. n - 1
            digits = labeled - answer + 1
            weights[i, answer - 1 :] = (labeled - digits) / digits
        block = torch.from_numpy(block)
        return {
            "input_ids": block[:, :-1].contiguous(),
            "labels": block[:, 1:].contiguous(),
            "loss_weights": weights,
        }
