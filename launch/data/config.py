"""The `data:` section of the training config, checked before any reading of the corpus."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)

SOURCES = ("stdlib", "files", "hub")
NonEmptyString = Annotated[str, Field(min_length=1)]


def _describe(error: dict) -> str:
    """One pydantic error as launch/config.py words those of the whole tree: `data.key:
    problem, got value`; a validator's own ValueError (which names its key) as it is."""
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    key = "data" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown config key {key}; data takes: {', '.join(DataConfig.model_fields)}"
    return f"{key}: {error['msg']}, got {error['input']!r}"


def stage_at(schedule: list[list[int]], step: int) -> int:
    """The value of a [[step, value], ...] schedule (steps from 0, rising) at `step`."""
    return [value for start, value in schedule if start <= step][-1]


def _check_steps(name: str, form: str, schedule: list[list[int]]) -> None:
    """A schedule's steps start at 0 and rise."""
    if not schedule:
        raise ValueError(f"{name} must be {form}, got {schedule}")
    steps = [step for step, _ in schedule]
    if steps[0] != 0 or any(a >= b for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(f"{name} steps must start at 0 and rise, got {steps}")


class DataConfig(BaseModel):
    """The `data:` section of the training config. Bad values raise ValueError naming the key
    (`data.seq_len: Input should be greater than 0, got 0`).

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
    passkey_distance_schedule: a distance curriculum, [[step, tokens], ...] from step 0 on with
        rising steps: from `step` on, a training row's pass key lies at most `tokens` before its
        question (longnet.launch.data.passkey), the rows keeping their length, so every
        pattern of the full context trains from the start while the lookup reaches farther.
        Needs passkey_fraction > 0. None: the key anywhere in the row.
    document_boundaries: each document of a packed row (its tokens up to and including its
        EOS) is its own sequence in attention: no key crosses a document boundary and segments
        start at each document's first token (longnet.dilated_attention's cu_seqlens), also
        across sequence-parallel ranks. Not with pass keys.
    """

    # strict, as the rest of the config tree: YAML gives numbers and booleans already.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    seq_len: PositiveInt = 256
    source: Literal["stdlib", "files", "hub"] = "stdlib"
    path: str | None = None
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: NonEmptyString = "train"
    text_field: NonEmptyString = "text"
    tokenizer: NonEmptyString = "byte"
    validation_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.05
    shuffle_seed: NonNegativeInt = 0
    max_documents: PositiveInt | None = None
    cache_dir: str | None = None
    num_proc: PositiveInt = 1
    passkey_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0
    seq_len_schedule: list[Annotated[list[int], Field(min_length=2, max_length=2)]] | None = None
    passkey_distance_schedule: (
        list[Annotated[list[int], Field(min_length=2, max_length=2)]] | None
    ) = None
    document_boundaries: bool = False

    def __init__(self, **values):
        # Built directly (tests, evaluate.py) as in the config tree: one line naming the key.
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ValueError("; ".join(_describe(e) for e in error.errors())) from None

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        """What the field types cannot say: fields that depend on each other."""
        if self.source == "files" and not self.path:
            raise ValueError("data.path is required with data.source='files'")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("data.hub_name is required with data.source='hub'")
        if self.tokenizer == "tiktoken:":
            raise ValueError(
                "data.tokenizer 'tiktoken:' needs an encoding name, e.g. tiktoken:gpt2"
            )
        if self.seq_len_schedule is not None:
            self._check_schedule(self.seq_len_schedule)
        if self.passkey_distance_schedule is not None:
            self._check_distance_schedule(self.passkey_distance_schedule)
        if self.document_boundaries and self.passkey_fraction:
            raise ValueError(
                "data.document_boundaries=true cannot go with data.passkey_fraction > 0: a pass "
                "key planted across documents could not be found"
            )
        return self

    def _check_schedule(self, schedule: list[list[int]]) -> None:
        _check_steps("data.seq_len_schedule", "[[step, length], ...]", schedule)
        for _, length in schedule:
            if length < 1 or self.seq_len % length:
                raise ValueError(
                    f"data.seq_len_schedule length {length} must divide data.seq_len={self.seq_len}"
                )

    def _check_distance_schedule(self, schedule: list[list[int]]) -> None:
        _check_steps("data.passkey_distance_schedule", "[[step, tokens], ...]", schedule)
        if not self.passkey_fraction:
            raise ValueError(
                "data.passkey_distance_schedule needs data.passkey_fraction > 0 (rows with keys)"
            )
        for _, tokens in schedule:
            if tokens < 1:
                raise ValueError(
                    f"data.passkey_distance_schedule distance {tokens} must be a positive number "
                    "of tokens"
                )

    def for_evaluation(self) -> DataConfig:
        """The same corpus without what only training rows have: planted keys, curricula."""
        return self.model_copy(
            update=dict(passkey_fraction=0.0, seq_len_schedule=None, passkey_distance_schedule=None)
        )

    def seq_len_at(self, step: int) -> int:
        """The training row length of optimizer step `step` (the curriculum's stage)."""
        if self.seq_len_schedule is None:
            return self.seq_len
        return stage_at(self.seq_len_schedule, step)
