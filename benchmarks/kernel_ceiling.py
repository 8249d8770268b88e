"""The speedup dilated attention could reach on this machine's fused kernel, and what it reaches.

    python benchmarks/kernel_ceiling.py [--seq-len 32768] [--repeats 3]

Times only the fused attention calls that longnet.dilated_attention makes (forward and backward,
on the views it passes; the backward uses each call's own output and log-sum-exp, the same
work as with the merged ones), against the one dense causal call, both best of --repeats
interleaved rounds. Their ratio is the ceiling on the measured speedup: everything else the
dilated layer does (merging, gradient accumulation) only lowers it. It also prints each call's
throughput in attended (query, key) pairs per second next to the dense call's, which shows how
much less efficient the kernel is on short causal segments than on one long one.
"""

from __future__ import annotations

import argparse
import time

import torch

from longnet.config import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS
from longnet.engine import own_keys, queries
from longnet.kernels import attention_backward, attention_forward, resolve_backend
from longnet.plan import make_plan


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def kernel_call(name: str, pairs: int, inputs, grad, scale: float, kernel: str):
    """(name, pairs, forward, backward) of one fused call on q, k, v = inputs (b, h, n, d)."""
    out, lse = attention_forward(*inputs, causal=True, scale=scale, kernel=kernel)

    def forward():
        attention_forward(*inputs, causal=True, scale=scale, kernel=kernel)

    def backward():
        attention_backward(grad, *inputs, out, lse, causal=True, scale=scale, kernel=kernel)

    return name, pairs, forward, backward


def kernel_calls(q, k, v, grad, kernel):
    """The fused calls of dilated attention, then the dense one; q, k, v, grad (b, n, h, d)."""
    scale = q.shape[-1] ** -0.5
    calls = []
    _, n, heads, _ = q.shape
    patterns = tuple(zip(PAPER_SEGMENT_LENGTHS, PAPER_DILATION_RATES, strict=True))
    for call in make_plan(n, heads, k.shape[2], patterns, True).local:
        block = call.blocks[0]
        inputs = (queries(call, q), own_keys(call, k), own_keys(call, v))
        segment_heads = sum(b.num_segments * b.num_heads for b in call.blocks)
        pairs = segment_heads * block.count * (block.count + 1) // 2
        name = f"w={block.segment_length} r={block.rate} c={block.count}"
        calls.append(kernel_call(name, pairs, inputs, queries(call, grad), scale, kernel))
    dense = [x.transpose(1, 2) for x in (q, k, v, grad)]  # (b, h, n, d)
    pairs = heads * n * (n + 1) // 2
    calls.append(kernel_call("dense", pairs, dense[:3], dense[3], scale, kernel))
    return calls


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    shape = (1, args.seq_len, args.heads, args.head_dim)  # (b, n, h, d)
    q, k, v, grad = (torch.randn(shape) for _ in range(4))
    kernel = resolve_backend("auto", q, k, v, causal=True)
    calls = kernel_calls(q, k, v, grad, kernel)
    best = [[float("inf"), float("inf")] for _ in calls]
    for _ in range(args.repeats):
        for times, (_, _, forward, backward) in zip(best, calls, strict=True):
            times[0] = min(times[0], timed(forward))
            times[1] = min(times[1], timed(backward))
    print(f"seq {args.seq_len}, heads {args.heads}, head_dim {args.head_dim}, kernel {kernel}")
    print(f"{'call':>24} {'pairs':>12} {'fwd s':>7} {'bwd s':>7} {'fwd Gpair/s':>11} {'bwd':>6}")
    for (name, pairs, _, _), (fwd, bwd) in zip(calls, best, strict=True):
        print(
            f"{name:>24} {pairs:12d} {fwd:7.3f} {bwd:7.3f} {pairs / fwd / 1e9:11.3f} "
            f"{pairs / bwd / 1e9:6.3f}"
        )
    dilated_pairs = sum(pairs for _, pairs, _, _ in calls[:-1])
    dilated_s = sum(fwd + bwd for fwd, bwd in best[:-1])
    dense_s = sum(best[-1])
    ideal = calls[-1][1] / dilated_pairs
    speedup = dense_s / dilated_s
    print(
        f"fwd+bwd: dilated calls {dilated_s:.3f} s, dense {dense_s:.3f} s: kernel-only speedup "
        f"{speedup:.2f}x of the ideal {ideal:.2f}x ({100 * speedup / ideal:.0f}%)"
    )


if __name__ == "__main__":
    main()
