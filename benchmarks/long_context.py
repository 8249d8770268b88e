"""The long-context experiments (docs/long-context.md): train, evaluate, tabulate.

    python benchmarks/long_context.py [--models dense,longnet,...] [--windows 40]
    python benchmarks/long_context.py --experiment far [--models ...]

Trains each configs/experiments/<prefix>-<model>.yaml with the trainer (one process; an
interrupted run resumes, a finished one is kept), evaluates it with launch/evaluate.py at the
experiment's contexts, then writes the experiment's JSON (every number), the comparison plots
under docs/long-context/ and the results table between the experiment's markers in
docs/long-context.md. A model whose training or evaluation failed is left out of the table and
named in the JSON; models recorded by an earlier call and not named in --models stay.

Experiments: `lc` (1024 tokens, the first one) and `far` (2048 tokens: far retrieval, with each
configuration's computed attention pairs per token at 8K and its training speed at 2048 and
8192 tokens against dense, measured in this process; models named `<model>-seed<k>` train the
same config with train.seed=k).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longnet import LongNetLM
from longnet.cost import pairs_per_token
from longnet.launch.config import load_config
from longnet.launch.metrics import read_metrics
from longnet.launch.plot import plot_evaluation

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "long-context"
PAGE = ROOT / "docs" / "long-context.md"


@dataclass(frozen=True)
class Experiment:
    prefix: str  # configs/experiments/<prefix>-<model>.yaml
    models: tuple[str, ...]
    contexts: tuple[int, ...]
    record: str  # benchmarks/<record>
    markers: tuple[str, str]
    plots: str  # the plots' name prefix under docs/long-context/
    # More evaluations of a trained model under other attention patterns (the same weights):
    # the dense model trained at 256 tokens, with full attention over 1024 (its trained w = 256
    # cuts every longer window into blocks of 256, which says nothing of its extrapolation).
    views: dict = field(default_factory=dict)
    costs: bool = False  # attention pairs per token at 8K and speed at 2048 / 8192 tokens


EXPERIMENTS = {
    "lc": Experiment(
        prefix="lc",
        models=(
            "dense", "longnet", "local", "dense-quarter", "longnet-r4", "longnet-shift",
            "longnet-long", "longnet-w256", "longnet-h8", "longnet-w256-long",
        ),
        contexts=(256, 512, 1024),
        record="long-context.json",
        markers=(
            "<!-- results: written by benchmarks/long_context.py -->", "<!-- end of results -->"
        ),
        plots="",
        views={
            "dense-quarter": {
                "dense-quarter, full attention": [
                    "--segment-lengths", "1024", "--dilation-rates", "1"
                ]
            }
        },
    ),
    "far": Experiment(
        prefix="far",
        models=(
            "dense", "dense-seed1", "local", "longnet", "select", "select-seed1",
            "select-k16", "select-k16-seed1", "select-k16-seed2", "select-b8", "select-b8-seed1",
            "select-k16-long-seed1", "select-k16-long-seed2", "select-pooled",
            "select-pooled-seed1", "select-pooled-k32", "select-pooled-k32-seed1",
            "select-pooled-k32-seed2", "select-pooled-k32-long", "select-pooled-k40",
            "select-pooled-k32-span16", "select-pooled-k32-span16-seed1",
            "select-pooled-k32-span16-near", "select-pooled-k32-near",
            "select-pooled-k32-near-seed1", "select-pooled-k32-nope", "select-pooled-k32-seed3",
            "select-pooled-k32-content", "select-pooled-k32-content-seed1",
            "select-pooled-k32-decay", "select-pooled-k32-decay-seed1",
            "select-pooled-k32-content-decay", "select-pooled-k32-content-decay-seed1",
            "select-pooled-k32-content-decay-seed2", "select-pooled-k32-content-decay-long",
            "select-pooled-k32-content-decay-long-seed1",
            "select-pooled-k32-content-decay-long-seed2", "select-pooled-k32-content-decay-span5",
            "select-pooled-k32-content-decay-span5-seed1",
            "select-pooled-k32-content-decay-deep", "select-pooled-k32-content-decay-deep-seed1",
            "select-pooled-k32-content-decay-long-seed3",
            "select-pooled-k32-content-decay-distance",
            "select-pooled-k32-content-decay-h8",
            "select-pooled-k32-content-decay-h8-seed1",
            "select-pooled-k32-content-decay-h8-seed2",
            "select-pooled-k32-content-decay-h8-long",
            "select-pooled-k32-content-decay-h8-long-seed1",
            "select-pooled-k32-content-decay-h8-long-seed2",
            "select-pooled-k32-content-decay-h8-long-spanmax5",
        ),
        contexts=(256, 512, 1024, 2048),
        record="far-retrieval.json",
        markers=(
            "<!-- far results: written by benchmarks/long_context.py --experiment far -->",
            "<!-- end of far results -->",
        ),
        plots="far-",
        costs=True,
    ),
}  # fmt: skip
COST_LENGTH = 8192  # the yardstick: dense causal attention computes 4096 pairs per token
SPEED_LENGTHS = (2048, 8192)


def config_and_overrides(experiment: Experiment, name: str) -> tuple[Path, list[str]]:
    """The config file of a model and the overrides of its seed variant (`<model>-seed<k>`)."""
    base, _, seed = name.partition("-seed")
    config_file = ROOT / "configs" / "experiments" / f"{experiment.prefix}-{base}.yaml"
    if not seed:
        return config_file, []
    output_dir = load_config(config_file).run.output_dir
    return config_file, [f"train.seed={seed}", f"run.output_dir={output_dir}-seed{seed}"]


def at_length(model_config, length: int):
    """The model's patterns extended to `length` tokens: a pattern as long as the training
    context grows with the sequence (dense stays dense; a dilated one doubles w and r until it
    covers the sequence, the paper's geometric series); shorter ones stay."""
    lengths, rates = list(model_config.segment_lengths), list(model_config.dilation_rates)
    if len(lengths) == 1 and rates == [1] and lengths[0] > 256:
        return dataclasses.replace(model_config, segment_lengths=(length,), dilation_rates=(1,))
    if max(lengths) > 256:
        while max(lengths) < length:
            lengths.append(2 * lengths[-1])
            rates.append(2 * rates[-1])
    return dataclasses.replace(
        model_config, segment_lengths=tuple(lengths), dilation_rates=tuple(rates)
    )


def pairs_at(model_config, length: int = COST_LENGTH) -> float:
    """Computed (query, key) pairs per token at `length` (longnet.cost)."""
    config = at_length(model_config, length)
    return pairs_per_token(
        length, config.num_heads, config.segment_lengths, config.dilation_rates,
        select_top_k=config.select_top_k, select_block_size=config.select_block_size,
        select_within_segment=config.select_within_segment,
    )  # fmt: skip


def step_seconds(configs: dict, length: int, rounds: int = 3) -> dict[str, float]:
    """{name: best forward+backward time of one row of `length` tokens} on one thread, as
    trained; the models take turns in every round, so a slow phase of a shared machine hits
    them alike (the first round warms up and is not counted)."""
    models, tokens = {}, None
    for name, config in configs.items():
        torch.manual_seed(0)
        models[name] = LongNetLM(at_length(config, length))
        tokens = torch.randint(0, config.vocab_size, (1, length))
    best = dict.fromkeys(models, math.inf)
    for round_ in range(rounds + 1):
        for name, model in models.items():
            start = time.perf_counter()
            model(tokens, tokens).loss.backward()
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def costs(results: dict[str, dict], names: list[str]) -> None:
    """Adds pairs per token at 8K to every summary and training speed against dense to those of
    `names` (the models of this call), each timed beside dense in this process."""
    configs = {n: load_config(ROOT / s["config"]).model.build() for n, s in results.items()}
    dense = next(n for n in configs if n.startswith("dense"))
    for name, config in configs.items():
        results[name]["pairs_per_token_8k"] = pairs_at(config)
    timed = {n: configs[n] for n in configs if n == dense or n in names}
    for length in SPEED_LENGTHS:
        times = step_seconds(timed, length)
        for name in timed:
            results[name][f"speed_vs_dense_{length}"] = times[dense] / times[name]


def run(command: list[str], log: Path) -> float:
    """Runs command with output to log; its wall time. CalledProcessError when it fails."""
    # One thread unless told otherwise: on a shared machine two threads per process spin against
    # other jobs (measured: 2.5 s per step with 2 threads beside a benchmark, 0.34 s with 1).
    env = {"OMP_NUM_THREADS": "1"} | dict(os.environ)
    start = time.perf_counter()
    with log.open("w") as out:
        subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def train_and_evaluate(experiment: Experiment, name: str, windows: int) -> dict[str, dict]:
    """{label: summary} of the model and of its views."""
    config_file, overrides = config_and_overrides(experiment, name)
    config = load_config(config_file, overrides)
    run_dir = ROOT / config.run.output_dir
    out = RESULTS / f"{experiment.prefix}-{name}"
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": name, "config": str(config_file.relative_to(ROOT)), "overrides": overrides}
    done = [r for r in read_metrics(run_dir) if r["step"] == config.train.steps]
    if not done:
        summary["train_seconds"] = run(
            [sys.executable, "launch/train.py", "--config", str(config_file), *overrides],
            out / "train.log",
        )
    train = [r for r in read_metrics(run_dir) if not r.get("eval")]
    summary["tokens_per_s"] = sum(r["tokens_per_s"] for r in train) / len(train)
    last = [r["tokens_per_s"] for r in train if r["seq_len"] == config.data.seq_len]
    summary["tokens_per_s_at_seq_len"] = sum(last) / len(last)  # the curriculum's last stage
    summary["tokens"] = train[-1]["tokens"]
    summary["final_train_loss"] = train[-1]["loss"]
    contexts = ",".join(str(c) for c in experiment.contexts)
    summaries = {}
    views = [(name, [])] + list(experiment.views.get(name, {}).items())
    for index, (label, extra) in enumerate(views):
        output = out / ("eval.json" if index == 0 else f"eval-view{index}.json")
        seconds = run(
            [sys.executable, "launch/evaluate.py", str(run_dir), "--context-lengths", contexts,
             "--windows", str(windows), "--output", str(output), *extra],
            output.with_suffix(".log"),
        )  # fmt: skip
        evaluation = json.loads(output.read_text())
        evaluation.pop("passkey_windows", None)  # per window: in the model's own eval.json
        summaries[label] = summary | {"eval_seconds": seconds, "eval": evaluation, "args": extra}
    return summaries


def table(experiment: Experiment, results: dict[str, dict]) -> str:
    """The markdown table: bits per byte per context, passkey exact match per context (mean over
    depths) and at the worst depth, copy loss at the farthest distance; for `far` also the
    pairs per token at 8K and the training speed against dense."""
    contexts = experiment.contexts
    header = ["model", "patterns (w / r)"]
    if experiment.costs:
        header += ["pairs/token @ 8K (dense 4096)"]
        header += [f"train speed vs dense @ {n}" for n in SPEED_LENGTHS]
    else:
        header += ["train tokens/s (at its seq_len)"]
    header += [f"bpb @ {c}" for c in contexts] + [f"passkey @ {c} (worst depth)" for c in contexts]
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
        selection = load_config(ROOT / summary["config"]).model.build()
        if selection.select_top_k:
            patterns += f" + top-{selection.select_top_k} blocks of {selection.select_block_size}"
            if selection.select_query_span > 1:
                ranked = "the best probability" if selection.select_span_max else "the mean"
                patterns += f" by {ranked} of {selection.select_query_span} queries"
            if selection.select_within_segment:
                patterns += ", near blocks too"
            if selection.select_ranking_dims:
                patterns += f", ranked by {selection.select_ranking_dims} unrotated dims"
        row = [name, patterns]
        if experiment.costs:  # measured at the end of a call
            pairs = summary.get("pairs_per_token_8k")
            row.append("-" if pairs is None else f"{pairs:.0f}")
            row += [f"{summary.get(f'speed_vs_dense_{n}', math.nan):.2f}x" for n in SPEED_LENGTHS]
        else:
            speed = summary.get("tokens_per_s_at_seq_len")  # absent in older records
            row.append("-" if speed is None else f"{speed:.0f}")
        row += [f"{e['perplexity'][str(c)]['bits_per_byte']:.4f}" for c in contexts]
        for c in contexts:
            cells = [p["accuracy"] for p in e["passkey"] if p["context"] == c]
            row.append(f"{sum(cells) / len(cells):.0%} ({min(cells):.0%})")
        far = e["copy"][-1]
        row.append(f"{far['loss']:.2f} @ {far['distance']}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_table(experiment: Experiment, results: dict[str, dict]) -> None:
    """The plots and the table between the experiment's markers of docs/long-context.md."""
    evaluations = {n: s["eval"] for n, s in results.items()}
    plot_evaluation(evaluations, PAGE.with_suffix(""), experiment.plots)
    text = PAGE.read_text()
    first, last = experiment.markers
    start, end = text.index(first) + len(first), text.index(last)
    PAGE.write_text(text[:start] + "\n\n" + table(experiment, results) + "\n\n" + text[end:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", choices=list(EXPERIMENTS), default="lc")
    parser.add_argument("--models", help="comma-separated; default: all of the experiment's")
    parser.add_argument("--windows", type=int, default=40)
    args = parser.parse_args(argv)
    experiment = EXPERIMENTS[args.experiment]
    names = args.models.split(",") if args.models else list(experiment.models)
    unknown = [n for n in names if n not in experiment.models]
    if unknown:
        sys.exit(
            f"error: --models: unknown {', '.join(unknown)}; models: {', '.join(experiment.models)}"
        )
    record = ROOT / "benchmarks" / experiment.record
    # Models measured by an earlier call stay in the table unless this call measures them again.
    earlier = json.loads(record.read_text()) if record.is_file() else {"models": {}, "failed": {}}
    results = {n: s for n, s in earlier["models"].items() if n not in names}
    failed = {n: f for n, f in earlier["failed"].items() if n not in names}
    for name in names:
        print(f"{time.strftime('%H:%M:%S')} {name}", file=sys.stderr, flush=True)
        try:
            results |= train_and_evaluate(experiment, name, args.windows)
            model = {n: results[n].get("model", n) for n in results}
            order = sorted(
                results, key=lambda n: (experiment.models.index(model[n]), n != model[n])
            )
            results = {n: results[n] for n in order}
        except subprocess.CalledProcessError as error:
            failed[name] = f"{error.cmd[1]} exited with {error.returncode} (see {RESULTS})"
        # After each model: an interrupted experiment still leaves what it measured.
        record.write_text(json.dumps({"models": results, "failed": failed}, indent=1) + "\n")
        if results:
            write_table(experiment, results)
    if experiment.costs and results:  # once, at the end: the speeds are measured together
        costs(results, names)
        record.write_text(json.dumps({"models": results, "failed": failed}, indent=1) + "\n")
        write_table(experiment, results)
    print(table(experiment, results))
    if failed:
        sys.exit(f"error: failed: {failed}")


if __name__ == "__main__":
    main()
