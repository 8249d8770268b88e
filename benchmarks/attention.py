"""Dilated attention against dense causal attention, from 8K to 1M tokens.

    python benchmarks/attention.py [--seq-lens 8192,32768,...] [--device cuda] [--dtype bfloat16]

Per sequence length: forward and forward+backward time and peak memory of
longnet.dilated_attention and of torch's dense causal scaled_dot_product_attention (run in the
same process; dense stops once one of its runs exceeds --dense-time-limit seconds), the measured
speedup and the ideal ratio of attended (query, key) pairs, which is the FLOP ratio. Also time
and memory per token relative to the reference length (--linear-reference), which stay flat when
the cost is linear. Times are the best of --repeats rounds that interleave dilated and dense runs,
so a slow phase of a shared machine hits both alike. Peak memory comes from a first, untimed run:
CUDA's allocator peak, or on CPU the growth of the peak resident set (VmHWM) of this process.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longnet import dilated_attention
from longnet.config import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS
from longnet.dilated import pattern_blocks


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seq-lens",
        type=_ints,
        default=_ints(",".join(str(1024 * k) for k in (8, 16, 32, 64, 128, 256, 512, 1024))),
    )
    parser.add_argument("--segment-lengths", type=_ints, default=list(PAPER_SEGMENT_LENGTHS))
    parser.add_argument("--dilation-rates", type=_ints, default=list(PAPER_DILATION_RATES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--non-causal", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best is kept)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=300.0,
        help="no further rounds at a length once its rounds took this many seconds",
    )
    parser.add_argument("--dense-time-limit", type=float, default=120.0)
    parser.add_argument("--linear-reference", type=int, default=32768)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/attention.json"))
    return parser.parse_args()


class PeakMemory:
    """Peak bytes allocated during a `with` block, on CUDA or (as resident set) on CPU.

    On CPU, free heap pages are first handed back to the OS (malloc_trim) and VmHWM is reset, so
    the growth of the peak resident set over the block is what the block allocated at its peak.
    The allocator keeps its default settings: timed runs see the allocator users get.
    """

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.start = self._status("VmRSS:")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.peak = self._status("VmHWM:") - self.start


class Timed:
    """One function under test: peak memory from a first, untimed run (which also warms up plan
    caches, kernel selection and the allocator), then the best of the timed runs."""

    def __init__(self, fn, reset, device: torch.device):
        self.fn, self.reset, self.device = fn, reset, device
        self.best = float("inf")
        with PeakMemory(device) as memory:
            fn()
        reset()
        self.peak = memory.peak

    def run(self) -> float:
        start = time.perf_counter()
        self.fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        self.reset()
        self.best = min(self.best, seconds)
        return seconds


def attended_pairs(args, seq_len: int) -> tuple[int, int]:
    """(dense, dilated) count of attended (query, key) pairs summed over heads: the FLOP ratio."""
    causal = not args.non_causal
    dense = args.heads * (seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len)
    dilated = 0
    for w, r in zip(args.segment_lengths, args.dilation_rates, strict=True):
        for block in pattern_blocks(seq_len, w, r, args.heads, args.heads, torch.device("cpu")):
            kept = block.count
            per_segment = kept * (kept + 1) // 2 if causal else kept * kept
            dilated += block.num_segments * block.num_heads * per_segment
    return dense, dilated


def make_cases(args, seq_len: int, dense: bool) -> dict[str, Timed]:
    """Forward and forward+backward of dilated (or dense) attention, memory already measured."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    causal = not args.non_causal
    shape = (args.batch, seq_len, args.heads, args.head_dim)  # (b, n, h, d)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in "qkv")
    grad = torch.randn(shape, device=device, dtype=dtype)

    if dense:

        def attend():  # sdpa takes (b, h, n, d)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            )
            return out.transpose(1, 2)
    else:

        def attend():
            return dilated_attention(
                q, k, v, args.segment_lengths, args.dilation_rates, causal=causal
            )

    def forward():
        with torch.no_grad():
            attend()

    def forward_backward():
        attend().backward(grad)

    def reset():
        q.grad = k.grad = v.grad = None

    return {"fwd": Timed(forward, reset, device), "fwd_bwd": Timed(forward_backward, reset, device)}


