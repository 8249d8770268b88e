"""The training configuration: one typed tree, loaded as defaults < YAML file < key=value overrides.

    run:         where the run lives and how it is logged
    train:       steps, seed, logging and evaluation cadence
    model:       a preset name plus any LongNetConfig field
    data:        the corpus, tokenizer and seq_len (longnet.launch.data.DataConfig)
    parallel:    the sequence-parallel degree (data parallel takes the rest of the world)
    checkpoint:  cadence and resumption
    deepspeed:   DeepSpeed's own config, passed through (zero_optimization, bf16, fp16,
                 gradient_accumulation_steps, gradient_clipping, optimizer, scheduler, ...)

The sections are strict pydantic models: unknown keys and values of the wrong type raise one
ValueError naming the dotted keys, before any heavy work. The resolved tree is saved with the run
(config.yaml in run.output_dir). `--config NAME` also finds the configs shipped with the package.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)

from longnet.config import LongNetConfig
from longnet.launch.data import DataConfig


class YAMLLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where 1e-3, 1E4, -.5 and +1e3 are strings (its floats need a dot
    and a signed exponent); YAML 1.2's float syntax, added below, makes them numbers."""


YAMLLoader.add_implicit_resolver(  # after int and 1.1's float, so "12" stays an int
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$"),
    list("-+.0123456789"),
)


class _Section(BaseModel):
    # strict: YAML already gives numbers and booleans, so "5" or true for an int is a mistake.
    model_config = ConfigDict(extra="forbid", strict=True)


class RunConfig(_Section):
    output_dir: str = "runs/longnet"
    name: str | None = None  # default: the output folder's name
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # offline needs no network
    wandb_project: str = "longnet"
    wandb_entity: str | None = None


class TrainConfig(_Section):
    steps: PositiveInt = 1000  # optimizer steps
    seed: int = 0
    log_interval: PositiveInt = 10
    eval_interval: NonNegativeInt = 200  # 0: evaluate only at the end
    eval_batches: PositiveInt = 8  # validation micro-batches per evaluation
    # Extra context lengths to evaluate at (LongNet's claim: loss keeps falling with context).
    eval_seq_lens: list[Annotated[int, Field(ge=2)]] = []


class ModelConfig(_Section):
    """A preset of longnet.LongNetConfig with any of its fields overridden (written next to
    `preset`; LongNetConfig validates them)."""

    model_config = ConfigDict(extra="allow", strict=True)
    preset: str = "longnet-tiny"

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra)

    def build(self) -> LongNetConfig:
        return LongNetConfig.preset(self.preset, **self.overrides)

    @model_validator(mode="after")
    def _buildable(self) -> ModelConfig:
        known = LongNetConfig.__dataclass_fields__
        unknown = [key for key in self.overrides if key not in known]
        if unknown:
            raise ValueError(
                f"unknown config key {', '.join('model.' + k for k in unknown)}; model takes "
                f"preset and the LongNetConfig fields: {', '.join(known)}"
            )
        try:
            self.build()
        except ValueError as error:
            raise ValueError(f"model: {error}") from None
        return self


class ParallelConfig(_Section):
    sequence_parallel_size: PositiveInt = 1


class CheckpointConfig(_Section):
    interval: NonNegativeInt = 0  # optimizer steps between checkpoints; 0: only at the end
    resume: str = "auto"  # auto: the latest complete checkpoint if any; none; or a folder
    keep: PositiveInt = 2  # complete checkpoints kept (older ones are deleted)
    # Content hashes of the checkpoint files, recorded at save and checked at resume (sizes are
    # always): false for checkpoints so large that reading them twice costs too much.
    verify_hashes: bool = True


def _default_deepspeed() -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 2.0,
        "zero_optimization": {"stage": 1},
        "bf16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 6e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01},
        },
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 750}},
    }


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    deepspeed: dict[str, Any] = Field(default_factory=_default_deepspeed)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @model_validator(mode="after")
    def _tiles_without_zero3(self) -> Config:
        # ZeRO-3 gathers a module's parameters around its forward; the tiles' backward runs the
        # FFN again outside that bracket and DeepSpeed's linear then sees the partitioned weight.
        tiles = self.model.build().ffn_tile_tokens
        stage = self.deepspeed.get("zero_optimization", {}).get("stage", 0)
        if tiles and stage == 3:
            raise ValueError(
                f"model.ffn_tile_tokens={tiles} cannot go with deepspeed.zero_optimization.stage=3 "
                "(the tiles' backward recomputes the FFN while ZeRO-3 holds its weights "
                "partitioned); use stage 1 or 2, or ffn_tile_tokens=0"
            )
        return self


def _describe(error: dict) -> str:
    """One pydantic error as `key: problem`, naming the dotted key."""
    if error["type"] == "value_error":  # raised by the validators above: names its key already
        return str(error["ctx"]["error"])
    loc = error["loc"]
    key = str(loc[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    if error["type"] == "extra_forbidden":
        section = Config
        for part in loc[:-1]:
            section = section.model_fields[part].annotation
        where = f"{'.'.join(loc[:-1])} takes" if len(loc) > 1 else "sections are"
        return f"unknown config key {key}; {where}: {', '.join(section.model_fields)}"
    return f"{key}: {error['msg']}, got {error['input']!r}"


def config_path(name: str | Path) -> Path:
    """The YAML file `name`; a bare name that is not a file (tiny-cpu, tiny-cpu.yaml) is one of
    the configs shipped with the package."""
    path = Path(name)
    if path.is_file() or path.parent != Path("."):
        return path
    shipped = resources.files("longnet.configs")
    file = shipped / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if file.is_file():
        return Path(str(file))
    names = sorted(
        p.name.removesuffix(".yaml") for p in shipped.iterdir() if p.name.endswith(".yaml")
    )
    raise ValueError(f"config file {str(name)!r} does not exist (shipped: {', '.join(names)})")


def _problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, without the quoted excerpt of the text."""
    return " ".join(str(getattr(error, "problem", None) or error).split())


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML file; ValueError with file:line:column for malformed YAML."""
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), YAMLLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValueError(f"{where}: bad YAML: {_problem(error)}") from None
    except (OSError, UnicodeError) as error:
        message = " ".join(str(error).split())
        raise ValueError(f"{path}: cannot read the config: {message}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping, got {loaded!r}")
    return loaded


def _merge(base: dict, update: dict) -> dict:
    """base deep-updated by update; unknown keys are rejected later, by the models."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ValueError(f"override {item!r}: empty key segment in {key!r}")
    try:
        return path, yaml.load(text, YAMLLoader) if text.strip() else ""
    except yaml.YAMLError as error:
        raise ValueError(f"override {item!r}: bad YAML value: {_problem(error)}") from None


def _set(tree: dict, path: list[str], value: Any, item: str) -> None:
    node = tree
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {'.'.join(path[: depth + 1])} is not a section")
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """defaults < the YAML file at `path` (or a shipped config's name) < `overrides`
    ("section.key=value", YAML values). ValueError with a one-line message on bad input."""
    # The deepspeed section is free-form: a file's keys update the defaults instead of
    # replacing the whole section, as the typed sections' fields do.
    tree = {"deepspeed": _default_deepspeed()}
    if path is not None:
        tree = _merge(tree, read_yaml(config_path(path)))
    for item in overrides:
        keys, value = _parse_override(item)
        _set(tree, keys, value, item)
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ValueError("; ".join(_describe(e) for e in error.errors())) from None


def save_config(config: Config, path: Path) -> None:
    """The resolved config as YAML (written to a temporary file first: never half-written)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tmp.replace(path)
