"""Training throughput of the LongNet language model, and the longest context one device trains.

    python benchmarks/lm_throughput.py [--device cuda] [--dtype bfloat16] [--preset longnet-125m]
        [--seq-len 32768] [--max-seq-len N] [--time-budget 120] [--json FILE]

1. Training tokens per second at --seq-len (batch 1; forward, backward and AdamW step; best of
   --steps after a warm-up step, the two models interleaved): the preset's dilated attention
   against the same model with dense attention (one pattern, w = seq_len, r = 1).
2. With activation checkpointing on, the sequence length doubles from --seq-len until a step
   runs out of memory, the next step would overrun --time-budget, or --max-seq-len is passed:
   the longest length that trained, with its tokens per second and peak memory (one step each).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from attention import PeakMemory

from longnet import LongNetConfig, LongNetLM


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="longnet-125m", choices=LongNetConfig.PRESETS)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--max-seq-len", type=int, default=1 << 26)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model (best kept)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--time-budget", type=float, default=120.0, help="seconds for part 2")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/lm_throughput.json"))
    return parser.parse_args()


class Trainer:
    """One model and its optimizer on random tokens; step(n) trains on n tokens."""

    def __init__(self, config: LongNetConfig, args):
        torch.manual_seed(0)
        self.device = torch.device(args.device)
        self.model = LongNetLM(config).to(self.device, getattr(torch, args.dtype)).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.vocab_size = config.vocab_size

    def step(self, seq_len: int) -> float:
        """Seconds of one training step on seq_len random tokens."""
        tokens, labels = torch.randint(0, self.vocab_size, (2, 1, seq_len), device=self.device)
        start = time.perf_counter()
        self.model(tokens, labels, return_logits=False).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def throughput(args, config: LongNetConfig) -> dict:
    """Part 1: best step time, tokens per second and peak memory, dilated and dense."""
    n = args.seq_len
    configs = {
        "dilated": config,
        "dense": LongNetConfig.preset(args.preset, segment_lengths=(n,), dilation_rates=(1,)),
    }
    trainers = {name: Trainer(c, args) for name, c in configs.items()}
    results = {}
    for name, trainer in trainers.items():
        with PeakMemory(trainer.device) as memory:
            trainer.step(n)  # warm-up: allocator, kernel choice, plans
        results[name] = {"step_s": float("inf"), "peak_bytes": memory.peak}
    for _ in range(args.steps):
        for name, trainer in trainers.items():
            results[name]["step_s"] = min(results[name]["step_s"], trainer.step(n))
    for name, result in results.items():
        result["tokens_per_s"] = n / result["step_s"]
        c = configs[name]
        result["patterns"] = [list(c.segment_lengths), list(c.dilation_rates)]
    results["speedup"] = results["dense"]["step_s"] / results["dilated"]["step_s"]
    return results


def longest(args, result: dict) -> None:
    """Part 2 into result["longest"]: one checkpointed training step per length, doubling until
    one fails; saved after each length, so what a killed run measured survives it."""
    trainer = Trainer(LongNetConfig.preset(args.preset, activation_checkpointing=True), args)
    rows, stopped, start, seq_len, last = [], None, time.perf_counter(), args.seq_len, 0.0
    result["longest"] = {"rows": rows, "longest_seq_len": 0, "stopped": None}
    while True:
        if seq_len > args.max_seq_len:
            stopped = f"--max-seq-len {args.max_seq_len} reached"
            break
        # A step costs at least linear time, and attention's planning a little more.
        if time.perf_counter() - start + 2.2 * last > args.time_budget:
            stopped = f"the step at {seq_len} tokens would overrun --time-budget {args.time_budget}"
            break
        try:
            with PeakMemory(trainer.device) as memory:
                last = trainer.step(seq_len)
        except (torch.OutOfMemoryError, MemoryError):
            stopped = f"out of memory at {seq_len} tokens"
            break
        rows.append(
            {
                "seq_len": seq_len,
                "step_s": last,
                "tokens_per_s": seq_len / last,
                "peak_bytes": memory.peak,
            }
        )
        print(f"{seq_len:>10} {last:9.2f} {seq_len / last:10.0f} {memory.peak / 2**20:10.0f}")
        result["longest"]["longest_seq_len"] = seq_len
        save(args, result)
        seq_len *= 2
    result["longest"]["stopped"] = stopped
    save(args, result)


def save(args, result: dict) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


def main() -> None:
    args = parse_args()
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    label = f"{args.preset}, {device}, {args.dtype}"
    print(f"{label}: training steps of batch 1 (forward, backward, AdamW)")
    part1 = throughput(args, LongNetConfig.preset(args.preset))
    print(f"{'at ' + str(args.seq_len):>10} {'step s':>9} {'tokens/s':>10} {'peak MiB':>10}")
    for name in ("dilated", "dense"):
        r = part1[name]
        w, rates = r["patterns"]
        print(
            f"{name:>10} {r['step_s']:9.3f} {r['tokens_per_s']:10.0f} "
            f"{r['peak_bytes'] / 2**20:10.0f}  w {w}, r {rates}"
        )
    print(f"dilated / dense tokens per second: {part1['speedup']:.2f}x")
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    config_fields = {k: v for k, v in vars(args).items() if k != "json"}
    result = {"label": label, "config": config_fields, "throughput": part1}
    save(args, result)
    print("\nlongest context, activation checkpointing on:")
    print(f"{'seq':>10} {'step s':>9} {'tokens/s':>10} {'peak MiB':>10}")
    longest(args, result)
    part2 = result["longest"]
    print(f"longest trained: {part2['longest_seq_len']} tokens ({part2['stopped']})")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