def run_cases(cases: dict[str, dict[str, Timed]], repeats: int, budget: float) -> None:
    """Timed runs, interleaved across all cases so that slow phases of a shared machine hit them
    alike; stops after `repeats` rounds, or once the rounds so far took `budget` seconds."""
    spent = 0.0
    for _ in range(repeats):
        spent += sum(timed.run() for case in cases.values() for timed in case.values())
        if spent >= budget:
            break


def summary(case: dict[str, Timed]) -> dict:
    return {
        "fwd_s": case["fwd"].best,
        "fwd_peak_bytes": case["fwd"].peak,
        "fwd_bwd_s": case["fwd_bwd"].best,
        "fwd_bwd_peak_bytes": case["fwd_bwd"].peak,
    }


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    rows, dense_on = [], True
    header = (
        f"{'seq':>8} | {'dilated fwd':>11} {'fwd+bwd':>9} {'peak MiB':>9} | "
        f"{'dense fwd':>9} {'fwd+bwd':>9} {'peak MiB':>9} | {'speedup':>7} {'ideal':>6} "
        f"{'%ideal':>6}"
    )
    print(
        f"device {args.device}, dtype {args.dtype}, batch {args.batch}, heads {args.heads}, "
        f"head_dim {args.head_dim}, causal {not args.non_causal}, w {args.segment_lengths}, "
        f"r {args.dilation_rates}, threads {torch.get_num_threads()}"
    )
    print(header)
    print("-" * len(header))
    for seq_len in args.seq_lens:
        cases = {"dilated": make_cases(args, seq_len, dense=False)}
        if dense_on:
            cases["dense"] = make_cases(args, seq_len, dense=True)
        run_cases(cases, args.repeats, args.time_budget)
        row = {"seq_len": seq_len, **{name: summary(case) for name, case in cases.items()}}
        cases.clear()  # frees the inputs before the next length
        dense_pairs, dilated_pairs = attended_pairs(args, seq_len)
        row["ideal_ratio"] = dense_pairs / dilated_pairs
        if "dense" in row:
            row["speedup_fwd_bwd"] = row["dense"]["fwd_bwd_s"] / row["dilated"]["fwd_bwd_s"]
            dense_on = row["dense"]["fwd_bwd_s"] <= args.dense_time_limit
        rows.append(row)
        d = row["dilated"]
        dense_cols = "         -         -         -"
        ratio_cols = "      -" + f" {row['ideal_ratio']:6.2f}" + "      -"
        if "dense" in row:
            e = row["dense"]
            dense_cols = (
                f"{e['fwd_s']:8.3f}s {e['fwd_bwd_s']:8.3f}s {e['fwd_bwd_peak_bytes'] / 2**20:9.0f}"
            )
            pct = 100 * row["speedup_fwd_bwd"] / row["ideal_ratio"]
            ratio_cols = f"{row['speedup_fwd_bwd']:6.2f}x {row['ideal_ratio']:6.2f} {pct:5.0f}%"
        print(
            f"{seq_len:>8} | {d['fwd_s']:10.3f}s {d['fwd_bwd_s']:8.3f}s "
            f"{d['fwd_bwd_peak_bytes'] / 2**20:9.0f} | {dense_cols} | {ratio_cols}",
            flush=True,
        )

    reference = next((r for r in rows if r["seq_len"] == args.linear_reference), None)
    if reference is not None:
        ref = reference["dilated"]
        print(f"\nper token, relative to {args.linear_reference} tokens (1.00 = linear):")
        print(f"{'seq':>8} {'time/token':>11} {'peak/token':>11}")
        for r in rows:
            d, n, n0 = r["dilated"], r["seq_len"], args.linear_reference
            r["time_per_token_rel"] = (d["fwd_bwd_s"] / n) / (ref["fwd_bwd_s"] / n0)
            r["peak_per_token_rel"] = (d["fwd_bwd_peak_bytes"] / n) / (
                ref["fwd_bwd_peak_bytes"] / n0
            )
            print(f"{n:>8} {r['time_per_token_rel']:11.2f} {r['peak_per_token_rel']:11.2f}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "json"}
    args.json.write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
