"""Every program fails safe: damaged checkpoints are found before they load, bad arguments before
any work, and every refusal is one line `error: ...` with exit status 2, leaving the run as it was.

Checkpoints are damaged the three ways a disk or a copy does it: a file deleted, truncated, or
with one bit flipped (same size: only the content hash sees it). The programs run for real
(train.py under DeepSpeed, one process and two ranks; export, generate and evaluate on a trained
run); argument checks that need no subprocess call the programs' main() in this process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import distributed_utils
import pytest
import torch
import torch.distributed as dist
from distributed_utils import (
    ROOT,
    assert_same_curve,
    file_digests,
    free_port,
    overrides,
    python_command,
    reference_run,
    run_command,
    torchrun_command,
    train_args,
)

from longnet import LongNetConfig, LongNetLM
from longnet.launch import checkpoint, evaluate, export, generate, runtime
from longnet.launch.metrics import read_metrics

MODEL = checkpoint.MODEL_STATES
OPTIMIZER = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
# A place no process may write, not even root's: sysfs refuses new files.
UNWRITABLE = Path("/sys/longnet-run")


def delete(path: Path) -> None:
    path.unlink()


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {"deleted": delete, "truncated": truncate, "bit-flipped": flip_a_bit}
# What the one-line refusal says of the damaged file.
SAYS = {
    "deleted": "is missing",
    "truncated": "is truncated",
    "bit-flipped": "does not match its hash",
}


ONE = checkpoint.layout(1, 1, 1)


def fake_checkpoint(directory: Path, step: int, current=ONE, hashes: bool = True) -> Path:
    """A complete checkpoint of DeepSpeed's file names holding arbitrary bytes."""
    folder = directory / checkpoint.tag(step)
    folder.mkdir(parents=True)
    (folder / MODEL).write_bytes(os.urandom(4096))
    (folder / OPTIMIZER).write_bytes(os.urandom(8192))
    checkpoint.mark_complete(directory, step, 10, current, hashes)
    return folder


def refusal(result) -> str:
    """The one line a program refused with: exit status 2, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def refused_in_process(main, argv: list[str], capsys) -> str:
    """main(argv) must exit with status 2 and exactly one line, `error: ...`, on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("error: ") and "\n" not in stderr, stderr
    return stderr


def launch(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


# -- the manifest and the resume decision (no DeepSpeed) --------------------------------------


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("file", [MODEL, OPTIMIZER, checkpoint.MANIFEST])
def test_verify_names_the_damaged_file(tmp_path, damage, file):
    folder = fake_checkpoint(tmp_path, 3)
    assert checkpoint.verify(folder) is True
    DAMAGE[damage](folder / file)
    with pytest.raises(checkpoint.DamagedCheckpoint) as error:
        checkpoint.verify(folder)
    assert error.value.file == file and str(folder) in str(error.value)


def test_sizes_only_verification_misses_a_flipped_bit_but_not_a_cut(tmp_path):
    folder = fake_checkpoint(tmp_path, 3)
    flip_a_bit(folder / MODEL)
    assert checkpoint.verify(folder, hashes=False) is True  # the price of skipping hashes
    truncate(folder / OPTIMIZER)
    with pytest.raises(checkpoint.DamagedCheckpoint, match="is truncated: 4096 bytes"):
        checkpoint.verify(folder, hashes=False)


def test_a_garbled_complete_marker_is_damage(tmp_path):
    folder = fake_checkpoint(tmp_path, 3)
    (folder / checkpoint.COMPLETE).write_bytes(b"\xff{garbage")
    with pytest.raises(checkpoint.DamagedCheckpoint, match="COMPLETE is unreadable"):
        checkpoint.verify(folder)


def test_without_hashes_at_save_sizes_are_still_checked(tmp_path):
    folder = fake_checkpoint(tmp_path, 3, hashes=False)
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())["files"]
    assert manifest == {MODEL: {"size": 4096}, OPTIMIZER: {"size": 8192}}
    delete(folder / MODEL)
    with pytest.raises(checkpoint.DamagedCheckpoint, match=f"{MODEL} is missing"):
        checkpoint.verify(folder)


