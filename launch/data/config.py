"""The `data:` section of the training config, checked before any reading of the corpus."""

from __future__ import annotations

from dataclasses import dataclass

from longnet.checks import choice, positive_int

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
    passkey_fraction: share of training rows with a pass key planted in them
        (longnet.launch.data.passkey), chosen per row index; 0: none.
    seq_len_schedule: a context curriculum, [[step, length], ...] from step 0 on with rising
        steps: from `step` on, training rows hold `length` tokens (a divisor of seq_len) and each
        micro-batch seq_len / length times as many rows, so the tokens per step stay the same.
        None: seq_len throughout. Evaluation and checkpoints ignore it.
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
    passkey_fraction: float = 0.0
    seq_len_schedule: list[list[int]] | None = None

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
        fraction = self.passkey_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ValueError(f"data.passkey_fraction must be a number, got {fraction!r}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"data.passkey_fraction must be in [0, 1], got {fraction!r}")
        if self.seq_len_schedule is not None:
            self._check_schedule(self.seq_len_schedule)

    def _check_schedule(self, schedule) -> None:
        bad = f"data.seq_len_schedule must be [[step, length], ...], got {schedule!r}"
        if not isinstance(schedule, list) or not schedule:
            raise ValueError(bad)
        for stage in schedule:
            if not (
                isinstance(stage, (list, tuple))
                and len(stage) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in stage)
            ):
                raise ValueError(bad)
        steps = [step for step, _ in schedule]
        if steps[0] != 0 or any(a >= b for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError(f"data.seq_len_schedule steps must start at 0 and rise, got {steps}")
        for _, length in schedule:
            if length < 1 or self.seq_len % length:
                raise ValueError(
                    f"data.seq_len_schedule length {length} must divide data.seq_len={self.seq_len}"
                )
        self.seq_len_schedule = [list(stage) for stage in schedule]

    def seq_len_at(self, step: int) -> int:
        """The training row length of optimizer step `step` (the curriculum's stage)."""
        if self.seq_len_schedule is None:
            return self.seq_len
        return [length for start, length in self.seq_len_schedule if start <= step][-1]
