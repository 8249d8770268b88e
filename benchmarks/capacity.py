"""longnet-capacity's estimate against the same training step measured on real CPU tensors.

    OMP_NUM_THREADS=1 python benchmarks/capacity.py [--lengths 1024 4096 8192] [--extrapolation]
    OMP_NUM_THREADS=1 python benchmarks/capacity.py --planner-table   # README's table, ~10 min

Per model, sequence length and activation checkpointing: the estimated peak (the step under
FakeTensorMode with torch's MemTracker, plus the model states of float32 AdamW without ZeRO)
and the measured one (the same tracker over the same step, forward, backward and AdamW, on
real tensors: launch.capacity.measured_peak). --extrapolation also checks the affine
extrapolation beyond EXACT_TOKENS: longnet-125m (bf16, checkpointing; then with the memory
options too) at 4 x EXACT_TOKENS tokens, extrapolated from the exact runs at 1/2 and
1 x EXACT_TOKENS, against its exact run. Each size runs plain, checkpointed, and with the
memory options (FFN tiles, the checkpointed inputs offloaded).

--planner-table prints README's "How long a sequence fits": per preset and device memory, the
longest sequence one device fits and the fewest sequence-parallel devices for 1M, 16M and 1B
tokens (bf16, ZeRO-1 over the SP group, activation checkpointing, FFN_TILE-token FFN tiles,
checkpointed inputs offloaded), and the same search without the options for comparison.
"""

from __future__ import annotations

import argparse
import sys
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


# (checkpointing, FFN tile tokens, offload): plain, checkpointed, and with the memory options
VARIANTS = ((False, 0, False), (True, 0, False), (True, 256, True))
FFN_TILE = 16384  # the planner table's tiles: the peak is elsewhere, 4096 gives the same numbers
TARGETS = (1 << 20, 1 << 24, 10**9)


def compare(lengths: list[int]) -> None:
    print(
        "| model | tokens | checkpointing | FFN tiles | offload | estimated MiB | measured MiB "
        "| error | est. s |"
    )
    print("|---|---:|---|---:|---|---:|---:|---:|---:|")
    for name, base in MODELS.items():
        for n in lengths:
            for checkpointing, tile, offload in VARIANTS:
                config = replace(base, activation_checkpointing=checkpointing)
                config = replace(config, ffn_tile_tokens=tile, offload_checkpoints=offload)
                start = time.perf_counter()
                step = capacity.Step(config, n, zero=0, dtype="fp32")
                estimated = capacity.estimate(step, checkpointing)["per_rank"]["peak"]
                seconds = time.perf_counter() - start
                measured = capacity.measured_peak(config, n)
                print(
                    f"| {name} | {n} | {checkpointing} | {tile or '-'} | {offload} | "
                    f"{estimated / 2**20:.1f} | {measured / 2**20:.1f} | "
                    f"{estimated / measured - 1:+.2%} | {seconds:.1f} |"
                )


def extrapolation() -> None:
    n = 4 * capacity.EXACT_TOKENS
    plain = LongNetConfig.preset("longnet-125m", activation_checkpointing=True)
    options = replace(plain, ffn_tile_tokens=FFN_TILE, offload_checkpoints=True)
    for label, config in (("", plain), (", FFN tiles, offload", options)):
        guessed = capacity.step_memory(config, n, 1, "bf16")
        exact = capacity.fake_step(config, n, 1, "bf16")
        print(
            f"\nlongnet-125m, bf16, checkpointing{label}, {n} tokens: {guessed['method']} vs "
            f"exact run"
        )
        for key in ("activations", "temporaries", "attention_workspace", "host_offload"):
            g, e = guessed[key] / 2**30, exact[key] / 2**30
            error = f"{g / e - 1:+.2%}" if e else "-"
            print(f"  {key:20s} {g:8.3f} GiB vs {e:8.3f} GiB ({error})")


def tokens(n: int) -> str:
    """1048576 -> '1.05M' (decimal: 1M = 10^6), 10^9 -> '1B'."""
    for size, unit in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def planner_table(presets: list[str], memories: list[str]) -> None:
    """The longest sequence on one device and the SP degree per target, with the memory options
    and without them (ZeRO-1 over the SP group, bf16, activation checkpointing)."""
    print(
        "| model | device | options | longest sequence, 1 device | its host memory | "
        "devices for 1M | for 16M | for 1B |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name in presets:
        for options in (True, False):
            config = LongNetConfig.preset(name, activation_checkpointing=True)
            if options:
                config = replace(config, ffn_tile_tokens=FFN_TILE, offload_checkpoints=True)
            for memory in memories:
                start = time.perf_counter()
                step = capacity.Step(config, 1, zero=1, device_memory=capacity.parse_bytes(memory))
                longest = capacity.max_seq_len(step, True)
                host = "-"
                if longest and options:
                    rank = capacity.estimate(replace(step, seq_len=longest), True)["per_rank"]
                    host = f"{rank['host_memory']['offloaded_checkpoints'] / 2**30:.0f} GiB"
                cells = [tokens(longest) if longest else "none fits", host]
                for target in TARGETS:
                    found = capacity.target_sp(step, True, target)
                    cells.append(f"{found[0]:,}" if found else "> 2^20")
                label = "tiles + offload" if options else "checkpointing only"
                print(f"| {name} | {memory} | {label} | {' | '.join(cells)} |", flush=True)
                print(f"  ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--extrapolation", action="store_true")
    parser.add_argument("--planner-table", action="store_true", help="README's table only")
    parser.add_argument(
        "--presets", nargs="+", default=["longnet-125m", "longnet-350m", "longnet-2.7b"]
    )
    parser.add_argument("--memories", nargs="+", default=["80GB", "141GB"])
    args = parser.parse_args()
    if args.planner_table:
        planner_table(args.presets, args.memories)
        return
    compare(args.lengths)
    if args.extrapolation:
        extrapolation()


if __name__ == "__main__":
    main()
