"""Does a model use its context? Four measurements on held-out data.

    python launch/evaluate.py RUN_OR_MODEL_DIR --tasks perplexity,positions,copy,passkey \\
        --context-lengths 256,1024,4096 --output eval.json

Under torchrun or deepspeed every rank holds a slice of each window (sequence parallelism, for
contexts one process cannot hold): perplexity, positions and copy; passkey decodes in one process.
The model runs on the device, and the ranks talk over the backend, that training uses
(longnet.launch.runtime: CUDA and NCCL on GPUs, gloo on CPUs).

RUN_OR_MODEL_DIR is a run folder (its latest complete checkpoint, its corpus) or an exported
model folder (the corpus of --data-config, default the stdlib with the byte tokenizer). Windows
are the first rows of the validation split (a random sample, the same for every model).

    perplexity  loss, perplexity and bits per byte at each context length, always on the SAME
                targets: the last min(context) tokens of each window of max(context) tokens;
                only the amount of text before them changes
    positions   mean loss by position in the max(context) windows, in buckets [0, 64),
                [64, 128), [128, 256), ... (a model that uses its context keeps falling)
    copy        a random string of COPY_LENGTH letters and digits, text, the same string again
                ending the window: loss on the second copy against the distance between the
                copies' starts; its first two tokens are left out (the first is unpredictable,
                and one token does not yet tell which earlier text is being repeated)
    passkey     a key planted at a depth in a window (longnet.launch.data.passkey), the question
                at its end, the answer decoded greedily through the cached decoder: exact-match
                accuracy per (context, depth)

Writes the JSON and, next to it, PNG plots (launch/plot.py's plot_evaluation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from longnet import LongNetLM
from longnet.distributed import ProcessGrid, check_layout
from longnet.launch import cli, runtime
from longnet.launch.config import load_config
from longnet.launch.data import Corpus, DataConfig, load
from longnet.launch.data.passkey import KEY, QUESTION, plant, random_key
from longnet.launch.plot import plot_evaluation

TASKS = ("perplexity", "positions", "copy", "passkey")
COPY_LENGTH = 32
COPY_ALPHABET = string.ascii_letters + string.digits
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def load_model(
    path: Path, data_config: Path | None, hashes: bool = True
) -> tuple[LongNetLM, DataConfig]:
    """The model in eval mode (a run's checkpoint verified, with content hashes when `hashes`)
    and the data config of its corpus: --data-config's, else the run's (an exported model's
    default: the stdlib with the byte tokenizer)."""
    model, run = runtime.load(path, hashes=hashes)
    if data_config:
        return model, load_config(data_config).data
    return model, run.data if run else DataConfig()


@torch.no_grad()
def token_losses(
    model: LongNetLM, tokens: torch.Tensor, batch_size: int, grid: ProcessGrid | None = None
) -> torch.Tensor:
    """tokens (b, n + 1) -> the cross-entropy of each next token (b, n), float32, on the CPU.
    Under sequence parallelism (grid, see sequence_parallel) each rank runs its slice of every
    window."""
    device = next(model.parameters()).device
    parts = []
    for chunk in tokens.split(batch_size):
        pair = {"inputs": chunk[:, :-1], "targets": chunk[:, 1:]}
        mine, offset = runtime.shard(pair, grid, device)
        logits = model(mine["inputs"], position_offset=offset).logits.float()  # (b, n / sp, V)
        losses = F.cross_entropy(logits.transpose(1, 2), mine["targets"], reduction="none")
        parts.append(runtime.unshard(losses, grid).cpu())  # (b, n)
    return torch.cat(parts)


def sequence_parallel(
    model: LongNetLM, tasks: list[str], contexts: list[int]
) -> tuple[LongNetLM, ProcessGrid | None]:
    """Under torchrun or deepspeed (WORLD_SIZE > 1): the process group of every rank, on the
    trainer's backend (runtime.start), and the model on sequence-parallel attention, each rank
    holding 1/world of each window; the contexts must split (ValueError before any work). One
    process: the model as it is, no grid."""
    world = runtime.world_size()
    if world == 1:
        return model, None
    if "passkey" in tasks:
        raise ValueError("--tasks passkey decodes in one process: run it without a launcher")
    config = model.config
    for context in contexts:
        try:
            check_layout(config.segment_lengths, config.dilation_rates, context, world)
        except ValueError as error:
            raise ValueError(f"--context-lengths {context} cannot be split: {error}") from None
    grid = runtime.start(sequence_parallel=world)
    return rebuilt(model, attention_fn=runtime.attention(grid)), grid


def rebuilt(model: LongNetLM, attention_fn=None, **patterns) -> LongNetLM:
    """The same weights with another attention function or other attention patterns
    (segment_lengths, dilation_rates: they hold no parameters), in eval mode."""
    config = dataclasses.replace(model.config, **patterns)
    other = LongNetLM(config, **({"attention_fn": attention_fn} if attention_fn else {}))
    other.load_state_dict(model.state_dict())
    return other.eval()


def windows(corpus: Corpus, length: int, count: int) -> torch.Tensor:
    """The first `count` validation rows of `length` tokens, with their next token: (count,
    length + 1). ValueError when the split holds fewer."""
    rows = corpus.validation_rows(length, max_rows=count)
    if len(rows["labels"]) < count:
        raise ValueError(
            f"the validation split holds {len(rows['labels'])} windows of {length} tokens, "
            f"fewer than --windows {count}: use fewer windows or shorter contexts"
        )
    return torch.cat([rows["input_ids"], rows["labels"][:, -1:]], dim=1)


def evaluate_perplexity(
    model, corpus, contexts, count, batch_size, grid=None
) -> tuple[dict, torch.Tensor]:
    """({context: {loss, perplexity, bits_per_byte, tokens}}, losses of the longest windows)."""
    longest, scored = max(contexts), min(contexts)
    tokens = windows(corpus, longest, count)  # (N, longest + 1)
    results, full = {}, None
    for context in sorted(contexts):
        window = tokens[:, longest - context :]
        losses = token_losses(model, window, batch_size, grid)  # (N, context)
        if context == longest:
            full = losses
        loss = losses[:, -scored:].double().mean().item()
        results[str(context)] = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": corpus.bits_per_byte(loss),
            "tokens": losses[:, -scored:].numel(),
        }
    return results, full


def position_buckets(losses: torch.Tensor, first: int = 64) -> list[dict]:
    """losses (N, n) -> mean loss over [0, first), [first, 2 first), [2 first, 4 first), ..."""
    n, edges = losses.shape[1], [0, first]
    while edges[-1] < n:
        edges.append(min(2 * edges[-1], n))
    edges[1] = min(edges[1], n)
    return [
        {"start": a, "end": b, "loss": losses[:, a:b].double().mean().item()}
        for a, b in zip(edges, edges[1:], strict=False)
        if b > a
    ]


def copy_distances(longest: int) -> list[int]:
    """Distances between the copies' starts: doubling from 2 COPY_LENGTH, and the farthest."""
    distances, distance = [], 2 * COPY_LENGTH
    while distance + COPY_LENGTH <= longest:
        distances.append(distance)
        distance *= 2
    if longest - COPY_LENGTH > distances[-1]:
        distances.append(longest - COPY_LENGTH)
    return distances


def evaluate_copy(
    model, corpus, longest: int, count: int, batch_size: int, seed: int, grid=None
) -> list:
    """[{distance, loss}] of the second copy (from its third token), see the module notes."""
    tokenizer, base = corpus.tokenizer, windows(corpus, longest, count)
    rng = np.random.default_rng([seed, 0xC0B1])
    results = []
    for distance in copy_distances(longest):
        tokens = base.clone()  # (N, longest + 1): inputs and the last label
        for row in tokens:
            text = "".join(rng.choice(list(COPY_ALPHABET), COPY_LENGTH))
            ids = torch.tensor(tokenizer.encode(text))
            second = longest + 1 - len(ids)
            row[second:] = ids
            row[second - distance : second - distance + len(ids)] = ids
        losses = token_losses(model, tokens, batch_size, grid)  # (N, longest)
        loss = losses[:, second + 1 :].double().mean().item()  # labels of copy tokens 3 .. m
        results.append({"distance": distance, "loss": loss})
    return results


@torch.no_grad()
def evaluate_passkey(model, corpus, contexts, depths, count, batch_size, seed) -> tuple[list, list]:
    """([{context, depth, accuracy, digit_accuracy}], one record per window): greedy decoding
    through the cache. A window's record: context, depth, key_position (first token of the
    key's digits), question_position (first token of the question), answer_position (first
    answer token), key, predicted (the decoded tokens as text), exact."""
    results, records, device = [], [], next(model.parameters()).device
    for context in sorted(contexts):
        base = windows(corpus, context, count)  # (N, context + 1)
        for depth in depths:
            rng = np.random.default_rng([seed, context, round(depth * 1000)])
            prompts, answers, keys, starts = [], [], [], []
            for row in base.numpy():
                key = random_key(rng)
                planted, start = plant(row, corpus.tokenizer, key, depth)
                prompts.append(planted[:start])
                answers.append(planted[start:])
                keys.append(key)
                starts.append(key_digits_position(planted, corpus.tokenizer, key))
            prompts, answers = torch.tensor(np.stack(prompts)), torch.tensor(np.stack(answers))
            decoded = torch.cat(
                [
                    model.generate(p.to(device), answers.shape[1], top_k=1)[:, -answers.shape[1] :]
                    for p in prompts.split(batch_size)
                ]
            ).cpu()  # (N, answer)
            right = decoded == answers
            results.append(
                {
                    "context": context,
                    "depth": depth,
                    "accuracy": right.all(dim=1).double().mean().item(),
                    "digit_accuracy": right.double().mean().item(),
                }
            )
            question = len(corpus.tokenizer.encode(QUESTION))
            for i in range(len(keys)):
                records.append(
                    {
                        "context": context,
                        "depth": depth,
                        "key_position": starts[i],
                        "question_position": prompts.shape[1] - question,
                        "answer_position": prompts.shape[1],
                        "key": keys[i],
                        "predicted": corpus.tokenizer.decode(decoded[i].tolist()),
                        "exact": bool(right[i].all()),
                    }
                )
    return results, records


def key_digits_position(planted: np.ndarray, tokenizer, key: str) -> int:
    """The position of the first digit of the key planted in a window."""
    digits = tokenizer.encode(KEY.format(key))
    prefix = len(tokenizer.encode(KEY.split("{}")[0]))
    for start in range(len(planted) - len(digits) + 1):
        if planted[start : start + len(digits)].tolist() == digits:
            return start + prefix
    raise ValueError(f"key {key} not found in its window")


def check_arguments(tasks, contexts, depths) -> None:
    """ValueError naming the bad one; main checks them before any work."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks: unknown {', '.join(unknown)}; tasks: {', '.join(TASKS)}")
    if not contexts or any(c < 2 for c in contexts):
        raise ValueError(f"--context-lengths must be integers >= 2, got {contexts}")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"--depths must lie in [0, 1], got {list(depths)}")
    if "copy" in tasks and max(contexts) < 3 * COPY_LENGTH:
        raise ValueError(f"the copy task needs a context of >= {3 * COPY_LENGTH} tokens")


def evaluate(
    model, corpus, tasks, contexts, count, batch_size, seed=0, depths=DEPTHS, grid=None
) -> dict:
    """The JSON of the module notes (with the model's patterns and parameter count); grid: the
    ranks' sequence-parallel grid (see sequence_parallel), None in one process."""
    check_arguments(tasks, contexts, depths)
    config = model.config
    results = {
        "model": {
            "segment_lengths": list(config.segment_lengths),
            "dilation_rates": list(config.dilation_rates),
            "parameters": model.num_parameters(),
        },
        "windows": count,
        "scored_tokens_per_window": min(contexts),
    }
    start = time.perf_counter()
    if "perplexity" in tasks or "positions" in tasks:
        ppl, full = evaluate_perplexity(model, corpus, contexts, count, batch_size, grid)
        if "perplexity" in tasks:
            results["perplexity"] = ppl
        if "positions" in tasks:
            results["positions"] = position_buckets(full)
    if "copy" in tasks:
        results["copy"] = evaluate_copy(model, corpus, max(contexts), count, batch_size, seed, grid)
    if "passkey" in tasks:
        results["passkey"], results["passkey_windows"] = evaluate_passkey(
            model, corpus, contexts, depths, count, batch_size, seed
        )
    results["seconds"] = time.perf_counter() - start
    return results


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a run's output_dir or an exported folder")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--context-lengths", type=_ints, default=[256, 1024])
    parser.add_argument("--windows", type=int, default=16, help="validation windows per task")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--depths", default=",".join(map(str, DEPTHS)))
    parser.add_argument("--data-config", type=Path, help="a config YAML whose data section to use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--segment-lengths",
        type=_ints,
        help="evaluate the weights with these segment lengths instead (e.g. a model trained at "
        "256 with full attention at 1024: --segment-lengths 1024 --dilation-rates 1)",
    )
    parser.add_argument("--dilation-rates", type=_ints, help="with --segment-lengths")
    parser.add_argument("--output", type=Path, default=Path("eval.json"))
    parser.add_argument(
        "--no-verify-hashes",
        dest="hashes",
        action="store_false",
        help="check a run checkpoint's file sizes only, not their content (huge checkpoints)",
    )
    args = parser.parse_args(argv)
    try:  # every argument first, then the work; bad input: one line, exit status 2
        try:
            depths = [float(d) for d in args.depths.split(",")]
        except ValueError:
            raise ValueError(f"--depths {args.depths!r}: not numbers separated by commas") from None
        if args.windows < 1 or args.batch_size < 1:
            raise ValueError(
                f"--windows and --batch-size must be >= 1, got {args.windows}, {args.batch_size}"
            )
        tasks = args.tasks.split(",")
        check_arguments(tasks, args.context_lengths, depths)
        cli.check_output_file(args.output, "--output")
        if args.data_config:  # a bad file fails before the checkpoint is read
            load_config(args.data_config)
        model, data = load_model(args.model, args.data_config, args.hashes)
        if args.segment_lengths or args.dilation_rates:
            model = rebuilt(
                model,
                segment_lengths=tuple(args.segment_lengths or model.config.segment_lengths),
                dilation_rates=tuple(args.dilation_rates or model.config.dilation_rates),
            )
        model, grid = sequence_parallel(model, tasks, args.context_lengths)
        model = model.to(runtime.device())
        corpus = load(data.for_evaluation())
        windows(corpus, max(args.context_lengths), args.windows)  # enough, before any task runs
        results = evaluate(
            model,
            corpus,
            tasks,
            args.context_lengths,
            args.windows,
            args.batch_size,
            args.seed,
            depths,
            grid,
        )
    except (ValueError, FileNotFoundError) as error:
        cli.fail(error, show=runtime.rank() == 0)
    runtime.finish()
    if runtime.rank():
        return
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    stem = args.output.with_suffix("")
    for path in plot_evaluation({args.model.name: results}, stem.parent, stem.name + "-"):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
