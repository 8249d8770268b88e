"""Sample text from a trained run.

    python launch/generate.py runs/tiny-cpu --prompt "def " --max-new-tokens 200 [--top-k 1]

Loads the run's config.yaml and its latest complete checkpoint (or --checkpoint step_*), rebuilds
the model and the tokenizer, and samples with the key/value cache of longnet.generation.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from longnet import LongNetLM
from longnet.launch import checkpoint
from longnet.launch.config import load_config
from longnet.launch.data import make_tokenizer


def load_weights(directory: Path, tag: str) -> dict[str, torch.Tensor]:
    """The model's float32 weights from a DeepSpeed checkpoint of any ZeRO stage."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if list((directory / tag).glob("*optim_states.pt")):  # ZeRO 1-3: merge the shards
        return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    states = torch.load(directory / tag / "mp_rank_00_model_states.pt", weights_only=False)
    return {name: value.float() for name, value in states["module"].items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="the run's output_dir")
    parser.add_argument("--checkpoint", help="a step_* folder name (default: the latest)")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = load_config(args.run / "config.yaml")
    directory = checkpoint.checkpoint_dir(args.run)
    steps = checkpoint.complete_steps(directory)
    if args.checkpoint is None and not steps:
        sys.exit(f"error: {args.run} has no complete checkpoint")
    tag = args.checkpoint or checkpoint.tag(steps[-1])
    model = LongNetLM(config.model.build())
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds only the sampled text
        model.load_state_dict(load_weights(directory, tag))
    model.eval()
    tokenizer = make_tokenizer(config.data.tokenizer)
    torch.manual_seed(args.seed)
    prompt = torch.tensor([tokenizer.encode(args.prompt)])
    tokens = model.generate(prompt, args.max_new_tokens, args.temperature, args.top_k)
    print(tokenizer.decode(tokens[0].tolist()))


if __name__ == "__main__":
    main()
