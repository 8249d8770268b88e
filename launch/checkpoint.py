"""Checkpoints that a crash can never leave half-written as the latest, verified before they are
trusted.

    <output_dir>/checkpoints/step_000100/                DeepSpeed's files for step 100 (every
                                                        rank writes)
    <output_dir>/checkpoints/step_000100/MANIFEST.json  written by rank 0 once EVERY rank
                                                        finished: each file's size and blake2b
    <output_dir>/checkpoints/step_000100/COMPLETE       written last, by rank 0: {"step", "time",
                                                        "layout": {world_size, ...}, "manifest":
                                                        the manifest's own blake2b}

A folder without COMPLETE is an interrupted save: resumption ignores it and the next save of
that step overwrites it. Only complete checkpoints count towards checkpoint.keep.

Integrity: whatever reads a checkpoint (resuming, launch/export.py, generate.py, evaluate.py)
first verifies it against its manifest: sizes always, content hashes unless told not to
(checkpoint.verify_hashes=false, --no-verify-hashes: hashing reads every byte, minutes for a huge
checkpoint). A checkpoint that lost, truncated or changed a file is never loaded: DamagedCheckpoint
names it and the file. `resume: auto` then falls back to the newest intact checkpoint, saying
which and why and leaving the damaged folder in place (until that step is saved again); the
other programs refuse. A checkpoint saved before manifests existed (its COMPLETE records none)
cannot be verified: it is accepted with a warning.

Resuming: plan_resume decides what to resume from (verifying included); rank 0 alone runs it and
hands its decision to every rank (longnet.launch.runtime.agree_on_resume). A checkpoint written
by another layout (world size, data- or sequence-parallel degree) is refused before anything
loads: DeepSpeed's ZeRO shards are laid out per rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
# DeepSpeed's file names (the one place that knows them): the whole model, written under ZeRO
# 0-2 (ZeRO-3 writes one partition per rank instead), and the per-rank optimizer shards.
MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIMIZER_STATES = "*optim_states.pt"
# What torch.load and DeepSpeed's loaders raise on a file that is cut short or garbled (DeepSpeed
# asserts on what it finds; unpickling garbage raises nearly anything).
READ_ERRORS = (
    OSError,
    EOFError,
    RuntimeError,
    ValueError,
    LookupError,
    TypeError,
    AssertionError,
    pickle.UnpicklingError,
)
_TAG = re.compile(r"^step_(\d+)$")
_CHUNK = 1 << 20


class DamagedCheckpoint(ValueError):
    """A checkpoint folder whose files are not the ones it was saved with."""

    def __init__(self, folder: Path, file: str, problem: str):
        super().__init__(f"checkpoint {folder} is damaged: {file} {problem}")
        self.folder, self.file, self.problem = folder, file, problem


def tag(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def layout(world_size: int, data_parallel: int, sequence_parallel: int) -> dict[str, int]:
    return {
        "world_size": world_size,
        "data_parallel": data_parallel,
        "sequence_parallel": sequence_parallel,
    }


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def complete_steps(directory: Path) -> list[int]:
    """Steps of the complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    steps = []
    for path in directory.iterdir():
        match = _TAG.match(path.name)
        if match and (path / COMPLETE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


# -- the manifest ---------------------------------------------------------------------------------


def file_hash(path: Path) -> str:
    digest = hashlib.blake2b()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # a reader sees the whole file or none


def write_manifest(folder: Path, hashes: bool = True) -> str:
    """Record the size (and, with `hashes`, the blake2b) of every file under `folder` but the
    markers in folder/MANIFEST.json; the manifest's own blake2b, for COMPLETE."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in (COMPLETE, MANIFEST) and path.suffix != ".tmp":
            entry = {"size": path.stat().st_size}
            if hashes:
                entry["blake2b"] = file_hash(path)
            files[path.relative_to(folder).as_posix()] = entry
    text = json.dumps({"files": files}, indent=1) + "\n"
    _write_atomic(folder / MANIFEST, text)
    return hashlib.blake2b(text.encode()).hexdigest()


def read_marker(folder: Path) -> dict:
    """The COMPLETE marker of checkpoint `folder`; DamagedCheckpoint when it is unreadable."""
    try:
        marker = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError):  # ValueError: not JSON, not UTF-8
        marker = None
    if not isinstance(marker, dict):
        raise DamagedCheckpoint(folder, COMPLETE, "is unreadable")
    return marker


def _manifest(folder: Path, recorded: str) -> dict[str, dict]:
    """The manifest's file entries, checked against the hash COMPLETE recorded for it."""
    try:
        text = (folder / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise DamagedCheckpoint(folder, MANIFEST, "is missing") from None
    if hashlib.blake2b(text).hexdigest() != recorded:
        raise DamagedCheckpoint(folder, MANIFEST, f"does not match the hash in {COMPLETE}")
    return json.loads(text)["files"]


def _check_size(folder: Path, name: str, expected: int) -> None:
    path = folder / name
    if not path.is_file():
        raise DamagedCheckpoint(folder, name, "is missing")
    size = path.stat().st_size
    if size != expected:
        cut = "truncated: " if size < expected else ""
        problem = f"is {cut}{size} bytes, {MANIFEST} records {expected}"
        raise DamagedCheckpoint(folder, name, problem)


def verify(folder: Path, hashes: bool = True) -> bool:
    """Check checkpoint `folder` against its manifest: every file present with its size and,
    with `hashes`, its content. True when verified; False for a checkpoint saved before manifests
    existed (nothing to verify against); DamagedCheckpoint naming the first bad file."""
    recorded = read_marker(folder).get("manifest")
    if recorded is None:
        return False
    files = _manifest(folder, recorded)
    for name, entry in files.items():  # sizes first: cheap, and they catch most damage
        _check_size(folder, name, entry["size"])
    if hashes:
        for name, entry in files.items():
            if "blake2b" in entry and file_hash(folder / name) != entry["blake2b"]:
                raise DamagedCheckpoint(folder, name, f"does not match its hash in {MANIFEST}")
    return True


def unverified(folder: Path) -> str:
    return (
        f"checkpoint {folder} has no {MANIFEST} (saved before checkpoints recorded one): its "
        f"files cannot be verified"
    )


def newest_intact(
    directory: Path, hashes: bool = True
) -> tuple[str | None, bool, list[DamagedCheckpoint]]:
    """Walk the complete checkpoints of `directory` newest first: (tag of the first that is not
    damaged or None, whether it was verified (False: it has no manifest), the damaged ones newer
    than it, newest first)."""
    damaged = []
    for step in reversed(complete_steps(directory)):
        try:
            return tag(step), verify(directory / tag(step), hashes), damaged
        except DamagedCheckpoint as error:
            damaged.append(error)
    return None, False, damaged


def verified(folder: Path, hashes: bool = True, report: Callable[[str], None] = warn) -> None:
    """verify(folder), reporting an unverifiable checkpoint. A damaged one raises, naming the
    newest intact checkpoint of the run, if any, to use instead."""
    try:
        if not verify(folder, hashes):
            report(unverified(folder))
    except DamagedCheckpoint as error:
        intact, _, _ = newest_intact(folder.parent, hashes)
        if intact is None:
            raise
        hint = f"; the newest intact checkpoint of the run is {intact}"
        raise DamagedCheckpoint(folder, error.file, error.problem + hint) from None


# -- resuming -------------------------------------------------------------------------------------


def resolve_resume(resume: str, output_dir: str | Path) -> tuple[Path, str] | None:
    """(checkpoint folder, tag) that a resume would start from, not yet verified (plan_resume
    verifies), or None to start fresh.

    resume: "auto" (the latest complete checkpoint of this run, if any), "none", or the path of a
    complete checkpoint (a step_* folder).
    """
    if resume == "none":
        return None
    if resume == "auto":
        steps = complete_steps(checkpoint_dir(output_dir))
        return (checkpoint_dir(output_dir), tag(steps[-1])) if steps else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise ValueError(
            f"checkpoint.resume={resume!r} is not a complete checkpoint (a step_* folder "
            f"holding {COMPLETE}); use 'auto', 'none' or such a folder"
        )
    return path.parent, path.name


def check_saved_layout(found: tuple[Path, str], current: dict[str, int]) -> None:
    """ValueError unless checkpoint `found` (resolve_resume's answer) was saved by `current`."""
    saved = read_marker(found[0] / found[1]).get("layout")  # None: saved before layouts were
    if saved is not None and saved != current:
        raise ValueError(
            f"checkpoint {found[0] / found[1]} was saved with layout {saved}, this run has "
            f"{current}: resume with the saved world size and parallel.sequence_parallel_size, "
            f"or choose another run.output_dir"
        )


def _newest_intact_to_resume(
    output_dir: str | Path, hashes: bool, report: Callable[[str], None]
) -> tuple[Path, str] | None:
    """resume=auto: the newest intact checkpoint, reporting each damaged one skipped."""
    directory = checkpoint_dir(output_dir)
    found, was_verified, damaged = newest_intact(directory, hashes)
    if found is None and damaged:
        raise ValueError(
            f"checkpoint.resume=auto: no intact checkpoint in {directory} to resume from: "
            + "; ".join(str(error) for error in damaged)
            + ": restore or remove the damaged folders, or choose another run.output_dir"
        )
    for error in damaged:
        kept = "the damaged folder stays until its step is saved again"
        report(f"{error}; resuming from {found} instead ({kept})")
    if found is not None and not was_verified:
        report(unverified(directory / found))
    return None if found is None else (directory, found)


def plan_resume(
    resume: str,
    output_dir: str | Path,
    current: dict[str, int],
    hashes: bool = True,
    report: Callable[[str], None] = warn,
) -> tuple[Path, str] | None:
    """The checkpoint to resume from, verified: with "auto" the newest intact one, else the one
    named (refused when damaged); refused when saved under another layout than `current`."""
    if resume == "auto":
        found = _newest_intact_to_resume(output_dir, hashes, report)
    else:
        found = resolve_resume(resume, output_dir)
        if found is not None:
            verified(found[0] / found[1], hashes, report)
    if found is not None:
        check_saved_layout(found, current)
    return found


# -- saving ---------------------------------------------------------------------------------------


def begin_save(directory: Path, step: int) -> None:
    """Rank 0, before any rank writes `step`: a folder of that step left by an earlier attempt
    (interrupted, or damaged and resumed past) stops counting as complete, so that a crash while
    it is overwritten cannot leave it looking whole."""
    for name in (COMPLETE, MANIFEST):
        (directory / tag(step) / name).unlink(missing_ok=True)


def mark_complete(
    directory: Path, step: int, keep: int, current: dict[str, int], hashes: bool = True
) -> None:
    """Rank 0, after every rank saved `step`: record its manifest, make it count, then drop the
    oldest beyond keep."""
    folder = directory / tag(step)
    manifest = write_manifest(folder, hashes)
    marker = {"step": step, "time": time.time(), "layout": current, "manifest": manifest}
    _write_atomic(folder / COMPLETE, json.dumps(marker))  # the checkpoint is complete or not
    for old in complete_steps(directory)[:-keep]:
        shutil.rmtree(directory / tag(old), ignore_errors=True)


# -- reading weights ------------------------------------------------------------------------------


def has_optimizer_shards(folder: Path) -> bool:
    """ZeRO 1-3 checkpoints hold per-rank optimizer shards (with float32 master weights)."""
    return any(folder.glob(OPTIMIZER_STATES))


def model_weights(folder: Path) -> dict:
    """The whole model's weights (float32) from a ZeRO 0-2 checkpoint's model file, read as
    tensors only (never unpickling objects); DamagedCheckpoint when the file is unreadable."""
    import torch

    try:
        states = torch.load(folder / MODEL_STATES, weights_only=True)
        return {name: value.float() for name, value in states["module"].items()}
    except READ_ERRORS as error:
        raise unreadable(folder, error, MODEL_STATES) from None


def merged_weights(directory: Path, tag: str) -> dict:
    """The model's float32 weights from checkpoint `tag` of any ZeRO stage: the model file without
    ZeRO, else the optimizer shards merged by DeepSpeed's zero_to_fp32 (which unpickles them, as
    DeepSpeed's resume does: only for runs you trust)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = directory / tag
    if not has_optimizer_shards(folder):  # no ZeRO: the whole model in one file
        return model_weights(folder)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed reports as it merges
            return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    except READ_ERRORS as error:  # only where no manifest could catch it first
        raise unreadable(folder, error) from None


def unreadable(folder: Path, error: BaseException, file: str | None = None) -> ValueError:
    """What a checkpoint that failed to load raises: one line naming it (and the file, when
    known) with the loader's error."""
    problem = " ".join(f"{type(error).__name__}: {error}".split())
    if file is None:
        return ValueError(f"checkpoint {folder} failed to load ({problem})")
    return DamagedCheckpoint(folder, file, f"cannot be read ({problem})")
