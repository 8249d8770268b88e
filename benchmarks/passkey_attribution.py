"""Which layers, heads and patterns carry a pass key to the answer (docs/long-context.md).

    python benchmarks/passkey_attribution.py RUN_OR_MODEL_DIR --context 1024 [--windows 40]
        [--eval eval.json] [--output attribution.json] [--rank-span S]

For each window of the pass-key task (the prompts launch/evaluate.py builds, same seed), the
query at the last prompt position (the one that predicts the first digit) attends, in every
layer and head, under each pattern of Eq. 10; this script measures the MIXED attention mass it
puts on the key's five digits through each pattern: a_i * (pattern i's softmax mass on the
digits), a_i = the pattern's share of the mixture (exp(lse_i - lse)). Computed from the q and
k the model really produced (captured through its attention function), in float64.

It also reads eval.json's per-window records (launch/evaluate.py) and reports the accuracy by
(answer query position - key digit position) mod r of the model's widest pattern: whether the
answer query and the key share a head's offset class in the one pattern that reaches them.

Output: JSON with `by_residue` and `mass` ({layer, head, pattern, mass_exact, mass_failed}:
mean mass over the windows decoded exactly and over the others; without --eval every window
counts as failed), `key_block_chosen` (how often the content-selected pattern chose the key's
block, per answer query and per depth), and a printed summary. --rank-span S measures the
choice as if the blocks were ranked by the mean of S queries (select_query_span), the model
otherwise unchanged: what such a ranking would choose with the trained weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from longnet import dilated_attention, selection
from longnet.launch.data import load
from longnet.launch.data.passkey import plant, random_key
from longnet.launch.evaluate import (
    DEPTHS,
    key_digits_position,
    load_model,
    rebuilt,
    windows,
)
from longnet.reference import multiplicity

DIGITS = 5


def by_residue(records: list[dict], context: int, rate: int) -> dict[int, dict]:
    """{(answer query - key digit) mod rate: {windows, exact}} over eval.json's records."""
    table: dict[int, dict] = {}
    for record in records:
        if record["context"] != context:
            continue
        query = record["answer_position"] - 1  # predicts the first digit
        residue = (query - record["key_position"]) % rate
        cell = table.setdefault(residue, {"windows": 0, "exact": 0})
        cell["windows"] += 1
        cell["exact"] += record["exact"]
    return dict(sorted(table.items()))


def by_class(records: list[dict], context: int, rate: int) -> dict[str, dict]:
    """{"query class q, key class k": {windows, first_digit, exact}} over the windows whose key
    lies beyond the first segment (depth < 1): the offset classes (position mod rate) of the
    answer query and of the key's first digit, and how often the first digit comes out right."""
    table: dict[str, dict] = {}
    for record in records:
        if record["context"] != context or record["depth"] == 1.0:
            continue
        query, key = (record["answer_position"] - 1) % rate, record["key_position"] % rate
        cell = table.setdefault(f"query {query}, key {key}", {"windows": 0, "first_digit": 0})
        cell["windows"] += 1
        cell["first_digit"] += record["predicted"][:1] == record["key"][:1]
    return dict(sorted(table.items()))


def digit_accuracy(records: list[dict], context: int) -> list[float]:
    """Accuracy of each of the five answer digits over the windows of depth < 1."""
    far = [r for r in records if r["context"] == context and r["depth"] < 1.0]
    return [sum(r["predicted"][i : i + 1] == r["key"][i] for r in far) / len(far) for i in range(5)]


