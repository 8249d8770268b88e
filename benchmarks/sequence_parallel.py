"""Sequence-parallel dilated attention: weak scaling, executor overhead and strong scaling.

    python benchmarks/sequence_parallel.py [--world-sizes 1,2,4] [--scale 16] [...]
    python benchmarks/sequence_parallel.py --experiment overhead    # (a) below
    python benchmarks/sequence_parallel.py --experiment strong      # (b) below
    torchrun --nproc_per_node P benchmarks/sequence_parallel.py [...]   # one world size

--experiment overhead: at P = 2 with patterns that do not span ranks (the paper's up to the
shard length), each rank times the sequence-parallel call against longnet.dilated_attention on
its shard in the same process: the cost of the SP executor itself. --experiment strong: the
paper's patterns on P x --shard-length tokens (by default 32K over 2 ranks: the 32K pattern
spans both), efficiency T(one process, all tokens) / (P x T(slowest SP rank, its shard)), with
the exchange overlapped with the local calls and without. Both run one thread per rank.

The global sequence is P x --shard-length, so every rank does the same work at every P. The
patterns are the paper's, w = {2048, ..., 32768} and r = {1, 2, 4, 6, 12}, divided by --scale
(default 16, for CPUs; use 1 on GPUs), with shards of 16384 / scale tokens: the largest pattern
spans two shards once P >= 2. Per world size: the forward and forward+backward time of one
attention layer (best of --repeats, the slowest rank) and the bytes each rank sent and received
(longnet.distributed.communication), next to the formula of docs/sequence-parallel.md.
Bytes per rank must stay flat as P and the sequence grow together: that is LongNet's scaling
argument (paper section 3.1).

Without torchrun in the environment the script launches `torchrun --standalone` once per world
size, prints one table and writes --json. CUDA with NCCL when a GPU is present, else CPU with gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from longnet import dilated_attention
from longnet.config import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS
from longnet.distributed import communication, sequence_parallel_dilated_attention

FLATNESS = 1.10  # the most bytes per rank may grow between world sizes >= 2


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", choices=("weak", "overhead", "strong"), default="weak")
    parser.add_argument("--world-sizes", type=_ints, default=None, help="weak: 1,2,4; strong: 1,2")
    parser.add_argument("--scale", type=int, default=16, help="divides the paper's patterns")
    parser.add_argument("--shard-length", type=int, help="tokens per rank (16384 / scale)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--non-causal", action="store_true")
    parser.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (best is kept)")
    parser.add_argument(
        "--json", type=Path, default=Path("benchmarks/results/sequence_parallel.json")
    )
    args = parser.parse_args()
    if args.experiment != "weak":
        args.scale = 1 if args.scale == 16 else args.scale  # the paper's patterns as they are
        args.world_sizes = [2] if args.experiment == "overhead" else args.world_sizes or [1, 2]
    args.world_sizes = args.world_sizes or [1, 2, 4]
    if args.shard_length is None:
        args.shard_length = 16384 // args.scale
    args.segment_lengths = [w // args.scale for w in PAPER_SEGMENT_LENGTHS]
    args.dilation_rates = list(PAPER_DILATION_RATES)
    if args.experiment == "overhead":  # only the patterns that fit in a shard
        fits = [i for i, w in enumerate(args.segment_lengths) if w <= args.shard_length]
        args.segment_lengths = [args.segment_lengths[i] for i in fits]
        args.dilation_rates = [args.dilation_rates[i] for i in fits]
    return args


def spec_bytes(args, world: int) -> float:
    """The formula's bytes received per rank and layer, summed over the spanning patterns (the most
    any rank receives: with causal masking a rank receives from earlier ranks only)."""
    seq_len, shard_len = world * args.shard_length, args.shard_length
    element = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    total = 0.0
    for w, r in zip(args.segment_lengths, args.dilation_rates, strict=True):
        w = min(w, seq_len)
        if w > shard_len:
            sparse = 2 * (w / r) * args.heads * args.head_dim * element * args.batch
            total += sparse * (1 - shard_len / w)
    return total


def measure(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: plan caches, kernel selection, allocator
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def run_rank(args) -> None:
    """One rank of one world size, under torchrun."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(rank)
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, args.shard_length, args.heads, args.head_dim)  # (b, L, h, d)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in "qkv")
    grad = torch.randn(shape, device=device, dtype=dtype)

    def attend(fn=sequence_parallel_dilated_attention, **options):
        return fn(
            q,
            k,
            v,
            args.segment_lengths,
            args.dilation_rates,
            causal=not args.non_causal,
            **options,
        )

    def forward():
        with torch.no_grad():
            attend()

    def forward_backward(fn=sequence_parallel_dilated_attention, **options):
        q.grad = k.grad = v.grad = None
        attend(fn, **options).backward(grad)

    if args.experiment == "weak":
        row = {
            "fwd_s": measure(forward, device, args.repeats),
            "fwd_bwd_s": measure(forward_backward, device, args.repeats),
            **vars(
                communication(
                    q,
                    k,
                    v,
                    args.segment_lengths,
                    args.dilation_rates,
                    causal=not args.non_causal,
                )
            ),
        }
    elif args.experiment == "overhead":
        # Interleaved rounds, so that a slow phase of the machine hits both alike.
        times = {"sp_s": float("inf"), "one_device_s": float("inf")}
        for _ in range(args.repeats):
            times["sp_s"] = min(times["sp_s"], measure(forward_backward, device, 1))
            one_device = partial(forward_backward, dilated_attention)
            times["one_device_s"] = min(times["one_device_s"], measure(one_device, device, 1))
        row = times
    else:
        row = {
            "overlap_s": measure(partial(forward_backward, overlap=True), device, args.repeats),
            "no_overlap_s": measure(partial(forward_backward, overlap=False), device, args.repeats),
        }
    row["rank"] = rank
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        result = {
            "world_size": world,
            "seq_len": world * args.shard_length,
            "shard_length": args.shard_length,
            "device": str(device.type),
            "threads": torch.get_num_threads(),
            "spec_bytes": spec_bytes(args, world),
            "ranks": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()


def summarize(result: dict) -> dict:
    """The slowest rank's times and the most bytes any rank moved."""
    ranks = result["ranks"]
    return {key: max(r[key] for r in ranks) for key in ranks[0] if key != "rank"}


def run_world(args, world: int, directory: Path) -> dict:
    """torchrun this script over `world` ranks; their gathered result."""
    out = directory / f"P{world}.json"
    names = ("experiment", "scale", "shard_length", "batch", "heads", "head_dim", "dtype")
    forwarded = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in names]
    forwarded += [f"--repeats={args.repeats}"] + (["--non-causal"] if args.non_causal else [])
    if args.experiment == "strong":  # the same tokens at every P
        total = max(args.world_sizes) * args.shard_length
        forwarded.append(f"--shard-length={total // world}")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world}",
        __file__,
        *forwarded,
        f"--json={out}",
    ]
    # The same CPU threads per rank at every P, so that per-rank times compare.
    threads = (
        1 if args.experiment != "weak" else max(1, (os.cpu_count() or 1) // max(args.world_sizes))
    )
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    result = json.loads(out.read_text())
    result["max_over_ranks"] = summarize(result)
    return result


def print_weak(runs: list[dict]) -> None:
    header = (
        f"{'P':>3} {'seq':>7} | {'fwd s':>7} {'fwd+bwd s':>9} | {'fwd recv':>9} {'fwd sent':>9} "
        f"{'bwd recv':>9} {'bwd sent':>9} {'formula':>9}  (max over ranks; bytes per layer)"
    )
    print(header)
    print("-" * len(header))
    for result in runs:
        summary = result["max_over_ranks"]
        print(
            f"{result['world_size']:>3} {result['seq_len']:>7} | {summary['fwd_s']:7.3f} "
            f"{summary['fwd_bwd_s']:9.3f} | {summary['forward_received']:>9} "
            f"{summary['forward_sent']:>9} {summary['backward_received']:>9} "
            f"{summary['backward_sent']:>9} {result['spec_bytes']:>9.0f}"
        )
    received = [r["max_over_ranks"]["forward_received"] for r in runs if r["world_size"] >= 2]
    if received:
        growth = max(received) / max(1, min(received))
        verdict = "flat" if growth <= FLATNESS else "NOT flat"
        print(f"bytes received per rank, P >= 2: max / min = {growth:.3f} ({verdict})")


def print_overhead(runs: list[dict]) -> None:
    for result in runs:
        ranks = result["ranks"]
        ratio = max(r["sp_s"] / r["one_device_s"] for r in ranks)
        for r in ranks:
            print(
                f"rank {r['rank']}: SP {r['sp_s']:.3f} s, dilated_attention on the shard "
                f"{r['one_device_s']:.3f} s (fwd+bwd)"
            )
        print(f"executor overhead at P = {result['world_size']}: {ratio:.3f}x (worst rank)")


def print_strong(runs: list[dict]) -> None:
    single = next(r for r in runs if r["world_size"] == 1)["max_over_ranks"]["overlap_s"]
    print(f"P = 1: {single:.3f} s fwd+bwd, all {max(r['seq_len'] for r in runs)} tokens")
    for result in runs:
        world, summary = result["world_size"], result["max_over_ranks"]
        if world == 1:
            continue
        for mode in ("overlap", "no_overlap"):
            seconds = summary[f"{mode}_s"]
            print(
                f"P = {world}, {mode.replace('_', ' ')}: {seconds:.3f} s per rank (slowest), "
                f"efficiency {single / (world * seconds):.3f}"
            )


def launch(args) -> None:
    """torchrun once per world size; a table; --json with every run."""
    print(
        f"{args.experiment}: {args.shard_length} tokens per rank, batch {args.batch}, heads "
        f"{args.heads}, head_dim {args.head_dim}, {args.dtype}, causal {not args.non_causal}, "
        f"w {args.segment_lengths}, r {args.dilation_rates}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_world(args, world, Path(tmp)) for world in args.world_sizes]
    {"weak": print_weak, "overhead": print_overhead, "strong": print_strong}[args.experiment](runs)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {key: str(value) for key, value in vars(args).items()}
    args.json.write_text(json.dumps({"args": settings, "runs": runs}, indent=2))
    print(f"wrote {args.json}")


def main() -> None:
    args = parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    if "LOCAL_RANK" in os.environ:
        run_rank(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
