"""Consolidate a run's checkpoint into a model folder that needs neither DeepSpeed nor the run.

    python launch/export.py RUN_DIR OUT_DIR [--step N] [--no-verify-hashes]

Writes OUT_DIR/config.json and OUT_DIR/model.safetensors (float32) from the latest complete
checkpoint (or step N) of any ZeRO stage, and the run's tokenizer as Hugging Face tokenizer files
(tokenizer.json, tokenizer_config.json; byte and tokenizer.json tokenizers, not tiktoken ones);
load them with LongNetLM.from_pretrained(OUT_DIR), or with transformers' AutoTokenizer and
AutoModelForCausalLM after `import longnet.integrations.transformers` (lm-eval's HFLM too).
The checkpoint is verified against its manifest first (longnet.launch.checkpoint): a damaged one
is refused, naming the file. Sharded ZeRO checkpoints are merged by DeepSpeed's zero_to_fp32,
which unpickles the run's own optimizer files (as DeepSpeed's resume does): export only runs you
trust. Bad input: one line `error: ...`, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longnet.launch import checkpoint, cli, runtime
from longnet.launch.config import load_config
from longnet.launch.data.tokenizer import HF_TOKENIZER_FILES, make_tokenizer
from longnet.model import CONFIG_FILE, WEIGHTS_FILE

EXPORTED_FILES = (CONFIG_FILE, WEIGHTS_FILE, *HF_TOKENIZER_FILES)


def find_checkpoint(run: Path, step: int | None) -> str:
    """The tag of step `step` (default: the latest complete one) of `run`."""
    if not (run / runtime.RUN_CONFIG).is_file():
        raise ValueError(f"{str(run)!r} is not a training run (no config.yaml)")
    directory = checkpoint.checkpoint_dir(run)
    steps = checkpoint.complete_steps(directory)
    if not steps:
        raise ValueError(f"{str(run)!r} has no complete checkpoint")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise ValueError(f"--step {step}: {str(run)!r} has complete checkpoints at steps {steps}")
    return checkpoint.tag(step)


def check_out(out: Path) -> None:
    """An empty or new folder this process can write (or a previous export, replaced)."""
    cli.check_output_dir(out, "OUT_DIR")
    if out.exists():
        others = sorted(p.name for p in out.iterdir() if p.name not in EXPORTED_FILES)
        if others:
            raise ValueError(
                f"{str(out)!r} holds other files ({', '.join(others[:3])}): export into an "
                f"empty or new folder"
            )


def export(run: Path, out: Path, step: int | None = None, hashes: bool = True) -> Path:
    """Checks first, the cheap ones first (nothing is written on a bad argument), then writes
    out/."""
    tag = find_checkpoint(run, step)
    check_out(out)
    tokenizer = make_tokenizer(load_config(run / runtime.RUN_CONFIG).data.tokenizer)
    model, _ = runtime.load_run(run, tag, hashes, merge_shards=True)
    for stale in HF_TOKENIZER_FILES:  # a previous export's, not this run's
        (out / stale).unlink(missing_ok=True)
    written = model.save_pretrained(out)
    tokenizer.save_pretrained(written)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="the run's output_dir")
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--step", type=int, help="a checkpointed step (default: the latest)")
    parser.add_argument(
        "--no-verify-hashes",
        dest="hashes",
        action="store_false",
        help="check the checkpoint's file sizes only, not their content (huge checkpoints)",
    )
    args = parser.parse_args(argv)
    try:
        written = export(args.run, args.out, args.step, args.hashes)
    except ValueError as error:
        cli.fail(error)
    print(f"exported {args.run} to {written}", file=sys.stderr)


if __name__ == "__main__":
    main()
