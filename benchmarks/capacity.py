"""longnet-capacity's estimate against the same training step measured on real CPU tensors.

    OMP_NUM_THREADS=1 python benchmarks/capacity.py [--lengths 1024 4096 8192] [--extrapolation]

Per model, sequence length and activation checkpointing: the estimated peak (the step under
FakeTensorMode with torch's MemTracker, plus the model states of float32 AdamW without ZeRO)
and the measured one (the same tracker over the same step, forward, backward and AdamW, on
real tensors: launch.capacity.measured_peak). --extrapolation also checks the affine
extrapolation beyond EXACT_TOKENS: longnet-125m (bf16, checkpointing) at 4 x EXACT_TOKENS
tokens, extrapolated from the exact runs at 1/2 and 1 x EXACT_TOKENS, against its exact run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from longnet import LongNetConfig
from longnet.launch import capacity

MODELS = {
    "longnet-tiny": LongNetConfig.preset("longnet-tiny"),  # 4 x 128, 0.8M parameters
    "4 x 256": LongNetConfig.preset(
        "longnet-tiny", d_model=256, num_heads=8, ffn_dim=1024, segment_lengths=(256, 512, 1024)
    ),
}


def compare(lengths: list[int]) -> None:
    print("| model | tokens | checkpointing | estimated MiB | measured MiB | error | est. s |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, base in MODELS.items():
        for n in lengths:
            for checkpointing in (False, True):
                config = replace(base, activation_checkpointing=checkpointing)
                start = time.perf_counter()
                step = capacity.Step(config, n, zero=0, dtype="fp32")
                estimated = capacity.estimate(step, checkpointing)["per_rank"]["peak"]
                seconds = time.perf_counter() - start
                measured = capacity.measured_peak(config, n)
                print(
                    f"| {name} | {n} | {checkpointing} | {estimated / 2**20:.1f} | "
                    f"{measured / 2**20:.1f} | {estimated / measured - 1:+.2%} | {seconds:.1f} |"
                )


def extrapolation() -> None:
    config = LongNetConfig.preset("longnet-125m", activation_checkpointing=True)
    n = 4 * capacity.EXACT_TOKENS
    guessed = capacity.step_memory(config, n, 1, "bf16")
    exact = capacity.fake_step(config, n, 1, "bf16")
    print(f"\nlongnet-125m, bf16, checkpointing, {n} tokens: {guessed['method']} vs exact run")
    for key in ("activations", "temporaries", "attention_workspace"):
        g, e = guessed[key] / 2**30, exact[key] / 2**30
        error = f"{g / e - 1:+.2%}" if e else "-"
        print(f"  {key:20s} {g:8.3f} GiB vs {e:8.3f} GiB ({error})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--extrapolation", action="store_true")
    args = parser.parse_args()
    compare(args.lengths)
    if args.extrapolation:
        extrapolation()


if __name__ == "__main__":
    main()