def test_auto_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    directory = checkpoint.checkpoint_dir(tmp_path)
    for step in (3, 6, 9):
        fake_checkpoint(directory, step)
    truncate(directory / "step_000009" / MODEL)
    flip_a_bit(directory / "step_000006" / OPTIMIZER)
    reports = []
    found = checkpoint.plan_resume("auto", tmp_path, ONE, True, reports.append)
    assert found == (directory, "step_000003")
    assert len(reports) == 2, reports
    assert "step_000009 is damaged: " + MODEL + " is truncated" in reports[0]
    assert "step_000006 is damaged: " + OPTIMIZER + " does not match its hash" in reports[1]
    assert all("resuming from step_000003 instead" in r for r in reports)
    assert checkpoint.complete_steps(directory) == [3, 6, 9]  # the damaged ones left in place


def test_auto_resume_refuses_in_one_line_when_nothing_is_intact(tmp_path):
    directory = checkpoint.checkpoint_dir(tmp_path)
    for step in (3, 6):
        fake_checkpoint(directory, step)
    delete(directory / "step_000006" / MODEL)
    flip_a_bit(directory / "step_000003" / MODEL)
    with pytest.raises(ValueError) as error:
        checkpoint.plan_resume("auto", tmp_path, ONE)
    message = str(error.value)
    assert "\n" not in message and message.startswith("checkpoint.resume=auto: no intact")
    assert f"step_000006 is damaged: {MODEL} is missing" in message
    assert f"step_000003 is damaged: {MODEL} does not match its hash" in message


def test_a_named_damaged_checkpoint_is_refused_naming_an_intact_one(tmp_path):
    directory = checkpoint.checkpoint_dir(tmp_path)
    for step in (3, 6):
        fake_checkpoint(directory, step)
    truncate(directory / "step_000003" / OPTIMIZER)
    with pytest.raises(checkpoint.DamagedCheckpoint) as error:
        checkpoint.plan_resume(str(directory / "step_000003"), tmp_path, {})
    assert error.value.file == OPTIMIZER
    assert "the newest intact checkpoint of the run is step_000006" in str(error.value)


def test_a_checkpoint_saved_before_manifests_is_accepted_with_a_warning(tmp_path):
    directory = checkpoint.checkpoint_dir(tmp_path)
    folder = fake_checkpoint(directory, 3)
    marker = json.loads((folder / checkpoint.COMPLETE).read_text())
    del marker["manifest"]  # as the trainer wrote it before manifests existed
    (folder / checkpoint.COMPLETE).write_text(json.dumps(marker))
    (folder / checkpoint.MANIFEST).unlink()
    reports = []
    found = checkpoint.plan_resume("auto", tmp_path, ONE, True, reports.append)
    assert found == (directory, "step_000003")
    assert reports == [checkpoint.unverified(folder)] and "cannot be verified" in reports[0]


def test_a_step_saved_again_stops_counting_as_complete_first(tmp_path):
    directory = checkpoint.checkpoint_dir(tmp_path)
    fake_checkpoint(directory, 3)
    checkpoint.begin_save(directory, 3)
    assert checkpoint.complete_steps(directory) == []
    assert not (directory / "step_000003" / checkpoint.MANIFEST).exists()


def _decide_with_a_damaged_latest(root: str) -> tuple:
    """On each worker rank: rank 0 sees checkpoints 3 and 6, 6 truncated; the other ranks (a
    lagging filesystem) see 6 whole. Rank 0's decision, and only its reports, count."""
    rank, current = dist.get_rank(), checkpoint.layout(4, 4, 1)
    view = checkpoint.checkpoint_dir(Path(root) / f"view_of_rank_{rank}")
    for step in (3, 6):
        fake_checkpoint(view, step, current)
    if rank == 0:
        truncate(view / "step_000006" / MODEL)
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        found = runtime.agree_on_resume("auto", view.parent, current)
    return found[1], stderr.getvalue()


def test_under_several_ranks_rank_0_decides_and_reports(tmp_path):
    results = distributed_utils.run(_decide_with_a_damaged_latest, str(tmp_path))
    assert [tag for tag, _ in results] == ["step_000003"] * distributed_utils.WORLD_SIZE
    assert results[0][1].count("\n") == 1 and "step_000006 is damaged" in results[0][1]
    assert all(stderr == "" for _, stderr in results[1:])


# -- train.py: resuming past damage, refusing, checks made at start -----------------------------


def damaged_copy(tmp_path: Path, reference: str, damages: dict[str, tuple]) -> Path:
    """A copy of a reference run with {step tag: (damage, file)} applied."""
    run = tmp_path / "run"
    shutil.copytree(reference_run(reference), run)
    for step_tag, (damage, file) in damages.items():
        DAMAGE[damage](run / "checkpoints" / step_tag / file)
    return run


