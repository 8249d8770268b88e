"""The training config tree: every file in configs/ against the schema, layering, bad input."""

from pathlib import Path

import pytest
import yaml

from longnet import LongNetConfig
from longnet.launch.config import Config, load_config, save_config
from longnet.launch.trainer import deepspeed_config, validate

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
TINY = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"


def test_there_are_configs():
    names = {path.name for path in CONFIGS}
    assert {"tiny-cpu.yaml", "tiny-cpu-sp2.yaml"} <= names
    assert len(names) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_against_the_schema(path):
    config = load_config(path)
    raw = yaml.safe_load(path.read_text())
    # Every key written in the file reached the typed tree (nothing silently dropped).
    for section, values in raw.items():
        if section in ("model", "deepspeed"):
            continue
        for key, value in values.items():
            assert getattr(getattr(config, section), key) == value, f"{section}.{key}"
    model = config.model.build()
    assert isinstance(model, LongNetConfig)
    for key, value in raw["model"].items():
        expected = tuple(value) if isinstance(value, list) else value
        assert key == "preset" or getattr(model, key) == expected
    assert config.deepspeed == raw["deepspeed"]
    # The layout check of the trainer: seq_len splits over the SP degree for these patterns.
    from longnet.distributed import check_layout

    sp = config.parallel.sequence_parallel_size
    for seq_len in [config.data.seq_len, *config.train.eval_seq_lens]:
        check_layout(model.segment_lengths, model.dilation_rates, seq_len, sp)


def test_layering_defaults_file_overrides(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("train: {steps: 7, seed: 3}\nmodel: {preset: longnet-tiny, num_layers: 2}\n")
    config = load_config(
        file,
        [
            "train.steps=9",
            "deepspeed.bf16.enabled=true",
            "model.qk_norm=true",
            "deepspeed.optimizer.params.lr=1e-3",
        ],
    )
    assert config.train.steps == 9  # override beats file
    assert config.train.seed == 3  # file beats default
    assert config.train.log_interval == Config().train.log_interval  # default kept
    assert config.deepspeed["bf16"]["enabled"] is True
    assert config.deepspeed["optimizer"]["params"]["lr"] == pytest.approx(1e-3)
    model = config.model.build()
    assert (model.num_layers, model.qk_norm, model.d_model) == (2, True, 128)


def test_resolved_config_round_trips(tmp_path):
    config = load_config(TINY, ["train.steps=11", "model.num_layers=3"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stepz=3"], "train.stepz"),
        (["nosection.x=1"], "nosection"),
        (["train.steps=abc"], "train.steps"),
        (["train.steps=0"], "train.steps"),
        (["train.steps"], "section.key=value"),
        (["run.wandb_mode=sometimes"], "run.wandb_mode"),
        (["model.preset=longnet-9000"], "longnet-9000"),
        (["model.num_heads=3"], "num_heads"),
        (["model.d_model_typo=3"], "d_model_typo"),
        (["data.seq_len=-5"], "seq_len"),
        (["parallel.sequence_parallel_size=0"], "sequence_parallel_size"),
        (["checkpoint.keep=0"], "checkpoint.keep"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(TINY, overrides)


def test_missing_config_file():
    with pytest.raises(ValueError, match="does-not-exist.yaml"):
        load_config("does-not-exist.yaml")


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.sequence_parallel_size=2"], 3, "does not divide the world size 3"),
        (["parallel.sequence_parallel_size=2", "data.seq_len=500"], 2, "data.seq_len=500"),
        (["parallel.sequence_parallel_size=2", "data.seq_len=384"], 2, "straddle"),
        (["parallel.sequence_parallel_size=2", "train.eval_seq_lens=[300]"], 2, "=300"),
        (["deepspeed.fp16.enabled=true"], 1, "fp16"),
        (["deepspeed.train_micro_batch_size_per_gpu=0"], 1, "train_micro_batch_size_per_gpu"),
        (["data.source=files", "data.path=/no/such/corpus"], 1, "/no/such/corpus"),
        (["model.vocab_size=100"], 1, "vocab_size"),
    ],
)
def test_validate_rejects_what_cannot_run(tmp_path, overrides, world, message):
    config = load_config(TINY, [f"run.output_dir={tmp_path}", *overrides])
    with pytest.raises(ValueError, match=message):
        validate(config, world)


def test_one_device_takes_any_length(tmp_path):
    config = load_config(TINY, [f"run.output_dir={tmp_path}", "data.seq_len=500"])
    validate(config, 1)


def test_deepspeed_batch_sizes_count_data_parallel_ranks():
    config = load_config(
        CONFIGS[0],
        ["deepspeed.train_micro_batch_size_per_gpu=3", "deepspeed.gradient_accumulation_steps=2"],
    )
    ds = deepspeed_config(config, data_parallel=4)
    assert ds["train_batch_size"] == 24
    assert ds["scheduler"]["params"]["total_num_steps"] == config.train.steps
    bad = load_config(TINY, ["deepspeed.train_batch_size=5"])
    with pytest.raises(ValueError, match="train_batch_size=5"):
        deepspeed_config(bad, data_parallel=1)
