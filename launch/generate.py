"""Sample text from a trained run or an exported model.

    python launch/generate.py runs/tiny-cpu --prompt "def " --max-new-tokens 200 [--top-k 1]
    python launch/generate.py exported/ --tokenizer byte --prompt "def "

A run folder: its config.yaml and the weights of its latest complete checkpoint (or
--checkpoint step_*), read as tensors only (a ZeRO-3 run is sharded: export it first with
launch/export.py). An exported folder (config.json, model.safetensors): LongNetLM.from_pretrained;
its tokenizer is --tokenizer (default byte). Samples with longnet.generation's key/value cache.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from longnet import LongNetLM
from longnet.launch import checkpoint
from longnet.launch.config import load_config
from longnet.launch.data import make_tokenizer
from longnet.model import CONFIG_FILE


def load_run(run: Path, tag: str | None) -> tuple[LongNetLM, str]:
    """The model of a run's checkpoint and the run's tokenizer spec."""
    config = load_config(run / "config.yaml")
    if config.deepspeed.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ValueError(
            f"{run} trained with ZeRO-3, whose checkpoints hold shards: run "
            f"`python launch/export.py {run} OUT` and pass OUT"
        )
    directory = checkpoint.checkpoint_dir(run)
    steps = checkpoint.complete_steps(directory)
    if tag is None and not steps:
        raise ValueError(f"{run} has no complete checkpoint")
    tag = tag or checkpoint.tag(steps[-1])
    if not (directory / tag / checkpoint.COMPLETE).is_file():
        raise ValueError(f"--checkpoint {tag}: no complete checkpoint of that name in {directory}")
    # ZeRO 0-2 keep the whole model (the weights the forward used) in one file: tensors only.
    states = torch.load(directory / tag / "mp_rank_00_model_states.pt", weights_only=True)
    model = LongNetLM(config.model.build())
    model.load_state_dict({name: value.float() for name, value in states["module"].items()})
    return model.eval(), config.data.tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a run's output_dir or an exported folder")
    parser.add_argument("--checkpoint", help="a run's step_* folder name (default: the latest)")
    parser.add_argument("--tokenizer", help="an exported model's tokenizer (default: byte)")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        if (args.model / CONFIG_FILE).is_file():
            model, tokenizer = LongNetLM.from_pretrained(args.model), args.tokenizer or "byte"
        elif (args.model / "config.yaml").is_file():
            model, tokenizer = load_run(args.model, args.checkpoint)
            tokenizer = args.tokenizer or tokenizer
        else:
            raise ValueError(f"{args.model} is neither a run folder nor an exported model")
    except ValueError as error:
        sys.exit(f"error: {error}")
    tokenizer = make_tokenizer(tokenizer)
    torch.manual_seed(args.seed)
    prompt = torch.tensor([tokenizer.encode(args.prompt)])
    tokens = model.generate(prompt, args.max_new_tokens, args.temperature, args.top_k)
    print(tokenizer.decode(tokens[0].tolist()))


if __name__ == "__main__":
    main()
