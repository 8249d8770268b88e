"""The training configuration: one typed tree, loaded as defaults < YAML file < key=value overrides.

    run:         where the run lives and how it is logged
    train:       steps, seed, logging and evaluation cadence
    model:       a preset name plus any LongNetConfig field
    data:        the corpus, tokenizer and seq_len (launch.data.DataConfig)
    parallel:    the sequence-parallel degree (data parallel takes the rest of the world)
    checkpoint:  cadence and resumption
    deepspeed:   DeepSpeed's own config, passed through (zero_optimization, bf16, fp16,
                 gradient_accumulation_steps, gradient_clipping, optimizer, scheduler, ...)

Unknown keys and values of the wrong type raise ValueError naming the dotted key, before any
heavy work. The resolved tree is saved with the run (config.yaml in run.output_dir).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from longnet.config import LongNetConfig
from longnet.launch.data import DataConfig

WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class RunConfig:
    output_dir: str = "runs/longnet"
    name: str | None = None  # default: the output folder's name
    wandb_mode: str = "offline"  # offline works without a network; `wandb sync` uploads later
    wandb_project: str = "longnet"
    wandb_entity: str | None = None

    def __post_init__(self):
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(
                f"run.wandb_mode must be one of {WANDB_MODES}, got {self.wandb_mode!r}"
            )


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    seed: int = 0
    log_interval: int = 10
    eval_interval: int = 200  # 0: evaluate only at the end
    eval_batches: int = 8  # validation micro-batches per evaluation
    # Extra context lengths to evaluate at (LongNet's claim: loss keeps falling with context).
    eval_seq_lens: list[int] = field(default_factory=list)

    def __post_init__(self):
        for name in ("steps", "log_interval", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_interval < 0:
            raise ValueError(f"train.eval_interval must be >= 0, got {self.eval_interval}")
        if any(n < 2 for n in self.eval_seq_lens):
            raise ValueError(f"train.eval_seq_lens must be >= 2, got {self.eval_seq_lens}")


@dataclass
class ModelConfig:
    """A preset of longnet.LongNetConfig with any of its fields overridden."""

    preset: str = "longnet-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)

    def build(self) -> LongNetConfig:
        return LongNetConfig.preset(self.preset, **self.overrides)


@dataclass
class ParallelConfig:
    sequence_parallel_size: int = 1

    def __post_init__(self):
        if self.sequence_parallel_size < 1:
            raise ValueError(
                f"parallel.sequence_parallel_size must be >= 1, got {self.sequence_parallel_size}"
            )


@dataclass
class CheckpointConfig:
    interval: int = 0  # optimizer steps between checkpoints; 0: only at the end
    resume: str = "auto"  # auto: the latest complete checkpoint if any; none; or a folder
    keep: int = 2  # complete checkpoints kept (older ones are deleted)

    def __post_init__(self):
        if self.interval < 0:
            raise ValueError(f"checkpoint.interval must be >= 0, got {self.interval}")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {self.keep}")


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


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: dict[str, Any] = field(default_factory=_default_deepspeed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """value converted to the annotated type `kind`, or ValueError naming the key."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _coerce(value, inner, key)
    if kind is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML reads 6e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {kind} for {key}")


def _build(cls: type, values: dict[str, Any], prefix: str):
    """An instance of the dataclass `cls` from a nested dict, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix or 'the config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ValueError(
            f"unknown config key{where}: {', '.join(prefix + k for k in unknown)}; "
            f"known: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        kind, key = hints[name], prefix + name
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, key + ".")
        else:
            kwargs[name] = _coerce(value, kind, key)
    return cls(**kwargs)


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    """base deep-updated by update; new keys are allowed here and rejected later by _build."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, f"{prefix}{key}.")
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
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    return path, value


def _set(tree: dict, path: list[str], value: Any, item: str) -> None:
    node = tree
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {'.'.join(path[: depth + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _model_section(tree: dict) -> None:
    """Users write model fields next to `preset`; they become ModelConfig.overrides."""
    model = tree.get("model")
    if isinstance(model, dict):
        preset = model.get("preset", ModelConfig.preset)
        overrides = {k: v for k, v in model.items() if k not in ("preset", "overrides")}
        tree["model"] = {"preset": preset, "overrides": {**model.get("overrides", {}), **overrides}}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """defaults < the YAML file at `path` < `overrides` ("section.key=value", YAML values)."""
    tree = Config().to_dict()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping, got {loaded!r}")
        _model_section(loaded)
        tree = _merge(tree, loaded)
    for item in overrides:
        keys, value = _parse_override(item)
        if keys[0] == "model" and len(keys) > 1 and keys[1] not in ("preset", "overrides"):
            keys = ["model", "overrides", *keys[1:]]
        _set(tree, keys, value, item)
    config = _build(Config, tree, "")
    try:
        config.model.build()
    except (ValueError, TypeError) as error:
        raise ValueError(f"model: {error}") from None
    return config


def save_config(config: Config, path: Path) -> None:
    """The resolved config as YAML (written to a temporary file first: never half-written)."""
    model = config.to_dict()
    model["model"] = {"preset": config.model.preset, **config.model.overrides}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(model, sort_keys=False))
    tmp.replace(path)
