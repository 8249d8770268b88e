"""Weak scaling of sequence-parallel dilated attention: per-rank time and bytes per layer.

    python benchmarks/sequence_parallel.py [--world-sizes 1,2,4] [--scale 16] [...]
    torchrun --nproc_per_node P benchmarks/sequence_parallel.py [...]   # one world size

The global sequence is P x --shard-length, so every rank does the same work at every P. The
patterns are the paper's, w = {2048, ..., 32768} and r = {1, 2, 4, 6, 12}, divided by --scale
(default 16, for CPUs; use 1 on GPUs), with shards of 16384 / scale tokens: the largest pattern
spans two shards once P >= 2. Per world size: the forward and forward+backward time of one
attention layer (best of --repeats, the slowest rank) and the bytes each rank sent and received
(longnet.distributed.last_communication), next to SPEC.md's formula. Bytes per rank must stay flat
as P and the sequence grow together: that is LongNet's scaling argument (paper section 3.1).

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
from pathlib import Path

import torch
import torch.distributed as dist

from longnet.config import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS
from longnet.distributed import last_communication, sequence_parallel_dilated_attention

FLATNESS = 1.10  # the most bytes per rank may grow between world sizes >= 2


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", type=_ints, default=[1, 2, 4])
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
    if args.shard_length is None:
        args.shard_length = 16384 // args.scale
    args.segment_lengths = [w // args.scale for w in PAPER_SEGMENT_LENGTHS]
    args.dilation_rates = list(PAPER_DILATION_RATES)
    return args


def spec_bytes(args, world: int) -> float:
    """SPEC.md's bytes received per rank and layer, summed over the spanning patterns (the most
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

    def attend():
        return sequence_parallel_dilated_attention(
            q, k, v, args.segment_lengths, args.dilation_rates, causal=not args.non_causal
        )

    def forward():
        with torch.no_grad():
            attend()

    def forward_backward():
        q.grad = k.grad = v.grad = None
        attend().backward(grad)

    row = {
        "rank": rank,
        "fwd_s": measure(forward, device, args.repeats),
        "fwd_bwd_s": measure(forward_backward, device, args.repeats),
        **vars(last_communication()),
    }
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
    ranks = result["ranks"]
    return {
        "fwd_s": max(r["fwd_s"] for r in ranks),
        "fwd_bwd_s": max(r["fwd_bwd_s"] for r in ranks),
        **{
            key: max(r[key] for r in ranks)
            for key in ("forward_sent", "forward_received", "backward_sent", "backward_received")
        },
    }


def launch(args) -> None:
    """torchrun once per world size; one table; --json with every run."""
    print(
        f"weak scaling, {args.shard_length} tokens per rank, batch {args.batch}, heads "
        f"{args.heads}, head_dim {args.head_dim}, {args.dtype}, causal {not args.non_causal}, "
        f"w {args.segment_lengths}, r {args.dilation_rates}"
    )
    header = (
        f"{'P':>3} {'seq':>7} | {'fwd s':>7} {'fwd+bwd s':>9} | {'fwd recv':>9} {'fwd sent':>9} "
        f"{'bwd recv':>9} {'bwd sent':>9} {'SPEC recv':>9}  (max over ranks; bytes per layer)"
    )
    print(header)
    print("-" * len(header))
    runs = []
    # The same CPU threads per rank at every P, so that per-rank times compare.
    threads = max(1, (os.cpu_count() or 1) // max(args.world_sizes))
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.world_sizes:
            out = Path(tmp) / f"P{world}.json"
            forwarded = (
                [
                    f"--{name.replace('_', '-')}={getattr(args, name)}"
                    for name in ("scale", "shard_length", "batch", "heads", "head_dim", "dtype")
                ]
                + [f"--repeats={args.repeats}"]
                + (["--non-causal"] if args.non_causal else [])
            )
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
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            subprocess.run(command, check=True, env=env)
            result = json.loads(out.read_text())
            result["max_over_ranks"] = summary = summarize(result)
            runs.append(result)
            print(
                f"{world:>3} {result['seq_len']:>7} | {summary['fwd_s']:7.3f} "
                f"{summary['fwd_bwd_s']:9.3f} | {summary['forward_received']:>9} "
                f"{summary['forward_sent']:>9} {summary['backward_received']:>9} "
                f"{summary['backward_sent']:>9} {result['spec_bytes']:>9.0f}",
                flush=True,
            )
    received = [r["max_over_ranks"]["forward_received"] for r in runs if r["world_size"] >= 2]
    if received:
        growth = max(received) / max(1, min(received))
        verdict = "flat" if growth <= FLATNESS else "NOT flat"
        print(f"bytes received per rank, P >= 2: max / min = {growth:.3f} ({verdict})")
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
