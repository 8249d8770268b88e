"""After training: export a run of any ZeRO stage, load it without DeepSpeed, sample from it.

The exported model must compute what the trained engine computes: its logits are compared with
the logits of the run's DeepSpeed engine (resumed from the same checkpoint, under the run's own
layout) on the same tokens.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from distributed_utils import (
    ROOT,
    file_digests,
    python_command,
    reference_run,
    run_command,
    torchrun_command,
)

from longnet import LongNetConfig, LongNetLM

safetensors = pytest.importorskip("safetensors.torch", reason="needs pip install longnet[hub]")

TOKENS = torch.arange(300).remainder(250).unsqueeze(0)  # (1, 300): not a multiple of a segment

# RUN TOKENS OUT: resumes a finished run (its last checkpoint, DeepSpeed's own loading, under
# the run's layout) and writes the engine's logits on the tokens.
ENGINE_LOGITS = """
import sys

import torch
from safetensors.torch import load_file, save_file

from longnet.launch import runtime
from longnet.launch.config import load_config
from longnet.launch.trainer import Trainer

trainer = Trainer(load_config(sys.argv[1] + "/config.yaml"))
trainer.engine.eval()
with torch.no_grad():
    logits = trainer.engine(load_file(sys.argv[2])["tokens"]).logits
if torch.distributed.get_rank() == 0:
    save_file({"logits": logits.contiguous()}, sys.argv[3])
runtime.finish()  # as the trainer ends
"""

RUNS = {"zero-1": ("baseline", None), "zero-3-two-ranks": ("zero3-dp2", 2)}


def _engine_logits(tmp_path: Path, run: Path, processes: int | None) -> torch.Tensor:
    script, out = tmp_path / "engine_logits.py", tmp_path / "engine_logits.safetensors"
    script.write_text(ENGINE_LOGITS)
    tokens = tmp_path / "tokens.safetensors"
    safetensors.save_file({"tokens": TOKENS}, tokens)
    args = [str(script), str(run), str(tokens), str(out)]
    if processes is None:
        run_command(python_command(*args))
    else:
        run_command(torchrun_command(["--standalone", "--nproc_per_node", str(processes)], *args))
    return safetensors.load_file(out)["logits"]


def _export(run: Path, out: Path, *extra: str):
    return run_command(python_command("launch/export.py", str(run), str(out), *extra))


@pytest.mark.parametrize("name", RUNS)
def test_exported_model_computes_the_trained_engines_logits(tmp_path, name):
    reference, processes = RUNS[name]
    run = reference_run(reference)
    _export(run, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",  # the run's byte tokenizer, for transformers' AutoTokenizer
        "tokenizer_config.json",
    ]
    model = LongNetLM.from_pretrained(tmp_path / "model")
    assert model.lm_head.weight is model.embed.weight  # tied, as trained
    with torch.no_grad():
        logits = model(TOKENS).logits
    expected = _engine_logits(tmp_path, run, processes)
    assert logits.shape == expected.shape == (1, 300, 264)
    # Measured: equal under ZeRO-1; 2.6e-6 apart under ZeRO-3, whose engine runs linear layers
    # through its own matmul (deepspeed's memory_efficient_linear).
    error = (logits - expected).abs().max().item()
    assert error <= 1e-5, error


def test_generate_reads_a_run_and_its_export_alike(tmp_path):
    run = reference_run("baseline")
    _export(run, tmp_path / "model", "--step", "6")
    args = ["--prompt", "def ", "--max-new-tokens", "30", "--top-k", "1"]
    from_run = run_command(python_command("launch/generate.py", str(run), *args))
    exported = python_command("launch/generate.py", str(tmp_path / "model"), *args)
    assert run_command(exported).stdout == from_run.stdout
    assert from_run.stdout.startswith("def ")


@pytest.mark.parametrize(
    "source, out, extra, message",
    [
        ("run", "new", ["--step", "4"], "--step 4: "),
        ("run", "run", [], "holds other files"),
        ("missing", "new", [], "is not a training run"),
    ],
    ids=["step-not-checkpointed", "into-the-run", "not-a-run"],
)
def test_export_refuses_bad_input_and_leaves_the_run_intact(tmp_path, source, out, extra, message):
    run = reference_run("baseline")
    folders = {"run": run, "new": tmp_path / "out", "missing": tmp_path / "no-run"}
    before = file_digests(run)
    command = python_command("launch/export.py", str(folders[source]), str(folders[out]), *extra)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert file_digests(run) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_save_and_load_pretrained_round_trip(tmp_path, tie):
    torch.manual_seed(0)
    model = LongNetLM(LongNetConfig.preset("longnet-tiny", tie_embeddings=tie)).eval()
    model.save_pretrained(tmp_path)
    loaded = LongNetLM.from_pretrained(tmp_path)
    assert loaded.config == model.config and not loaded.training
    assert (loaded.lm_head.weight is loaded.embed.weight) is tie
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_embeddings"] is tie and config["segment_lengths"] == [64, 128, 256]


def test_from_pretrained_names_what_is_missing_or_unknown(tmp_path):
    with pytest.raises(ValueError, match="lacks config.json, model.safetensors"):
        LongNetLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unknown LongNetConfig fields \['d_modle'\]"):
        LongNetConfig.from_dict({"d_modle": 64})
