"""Sample text from a trained run or an exported model.

    python launch/generate.py runs/tiny-cpu --prompt "def " --max-new-tokens 200 [--top-k 1]
    python launch/generate.py exported/ --tokenizer byte --prompt "def "

A run folder: its config.yaml and the weights of its latest complete checkpoint (or
--checkpoint step_*), verified against the checkpoint's manifest and read as tensors only (a
ZeRO-3 run is sharded: export it first with launch/export.py). An exported folder (config.json,
model.safetensors): LongNetLM.from_pretrained; its tokenizer is --tokenizer, else the one
export wrote into the folder (byte for a folder without one). Runs on this machine's accelerator
when it has one. Samples with longnet.generation's key/value cache; --temperature 0 (like
--top-k 1) decodes greedily. Every argument is checked before the model loads: bad input ends
with one line `error: ...` and exit status 2.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from longnet import LongNetLM
from longnet.launch import cli, runtime
from longnet.launch.config import load_config
from longnet.launch.data import Tokenizer, make_tokenizer
from longnet.launch.data.tokenizer import exported_tokenizer


def check_sampling(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.temperature < math.inf:  # NaN fails too
        raise ValueError(
            f"--temperature must be > 0, or 0 for greedy decoding, got {args.temperature}"
        )
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1 (1: greedy), got {args.top_k}")
    if not args.prompt:
        raise ValueError("--prompt is empty: generation continues a prompt of at least one token")


def tokenizer_of(args: argparse.Namespace, exported: bool) -> Tokenizer:
    """--tokenizer, else the run's own (an exported model: the one in its folder)."""
    if args.tokenizer is None:
        if exported:
            return exported_tokenizer(args.model)
        return make_tokenizer(load_config(args.model / runtime.RUN_CONFIG).data.tokenizer)
    try:
        return make_tokenizer(args.tokenizer)
    except ValueError as error:
        raise ValueError(f"--tokenizer {args.tokenizer!r}: {error}") from None


def encode_prompt(tokenizer: Tokenizer, prompt: str, vocab_size: int) -> torch.Tensor:
    """(1, n) token ids of the prompt, which the model must know."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the model {vocab_size}: pass the "
            f"tokenizer the model was trained with (--tokenizer)"
        )
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError(f"--prompt {prompt!r} encodes to no tokens")
    return torch.tensor([ids])


def load(args: argparse.Namespace) -> tuple[LongNetLM, torch.Tensor, Tokenizer]:
    """(model, prompt tokens, tokenizer), every argument checked before the model loads."""
    check_sampling(args)
    exported = runtime.is_export(args.model)
    if exported and args.checkpoint:
        raise ValueError(f"--checkpoint names a run's checkpoint; {args.model} is an export")
    tokenizer = tokenizer_of(args, exported)
    model, _ = runtime.load(args.model, args.checkpoint, args.hashes)
    return model, encode_prompt(tokenizer, args.prompt, model.config.vocab_size), tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a run's output_dir or an exported folder")
    parser.add_argument("--checkpoint", help="a run's step_* folder name (default: the latest)")
    parser.add_argument("--tokenizer", help="default: the run's own, or the exported folder's")
    parser.add_argument("--prompt", default="def ", help="the text to continue (not empty)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help=">= 1")
    parser.add_argument("--temperature", type=float, default=0.8, help="> 0; 0: greedy")
    parser.add_argument("--top-k", type=int, default=None, help=">= 1; 1: greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-verify-hashes",
        dest="hashes",
        action="store_false",
        help="check a run checkpoint's file sizes only, not their content (huge checkpoints)",
    )
    args = parser.parse_args(argv)
    try:
        model, prompt, tokenizer = load(args)
    except (ValueError, FileNotFoundError) as error:
        cli.fail(error)
    # temperature 0 is the limit of sharper and sharper sampling: the most likely token.
    temperature, top_k = (1.0, 1) if args.temperature == 0 else (args.temperature, args.top_k)
    torch.manual_seed(args.seed)
    device = runtime.device()
    tokens = model.to(device).generate(prompt.to(device), args.max_new_tokens, temperature, top_k)
    print(tokenizer.decode(tokens[0].tolist()))


if __name__ == "__main__":
    main()
