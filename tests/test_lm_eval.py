"""lm-eval-harness on an exported run, as its users call it: HFLM(pretrained=folder) loads the
tokenizer and the model through transformers (after `import longnet.integrations.transformers`),
runs local tasks (no download), and what it measures is what the model computes itself:
log-likelihoods of every choice, and greedy continuations of left-padded batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed_utils import python_command, reference_run, run_command
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import longnet.integrations.transformers  # noqa: F401  (registers model_type "longnet")
from longnet import LongNetLM
from longnet.launch.data import ByteTokenizer

# Contexts from 60 to 420 bytes: past the run's first segment (128) and its second (256).
CONTEXTS = [
    "def area_{i}(width, height):\n" + "    width = width * {i} + height\n" * (i + 1) + "    return"
    for i in range(12)
]
CHOICES = [" width", " height * width", " None"]
MULTIPLE_CHOICE = """
task: longnet_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""
GENERATE = """
task: longnet_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: " width"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[Path, dict]:
    """An exported run and lm-eval's samples of both local tasks (batches of 4)."""
    folder = tmp_path_factory.mktemp("lm-eval")
    run_command(
        python_command("launch/export.py", str(reference_run("baseline")), str(folder / "model"))
    )
    rows = [
        {"context": c.format(i=i), "choices": CHOICES, "gold": i % 3}
        for i, c in enumerate(CONTEXTS)
    ]
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = folder / "tasks"
    tasks.mkdir()
    (tasks / "choice.yaml").write_text(MULTIPLE_CHOICE.format(data=data))
    (tasks / "generate.yaml").write_text(GENERATE.format(data=data))
    lm = HFLM(pretrained=str(folder / "model"), backend="causal", device="cpu", batch_size=4)
    results = simple_evaluate(
        model=lm,
        tasks=["longnet_choice", "longnet_generate"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )
    return folder / "model", results["samples"]


def test_log_likelihoods_are_the_models_own(evaluated):
    folder, samples = evaluated
    model, tokenizer = LongNetLM.from_pretrained(folder).eval(), ByteTokenizer()
    worst, compared = 0.0, 0
    for sample in samples["longnet_choice"]:
        for (context, continuation), ((log_likelihood, _),) in zip(
            sample["arguments"], sample["resps"], strict=True
        ):
            ids = torch.tensor([tokenizer.encode(context + continuation)])  # (1, n)
            start = len(tokenizer.encode(context))
            with torch.no_grad():
                log_probs = model(ids).logits.log_softmax(-1)[0, start - 1 : -1]  # (m, vocab)
            own = log_probs.gather(-1, ids[0, start:, None]).sum().item()
            worst, compared = max(worst, abs(own - log_likelihood)), compared + 1
    assert compared == len(CONTEXTS) * len(CHOICES)
    # Measured: 1.5e-5 (float32 sums over up to 15 tokens; lm-eval pads its batches on the right).
    assert worst <= 1e-4, worst


def test_generations_of_left_padded_batches_are_each_prompts_own(evaluated):
    folder, samples = evaluated
    model, tokenizer = LongNetLM.from_pretrained(folder).eval(), ByteTokenizer()
    for sample in samples["longnet_generate"]:
        (context, _), ((generated,),) = sample["arguments"][0], sample["resps"]
        prompt = torch.tensor([tokenizer.encode(context)])
        with torch.no_grad():
            tokens = model.generate(prompt, max_new_tokens=12, top_k=1)[0, prompt.shape[1] :]
        tokens = tokens.tolist()
        if tokenizer.eos_id in tokens:  # lm-eval stops there too
            tokens = tokens[: tokens.index(tokenizer.eos_id)]
        own = tokenizer.decode(tokens).split("\n")[0]
        assert generated == own, (context[-40:], generated, own)
