"""This checkout's attention speed against an earlier commit's, measured in the same run.

    python benchmarks/before_after.py --base 0d6385b [--rounds 2] [--seq-lens 8192,32768]

Checks --base out into a temporary git worktree (with longnet/distributed and longnet/launch
linked in, as the installed package maps them) and runs each tree's own benchmarks on its own
code, the trees taking turns round by round so that a slow phase of a shared machine hits both:
benchmarks/attention.py (one device: dilated attention forward and forward+backward at
--seq-lens, the paper's patterns) and benchmarks/sequence_parallel.py --experiment strong (the
same tokens on P = 1 and 2 processes: efficiency, with the exchange overlapped and without; the
default on gloo is without). Prints the best of the rounds per tree and now / base: a time ratio
below 1 is faster now.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worktree(revision: str, directory: Path) -> Path:
    """`revision` checked out under directory, importable as the package `longnet`."""
    tree = directory / "base"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision],
        check=True, capture_output=True,
    )  # fmt: skip
    for name in ("distributed", "launch"):
        (tree / "longnet" / name).symlink_to(tree / name)
    return tree


def run(tree: Path, script: str, arguments: list[str], output: Path) -> dict:
    """tree's benchmarks/<script> on tree's own code; its JSON."""
    # PYTHONPATH comes before the editable install's finder: `import longnet` finds the tree.
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    command = [sys.executable, f"benchmarks/{script}", *arguments, f"--json={output}"]
    subprocess.run(command, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(output.read_text())


def attention_times(result: dict) -> dict[int, dict[str, float]]:
    return {
        row["seq_len"]: {key: row["dilated"][key] for key in ("fwd_s", "fwd_bwd_s")}
        for row in result["rows"]
    }


def strong_times(result: dict) -> dict[str, float]:
    """{P=1 seconds, P=2 overlap and no-overlap seconds (slowest rank)} of a strong run."""
    runs = {r["world_size"]: r["max_over_ranks"] for r in result["runs"]}
    return {
        "P1_s": runs[1]["overlap_s"],
        "P2_overlap_s": runs[2]["overlap_s"],
        "P2_no_overlap_s": runs[2]["no_overlap_s"],
    }


def best(rounds: list[dict]) -> dict:
    """The minimum of every leaf over the rounds."""
    first = rounds[0]
    if isinstance(first, dict):
        return {key: best([r[key] for r in rounds]) for key in first}
    return min(rounds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seq-lens", default="8192,32768")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/before_after.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"base": worktree(args.base, Path(tmp)), "now": ROOT}
        found = {name: {"attention": [], "strong": []} for name in trees}
        try:
            for round_ in range(args.rounds):
                for name, tree in trees.items():
                    attention = run(
                        tree, "attention.py",
                        [f"--seq-lens={args.seq_lens}", "--dense-time-limit=0", "--repeats=2"],
                        Path(tmp) / f"{name}-{round_}-attention.json",
                    )  # fmt: skip
                    strong = run(
                        tree, "sequence_parallel.py", ["--experiment=strong", "--repeats=2"],
                        Path(tmp) / f"{name}-{round_}-strong.json",
                    )  # fmt: skip
                    found[name]["attention"].append(attention_times(attention))
                    found[name]["strong"].append(strong_times(strong))
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees["base"])],
                check=False,
            )
    summary = {name: {k: best(v) for k, v in runs.items()} for name, runs in found.items()}
    print(f"best of {args.rounds} rounds; now / {args.base} (< 1: faster now)")
    for seq_len, now in summary["now"]["attention"].items():
        base = summary["base"]["attention"][seq_len]
        for key in ("fwd_s", "fwd_bwd_s"):
            print(
                f"  one device {seq_len:>6} {key:9s} {base[key]:8.3f} s -> {now[key]:8.3f} s "
                f"({now[key] / base[key]:.3f})"
            )
    for name in ("base", "now"):
        s = summary[name]["strong"]
        for mode in ("overlap", "no_overlap"):
            summary[name][f"efficiency_{mode}"] = s["P1_s"] / (2 * s[f"P2_{mode}_s"])
        print(
            f"  P = 2 efficiency ({name}): overlap {summary[name]['efficiency_overlap']:.3f}, "
            f"no overlap {summary[name]['efficiency_no_overlap']:.3f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"base": args.base, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