def choice(q, k, query: int, config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h, m) scaled scores of position `query`'s ranking query (its own, or its mean with the
    select_query_span - 1 before it unless select_span_max, which ranks the blocks by the best
    log-probability those queries give them; the last select_ranking_dims dims) against the
    mean key of each of its m candidate blocks (what the content-selected pattern ranks and the
    pooled one attends), and (h, query + 1) whether it chose each key (None when the pattern is
    off); q, k as in pattern_masses."""
    heads, block = q.shape[1], config.select_block_size
    window = selection.candidate_window(config.segment_lengths, block, config.select_within_segment)
    candidates = selection.candidates(query, window, block)
    q, k = (selection.ranking_part(x, config.select_ranking_dims) for x in (q, k))
    means = selection.block_means(k[None, : candidates * block], block)  # (1, m, h, D)
    span = config.select_query_span
    if config.select_span_max:  # the blocks by the best of S queries, the pooled by its own
        ranking, rows = q[None, query : query + 1], q[None, max(0, query - span + 1) : query + 1]
    else:
        ranking = selection.ranking_queries(q[None, : query + 1], span)[:, query:]  # (1, 1, h, D)
        rows, span = ranking, 1
    scale = 1 / math.sqrt(config.head_dim)
    pooled = torch.einsum("hd,mhd->hm", ranking[0, 0], means[0]) * scale
    if not config.select_top_k:
        return pooled, None
    index, _ = selection.select_blocks(
        rows, means, torch.tensor([query]), block, config.select_top_k, window, span, scale
    )
    best = index[0, 0]  # (h, top_k): every candidate is a real choice here
    chosen = torch.zeros(heads, query + 1, dtype=torch.bool)
    for offset in range(block):
        chosen.scatter_(1, best * block + offset, True)
    return pooled, chosen


def pattern_masses(q, k, query: int, keys: list[int], config) -> torch.Tensor:
    """(h, patterns) mixed attention mass of position `query` on positions `keys`; q (n, h, d),
    k (n, h, d) in float64 (kv heads repeated), the patterns of config (the content-selected
    one, then the pooled one, last when on). The pooled pattern's mass is its mass on the blocks
    that hold the keys."""
    n, heads, dim = q.shape
    scale = 1 / math.sqrt(config.head_dim)
    scores = torch.einsum("hd,nhd->hn", q[query], k[: query + 1]) * scale
    masks = [
        multiplicity(query + 1, heads, [w], [r], causal=True)[:, query] > 0
        for w, r in zip(config.segment_lengths, config.dilation_rates, strict=True)
    ]  # (h, query + 1) each
    pooled, chosen = choice(q, k, query, config)
    if chosen is not None:
        masks.append(chosen)
    columns = [(scores, mask, keys) for mask in masks]
    if config.select_pooled:  # one key per candidate block: its mean key
        block = config.select_block_size
        held = sorted({key // block for key in keys if key // block < pooled.shape[1]})
        columns.append((pooled, torch.ones_like(pooled, dtype=torch.bool), held))
    lse = torch.stack(
        [torch.logsumexp(x.masked_fill(~m, -math.inf), -1) for x, m, _ in columns], -1
    )  # (h, patterns)
    total = torch.logsumexp(lse, -1, keepdim=True)  # (h, 1)
    masses = []
    for i, (x, mask, targets) in enumerate(columns):
        probs = torch.exp(x.masked_fill(~mask, -math.inf) - lse[:, i : i + 1])
        share = torch.exp(lse[:, i] - total[:, 0]).nan_to_num(0.0)
        masses.append(share * probs[:, targets].nan_to_num(0.0).sum(-1))
    return torch.stack(masses, -1)


def capture(model):
    """The model rebuilt with an attention function that records each layer's q and k."""
    captured = []

    def attention(q, k, v, *args, **kwargs):
        captured.append((q.detach(), k.detach()))
        return dilated_attention(q, k, v, *args, **kwargs)

    return rebuilt(model, attention_fn=attention), captured


