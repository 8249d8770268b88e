"""The long-context experiment (docs/long-context.md): train, evaluate, tabulate.

    python benchmarks/long_context.py [--models dense,longnet,...] [--windows 40]

Trains each configs/experiments/lc-<model>.yaml with the trainer (one process; an interrupted run
resumes, a finished one is kept), evaluates it with launch/evaluate.py at 256, 512 and 1024
tokens, then writes benchmarks/long-context.json (every number), the comparison plots under
docs/long-context/ and the results table between the markers of docs/long-context.md. A model
whose training or evaluation failed is left out of the table and named in the JSON; models
recorded by an earlier call and not named in --models stay.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from longnet.launch.config import load_config
from longnet.launch.metrics import read_metrics
from longnet.launch.plot import plot_evaluation

ROOT = Path(__file__).resolve().parents[1]
MODELS = (
    "dense",
    "longnet",
    "local",
    "dense-quarter",
    "longnet-r4",
    "longnet-shift",
    "longnet-long",
    "longnet-w256",
    "longnet-h8",
    "longnet-w256-long",
)
CONTEXTS = (256, 512, 1024)
RESULTS = ROOT / "benchmarks" / "results" / "long-context"
PAGE = ROOT / "docs" / "long-context.md"
# More evaluations of a trained model under other attention patterns (the same weights): the
# dense model trained at 256 tokens, with full attention over 1024 (its trained w = 256 cuts
# every longer window into blocks of 256, which says nothing about its extrapolation).
VIEWS = {
    "dense-quarter": {
        "dense-quarter, full attention": ["--segment-lengths", "1024", "--dilation-rates", "1"]
    }
}
MARKERS = ("<!-- results: written by benchmarks/long_context.py -->", "<!-- end of results -->")


def run(command: list[str], log: Path) -> float:
    """Runs command with output to log; its wall time. CalledProcessError when it fails."""
    # One thread unless told otherwise: on a shared machine two threads per process spin against
    # other jobs (measured: 2.5 s per step with 2 threads beside a benchmark, 0.34 s with 1).
    env = {"OMP_NUM_THREADS": "1"} | dict(os.environ)
    start = time.perf_counter()
    with log.open("w") as out:
        subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def train_and_evaluate(name: str, windows: int) -> dict[str, dict]:
    """{label: summary} of the model and of its VIEWS."""
    config_file = ROOT / "configs" / "experiments" / f"lc-{name}.yaml"
    config = load_config(config_file)
    run_dir = ROOT / config.run.output_dir
    out = RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": name, "config": str(config_file.relative_to(ROOT))}
    done = [r for r in read_metrics(run_dir) if r["step"] == config.train.steps]
    if not done:
        summary["train_seconds"] = run(
            [sys.executable, "launch/train.py", "--config", str(config_file)], out / "train.log"
        )
    train = [r for r in read_metrics(run_dir) if not r.get("eval")]
    summary["tokens_per_s"] = sum(r["tokens_per_s"] for r in train) / len(train)
    last = [r["tokens_per_s"] for r in train if r["seq_len"] == config.data.seq_len]
    summary["tokens_per_s_at_seq_len"] = sum(last) / len(last)  # the curriculum's last stage
    summary["tokens"] = train[-1]["tokens"]
    summary["final_train_loss"] = train[-1]["loss"]
    contexts = ",".join(str(c) for c in CONTEXTS)
    summaries = {}
    for index, (label, extra) in enumerate([(name, [])] + list(VIEWS.get(name, {}).items())):
        output = out / ("eval.json" if index == 0 else f"eval-view{index}.json")
        seconds = run(
            [sys.executable, "launch/evaluate.py", str(run_dir), "--context-lengths", contexts,
             "--windows", str(windows), "--output", str(output), *extra],
            output.with_suffix(".log"),
        )  # fmt: skip
        evaluation = json.loads(output.read_text())
        summaries[label] = summary | {"eval_seconds": seconds, "eval": evaluation, "args": extra}
    return summaries


def table(results: dict[str, dict]) -> str:
    """The markdown table: bits per byte per context, passkey exact match per context (mean over
    depths) and at the worst depth, copy loss at the farthest distance."""
    header = ["model", "patterns (w / r)", "train tokens/s (at its seq_len)"]
    header += [f"bpb @ {c}" for c in CONTEXTS] + [f"passkey @ {c} (worst depth)" for c in CONTEXTS]
    header += ["copy loss @ farthest"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, summary in results.items():
        e = summary["eval"]
        patterns = " ".join(
            f"{w}/{r}"
            for w, r in zip(
                e["model"]["segment_lengths"], e["model"]["dilation_rates"], strict=True
            )
        )
        speed = summary.get("tokens_per_s_at_seq_len")  # absent in records of older versions
        row = [name, patterns, "-" if speed is None else f"{speed:.0f}"]
        row += [f"{e['perplexity'][str(c)]['bits_per_byte']:.4f}" for c in CONTEXTS]
        for c in CONTEXTS:
            cells = [p["accuracy"] for p in e["passkey"] if p["context"] == c]
            row.append(f"{sum(cells) / len(cells):.0%} ({min(cells):.0%})")
        far = e["copy"][-1]
        row.append(f"{far['loss']:.2f} @ {far['distance']}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--windows", type=int, default=40)
    args = parser.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        sys.exit(f"error: --models: unknown {', '.join(unknown)}; models: {', '.join(MODELS)}")
    record = ROOT / "benchmarks" / "long-context.json"
    # Models measured by an earlier call stay in the table unless this call measures them again.
    earlier = json.loads(record.read_text()) if record.is_file() else {"models": {}, "failed": {}}
    results = {n: s for n, s in earlier["models"].items() if n not in names}
    failed = {n: f for n, f in earlier["failed"].items() if n not in names}
    for name in names:
        print(f"{time.strftime('%H:%M:%S')} {name}", file=sys.stderr, flush=True)
        try:
            results |= train_and_evaluate(name, args.windows)
            model = {n: results[n].get("model", n) for n in results}
            order = sorted(results, key=lambda n: (MODELS.index(model[n]), n != model[n]))
            results = {n: results[n] for n in order}
        except subprocess.CalledProcessError as error:
            failed[name] = f"{error.cmd[1]} exited with {error.returncode} (see {RESULTS / name})"
        # After each model: an interrupted experiment still leaves what it measured.
        record.write_text(json.dumps({"models": results, "failed": failed}, indent=1) + "\n")
        if results:
            plot_evaluation({n: s["eval"] for n, s in results.items()}, PAGE.with_suffix(""))
            text = PAGE.read_text()
            start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
            PAGE.write_text(text[:start] + "\n\n" + table(results) + "\n\n" + text[end:])
    print(table(results))
    if failed:
        sys.exit(f"error: failed: {failed}")


if __name__ == "__main__":
    main()
