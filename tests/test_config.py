"""The training config tree: every file in configs/ against the schema, layering, numbers, bad
input (also through the real command line: one line, exit status 2)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from longnet import LongNetConfig
from longnet.launch.config import Config, YAMLLoader, load_config, save_config
from longnet.launch.trainer import deepspeed_config, validate

REPO = Path(__file__).parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TINY = REPO / "configs" / "tiny-cpu.yaml"
# YAML 1.1 (PyYAML) reads all but .5 as strings.
SPELLINGS = {"1e-3": 1e-3, "1E4": 1e4, ".5": 0.5, "-2e-5": -2e-5, "+1e3": 1e3}


def test_there_are_configs():
    names = {path.name for path in CONFIGS}
    assert {"tiny-cpu.yaml", "tiny-cpu-sp2.yaml"} <= names
    assert len(names) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_against_the_schema(path):
    config = load_config(path)
    assert load_config(path.stem) == config  # the shipped config, by name
    raw = yaml.load(path.read_text(), YAMLLoader)
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
    overrides = ["train.steps=11", "model.num_layers=3", "deepspeed.optimizer.params.eps=1e-8"]
    config = load_config(TINY, overrides)
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_yaml_loader_reads_every_number_spelling_as_a_number():
    as_text = [text for text in SPELLINGS if yaml.safe_load(f"x: {text}")["x"] == text]
    assert as_text == ["1e-3", "1E4", "-2e-5", "+1e3"]  # the bug
    for text, value in SPELLINGS.items():
        loaded = yaml.load(f"x: {text}", YAMLLoader)["x"]
        assert type(loaded) is float and loaded == value, text
    # Integers stay integers and text that only starts like a number stays text.
    loaded = yaml.load("[12, -3, 0x10, 1_000, 1.5e+3, -.5, 1e3x, v1e3, 1.2.3, 2e]", YAMLLoader)
    assert loaded == [12, -3, 16, 1000, 1500.0, -0.5, "1e3x", "v1e3", "1.2.3", "2e"]
    assert [type(v) for v in loaded[:4]] == [int] * 4


def lookup(config: Config, key: str):
    node = config
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


# A key of every section and the spellings within its range. The others must fail naming the key
# and showing the number read (integer and string fields take no float).
NUMBER_FIELDS = {
    "deepspeed.optimizer.params.lr": set(SPELLINGS),
    "deepspeed.gradient_clipping": set(SPELLINGS),
    "deepspeed.my_plugin.threshold": set(SPELLINGS),  # a key the defaults lack
    "model.rotary_base": {"1e-3", "1E4", ".5", "+1e3"},
    "data.validation_fraction": {"1e-3", ".5"},
    "train.steps": set(),
    "parallel.sequence_parallel_size": set(),
    "checkpoint.interval": set(),
    "run.name": set(),
}


@pytest.mark.parametrize("where", ["file", "override"])
@pytest.mark.parametrize("key", NUMBER_FIELDS)
def test_number_spellings_are_numbers_in_every_section(tmp_path, key, where):
    parts = key.split(".")
    for text, value in SPELLINGS.items():
        if where == "file":
            file = tmp_path / "numbers.yaml"
            lines = [f"{'  ' * depth}{part}:" for depth, part in enumerate(parts[:-1])]
            file.write_text("\n".join([*lines, f"{'  ' * (len(parts) - 1)}{parts[-1]}: {text}"]))
            args = (file, [])
        else:
            args = (None, [f"{key}={text}"])
        if text in NUMBER_FIELDS[key]:
            config = load_config(*args)
            assert type(lookup(config, key)) is float and lookup(config, key) == value, text
            if parts[0] == "model":
                assert getattr(config.model.build(), parts[1]) == value
        else:
            with pytest.raises(ValueError, match=f"{parts[-1]}.* got {value!r}"):
                load_config(*args)


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
        (
            ["model.ffn_tile_tokens=64", "deepspeed.zero_optimization.stage=3"],
            r"model.ffn_tile_tokens=64 cannot go with deepspeed.zero_optimization.stage=3",
        ),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(TINY, overrides)


def test_missing_config_file():
    with pytest.raises(ValueError, match="does-not-exist.yaml.*shipped: gpu-125m-1m-sp8, "):
        load_config("does-not-exist.yaml")
    with pytest.raises(ValueError, match="'no/such/file.yaml' does not exist"):
        load_config("no/such/file.yaml")


@pytest.mark.parametrize(
    "name, text, message",
    [
        (
            "bad.yaml",
            "train:\n  steps: 3\n  seed: [1, 2\nrun: {}\n",
            "{path}:4:4: bad YAML: expected ',' or ']', but got ':'",
        ),
        (
            "indent.yaml",
            "train:\n  steps: 3\n bad: 1\n",
            "{path}:3:2: bad YAML: expected <block end>, but found '<block mapping start>'",
        ),
        ("missing.yaml", None, "config file '{path}' does not exist"),
        ("unknown.yaml", "train:\n  stepz: 3\n", "unknown config key train.stepz; train takes: "),
        ("list.yaml", "- 1\n- 2\n", "config file '{path}' must hold a mapping, got [1, 2]"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: " + message.format(path=path)), line


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


def test_selection_counts_are_stored_as_ints():
    """numpy ints are accepted and stored as ints, so the config serialises."""
    config = LongNetConfig.preset(
        "longnet-tiny", position="rotary", select_top_k=np.int64(2),
        select_query_span=np.int64(3), select_ranking_dims=np.int64(4),
    )  # fmt: skip
    assert json.dumps(config.to_dict())
    assert type(config.select_ranking_dims) is int
