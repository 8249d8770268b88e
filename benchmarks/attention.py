"""Dilated attention against dense causal attention, from 8K to 1M tokens and beyond.

    python benchmarks/attention.py [--seq-lens 8192,32768,...] [--device cuda] [--dtype bfloat16]
        [--heads 8] [--head-dim 64] [--json FILE] [--plot PNG [--plot-with OTHER.json ...]]

Per sequence length: forward and forward+backward time and peak memory of
longnet.dilated_attention and of torch's dense causal scaled_dot_product_attention (run in the
same process; dense stops once one of its runs exceeds --dense-time-limit seconds), the measured
speedup and the ideal ratio of attended (query, key) pairs, which is the FLOP ratio. Also time
and memory per token relative to the reference length (--linear-reference), which stay flat when
the cost is linear. Times are the best of --repeats rounds that interleave dilated and dense runs,
so a slow phase of a shared machine hits both alike. Peak memory comes from a first, untimed run:
CUDA's allocator peak, or on CPU the growth of the peak resident set (VmHWM) of this process.

Achieved TFLOP/s count only the pairs each computes (dilated: the kept pairs of its patterns):
4 d FLOPs per pair forward, 2.5 times that backward (flash attention's convention). A length that
runs out of memory ends the dense runs (or, for dilated attention, the run); no new length
starts once --total-budget seconds have passed. --plot draws time per token and peak memory
against the sequence length (benchmarks/plot_attention.py), with other runs' JSON files.
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
from plot_attention import plot

from longnet import dilated_attention
from longnet.config import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS

# Attention FLOPs per (query, key) pair and head_dim: QK^T and PV forward; backward 2.5 times.
FORWARD_FLOPS, FORWARD_BACKWARD_FLOPS = 4, 14


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
    parser.add_argument(
        "--backend", default="auto", help="dilated_attention's backend (auto, fused, math, triton)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best is kept)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=300.0,
        help="no further rounds at a length once its rounds took this many seconds",
    )
    parser.add_argument("--dense-time-limit", type=float, default=120.0)
    parser.add_argument("--linear-reference", type=int, default=32768)
    parser.add_argument(
        "--total-budget", type=float, help="no new length starts once the run took this long (s)"
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/attention.json"))
    parser.add_argument("--plot", type=Path, help="draw this run (and --plot-with runs) here")
    parser.add_argument("--plot-with", type=Path, nargs="*", default=[], metavar="JSON")
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
    """(dense, dilated) count of attended (query, key) pairs summed over heads: the FLOP ratio.

    From the definition: pattern (w, r) cuts segments of w tokens (the last may be shorter);
    head j keeps c = len(range(j mod r, L, r)) positions of a segment of L tokens, which attend
    each other (c (c + 1) / 2 pairs when causal)."""
    causal = not args.non_causal

    def pairs(count: int) -> int:
        return count * (count + 1) // 2 if causal else count * count

    dilated = 0
    for w, r in zip(args.segment_lengths, args.dilation_rates, strict=True):
        w = min(w, seq_len)
        full, tail = divmod(seq_len, w)
        for length, segments in ((w, full), (tail, 1)):
            kept = (len(range(head % r, length, r)) for head in range(args.heads))
            dilated += segments * sum(pairs(c) for c in kept)
    return args.heads * pairs(seq_len), dilated


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
                q, k, v, args.segment_lengths, args.dilation_rates, causal=causal,
                backend=args.backend,
            )  # fmt: skip

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


def summary(case: dict[str, Timed], pairs: int, args) -> dict:
    """Best times, peaks and achieved TFLOP/s of one function over `pairs` attended pairs."""
    flops = pairs * args.batch * args.head_dim
    return {
        "fwd_s": case["fwd"].best,
        "fwd_peak_bytes": case["fwd"].peak,
        "fwd_tflops": FORWARD_FLOPS * flops / case["fwd"].best / 1e12,
        "fwd_bwd_s": case["fwd_bwd"].best,
        "fwd_bwd_peak_bytes": case["fwd_bwd"].peak,
        "fwd_bwd_tflops": FORWARD_BACKWARD_FLOPS * flops / case["fwd_bwd"].best / 1e12,
    }


def label(args) -> str:
    """The device, dtype and heads of this run, as plots and reports name it."""
    if args.device.startswith("cuda"):
        device = torch.cuda.get_device_name(torch.device(args.device))
    else:
        device = f"{args.device} ({torch.get_num_threads()} threads)"
    backend = "" if args.backend == "auto" else f", backend {args.backend}"
    return f"{device}, {args.dtype}, {args.heads}x{args.head_dim}{backend}"


def measure(args, seq_len: int, dense: bool) -> dict[str, Timed] | None:
    """make_cases, or None when the device runs out of memory."""
    try:
        return make_cases(args, seq_len, dense)
    except (torch.OutOfMemoryError, MemoryError):
        pass  # leaving the handler drops the traceback's frames, and the tensors they hold
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return None


def print_row(row: dict) -> None:
    def cells(times: dict | None) -> str:
        if times is None:
            return f"{'-':>10} {'-':>9} {'-':>7} {'-':>9}"
        return (
            f"{times['fwd_s']:9.3f}s {times['fwd_bwd_s']:8.3f}s {times['fwd_bwd_tflops']:7.3f} "
            f"{times['fwd_bwd_peak_bytes'] / 2**20:9.0f}"
        )

    ratio = f"{'-':>7} {row['ideal_ratio']:6.2f} {'-':>6}"
    if "speedup_fwd_bwd" in row:
        pct = 100 * row["speedup_fwd_bwd"] / row["ideal_ratio"]
        ratio = f"{row['speedup_fwd_bwd']:6.2f}x {row['ideal_ratio']:6.2f} {pct:5.0f}%"
    print(
        f"{row['seq_len']:>8} | {cells(row['dilated'])} | {cells(row.get('dense'))} | {ratio}",
        flush=True,
    )


def save(args, run_label: str, rows: list[dict], stopped: str | None) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("json", "plot", "plot_with")}
    result = {"label": run_label, "config": config, "rows": rows, "stopped": stopped}
    args.json.write_text(json.dumps(result, indent=2))


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    start, rows, dense_on, stopped = time.perf_counter(), [], True, None
    run_label = label(args)
    header = (
        f"{'seq':>8} | {'dilated fwd':>10} {'fwd+bwd':>9} {'TFLOP/s':>7} {'peak MiB':>9} | "
        f"{'dense fwd':>10} {'fwd+bwd':>9} {'TFLOP/s':>7} {'peak MiB':>9} | "
        f"{'speedup':>7} {'ideal':>6} {'%ideal':>6}"
    )
    print(
        f"{run_label}, batch {args.batch}, causal {not args.non_causal}, "
        f"w {args.segment_lengths}, r {args.dilation_rates}, threads {torch.get_num_threads()}"
    )
    print(header)
    print("-" * len(header))
    for seq_len in args.seq_lens:
        if args.total_budget is not None and time.perf_counter() - start >= args.total_budget:
            stopped = f"time budget of {args.total_budget:.0f} s spent before {seq_len} tokens"
            break
        cases = {"dilated": measure(args, seq_len, dense=False)}
        if cases["dilated"] is None:
            stopped = f"out of memory at {seq_len} tokens"
            break
        if dense_on:
            cases["dense"] = measure(args, seq_len, dense=True)
            dense_on = cases["dense"] is not None
            if not dense_on:
                print(f"(dense attention: out of memory at {seq_len} tokens)")
                del cases["dense"]
        run_cases(cases, args.repeats, args.time_budget)
        dense_pairs, dilated_pairs = attended_pairs(args, seq_len)
        pairs = {"dilated": dilated_pairs, "dense": dense_pairs}
        row = {"seq_len": seq_len}
        row.update({name: summary(case, pairs[name], args) for name, case in cases.items()})
        cases.clear()  # frees the inputs before the next length
        row["ideal_ratio"] = dense_pairs / dilated_pairs
        if "dense" in row:
            row["speedup_fwd_bwd"] = row["dense"]["fwd_bwd_s"] / row["dilated"]["fwd_bwd_s"]
            dense_on = row["dense"]["fwd_bwd_s"] <= args.dense_time_limit
        rows.append(row)
        print_row(row)
        save(args, run_label, rows, None)  # what a killed run measured survives it
    if stopped:
        print(f"stopped: {stopped}")

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

    save(args, run_label, rows, stopped)
    print(f"\nwrote {args.json}")
    if args.plot:
        plot([args.json, *args.plot_with], args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
