"""Memory and time of the language-model loss with full logits against the chunked loss.

    python benchmarks/lm_loss.py [--seq-len 8192] [--vocab-size 50304] [--layers 1]

One forward+backward of LongNetLM (the longnet-125m shape, --layers blocks) on random tokens, with
return_logits=True (the (tokens x vocabulary) logits are held) and with return_logits=False (the
trainer's chunked loss), alternately, --repeats times each. Prints the loss (which must agree),
the best time and the peak resident-set growth (CPU) or allocator peak (CUDA) of each.
"""

from __future__ import annotations

import argparse
import time

import torch
from attention import PeakMemory

from longnet import LongNetConfig, LongNetLM


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--vocab-size", type=int, default=50304)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    config = LongNetConfig.preset(
        "longnet-125m",
        num_layers=args.layers,
        vocab_size=args.vocab_size,
        segment_lengths=[2048, 4096, 8192],
        dilation_rates=[1, 2, 4],
    )
    torch.manual_seed(0)
    model = LongNetLM(config).to(device)
    tokens, labels = (
        torch.randint(0, args.vocab_size, (1, args.seq_len), device=device) for _ in range(2)
    )
    best = {True: (float("inf"), 0, 0.0), False: (float("inf"), 0, 0.0)}
    for _ in range(args.repeats):
        for return_logits in (True, False):
            model.zero_grad(set_to_none=True)
            with PeakMemory(device) as memory:
                start = time.perf_counter()
                output = model(tokens, labels, return_logits=return_logits)
                output.loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - start
            loss = output.loss.item()
            del output
            fastest, peak, _ = best[return_logits]
            best[return_logits] = (min(fastest, seconds), max(peak, memory.peak), loss)
    print(f"seq {args.seq_len}, vocab {args.vocab_size}, layers {args.layers}, {device.type}")
    for return_logits, (seconds, peak, loss) in best.items():
        name = "full logits" if return_logits else "chunked"
        mib = peak / 2**20
        print(f"{name:>12}: loss {loss:.6f}  fwd+bwd {seconds:6.2f} s  peak {mib:7.0f} MiB")


if __name__ == "__main__":
    main()
