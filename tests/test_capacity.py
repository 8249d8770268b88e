"""longnet-capacity (launch/capacity.py): the estimate against the same step measured on real
CPU tensors, its JSON, the searches, the shipped configs (every configs/gpu-*.yaml on the
hardware its comment names) and bad input."""

import contextlib
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from longnet import LongNetConfig, LongNetLM
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


@pytest.mark.parametrize("tile, offload", [(64, False), (100, True), (0, True)])
def test_estimate_matches_the_measured_step_with_the_memory_options(tile, offload):
    # The FFN over tiles of 64 / 100 tokens, the blocks' inputs in host memory: both runs
    # offload as an accelerator does (save_on_cpu keeps a CPU tensor where it is).
    config = replace(TINY, activation_checkpointing=True, ffn_tile_tokens=tile)
    config = replace(config, offload_checkpoints=offload)
    estimated = capacity.estimate(capacity.Step(config, 384, zero=0, dtype="fp32"), True)
    measured = capacity.measured_peak(config, 384)
    assert abs(estimated["per_rank"]["peak"] / measured - 1) < 0.10
    # what moves: every block's input, (b, n, D) in the training dtype
    host = estimated["per_rank"]["host_memory"]["offloaded_checkpoints"]
    assert host == (TINY.num_layers * 384 * TINY.d_model * 4 if offload else 0)


def test_offloaded_steps_keep_their_gradients():
    # The estimate's stand-in for save_on_cpu on an accelerator (the saved inputs copied out
    # of the tracked memory, new tensors in backward) leaves the numbers as they are.
    config = replace(TINY, activation_checkpointing=True, ffn_tile_tokens=100)
    ids = torch.randint(0, TINY.vocab_size, (2, 384), generator=torch.Generator().manual_seed(0))
    grads = []
    for offload, hooks in ((False, contextlib.nullcontext()), (True, capacity._HostCopies())):
        torch.manual_seed(0)
        lm = LongNetLM(replace(config, offload_checkpoints=offload)).double()
        with capacity.host_offload(hooks) if offload else hooks:
            lm(ids, labels=ids, return_logits=False).loss.backward()
        grads.append([p.grad for p in lm.parameters()])
    assert hooks.peak == TINY.num_layers * 2 * 384 * TINY.d_model * 8 and hooks.bytes == 0
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_the_memory_options_shrink_the_step():
    step = capacity.Step(replace(TINY, activation_checkpointing=True), 2048, zero=0)
    plain = capacity.estimate(step, True)["per_rank"]["memory"]
    tiled = replace(step, config=replace(step.config, ffn_tile_tokens=256))
    both = replace(tiled, config=replace(tiled.config, offload_checkpoints=True))
    sizes = [
        sum(capacity.estimate(s, True)["per_rank"]["memory"].values()) for s in (step, tiled, both)
    ]
    assert sizes[0] == sum(plain.values()) and sizes[0] > sizes[1] > sizes[2]


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


CONFIGS = Path(__file__).parent.parent / "configs"
# The device memory of a config whose comment names no size: the smallest device these configs
# are planned for (docs/capacity.md, 80 GB).
UNNAMED_MEMORY = "80GB"


def hardware(path: Path) -> tuple[int, str]:
    """(devices, memory per device) that a config's header comment names: its launch command's
    --num_nodes x --num_gpus (1 without --num_gpus), and a size such as '80GB' or '141 GB'."""
    comment = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    gpus = re.search(r"--num_gpus\s+(\d+)", comment)
    nodes = re.search(r"--num_nodes\s+(\d+)", comment)
    memory = re.search(r"\b(\d+(?:\.\d+)?)\s*(GB|GiB)\b", comment)
    devices = (int(gpus[1]) if gpus else 1) * (int(nodes[1]) if nodes else 1)
    return devices, memory[1] + memory[2] if memory else UNNAMED_MEMORY


GPU_CONFIGS = sorted(CONFIGS.glob("gpu-*.yaml"))


@pytest.fixture(scope="module")
def gpu_estimates(tmp_path_factory) -> dict[str, tuple]:
    """{config name: (devices, memory, sp, the estimate's exit, stderr, JSON path)} of every GPU
    config launched as its comment says, the estimates run side by side (full-size models: a
    fake step of about a minute each on one core)."""
    from longnet.launch.config import load_config

    folder, runs = tmp_path_factory.mktemp("gpu-configs"), {}
    for path in GPU_CONFIGS:
        devices, memory = hardware(path)
        sp = load_config(path).parallel.sequence_parallel_size
        out = folder / f"{path.stem}.json"
        args = ["--config", str(path), "--dp", str(devices // sp), "--device-memory", memory]
        command = [sys.executable, "-m", "longnet.launch.capacity", *args, "--json", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
        runs[path.name] = (devices, memory, sp, process, out)
    return {
        name: (devices, memory, sp, process.wait(timeout=900), process.stderr.read(), out)
        for name, (devices, memory, sp, process, out) in runs.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_gpu_configs_fit_their_hardware(path, gpu_estimates):
    """Each GPU config, launched as its comment says (devices = dp x sp, ZeRO over all of
    them), fits one of its devices by the estimate."""
    devices, memory, sp, returncode, stderr, out = gpu_estimates[path.name]
    assert devices % sp == 0, f"{path.name}: {devices} devices, sp {sp}"
    assert returncode == 0, stderr
    rank = json.loads(out.read_text())["per_rank"]
    assert rank["fits"], f"{path.name}: {rank['peak'] / 2**30:.1f} GiB on {memory}"


def test_offload_needs_checkpointing(capsys):
    with pytest.raises(SystemExit):
        capacity.main(["--preset", "longnet-tiny", "--seq-len", "512", "--offload-checkpoints"])
    assert "--activation-checkpointing" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, named",
    [
        (["--preset", "longnet-9b", "--seq-len", "512"], "longnet-9b"),
        (["--preset", "longnet-tiny", "--seq-len", "1000", "--sp", "4"], "1000"),
        (["--preset", "longnet-tiny", "--seq-len", "512", "--device-memory", "80 parsecs"], "80"),
        (["--preset", "longnet-tiny", "--seq-len", "-512"], "-512"),
        (["--preset", "longnet-tiny", "--seq-len", "512", "--sp", "-2"], "-2"),
        (["--preset", "longnet-tiny", "--seq-len", "512", "--ffn-tile-tokens", "-3"], "-3"),
        (
            [
                "--preset",
                "longnet-tiny",
                "--seq-len",
                "512",
                "--ffn-tile-tokens",
                "64",
                "--zero",
                "3",
            ],
            "cannot go with zero 3",
        ),  # fmt: skip
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
