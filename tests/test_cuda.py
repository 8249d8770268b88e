"""The GPU path on a GPU: numbers against the dense float64 reference on the device's kernels.

Every test takes the device as a parameter: "cpu" runs here too (it proves the test itself and
the CPU kernels); "cuda" is SKIPPED, with the reason, where torch sees no CUDA device, and runs
the flash and memory-efficient kernels, float16/bfloat16, stride-0 multi-query keys, the models,
the trainer, and sequence parallelism over gloo (one GPU) and NCCL (two GPUs) where there is one.
benchmarks/gpu.sh runs this file first.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import LAYOUTS, TOLERANCE, assert_matches, make_qkv, max_error, randn, reference_fn

import longnet.model
from longnet import LongNetConfig, LongNetLM, dilated_attention
from longnet.distributed import sequence_parallel_dilated_attention
from longnet.kernels import resolve_backend
from longnet.launch.metrics import read_metrics
from longnet.reference import dense_dilated_attention

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False): run benchmarks/gpu.sh on a GPU"
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))
DEVICES = ["cpu", CUDA]
# float16 keeps 11 mantissa bits to bfloat16's 8: its bound is bfloat16's / 8 (see conftest).
BOUNDS = {**TOLERANCE, torch.float16: TOLERANCE[torch.bfloat16] / 8}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# (batch, seq, heads, kv_heads, head_dim, segment_lengths, dilation_rates); sequence lengths that
# are no multiple of 32 leave the memory-efficient kernel's padded log-sum-exp rows in play.
CASES = {
    "paper_scaled_down": (1, 256, 12, 12, 64, [16, 32, 64, 128, 256], [1, 2, 4, 6, 12]),
    "grouped_query": (2, 100, 8, 2, 64, [8, 32, 64], [1, 2, 4]),
    "multi_query": (2, 100, 8, 1, 64, [16, 50], [1, 3]),  # stride-0 keys and values
    "short_last_segment": (1, 70, 6, 3, 32, [14, 20, 64], [1, 3, 6]),
}


def on(device: str, fn):
    """fn run on `device` with CPU tensors in and out, so conftest's helpers (CPU inputs and
    float64 reference) compare it; gradients flow back through the copies."""

    def moved(*tensors):
        return fn(*(t.to(device) for t in tensors)).cpu()

    return moved


def dilated(lengths, rates, causal, backend="auto"):
    return functools.partial(
        dilated_attention,
        segment_lengths=lengths,
        dilation_rates=rates,
        causal=causal,
        backend=backend,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(rng, device, case, causal, dtype):
    batch, seq_len, heads, kv_heads, dim, lengths, rates = CASES[case]
    q, k, v = make_qkv(rng, batch, seq_len, heads, kv_heads, dim, dtype)
    expected = reference_fn(lengths, rates, causal)
    assert_matches(on(device, dilated(lengths, rates, causal)), q, k, v, expected, BOUNDS[dtype])


# What torch's checks pick on a CUDA GPU of compute capability 8.0 or later: flash attention
# for 16-bit inputs up to head_dim 256, else the memory-efficient kernel (float32, or wider
# heads), and plain matmuls for float64.
CUDA_KERNELS = [
    (torch.bfloat16, 64, "flash"),
    (torch.float16, 128, "flash"),
    (torch.bfloat16, 256, "flash"),
    (torch.bfloat16, 512, "efficient"),
    (torch.float32, 64, "efficient"),
    (torch.float64, 64, "math"),
]


@pytest.mark.parametrize("dtype, head_dim, kernel", CUDA_KERNELS, ids=str)
@pytest.mark.parametrize("device", [CUDA])
def test_cuda_kernel_choice_and_its_numbers(rng, device, dtype, head_dim, kernel):
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        pytest.skip(f"{torch.cuda.get_device_name()} has compute capability {capability} < 8.0")
    q, k, v = make_qkv(rng, 1, 100, 4, 2, head_dim, dtype)
    queries = q.detach().to(device).transpose(1, 2)  # what dilated_attention asks about
    assert resolve_backend("auto", queries, queries, queries, True) == kernel
    lengths, rates = [16, 40, 100], [1, 2, 4]
    backend = "math" if kernel == "math" else "fused"
    fn = on(device, dilated(lengths, rates, True, backend))
    assert_matches(fn, q, k, v, reference_fn(lengths, rates, True), BOUNDS[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("device", [CUDA])
def test_triton_backend_matches_reference(rng, device, causal, dtype):
    """backend="triton" compiled for the GPU (tests/test_triton.py runs it under the
    interpreter): grouped-query heads, a long sequence, r > w, a head shift, against the float64
    reference; "auto" never picks it."""
    pytest.importorskip("triton", reason="pip install 'longnet[triton]'")
    q, k, v = make_qkv(rng, 2, 1000, 8, 2, 64, dtype)
    lengths, rates = [128, 256, 1024, 64], [1, 2, 4, 70]
    queries = q.detach().to(device).transpose(1, 2)
    assert resolve_backend("auto", queries, queries, queries, causal) != "triton"
    fn = functools.partial(dilated(lengths, rates, causal, "triton"), head_shift=1)

    def expected(q, k, v):
        return dense_dilated_attention(q, k, v, lengths, rates, causal=causal, head_shift=1)

    assert_matches(on(device, fn), q, k, v, expected, BOUNDS[dtype])


def laid_out_outputs_and_grads(device, layout, q, k, v, grad_out, fn):
    """fn's output and gradients on the device, its inputs given in `layout` (gradients of the
    laid-out tensors themselves), and the values it saw, contiguous on the CPU."""
    leaves = [x.detach().to(device).requires_grad_() for x in (q, k, v)]
    inputs = [LAYOUTS[layout](x) for x in leaves]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out.to(device, out.dtype))
    seen = [x.detach().contiguous().cpu() for x in inputs]
    return [t.cpu() for t in (out.detach(), *grads)], seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("device", DEVICES)
def test_every_memory_layout(rng, device, layout, dtype):
    """Strided, sliced, packed and broadcast (stride-0) inputs give the numbers of their values
    (the fused kernels read head_dim as dense memory: a strided one must be copied first)."""
    q, k, v = make_qkv(rng, 2, 72, 4, 2, 32, dtype)
    lengths, rates = [8, 24, 72], [1, 2, 4]
    grad_out = randn(rng, *q.shape, dtype=dtype)
    actual, seen = laid_out_outputs_and_grads(
        device, layout, q, k, v, grad_out, dilated(lengths, rates, True)
    )
    leaves = [x.double().requires_grad_() for x in seen]
    out = reference_fn(lengths, rates, True)(*leaves)
    expected = [out, *torch.autograd.grad(out, leaves, grad_out.double())]
    for name, a, e in zip(("out", "grad_q", "grad_k", "grad_v"), actual, expected, strict=True):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert max_error(a, e) <= BOUNDS[dtype], f"{layout} {name}: {max_error(a, e):.3g}"


# The models.


def tiny_lm(device, seed=0, **overrides) -> LongNetLM:
    fields = dict(
        vocab_size=48,
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_dim=96,
        segment_lengths=(4, 8, 16),
        dilation_rates=(1, 2, 4),
    )
    torch.manual_seed(seed)
    return LongNetLM(LongNetConfig(**{**fields, **overrides})).to(device)


@pytest.mark.parametrize("num_kv_heads", [4, 1])
@pytest.mark.parametrize("position", ["xpos", "alibi"])
@pytest.mark.parametrize("device", DEVICES)
def test_cached_greedy_generation_equals_uncached(device, position, num_kv_heads):
    """float32: the cache's decode step (a one-query plan through the executor) against the
    whole sequence through the fused kernels each time."""
    model = tiny_lm(device, position=position, num_kv_heads=num_kv_heads).eval()
    prompt = torch.randint(0, 48, (2, 5), generator=torch.Generator().manual_seed(1)).to(device)
    cached = model.generate(prompt, 27, top_k=1, use_cache=True)
    uncached = model.generate(prompt, 27, top_k=1, use_cache=False)
    assert cached.device.type == device and torch.equal(cached, uncached)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_chunked_loss_equals_full_logit_loss(monkeypatch, device, dtype):
    monkeypatch.setattr(longnet.model, "LOSS_CHUNK_ELEMENTS", 7 * 48)  # 7 tokens a chunk
    model = tiny_lm(device).to(dtype)
    generator = torch.Generator().manual_seed(2)
    tokens, labels = (torch.randint(0, 48, (2, 40), generator=generator) for _ in "tl")
    labels[0, :9] = -100
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        output = model(tokens.to(device), labels.to(device), return_logits=return_logits)
        output.loss.backward()
        grads = {n: p.grad.float().cpu() for n, p in model.named_parameters()}
        results.append((output.loss.float().cpu(), grads))
    (full_loss, full_grads), (loss, grads) = results
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(48)) < 1.0
    assert max_error(loss, full_loss) <= BOUNDS[dtype]
    for name, grad in grads.items():
        assert max_error(grad, full_grads[name]) <= BOUNDS[dtype], name


@pytest.mark.parametrize("device", DEVICES)
def test_two_training_steps(tmp_path_factory, device):
    """The trainer (DeepSpeed, the tiny config, float32) on the device: it says which device it
    used, and its two losses equal those of the CPU run (float32, summation order only)."""
    runs = {d: train_two_steps(tmp_path_factory, d) for d in ("cpu", device)}
    assert f"device {device}" in runs[device][0]
    losses = {d: [r["loss"] for r in records] for d, (_, records) in runs.items()}
    assert len(losses[device]) == 2 and abs(losses[device][0] - math.log(264)) < 1.0
    for got, expected in zip(losses[device], losses["cpu"], strict=True):
        assert abs(got - expected) < 1e-3, losses


_trained: dict[str, tuple[str, list[dict]]] = {}


def train_two_steps(tmp_path_factory, device: str) -> tuple[str, list[dict]]:
    """(the trainer's stderr, its per-step records); one run per device and test session."""
    if device in _trained:
        return _trained[device]
    output = tmp_path_factory.mktemp(f"train-{device}")
    command = [
        *(sys.executable, "launch/train.py", "--config", "configs/tiny-cpu.yaml"),
        *(f"run.output_dir={output}", "run.wandb_mode=disabled", "train.steps=2"),
        *("train.log_interval=1", "train.eval_interval=0", "train.eval_batches=1"),
        *("train.eval_seq_lens=[]", "checkpoint.interval=0", "data.max_documents=60"),
        *(f"data.cache_dir={output / 'cache'}", "deepspeed.train_micro_batch_size_per_gpu=2"),
        # torch's AdamW: DeepSpeed's fused one would first compile a CUDA extension.
        "deepspeed.optimizer.params.torch_adam=true",
    ]
    env = {**os.environ, "DS_ACCELERATOR": device}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    _trained[device] = result.stderr, [r for r in read_metrics(output) if not r.get("eval")]
    return _trained[device]


# Sequence parallelism: two processes on the device.

SP_CASES = {  # (heads, kv_heads, segment_lengths, dilation_rates) over 2 x 48 tokens
    "paper_scaled_down": (6, 6, [6, 12, 24, 48, 96], [1, 2, 4, 6, 12]),
    "multi_query": (4, 1, [16, 96], [1, 3]),
}


def _sp_worker(rank, backend, device, store_path, inputs, options, results_dir):
    dist.init_process_group(
        backend,
        store=dist.FileStore(store_path, 2),
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=120),
    )
    try:
        device = torch.device(device, rank if backend == "nccl" else 0)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        q, k, v, grad_out = (x.chunk(2, dim=1)[rank].to(device, copy=True) for x in inputs)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        out = sequence_parallel_dilated_attention(q, k, v, **options)
        out.backward(grad_out)
        shards = [t.cpu() for t in (out.detach(), q.grad, k.grad, v.grad)]
        torch.save(shards, Path(results_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


TWO_GPUS = pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason=f"NCCL takes one CUDA device per rank: 2 needed, {torch.cuda.device_count()} found",
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(SP_CASES))
@pytest.mark.parametrize(
    "device, backend",
    [
        ("cpu", "gloo"),
        pytest.param(*CUDA.values, "gloo", marks=CUDA.marks),
        pytest.param(*CUDA.values, "nccl", marks=[*CUDA.marks, TWO_GPUS]),
    ],
)
def test_sequence_parallel_on_two_processes(device, backend, case, dtype):
    """Causal, so ranks send uneven amounts; the two shards' outputs and gradients concatenate
    to the dense reference's."""
    heads, kv_heads, lengths, rates = SP_CASES[case]
    generator = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(generator, 1, 96, heads, kv_heads, 32, dtype)
    grad_out = randn(generator, *q.shape, dtype=dtype)
    inputs = tuple(x.detach() for x in (q, k, v, grad_out))
    options = dict(segment_lengths=lengths, dilation_rates=rates, causal=True)
    with tempfile.TemporaryDirectory() as folder:
        store = str(Path(folder) / "store")
        mp.spawn(_sp_worker, (backend, device, store, inputs, options, folder), nprocs=2)
        shards = [torch.load(Path(folder) / f"rank{r}.pt") for r in range(2)]
    actual = [torch.cat(parts, dim=1) for parts in zip(*shards, strict=True)]
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out = reference_fn(lengths, rates, True)(*leaves)
    expected = [out, *torch.autograd.grad(out, leaves, grad_out.double())]
    for name, a, e in zip(("out", "grad_q", "grad_k", "grad_v"), actual, expected, strict=True):
        assert a.dtype == dtype and max_error(a, e) <= BOUNDS[dtype], name