def _resumed_past_damage(run: Path, output: str, damage: str, file: str) -> None:
    """The run resumed from step 3, said why, and its curve is the uninterrupted one's."""
    assert f"step_000006 is damaged: {file} {SAYS[damage]}" in output, output[-3000:]
    assert "resuming from step_000003 instead" in output
    assert "resuming after step 3" in output
    assert_same_curve(run, reference_run("baseline"))
    assert checkpoint.verify(run / "checkpoints" / "step_000006")  # saved again, whole


def test_one_process_resumes_past_a_truncated_latest_checkpoint(tmp_path):
    run = damaged_copy(tmp_path, "baseline", {"step_000006": ("truncated", MODEL)})
    command = python_command("launch/train.py", *train_args("tiny-cpu.yaml", overrides(run)))
    _resumed_past_damage(run, run_command(command).stderr, "truncated", MODEL)


def test_two_ranks_resume_past_a_bit_flip_in_one_ranks_shard(tmp_path):
    """ZeRO-3 over two ranks: rank 1's optimizer shard of step 6 has a flipped bit."""
    shard = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    run = damaged_copy(tmp_path, "zero3-dp2", {"step_000006": ("bit-flipped", shard)})
    _, extra = distributed_utils.REFERENCE_RUNS["zero3-dp2"]
    args = train_args("tiny-cpu.yaml", overrides(run, *extra))
    launcher = ["--standalone", "--nproc_per_node", "2"]
    result = run_command(torchrun_command(launcher, "launch/train.py", *args))
    _resumed_past_damage(run, result.stderr, "bit-flipped", shard)
    assert result.stderr.count("is damaged") == 1  # reported by rank 0 alone


# Rank 0's optimizer shard: one and two-rank runs both have it.
NOTHING_INTACT = {"step_000006": ("deleted", OPTIMIZER), "step_000003": ("bit-flipped", OPTIMIZER)}


def _assert_refused_nothing_intact(line: str) -> None:
    assert "checkpoint.resume=auto: no intact checkpoint" in line, line
    assert f"step_000006 is damaged: {OPTIMIZER} is missing" in line, line
    assert f"step_000003 is damaged: {OPTIMIZER} does not match its hash" in line, line


def test_one_process_refuses_when_no_checkpoint_is_intact(tmp_path):
    run = damaged_copy(tmp_path, "baseline", NOTHING_INTACT)
    before = file_digests(run)
    command = python_command("launch/train.py", *train_args("tiny-cpu.yaml", overrides(run)))
    _assert_refused_nothing_intact(refusal(launch(command)))
    assert file_digests(run) == before


def test_two_ranks_refuse_when_no_checkpoint_is_intact(tmp_path):
    """Two ranks started by hand (so that each one's exit status is seen): both exit 2, rank 0
    alone prints the refusal."""
    run = damaged_copy(tmp_path, "zero3-dp2", NOTHING_INTACT)
    before = file_digests(run)
    _, extra = distributed_utils.REFERENCE_RUNS["zero3-dp2"]
    command = python_command(
        "launch/train.py", *train_args("tiny-cpu.yaml", overrides(run, *extra))
    )
    port = str(free_port())
    ranks = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )  # fmt: skip
        for rank in range(2)
    ]
    outputs = [process.communicate(timeout=300) for process in ranks]
    results = [
        SimpleNamespace(returncode=p.returncode, stdout=out, stderr=err)
        for p, (out, err) in zip(ranks, outputs, strict=True)
    ]
    _assert_refused_nothing_intact(refusal(results[0]))
    assert results[1].returncode == 2 and "Traceback" not in results[1].stderr
    assert "error:" not in results[1].stderr
    assert file_digests(run) == before