@torch.no_grad()
def masses(
    model, corpus, context: int, count: int, seed: int, exact: dict, rank_span: int | None = None
) -> list[dict]:
    """Mean mass per (layer, head, pattern) over exactly decoded and failed windows."""
    traced, captured = capture(model)
    config = model.config
    sums = {True: 0.0, False: 0.0}
    counts = {True: 0, False: 0}
    ranked = config
    if rank_span is not None:  # a span of 1 has no best to take
        span_max = config.select_span_max and rank_span > 1
        ranked = dataclasses.replace(config, select_query_span=rank_span, select_span_max=span_max)
    recall = Recall(ranked) if config.select_top_k else None
    base = windows(corpus, context, count)
    for depth in DEPTHS:
        rng = np.random.default_rng([seed, context, round(depth * 1000)])
        for index, row in enumerate(base.numpy()):
            key = random_key(rng)
            planted, start = plant(row, corpus.tokenizer, key, depth)
            digit = key_digits_position(planted, corpus.tokenizer, key)
            captured.clear()
            # the prompt and the first four digits: the queries that predict the five digits
            traced(torch.tensor(planted[: start + DIGITS - 1])[None])
            layers = []
            for q, k in captured:
                q, k = q[0].double(), k[0].double()
                layers.append((q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)))
            keys = list(range(digit, digit + DIGITS))
            per_layer = [pattern_masses(q, k, start - 1, keys, config) for q, k in layers]
            right = exact.get((depth, index), False)
            sums[right] = sums[right] + torch.stack(per_layer)  # (layers, h, patterns)
            counts[right] += 1
            if recall is not None:
                recall.add(layers, start - 1, keys, depth)
    labels = [
        f"{w}/{r}" for w, r in zip(config.segment_lengths, config.dilation_rates, strict=True)
    ]
    if config.select_top_k:
        labels.append(f"selected {config.select_top_k}x{config.select_block_size}")
    if config.select_pooled:
        labels.append(f"pooled {config.select_block_size}")
    rows = []
    mean = {right: sums[right] / max(1, counts[right]) for right in sums}
    for layer in range(config.num_layers):
        for head in range(config.num_heads):
            for p, label in enumerate(labels):
                rows.append(
                    {
                        "layer": layer,
                        "head": head,
                        "pattern": label,
                        "mass_exact": _item(mean[True], counts[True], layer, head, p),
                        "mass_failed": _item(mean[False], counts[False], layer, head, p),
                    }
                )
    return rows, None if recall is None else recall.summary(), counts


class Recall:
    """How often the content-selected pattern chose the key's block for each of the five
    queries that predict the digits, over the windows whose key lies in a candidate block of
    the first of them (beyond its segment of the first pattern)."""

    def __init__(self, config):
        self.config, self.windows = config, 0
        self.by_digit = torch.zeros(config.num_layers, config.num_heads, DIGITS)
        self.every_digit_by_head = torch.zeros(config.num_layers, config.num_heads)
        self.every_digit_by_some_head = 0
        self.first_digit_by_depth = {}  # depth: [windows, (layers, h) chosen for digit 1]

    def add(self, layers, first_query: int, keys: list[int], depth: float) -> None:
        block, window = self.config.select_block_size, self.config.segment_lengths[0]
        if keys[0] // block >= selection.candidates(first_query, window, block):
            return
        chosen = torch.stack(
            [
                torch.stack(
                    [
                        choice(q, k, first_query + i, self.config)[1][:, keys].any(-1)
                        for i in range(DIGITS)
                    ],
                    -1,
                )  # fmt: skip
                for q, k in layers
            ]
        )  # (layers, h, digits)
        self.windows += 1
        cell = self.first_digit_by_depth.setdefault(depth, [0, torch.zeros(chosen.shape[:2])])
        cell[0] += 1
        cell[1] += chosen[..., 0].double()
        self.by_digit += chosen.double()
        self.every_digit_by_head += chosen.all(-1).double()
        self.every_digit_by_some_head += int(chosen.any(0).any(0).all())

    def summary(self) -> dict:
        share = 1 / max(1, self.windows)
        return {
            "windows": self.windows,
            "select_query_span": self.config.select_query_span,
            "select_span_max": self.config.select_span_max,
            "first_digit_by_depth": {
                str(depth): {"windows": windows, "by_head": (chosen / windows).tolist()}
                for depth, (windows, chosen) in self.first_digit_by_depth.items()
            },
            "every_digit_by_some_head": self.every_digit_by_some_head * share,
            "heads": [
                {
                    "layer": layer,
                    "head": head,
                    "by_digit": (self.by_digit[layer, head] * share).tolist(),
                    "every_digit": float(self.every_digit_by_head[layer, head] * share),
                }
                for layer in range(self.config.num_layers)
                for head in range(self.config.num_heads)
            ],
        }


