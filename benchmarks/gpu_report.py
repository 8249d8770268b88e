"""One table of a benchmarks/gpu.sh run: its tests, attention and language-model benchmarks.

    python benchmarks/gpu_report.py --tests-log LOG --tests-status RC --attention A.json ...
        --lm LM.json --json REPORT.json

Prints the table and writes it, with the benchmark results it came from, as JSON. A result file
that is missing (its step failed or ran out of time) is a row that says so.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

GIB = 2**30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tests-log", type=Path, required=True, help="pytest's output")
    parser.add_argument("--tests-status", type=int, required=True, help="pytest's exit status")
    parser.add_argument("--attention", type=Path, nargs="*", default=[])
    parser.add_argument("--lm", type=Path)
    parser.add_argument("--json", type=Path, required=True)
    return parser.parse_args()


def tests_summary(log: Path, status: int) -> str:
    """pytest's closing line ("3 passed, 1 skipped in 9.1s"), and its exit status."""
    text = log.read_text() if log.is_file() else ""
    # "-q" prints it bare, otherwise between "=" rules
    lines = re.findall(r"^=* ?(\d+ \w+.* in [\d.]+s.*?)(?: =+)?$", text, flags=re.MULTILINE)
    return f"{lines[-1] if lines else 'no summary (killed?)'}; exit status {status}"


def load(path: Path | None) -> dict | None:
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def attention_rows(path: Path, result: dict | None) -> list[list[str]]:
    if result is None:
        return [[f"attention ({path.name})", "-", "missing: failed or out of time", "", ""]]
    config = result["config"]
    backend = config.get("backend", "auto")
    name = f"attention {config['heads']}x{config['head_dim']} fwd+bwd"
    name += "" if backend == "auto" else f", backend {backend}"
    rows = []
    for row in result["rows"]:
        cells = []
        for kind in ("dilated", "dense"):
            t = row.get(kind)
            cells.append(
                "-"
                if t is None
                else f"{t['fwd_bwd_s']:.4f} s, {t['fwd_bwd_tflops']:.1f} TFLOP/s, "
                f"{t['fwd_bwd_peak_bytes'] / GIB:.2f} GiB"
            )
        speedup = row.get("speedup_fwd_bwd")
        ratio = f"{speedup:.2f}x" if speedup else "-"
        ratio += f" (ideal {row['ideal_ratio']:.1f}x)"
        rows.append([name, str(row["seq_len"]), *cells, ratio])
    if result.get("stopped"):
        rows.append([name, "-", f"stopped: {result['stopped']}", "", ""])
    return rows


def lm_rows(path: Path | None, result: dict | None) -> list[list[str]]:
    if result is None:
        return [[f"LM training ({path.name if path else 'not run'})", "-", "missing", "", ""]]
    config, part1, part2 = result["config"], result["throughput"], result["longest"]

    def cell(r: dict) -> str:
        return f"{r['tokens_per_s']:.0f} tokens/s, {r['peak_bytes'] / GIB:.2f} GiB"

    name = f"LM {config['preset']} {config['dtype']} training"
    rows = [
        [
            name,
            str(config["seq_len"]),
            cell(part1["dilated"]),
            cell(part1["dense"]),
            f"{part1['speedup']:.2f}x",
        ]
    ]
    if part2["rows"]:
        best = part2["rows"][-1]
        rows.append([f"{name}, longest (checkpointed)", str(best["seq_len"]), cell(best), "-", ""])
    rows.append([f"{name}, longest (checkpointed)", "-", f"stopped: {part2['stopped']}", "", ""])
    return rows


def main() -> None:
    args = parse_args()
    attention = {str(path): load(path) for path in args.attention}
    lm = load(args.lm)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    header = ["benchmark", "seq", "dilated", "dense", "dilated vs dense"]
    table = [["tests", "-", tests_summary(args.tests_log, args.tests_status), "", ""]]
    for path in args.attention:
        table += attention_rows(path, attention[str(path)])
    table += lm_rows(args.lm, lm)
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    print(f"{device}, torch {torch.__version__}")
    for row in [header, ["-" * w for w in widths], *table]:
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    report = {
        "device": device,
        "torch": torch.__version__,
        "table": [dict(zip(header, row, strict=True)) for row in table],
        "attention": attention,
        "lm": lm,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
