"""The `data:` section of the training config, checked before any reading of the corpus."""

from __future__ import annotations

from dataclasses import dataclass

from longnet.config import choice, positive_int

SOURCES = ("stdlib", "files", "hub")


@dataclass
class DataConfig:
    """The `data:` section of the training config.

    seq_len: tokens per training row (the model sees seq_len inputs and seq_len labels).
    source: "stdlib" (the Python standard library's .py files, offline), "files" (path) or "hub".
    path: a .txt / .jsonl / .json / .parquet file or a folder of them (searched recursively,
        hidden files ignored). A .txt file is one document; a JSON / Parquet record is one.
    hub_name, hub_config, hub_split: a Hugging Face hub dataset (needs a network the first time).
    text_field: the column holding the text in JSON, Parquet and hub data.
    tokenizer: "byte" (UTF-8 bytes, no download), a local HF tokenizer.json file, or
        "tiktoken:<encoding>" (e.g. tiktoken:gpt2) when tiktoken has the encoding cached.
    validation_fraction: share of documents held out for validation (0: none).
    shuffle_seed: seeds the document order and the per-epoch row order.
    max_documents: keep only this many documents (the stdlib: in a fixed pseudo-random order).
    cache_dir: where tokenised corpora are cached; None: $XDG_CACHE_HOME or ~/.cache, /longnet/data.
    num_proc: processes for reading and tokenising.
    """

    seq_len: int = 256
    source: str = "stdlib"
    path: str | None = None
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    text_field: str = "text"
    tokenizer: str = "byte"
    validation_fraction: float = 0.05
    shuffle_seed: int = 0
    max_documents: int | None = None
    cache_dir: str | None = None
    num_proc: int = 1

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ValueError naming the field for values that are wrong whatever is on disk."""
        self.seq_len = positive_int("data.seq_len", self.seq_len)
        self.num_proc = positive_int("data.num_proc", self.num_proc)
        if self.max_documents is not None:
            self.max_documents = positive_int("data.max_documents", self.max_documents)
        choice("data.source", self.source, SOURCES)
        if self.source == "files" and not self.path:
            raise ValueError("data.path is required with data.source='files'")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("data.hub_name is required with data.source='hub'")
        for name in ("path", "hub_name", "hub_config", "cache_dir"):
            if not isinstance(getattr(self, name), str | None):
                raise ValueError(f"data.{name} must be a string, got {getattr(self, name)!r}")
        for name in ("text_field", "tokenizer", "hub_split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(
                    f"data.{name} must be a non-empty string, got {getattr(self, name)!r}"
                )
        if self.tokenizer.startswith("tiktoken:") and not self.tokenizer.removeprefix("tiktoken:"):
            raise ValueError(
                "data.tokenizer 'tiktoken:' needs an encoding name, e.g. tiktoken:gpt2"
            )
        fraction = self.validation_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ValueError(f"data.validation_fraction must be a number, got {fraction!r}")
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"data.validation_fraction must be in [0, 1), got {fraction!r}")
        if isinstance(self.shuffle_seed, bool) or not isinstance(self.shuffle_seed, int):
            raise ValueError(f"data.shuffle_seed must be an integer, got {self.shuffle_seed!r}")
        if self.shuffle_seed < 0:
            raise ValueError(f"data.shuffle_seed must be >= 0, got {self.shuffle_seed}")
