"""Time per token and peak memory against the sequence length, dilated against dense attention.

    python benchmarks/plot_attention.py benchmarks/results/attention-*.json --out attention.png

Log-log, one line per run of benchmarks/attention.py (its JSON file): a device, dtype and head
shape, so CPU and GPU runs share one figure. Solid lines are dilated attention, dashed dense.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def run_label(result: dict) -> str:
    # Files written before runs carried a label name their device from the configuration.
    config = result["config"]
    default = f"{config['device']}, {config['dtype']}, {config['heads']}x{config['head_dim']}"
    return result.get("label", default)


def plot(paths: list[Path], out: Path) -> None:
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 4.8))
    for index, path in enumerate(paths):
        result = json.loads(Path(path).read_text())
        for name, style in (("dilated", "-"), ("dense", "--")):
            rows = [row for row in result["rows"] if name in row]
            if not rows:
                continue
            lengths = [row["seq_len"] for row in rows]
            line = dict(color=f"C{index}", linestyle=style, marker="o", markersize=3)
            line["label"] = f"{name}: {run_label(result)}"
            per_token = [row[name]["fwd_bwd_s"] / row["seq_len"] * 1e6 for row in rows]
            time_axis.plot(lengths, per_token, **line)
            peaks = [row[name]["fwd_bwd_peak_bytes"] / 2**20 for row in rows]
            memory_axis.plot(lengths, peaks, **line)
    time_axis.set_ylabel("forward+backward time per token (µs)")
    memory_axis.set_ylabel("peak memory of forward+backward (MiB)")
    for axis in (time_axis, memory_axis):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length (tokens)")
        axis.grid(True, which="both", alpha=0.3)
    time_axis.legend(fontsize=7)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="JSON files of attention.py")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attention.png"))
    args = parser.parse_args()
    plot(args.results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