def _train_fresh(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    output = tmp_path / "new-run"
    args = train_args("tiny-cpu.yaml", overrides(output, *extra))
    return launch(python_command("launch/train.py", *args))


def test_evaluation_longer_than_the_validation_split_fails_at_start(tmp_path):
    line = refusal(_train_fresh(tmp_path, "train.eval_seq_lens=[100000000]"))
    assert "train.eval_seq_lens=100000000" in line and "validation split" in line
    assert not (tmp_path / "new-run").exists()  # refused before the run folder was made


@pytest.mark.parametrize(
    "output_dir, says",
    [
        ("file", "is a file, not a folder"),
        ("under-a-file", "is a file, not a folder"),
        ("unwritable", "cannot write in /sys"),
    ],  # fmt: skip
)
def test_an_unusable_output_dir_is_refused_before_any_work(tmp_path, output_dir, says):
    file = tmp_path / "a-file"
    file.write_text("keep me")
    path = {"file": file, "under-a-file": file / "run", "unwritable": UNWRITABLE}[output_dir]
    command = python_command("launch/train.py", "--config", "configs/tiny-cpu.yaml",
                             f"run.output_dir={path}", "run.wandb_mode=disabled")  # fmt: skip
    line = refusal(launch(command))
    assert f"run.output_dir='{path}'" in line and says in line, line
    assert file.read_text() == "keep me"


def test_each_checkpoint_is_saved_before_the_evaluation_of_its_step(tmp_path):
    """An evaluation that fails can lose no training: a real run that checkpoints and evaluates
    at every step marks each step's checkpoint complete before it logs that step's evaluation
    (the COMPLETE marker's time against the evaluation record's)."""
    every_step = ["train.steps=2", "checkpoint.interval=1", "train.eval_interval=1"]
    args = train_args("tiny-cpu.yaml", overrides(tmp_path, *every_step))
    run_command(python_command("launch/train.py", *args))
    evaluated = {r["step"]: r["time"] for r in read_metrics(tmp_path) if r.get("eval")}
    assert sorted(evaluated) == [1, 2]
    for step, logged in evaluated.items():
        marker = tmp_path / "checkpoints" / checkpoint.tag(step) / checkpoint.COMPLETE
        assert json.loads(marker.read_text())["time"] < logged, step


# -- export, generate, evaluate on damaged checkpoints ------------------------------------------


@pytest.fixture(scope="module")
def damaged_runs(tmp_path_factory) -> dict[str, Path]:
    """A copy of the baseline run per damage, applied to the model file of its latest step."""
    runs = {}
    for damage in DAMAGE:
        root = tmp_path_factory.mktemp(damage)
        runs[damage] = damaged_copy(root, "baseline", {"step_000006": (damage, MODEL)})
    return runs


PROGRAMS = {
    "export": lambda run, out: ["launch/export.py", run, out / "model"],
    "generate": lambda run, out: ["launch/generate.py", run, "--max-new-tokens", "4"],
    "evaluate": lambda run, out: [
        "launch/evaluate.py",
        run,
        "--tasks",
        "perplexity",
        "--context-lengths",
        "256",
        "--windows",
        "1",
        "--output",
        out / "eval.json",
    ],  # fmt: skip
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("program", PROGRAMS)
def test_programs_refuse_a_damaged_checkpoint_naming_it(tmp_path, damaged_runs, program, damage):
    run = damaged_runs[damage]
    before = file_digests(run)
    line = refusal(launch(python_command(*map(str, PROGRAMS[program](run, tmp_path)))))
    assert f"step_000006 is damaged: {MODEL} {SAYS[damage]}" in line, line
    assert "the newest intact checkpoint of the run is step_000003" in line, line
    assert file_digests(run) == before and list(tmp_path.iterdir()) == []


# -- generate, export, evaluate: bad arguments (main() in this process) ---------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("exported")
    LongNetLM(LongNetConfig.preset("longnet-tiny")).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 1, got -3"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--temperature", "-1"], "--temperature must be > 0, or 0 for greedy decoding, got -1"),
        (["--temperature", "nan"], "--temperature must be > 0"),
        (["--top-k", "0"], "--top-k must be >= 1 (1: greedy), got 0"),
        (["--prompt", ""], "--prompt is empty"),
        (["--tokenizer", "no-such-tokenizer"], "--tokenizer 'no-such-tokenizer': unknown"),
        (["--tokenizer", "{words}/300.json"], "the tokenizer has 301 tokens, the model 264"),
        (["--tokenizer", "{words}/2.json", "--prompt", " "], "--prompt ' ' encodes to no tokens"),
        (["--checkpoint", "step_000003"], "--checkpoint names a run's checkpoint"),
    ],
)
def test_generate_refuses_bad_arguments(exported, tmp_path, capsys, argv, says):
    tokenizers = pytest.importorskip("tokenizers")
    for size in (2, 300):  # word-level tokenizers: "w0" ... and end of text
        words = tokenizers.models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0")
        tokenizer = tokenizers.Tokenizer(words)
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        tokenizer.save(str(tmp_path / f"{size}.json"))
    argv = [a.format(words=tmp_path) for a in argv]
    line = refused_in_process(generate.main, [exported, *argv], capsys)
    assert says in line, line


