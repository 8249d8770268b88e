"""Plot a run's metrics: python launch/plot.py <output_dir> [--out DIR].

Writes loss.png (training loss, and validation loss at every evaluated context length),
throughput.png (tokens per second) and eval.png (the last evaluation's bits per byte against
the context length, from 0 and printed: LongNet's claim is that it keeps falling as the context
grows). plot_evaluation draws launch/evaluate.py's results.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np

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
        curves(
            axes, {"validation": points}, "log", "context length (tokens)", "bits per byte",
            f"{run.name}: validation at step {last}",
        )  # fmt: skip
        written.append(_save(figure, out / "eval.png"))
    return written


def _label_points(axes, points, digits: int = 4) -> None:
    for x, y in points:
        axes.annotate(
            f"{y:.{digits}f}",
            (x, y),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=7,
        )


def curves(axes, runs: dict, xscale: str, xlabel, ylabel, title, extra_ys=()) -> None:
    """One line per run ({label: [(x, y), ...]}) with ticks at the measured x values, y from 0
    (a difference looks as large as it is) with room above the values, printed beside each
    point for up to three runs (more would cover each other)."""
    xs, ys = set(), [0.0, *extra_ys]
    for label, points in runs.items():
        axes.plot(*zip(*points, strict=True), "o-", label=label)
        if len(runs) <= 3:
            _label_points(axes, points, 3)
        xs.update(x for x, _ in points)
        ys += [y for _, y in points]
    if xscale == "symlog":
        axes.set_xscale("symlog", linthresh=64)
    else:
        axes.set_xscale(xscale)
    axes.set_xticks(sorted(xs), [str(x) for x in sorted(xs)])
    axes.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes.set(ylim=(0, 1.15 * max(ys)), xlabel=xlabel, ylabel=ylabel, title=title)


def plot_evaluation(results: dict[str, dict], out: Path, prefix: str = "") -> list[Path]:
    """launch/evaluate.py's results, one line per model ({label: results}): perplexity.png,
    positions.png, copy.png (against the chance loss of a random copy) and passkey.png (a
    heatmap per model, accuracy printed in each cell); y axes start at 0, and with up to three
    models each point is labelled with its value."""
    from longnet.launch.evaluate import COPY_ALPHABET

    out.mkdir(parents=True, exist_ok=True)
    written = []
    tasks = {
        "perplexity": ("context length (tokens)", "bits per byte", "bits_per_byte"),
        "positions": ("position in the window (bucket start)", "loss (nats/token)", "loss"),
        "copy": ("distance between the copies (tokens)", "loss on the 2nd copy (nats)", "loss"),
    }
    for task, (xlabel, ylabel, key) in tasks.items():
        runs = {label: r[task] for label, r in results.items() if task in r}
        if not runs:
            continue
        figure, axes = plt.subplots(figsize=(7, 4))
        series = {}
        for label, rows in runs.items():
            if task == "perplexity":
                series[label] = sorted((int(c), v[key]) for c, v in rows.items())
            else:
                x = "start" if task == "positions" else "distance"
                series[label] = [(v[x], v[key]) for v in rows]
        extra = ()
        if task == "copy":
            extra = (math.log(len(COPY_ALPHABET)),)
            axes.axhline(extra[0], color="gray", ls="--", label="chance (ln 62)")
        xscale = "symlog" if task == "positions" else "log"
        curves(axes, series, xscale, xlabel, ylabel, task, extra)
        if len(runs) <= 3:
            axes.legend(fontsize=8)
        else:  # beside the axes, where it hides no line
            figure.set_size_inches(9.5, 4)
            axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        written.append(_save(figure, out / f"{prefix}{task}.png"))
    runs = {label: r["passkey"] for label, r in results.items() if "passkey" in r}
    if runs:
        columns = min(len(runs), 4)
        lines = math.ceil(len(runs) / columns)
        figure, grid = plt.subplots(
            lines, columns, figsize=(3.2 * columns + 1, 3.4 * lines), squeeze=False
        )
        for axes in grid.flat[len(runs) :]:
            axes.set_axis_off()
        for axes, (label, rows) in zip(grid.flat, runs.items(), strict=False):
            contexts = sorted({r["context"] for r in rows})
            depths = sorted({r["depth"] for r in rows})
            table = np.full((len(depths), len(contexts)), np.nan)
            for r in rows:
                table[depths.index(r["depth"]), contexts.index(r["context"])] = r["accuracy"]
            axes.imshow(table, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
            for (i, j), value in np.ndenumerate(table):
                axes.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
            axes.set(
                xticks=range(len(contexts)),
                xticklabels=contexts,
                yticks=range(len(depths)),
                yticklabels=[f"{d:.0%}" for d in depths],
                xlabel="context (tokens)",
                ylabel="key depth",
                title=label,
            )
        written.append(_save(figure, out / f"{prefix}passkey.png"))
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
