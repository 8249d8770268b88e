"""Consolidate a run's checkpoint into a model folder that needs neither DeepSpeed nor the run.

    python launch/export.py RUN_DIR OUT_DIR [--step N]

Writes OUT_DIR/config.json and OUT_DIR/model.safetensors (float32) from the latest complete
checkpoint (or step N) of any ZeRO stage; load them with LongNetLM.from_pretrained(OUT_DIR).
Sharded ZeRO checkpoints are merged by DeepSpeed's zero_to_fp32, which unpickles the run's own
optimizer files (as DeepSpeed's resume does): export only runs you trust.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from longnet import LongNetLM
from longnet.launch import checkpoint
from longnet.launch.config import load_config
from longnet.model import CONFIG_FILE, WEIGHTS_FILE


def find_checkpoint(run: Path, step: int | None) -> tuple[Path, str]:
    """(checkpoints folder, tag) of step `step` (default: the latest complete one) of `run`."""
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{str(run)!r} is not a training run (no config.yaml)")
    directory = checkpoint.checkpoint_dir(run)
    steps = checkpoint.complete_steps(directory)
    if not steps:
        raise ValueError(f"{str(run)!r} has no complete checkpoint")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise ValueError(f"--step {step}: {str(run)!r} has complete checkpoints at steps {steps}")
    return directory, checkpoint.tag(step)


def consolidated_state_dict(directory: Path, tag: str) -> dict[str, torch.Tensor]:
    """The model's float32 weights from a DeepSpeed checkpoint of any ZeRO stage."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if list((directory / tag).glob("*optim_states.pt")):  # ZeRO 1-3: merge the shards
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed reports as it merges
            return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    # No ZeRO: the whole model is in one file, tensors only.
    states = torch.load(directory / tag / "mp_rank_00_model_states.pt", weights_only=True)
    return {name: value.float() for name, value in states["module"].items()}


def export(run: Path, out: Path, step: int | None = None) -> Path:
    """Checks first (nothing is written on a bad argument), then writes out/."""
    directory, tag = find_checkpoint(run, step)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{str(out)!r} is a file: export into an empty or new folder")
        others = sorted(p.name for p in out.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE))
        if others:
            raise ValueError(
                f"{str(out)!r} holds other files ({', '.join(others[:3])}): export into an "
                f"empty or new folder"
            )
    model = LongNetLM(load_config(run / "config.yaml").model.build())
    model.load_state_dict(consolidated_state_dict(directory, tag))
    return model.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="the run's output_dir")
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--step", type=int, help="a checkpointed step (default: the latest)")
    args = parser.parse_args(argv)
    try:
        written = export(args.run, args.out, args.step)
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(f"exported {args.run} to {written}", file=sys.stderr)


if __name__ == "__main__":
    main()