def test_generate_at_temperature_0_decodes_greedily(exported, capsys):
    outputs = []
    for argv in (["--temperature", "0"], ["--top-k", "1", "--seed", "7"]):
        generate.main([str(exported), "--max-new-tokens", "8", *argv])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("def ")


@pytest.fixture
def broken_export(tmp_path, exported) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(exported, folder)
    return folder


@pytest.mark.parametrize(
    "file, content, says",
    [
        ("model.safetensors", None, "model.safetensors is unreadable"),
        ("config.json", "{not json", "config.json is unreadable"),
        ("config.json", '{"d_modle": 64}', "config.json is unreadable: unknown LongNetConfig"),
    ],
    ids=["truncated-weights", "invalid-json", "unknown-field"],
)
def test_generate_and_evaluate_refuse_an_unreadable_export(
    tmp_path, broken_export, capsys, file, content, says
):
    if content is None:
        truncate(broken_export / file)
    else:
        (broken_export / file).write_text(content)
    line = refused_in_process(generate.main, [broken_export], capsys)
    assert says in line and str(broken_export) in line, line
    output = tmp_path / "eval.json"
    line = refused_in_process(evaluate.main, [broken_export, "--output", output], capsys)
    assert says in line, line
    assert not output.exists()


def test_from_pretrained_names_a_mistyped_folder_before_any_hub_lookup(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "a-file").write_text("")
    for path in ["runs/my-exprot", "./exported", "/no/such/folder", "~/no-such-model",
                 tmp_path / "missing", "a-file"]:  # fmt: skip
        with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
            LongNetLM.from_pretrained(path)


def test_from_pretrained_names_an_unreadable_file(broken_export):
    truncate(broken_export / "model.safetensors")
    with pytest.raises(ValueError, match=f"{broken_export}/model.safetensors is unreadable"):
        LongNetLM.from_pretrained(broken_export)
    (broken_export / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{broken_export}/config.json is unreadable"):
        LongNetLM.from_pretrained(broken_export)


def test_save_pretrained_leaves_no_temporary_files(tmp_path, exported):
    model = LongNetLM.from_pretrained(exported)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize(
    "out, says",
    [
        ("file", "OUT_DIR='{out}' is a file, not a folder"),
        ("unwritable", "OUT_DIR='{out}': cannot write in /sys"),
    ],  # fmt: skip
)
def test_export_refuses_an_unusable_output_before_reading_the_run(tmp_path, capsys, out, says):
    run = reference_run("baseline")
    path = tmp_path / "a-file" if out == "file" else UNWRITABLE
    if out == "file":
        path.write_text("keep me")
    line = refused_in_process(export.main, [run, path], capsys)
    assert says.format(out=path) in line, line
    assert out != "file" or path.read_text() == "keep me"


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--output", "{tmp}"], "--output='{tmp}' is a folder"),
        (["--output", str(UNWRITABLE / "eval.json")], "cannot write in /sys"),
        (["--output", "{tmp}/a-file/eval.json"], "a-file is a file, not a folder"),
        (["--depths", "0.5,deep"], "--depths '0.5,deep': not numbers"),
        (["--data-config", "{tmp}/no-such.yaml"], "config file '{tmp}/no-such.yaml' does not"),
        (["--tasks", "perplexity,recall"], "--tasks: unknown recall"),
        (["--context-lengths", "1"], "--context-lengths must be integers >= 2"),
        (["--windows", "0"], "--windows and --batch-size must be >= 1"),
        # Checked before any task runs: passkey would have scored 128 tokens first.
        (["--tasks", "passkey", "--context-lengths", "128,100000"], "fewer than --windows 2"),
    ],
)
def test_evaluate_refuses_bad_arguments_before_the_work(tmp_path, capsys, argv, says):
    (tmp_path / "a-file").write_text("")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--output" not in argv:
        argv += ["--output", str(tmp_path / "eval.json")]
    run = reference_run("baseline")
    line = refused_in_process(evaluate.main, [run, "--windows", "2", *argv], capsys)
    assert says.format(tmp=tmp_path) in line, line
    assert not (tmp_path / "eval.json").exists()


def test_evaluate_and_generate_name_a_missing_model_folder(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    for main in (evaluate.main, generate.main):
        line = refused_in_process(main, [missing], capsys)
        assert f"'{missing}' is neither a run folder nor an exported model" in line, line
