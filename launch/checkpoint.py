"""Checkpoints that a crash can never leave half-written as the latest.

    <output_dir>/checkpoints/step_000100/   DeepSpeed's files for step 100 (every rank writes)
    <output_dir>/checkpoints/step_000100/COMPLETE   written by rank 0 once EVERY rank finished

A folder without COMPLETE is an interrupted save: resumption ignores it and the next save of
that step overwrites it. Only complete checkpoints count towards checkpoint.keep.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step_(\d+)$")


def tag(step: int) -> str:
    return f"step_{step:06d}"


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


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


def resolve_resume(resume: str, output_dir: str | Path) -> tuple[Path, str] | None:
    """(checkpoint folder, tag) to resume from, or None to start fresh.

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


def mark_complete(directory: Path, step: int, keep: int) -> None:
    """Rank 0, after every rank saved `step`: make it count, then drop the oldest beyond keep."""
    marker = directory / tag(step) / COMPLETE
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "time": time.time()}))
    tmp.replace(marker)  # atomic: the checkpoint is complete or it is not
    for old in complete_steps(directory)[:-keep]:
        shutil.rmtree(directory / tag(old), ignore_errors=True)
