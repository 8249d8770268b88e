"""Plot a run's metrics: python launch/plot.py <output_dir> [--out DIR].

Writes loss.png (training loss, and validation loss at every evaluated context length),
throughput.png (tokens per second) and eval.png (the last evaluation's bits per byte against
the context length: LongNet's claim is that it keeps falling as the context grows).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from longnet.launch.metrics import read_metrics  # noqa: E402


def plot(run: Path, out: Path) -> list[Path]:
    records = read_metrics(run)
    if not records:
        raise SystemExit(f"error: no metrics in {run}")
    train = [r for r in records if not r.get("eval")]
    evals = defaultdict(list)
    for r in records:
        if r.get("eval"):
            evals[r["seq_len"]].append(r)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    for seq_len, rows in sorted(evals.items()):
        axes.plot(
            [r["step"] for r in rows],
            [r["loss"] for r in rows],
            "o-",
            label=f"validation @ {seq_len} tokens",
        )
    axes.set(xlabel="step", ylabel="loss (nats/token)", title=run.name)
    axes.legend()
    written.append(_save(figure, out / "loss.png"))

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    axes.set(xlabel="step", ylabel="tokens / s", title=f"{run.name}: throughput")
    written.append(_save(figure, out / "throughput.png"))

    if evals:
        last = max(r["step"] for rows in evals.values() for r in rows)
        points = sorted(
            (seq_len, r["bits_per_byte"])
            for seq_len, rows in evals.items()
            for r in rows
            if r["step"] == last
        )
        figure, axes = plt.subplots(figsize=(7, 4))
        axes.plot(*zip(*points, strict=True), "o-")
        axes.set(
            xscale="log",
            xlabel="context length (tokens)",
            ylabel="bits per byte",
            title=f"{run.name}: validation at step {last}",
        )
        written.append(_save(figure, out / "eval.png"))
    return written


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="the run's output_dir")
    parser.add_argument("--out", type=Path, help="where to write the PNGs (default: the run)")
    args = parser.parse_args(argv)
    for path in plot(args.run, args.out or args.run):
        print(path)


if __name__ == "__main__":
    main()
