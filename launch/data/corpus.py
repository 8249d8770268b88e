"""The corpus a run trains on: its packed splits (pass keys planted when asked), tokenizer and
statistics, from the tokenised cache."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from longnet.checks import positive_int

from .cache import ensure_cache
from .config import DataConfig
from .packing import PackedDataset, TokenStream
from .passkey import DIGITS, PasskeyDataset, plant, prompt_parts
from .tokenizer import Tokenizer


@dataclass
class Corpus:
    """What load() returns: the packed splits, the tokenizer and the corpus statistics."""

    tokenizer: Tokenizer
    train: PackedDataset
    validation: PackedDataset | None  # None when data.validation_fraction is 0
    path: Path  # the cache folder
    from_cache: bool  # False when this call tokenised the corpus
    stats: dict  # per split: documents, tokens (EOS included), bytes (UTF-8 of the text)

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token on the validation split (train without one)."""
        split = self.stats["validation" if self.validation is not None else "train"]
        return split["bytes"] / split["tokens"]

    def bits_per_byte(self, nats_per_token: float) -> float:
        """A mean cross-entropy (nats per token) in bits per byte of text, comparable across
        tokenizers. EOS tokens count as tokens and carry no bytes."""
        return nats_per_token / math.log(2) / self.bytes_per_token

    def validation_rows(self, seq_len: int, max_rows: int | None = None) -> dict[str, torch.Tensor]:
        """The first rows (at most max_rows) of the validation split packed at seq_len: input_ids
        and labels (rows, seq_len) int64, for the loss at several context lengths. Documents are
        shuffled before packing, so the first rows are a random sample; the same for every call."""
        if self.validation is None:
            raise ValueError("no validation split: data.validation_fraction is 0")
        seq_len = positive_int("seq_len", seq_len)
        rows = PackedDataset(self.validation.stream, seq_len, self.validation.seed, "validation")
        count = (
            len(rows) if max_rows is None else min(positive_int("max_rows", max_rows), len(rows))
        )
        return rows.rows(range(count))


def load(config: DataConfig) -> Corpus:
    """The corpus packed at config.seq_len, from the cache (built first if missing)."""
    path, tokenizer, from_cache = ensure_cache(config)
    stats = json.loads((path / "meta.json").read_text())["splits"]
    splits = {
        name: PackedDataset(
            TokenStream(datasets.load_from_disk(str(path / name))),
            config.seq_len,
            config.shuffle_seed,
            name,
        )
        for name in stats
    }
    if config.passkey_fraction:
        splits["train"] = PasskeyDataset(
            splits["train"], tokenizer, config.passkey_fraction, config.passkey_distance_schedule
        )
        shortest = min(length for _, length in config.seq_len_schedule or [[0, config.seq_len]])
        try:
            plant(np.zeros(shortest + 1, np.int64), tokenizer, "0" * DIGITS, 0.0)
        except ValueError as error:
            raise ValueError(
                f"data.passkey_fraction with rows of {shortest} tokens: {error}"
            ) from None
        key_line = len(prompt_parts(tokenizer, "0" * DIGITS)[0])
        for _, tokens in config.passkey_distance_schedule or []:
            if tokens < key_line:
                raise ValueError(
                    f"data.passkey_distance_schedule: a pass key distance of {tokens} tokens is "
                    f"shorter than the key's line ({key_line} tokens)"
                )
    return Corpus(tokenizer, splits["train"], splits.get("validation"), path, from_cache, stats)