def _item(mean, count: int, layer: int, head: int, pattern: int):
    return None if not count else float(mean[layer, head, pattern])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", type=Path, help="eval.json of the model, for by_residue")
    parser.add_argument("--output", type=Path, default=Path("attribution.json"))
    parser.add_argument(
        "--rank-span",
        type=int,
        help="measure the choice ranked by this many queries (their mean; their best "
        "log-probability for a "
        "model with select_span_max)",
    )
    args = parser.parse_args(argv)
    model, data = load_model(args.model, None)
    corpus = load(data.for_evaluation())
    records = json.loads(args.eval.read_text())["passkey_windows"] if args.eval else []
    ordered = [r for r in records if r["context"] == args.context]
    exact = {}
    for record in ordered:  # windows in evaluate_passkey's order: depth, then row
        index = sum(1 for key in exact if key[0] == record["depth"])
        exact[(record["depth"], index)] = record["exact"]
    rate = max(model.config.dilation_rates)
    rows, chosen, counts = masses(
        model, corpus, args.context, args.windows, args.seed, exact, args.rank_span
    )
    result = {
        "model": str(args.model),
        "context": args.context,
        "widest_rate": rate,
        "by_residue": by_residue(records, args.context, rate),
        "first_digit_by_class": by_class(records, args.context, rate) if records else {},
        "digit_accuracy_beyond_first_depth": digit_accuracy(records, args.context)
        if records
        else [],
        "windows": {"exact": counts[True], "failed": counts[False]},
        "mass": rows,
        "key_block_chosen": chosen,  # None without the content-selected pattern
    }
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"accuracy by (answer query - key digit) mod {rate}:")
    for residue, cell in result["by_residue"].items():
        print(f"  {residue}: {cell['exact']}/{cell['windows']}")
    print(f"first digit right by offset class (mod {rate}), keys at depth < 1:")
    for cell, counts_ in result["first_digit_by_class"].items():
        print(f"  {cell}: {counts_['first_digit']}/{counts_['windows']}")
    print("digit accuracy, keys at depth < 1:", result["digit_accuracy_beyond_first_depth"])
    print("largest mean mass on the key digits (layer, head, pattern): exact | failed")
    top = sorted(rows, key=lambda r: -(r["mass_exact"] or 0) - (r["mass_failed"] or 0))[:12]
    for r in top:
        print(
            f"  L{r['layer']} h{r['head']} {r['pattern']}: {r['mass_exact']} | {r['mass_failed']}"
        )
    if chosen:
        print(
            f"key block chosen, {chosen['windows']} windows with the key in a candidate block: "
            f"for all five digits by some head {chosen['every_digit_by_some_head']:.0%}; per "
            "head (layer, head): by digit | all five"
        )
        for r in sorted(chosen["heads"], key=lambda r: -r["every_digit"])[:6]:
            digits = " ".join(f"{x:.0%}" for x in r["by_digit"])
            print(f"  L{r['layer']} h{r['head']}: {digits} | {r['every_digit']:.0%}")
        print("first digit's query, key block chosen by depth: the heads that chose it in > 30%")
        for depth, cell in chosen["first_digit_by_depth"].items():
            heads = [
                f"L{layer}h{head}:{share:.0%}"
                for layer, row in enumerate(cell["by_head"])
                for head, share in enumerate(row)
                if share > 0.3
            ]
            print(f"  depth {depth} ({cell['windows']} windows): {' '.join(heads) or '-'}")


if __name__ == "__main__":
    main()
