"""launch/evaluate.py on real data: the trainer's own evaluation reproduced, a model built to copy
perfectly (an ideal induction head) scored on the copy and pass-key tasks, and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from distributed_utils import (
    ROOT,
    python_command,
    reference_run,
    run_command,
    session_dir,
    torchrun_command,
)

from longnet import LongNetConfig, LongNetLM
from longnet.launch.data import DataConfig, load
from longnet.launch.evaluate import (
    COPY_ALPHABET,
    evaluate,
    evaluate_copy,
    evaluate_passkey,
    position_buckets,
    rebuilt,
)
from longnet.launch.metrics import read_metrics
from longnet.model import LMOutput

CONFIDENCE = 20.0  # the oracle's logit for the token it predicts


class InductionOracle(LongNetLM):
    """After each token, predicts what followed the earlier position whose preceding tokens match
    the longest (the latest among equals): what an ideal induction head does. No match: uniform.
    generate() decodes greedily with it (the tasks call nothing else)."""

    def forward(self, tokens, labels=None, **_):
        b, n = tokens.shape
        logits = torch.zeros(b, n, self.config.vocab_size)
        for row, out in zip(tokens, logits, strict=True):
            same = row[:, None] == row[None, :]  # (n, n)
            match = torch.zeros(n, n, dtype=torch.long)  # match[i, j]: common suffix length
            match[0] = same[0]
            for i in range(1, n):
                match[i, 1:] = same[i, 1:] * (1 + match[i - 1, :-1])
                match[i, 0] = same[i, 0]
            match = match.tril(-1)  # earlier positions only
            score = match * n + torch.arange(n)  # longest, then latest
            best = score.argmax(dim=1)  # (n,)
            found = match.gather(1, best[:, None])[:, 0] > 0
            rows = torch.arange(n)[found]
            out[rows, row[best[found] + 1]] = CONFIDENCE
        return LMOutput(logits)

    def generate(self, tokens, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        for _ in range(max_new_tokens):
            tokens = torch.cat([tokens, self(tokens).logits[:, -1:].argmax(-1)], dim=1)
        return tokens


class OffByOne(InductionOracle):
    """The oracle with its last decoded digit moved by one: four of five digits right."""

    def generate(self, tokens, max_new_tokens, **kwargs):
        out = super().generate(tokens, max_new_tokens, **kwargs)
        out[:, -1] = (out[:, -1] - ord("0") + 1) % 10 + ord("0")
        return out


@pytest.fixture(scope="module")
def corpus():
    return load(
        DataConfig(max_documents=60, validation_fraction=0.3, cache_dir=str(session_dir() / "ev"))
    )


def tiny(cls=LongNetLM) -> LongNetLM:
    torch.manual_seed(0)
    return cls(LongNetConfig.preset("longnet-tiny", position="rotary")).eval()


def test_perplexity_equals_the_trainers_evaluation(tmp_path):
    run = reference_run("baseline")  # tiny-cpu: evaluated at 512 tokens on 2 windows
    trainer = [r for r in read_metrics(run) if r.get("eval")][-1]
    assert trainer["seq_len"] == 512 and trainer["tokens"] == 2 * 512
    output = tmp_path / "eval.json"
    command = [sys.executable, "launch/evaluate.py", str(run), "--tasks", "perplexity,positions"]
    command += ["--context-lengths", "512", "--windows", "2", "--output", str(output)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    result = json.loads(output.read_text())
    measured = result["perplexity"]["512"]
    assert measured["tokens"] == trainer["tokens"]
    assert measured["loss"] == pytest.approx(trainer["loss"], abs=1e-5)
    assert measured["bits_per_byte"] == pytest.approx(trainer["bits_per_byte"], abs=1e-5)
    buckets = result["positions"]
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 64), (64, 128), (128, 256), (256, 512)]
    weighted = sum(b["loss"] * (b["end"] - b["start"]) for b in buckets) / 512
    assert weighted == pytest.approx(trainer["loss"], abs=1e-5)
    assert (tmp_path / "eval-perplexity.png").is_file() and (
        tmp_path / "eval-positions.png"
    ).is_file()


def test_training_rows_options_leave_the_evaluation_corpus_alone(tmp_path):
    """A run trained with pass keys and a distance curriculum is evaluated on the plain corpus:
    the perplexity of a config without them."""
    import yaml

    run = reference_run("baseline")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"] |= {"passkey_fraction": 1.0, "passkey_distance_schedule": [[0, 100]]}
    trained_with_keys = tmp_path / "keys.yaml"
    trained_with_keys.write_text(yaml.safe_dump(config))
    losses = []
    for extra in ([], ["--data-config", str(trained_with_keys)]):
        output = tmp_path / f"eval{len(extra)}.json"
        command = [sys.executable, "launch/evaluate.py", str(run), "--tasks", "perplexity"]
        command += ["--context-lengths", "512", "--windows", "2", "--output", str(output), *extra]
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        losses.append(json.loads(output.read_text())["perplexity"]["512"]["loss"])
    assert losses[1] == losses[0]


def test_sequence_parallel_evaluation_equals_one_process(tmp_path):
    """Two ranks each holding half of every window (torchrun) measure what one process does."""
    run = reference_run("baseline")
    args = [str(run), "--tasks", "perplexity,positions,copy", "--context-lengths", "256,512"]
    args += ["--windows", "2"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    run_command(python_command("launch/evaluate.py", *args, "--output", str(one)))
    launcher = ["--standalone", "--nproc_per_node", "2"]
    run_command(torchrun_command(launcher, "launch/evaluate.py", *args, "--output", str(two)))
    one, two = json.loads(one.read_text()), json.loads(two.read_text())
    for context in ("256", "512"):
        assert two["perplexity"][context]["loss"] == pytest.approx(
            one["perplexity"][context]["loss"], abs=1e-5
        )
    for task in ("positions", "copy"):
        assert [r["loss"] for r in two[task]] == pytest.approx(
            [r["loss"] for r in one[task]], abs=1e-5
        )
    refused = subprocess.run(
        torchrun_command(launcher, "launch/evaluate.py", *args[:1], "--tasks", "passkey"),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "passkey decodes in one process" in refused.stderr


def test_every_context_scores_the_same_targets(corpus):
    model = tiny()
    result = evaluate(model, corpus, ["perplexity"], [64, 128, 256], count=3, batch_size=2)
    assert result["scored_tokens_per_window"] == 64
    assert {c: r["tokens"] for c, r in result["perplexity"].items()} == {
        "64": 192,
        "128": 192,
        "256": 192,
    }
    losses = [r["loss"] for r in result["perplexity"].values()]
    assert all(4.0 < loss < 7.0 for loss in losses)  # an untrained model: near ln(264) = 5.6


def test_a_model_built_to_copy_gets_near_zero_copy_loss(corpus):
    oracle = evaluate_copy(tiny(InductionOracle), corpus, 256, count=4, batch_size=4, seed=0)
    assert [r["distance"] for r in oracle] == [64, 128, 224]
    assert all(r["loss"] < 0.05 for r in oracle), oracle
    untrained = evaluate_copy(tiny(), corpus, 256, count=4, batch_size=4, seed=0)
    assert all(r["loss"] > math.log(len(COPY_ALPHABET)) for r in untrained), untrained


def test_passkey_scores_a_known_answer(corpus):
    depths = [0.0, 0.5, 1.0]
    right, records = evaluate_passkey(
        tiny(InductionOracle), corpus, [128, 256], depths, 4, 4, seed=0
    )
    assert [(r["context"], r["depth"]) for r in right] == [
        (c, d) for c in (128, 256) for d in depths
    ]
    assert all(r["accuracy"] == 1.0 and r["digit_accuracy"] == 1.0 for r in right)
    wrong, wrong_records = evaluate_passkey(tiny(OffByOne), corpus, [128], depths, 4, 4, seed=0)
    assert all(r["accuracy"] == 0.0 and r["digit_accuracy"] == 0.8 for r in wrong)
    # One record per window: where the key and the question are, what was decoded.
    assert len(records) == 2 * 3 * 4 and len(wrong_records) == 3 * 4
    for record in records:
        assert record["exact"] and record["predicted"] == record["key"]
        assert record["key_position"] < record["question_position"] < record["answer_position"]
        assert record["answer_position"] == record["context"] - 5 + 1  # 5 digits, n + 1 tokens
    assert [r["key_position"] for r in records if r["depth"] == 0.0][0] == len(
        "\n# the pass key is "
    )
    assert not any(r["exact"] for r in wrong_records)
    assert all(r["predicted"][:4] == r["key"][:4] for r in wrong_records)


def test_other_patterns_keep_the_weights(corpus):
    """Within one segment every pattern with r = 1 is full causal attention: a model rebuilt
    with w = 1024 scores a 256-token window as the model trained with w = 256 does."""
    trained = rebuilt(tiny(), segment_lengths=(256,), dilation_rates=(1,))
    full = rebuilt(trained, segment_lengths=(1024,), dilation_rates=(1,))
    assert full.config.segment_lengths == (1024,)
    results = [evaluate(m, corpus, ["perplexity"], [256], 2, 2) for m in (trained, full)]
    # Equal up to rounding: rotary angles are measured from the middle of a longer period.
    assert results[0]["perplexity"]["256"]["loss"] == pytest.approx(
        results[1]["perplexity"]["256"]["loss"], abs=1e-6
    )
    assert results[1]["model"]["segment_lengths"] == [1024]


def test_position_buckets_double():
    losses = torch.arange(300.0).expand(2, 300)
    buckets = position_buckets(losses)
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 64), (64, 128), (128, 256), (256, 300)]
    assert buckets[0]["loss"] == pytest.approx(31.5) and buckets[-1]["loss"] == pytest.approx(277.5)


@pytest.mark.parametrize(
    "tasks, contexts, kwargs, match",
    [
        (["perplexity", "recall"], [64], {}, "--tasks: unknown recall"),
        (["perplexity"], [1, 64], {}, "--context-lengths must be integers >= 2"),
        (["passkey"], [128], {"depths": [0.5, 1.5]}, "--depths must lie in \\[0, 1\\]"),
        (["copy"], [64], {}, "the copy task needs a context of >= 96 tokens"),
        (["perplexity"], [256], {"count": 10**6}, "fewer than --windows 1000000"),
    ],
)
def test_bad_input(corpus, tasks, contexts, kwargs, match):
    kwargs = {"count": 2, "batch_size": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        evaluate(tiny(), corpus, tasks, contexts, **kwargs)
