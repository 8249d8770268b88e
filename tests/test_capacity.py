"""longnet-capacity (launch/capacity.py): the estimate against the same step measured on real
CPU tensors, its JSON, the searches, a shipped config and bad input."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from longnet import LongNetConfig
from longnet.launch import capacity
from longnet.plan import make_plan

TINY = LongNetConfig.preset("longnet-tiny")  # 0.8M parameters, segments 64, 128, 256


@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_matches_the_measured_step(checkpointing):
    # Same tracker, same step: fake tensors (the estimate) against real CPU tensors (float32,
    # AdamW, no ZeRO: the model states the estimate counts with zero=0, fp32).
    config = replace(TINY, activation_checkpointing=checkpointing)
    estimated = capacity.estimate(capacity.Step(config, 384, zero=0, dtype="fp32"), checkpointing)
    measured = capacity.measured_peak(config, 384)
    assert abs(estimated["per_rank"]["peak"] / measured - 1) < 0.10
    assert estimated["activations_from"] == "fake run"


def test_model_states_follow_deepspeeds_estimators():
    p, largest, world = 1_000_000, 50_000, 8
    # deepspeed.runtime.zero: stage_1_and_2.estimate_zero2_model_states_mem_needs(cpu_offload=
    # False) is 2 P + 18 P / world, stage3.estimate_zero3_... is 4 largest + 18 P / world.
    assert sum(capacity.model_states(p, largest, 2, world, "bf16").values()) == 2 * p + 18 * p // 8
    stage3 = capacity.model_states(p, largest, 3, world, "bf16")
    assert sum(stage3.values()) == 4 * largest + 18 * p // 8
    stage1 = capacity.model_states(p, largest, 1, world, "bf16")
    assert stage1["gradients"] == 2 * p + 4 * p // 8  # 16-bit gradients whole
    assert capacity.model_states(p, largest, 0, 1, "fp32") == dict(
        parameters=4 * p, gradients=4 * p, optimizer_states=8 * p
    )


def test_json_fields_and_exchange(tmp_path):
    out = tmp_path / "out.json"
    config = replace(TINY, segment_lengths=(64, 256, 1024), dilation_rates=(1, 2, 4))
    step = capacity.Step(config, 1024, sp=4, zero=2, device_memory=1 << 30)
    result = capacity.estimate(step, True)
    out.write_text(json.dumps(result))
    rank = json.loads(out.read_text())["per_rank"]
    assert set(rank["memory"]) == {
        "parameters", "gradients", "optimizer_states", "activations", "temporaries",
        "attention_workspace", "exchange_buffers",
    }  # fmt: skip
    assert rank["peak"] == sum(rank["memory"].values()) and rank["fits"] is True
    assert rank["exchange_bytes_per_step"] > 0 and rank["flops_per_step"]["model"] > 0
    # The 1024-token segments span the 4 shards: the last rank receives from the 3 before it.
    patterns = ((64, 1), (256, 2), (1024, 4))
    plan = make_plan(256, 4, 4, patterns, True, 0, 3, 4)
    entries = capacity.exchange(step)["received"] // (2 * config.head_dim)
    assert entries == sum(plan.recv_counts) > 0


def test_max_seq_len_grows_with_memory():
    step = capacity.Step(TINY, 1, zero=0, dtype="fp32")
    small = capacity.max_seq_len(replace(step, device_memory=30 << 20), False)
    large = capacity.max_seq_len(replace(step, device_memory=60 << 20), False)
    assert small is not None and large >= small and large % 256 == 0
    assert capacity.estimate(replace(step, seq_len=large, device_memory=60 << 20), False)[
        "per_rank"
    ]["fits"]
    assert capacity.max_seq_len(replace(step, device_memory=1 << 20), False) is None


def test_target_seq_len_finds_the_smallest_degree():
    step = capacity.Step(TINY, 1, zero=0, dtype="fp32", device_memory=30 << 20)
    sp, seq_len = capacity.target_sp(step, False, 4096)
    assert seq_len >= 4096 and seq_len % sp == 0
    fits = capacity.estimate(replace(step, seq_len=seq_len, sp=sp), False)["per_rank"]["fits"]
    assert fits and sp > 1
    fewer = capacity.first_allowed(TINY.segment_lengths, 4096, sp - 1)
    assert not capacity.estimate(replace(step, seq_len=fewer, sp=sp - 1), False)["per_rank"]["fits"]


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "longnet.launch.capacity", *args], capture_output=True, text=True
    )


def test_shipped_config(tmp_path):
    out = tmp_path / "tiny.json"
    config = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"
    done = run("--config", str(config), "--device-memory", "1GiB", "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["step"]["seq_len"] == 512 and result["step"]["micro_batch"] == 8
    assert result["per_rank"]["fits"] is True and "peak" in done.stdout


@pytest.mark.parametrize(
    "args, named",
    [
        (["--preset", "longnet-9b", "--seq-len", "512"], "longnet-9b"),
        (["--preset", "longnet-tiny", "--seq-len", "1000", "--sp", "4"], "1000"),
        (["--preset", "longnet-tiny", "--seq-len", "512", "--device-memory", "80 parsecs"], "80"),
        (["--preset", "longnet-tiny", "--seq-len", "-512"], "-512"),
        (["--preset", "longnet-tiny", "--seq-len", "512", "--sp", "-2"], "-2"),
    ],
)
def test_bad_input_is_one_line(args, named, capsys):
    with pytest.raises(SystemExit) as exit:
        capacity.main(args)
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err


def test_accelerator_path_is_undone():
    import longnet.model

    original = longnet.model.reads_values_on_host
    with capacity.accelerator_path():
        assert not longnet.model.reads_values_on_host(torch.device("cpu"))
    assert longnet.model.reads_values_on_host is original
