"""Checkpoints that a crash can never leave half-written as the latest.

    <output_dir>/checkpoints/step_000100/   DeepSpeed's files for step 100 (every rank writes)
    <output_dir>/checkpoints/step_000100/COMPLETE   written by rank 0 once EVERY rank finished:
                                            {"step", "time", "layout": {world_size, ...}}

A folder without COMPLETE is an interrupted save: resumption ignores it and the next save of
that step overwrites it. Only complete checkpoints count towards checkpoint.keep.

Resuming: rank 0 alone decides what to resume from and hands its decision to every rank (on a
shared filesystem that lags, ranks listing the folder themselves can see different latest
steps). A checkpoint written by another layout (world size, data- or sequence-parallel degree)
is refused before anything loads: DeepSpeed's ZeRO shards are laid out per rank.
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


def layout(world_size: int, data_parallel: int, sequence_parallel: int) -> dict[str, int]:
    return {
        "world_size": world_size,
        "data_parallel": data_parallel,
        "sequence_parallel": sequence_parallel,
    }


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


def check_layout(found: tuple[Path, str], current: dict[str, int]) -> None:
    """ValueError unless checkpoint `found` (resolve_resume's answer) was saved by `current`."""
    marker = json.loads((found[0] / found[1] / COMPLETE).read_text())
    saved = marker.get("layout")  # None: written before layouts were recorded
    if saved is not None and saved != current:
        raise ValueError(
            f"checkpoint {found[0] / found[1]} was saved with layout {saved}, this run has "
            f"{current}: resume with the saved world size and parallel.sequence_parallel_size, "
            f"or choose another run.output_dir"
        )


def plan_resume(
    resume: str, output_dir: str | Path, current: dict[str, int]
) -> tuple[Path, str] | None:
    """resolve_resume, refusing a checkpoint saved under another layout than `current`."""
    found = resolve_resume(resume, output_dir)
    if found is not None:
        check_layout(found, current)
    return found


def agree_on_resume(
    resume: str, output_dir: str | Path, current: dict[str, int]
) -> tuple[Path, str] | None:
    """plan_resume decided on rank 0 and broadcast: every rank gets the same answer, or the
    same ValueError. A collective: every rank calls it."""
    import torch.distributed as dist

    decision = [None, None]
    if dist.get_rank() == 0:
        try:
            decision[0] = plan_resume(resume, output_dir, current)
        except ValueError as error:
            decision[1] = str(error)
    dist.broadcast_object_list(decision, src=0)
    if decision[1] is not None:
        raise ValueError(decision[1])
    return decision[0]


def mark_complete(directory: Path, step: int, keep: int, current: dict[str, int]) -> None:
    """Rank 0, after every rank saved `step`: make it count, then drop the oldest beyond keep."""
    marker = directory / tag(step) / COMPLETE
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "time": time.time(), "layout": current}))
    tmp.replace(marker)  # atomic: the checkpoint is complete or it is not
    for old in complete_steps(directory)[:-keep]:
        shutil.rmtree(directory / tag(old), ignore_errors=True)
