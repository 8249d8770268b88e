"""Shared helpers: seeded inputs and the comparison against the dense float64 reference.

Every fast path is checked on NUMBERS: its output and the gradients of q, k and v under one random
upstream gradient, against longnet.reference.dense_dilated_attention evaluated in float64 on the
same (dtype-rounded) input values.
"""

from __future__ import annotations

import math
import os

# Triton's interpreter for tests/test_triton.py (CPU tensors), unless the caller chose: it must be
# set before anything imports triton (transformers and deepspeed do, at import), since triton.jit
# and triton.language read it then; only triton reads it (torch.compile on CPU writes C++).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from longnet.reference import dense_dilated_attention, multiplicity  # noqa: E402

# Error bounds relative to the largest magnitude of the expected tensor (see max_error). Measured
# worst cases over tests/test_dilated_attention.py::CASES (outputs and q/k/v gradients, both
# backends): float64 1.3e-15, float32 6.3e-7, bfloat16 8.9e-3 (bf16 keeps 8 mantissa bits: q, k,
# v, the probabilities and the output are each rounded to 2^-8 relative).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def randn(generator: torch.Generator, *shape, dtype=torch.float64) -> torch.Tensor:
    """Standard normal values drawn in float64, then rounded to dtype (same values per seed)."""
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def make_qkv(generator, batch, seq_len, heads, kv_heads, dim, dtype=torch.float64):
    """q (b, n, h, d), k and v (b, n, g, d), leaves that require grad."""
    q = randn(generator, batch, seq_len, heads, dim, dtype=dtype)
    k = randn(generator, batch, seq_len, kv_heads, dim, dtype=dtype)
    v = randn(generator, batch, seq_len, kv_heads, dim, dtype=dtype)
    return tuple(x.requires_grad_() for x in (q, k, v))


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(1, max |expected|), in float64."""
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.double(), expected.double()
    return (actual - expected).abs().max().item() / max(1.0, expected.abs().max().item())


def outputs_and_grads(fn, q, k, v, grad_out):
    """fn(q, k, v) and the gradients of q, k, v under grad_out, on fresh leaves."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return (out.detach(), *(x.grad for x in leaves))


def reference_fn(segment_lengths, dilation_rates, causal=False, softmax_scale=None):
    def fn(q, k, v):
        return dense_dilated_attention(
            q, k, v, segment_lengths, dilation_rates, causal=causal, softmax_scale=softmax_scale
        )

    return fn


def assert_matches(fn, q, k, v, expected_fn, tolerance):
    """Output and q/k/v gradients of fn equal those of expected_fn (run in float64) within
    tolerance (see max_error). The reference sees the values q, k, v and the upstream gradient
    hold in q's dtype."""
    grad_out = randn(torch.Generator().manual_seed(1), *q.shape, dtype=q.dtype)
    actual = outputs_and_grads(fn, q, k, v, grad_out)
    expected = outputs_and_grads(expected_fn, q.double(), k.double(), v.double(), grad_out)
    assert actual[0].dtype == q.dtype
    for name, a, e in zip(("out", "grad_q", "grad_k", "grad_v"), actual, expected, strict=True):
        assert a.shape == e.shape, name
        assert torch.isfinite(a).all(), name
        error = max_error(a, e)
        assert error <= tolerance, f"{name}: error {error:.3g} > {tolerance:.3g}"


def mixture_of_patterns(q, k, v, segment_lengths, dilation_rates, *, causal=False, detach=False):
    """The paper's Eq. 10 written out: per-pattern dense attentions O_i with log-denominators
    lse_i, mixed by a_i = softmax_i(lse_i). detach=True treats a_i as constants (the official
    implementation's no_grad), which gives the wrong gradient. float64, (b, n, h, d)."""
    q, k, v = q.double(), k.double(), v.double()
    batch, seq_len, heads, dim = q.shape
    group = heads // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    outs, lses = [], []
    for w, r in zip(segment_lengths, dilation_rates, strict=True):
        kept = multiplicity(seq_len, heads, [w], [r], causal=causal).to(q.device) > 0
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim)
        scores = scores.masked_fill(~kept, -math.inf)  # (b, h, n, n)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # -inf for queries not kept
        probs = torch.exp(scores - lse.masked_fill(lse == -math.inf, 0.0))
        outs.append(torch.einsum("bhqk,bkhd->bhqd", probs, v))
        lses.append(lse)
    lse = torch.stack(lses)  # (patterns, b, h, n, 1)
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - total.masked_fill(total == -math.inf, 0.0))
    if detach:
        weights = weights.detach()
    out = (weights * torch.stack(outs)).sum(0)  # (b, h, n, d)
    return out.transpose(1, 2)


def _strided_copy(x: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """x's values in memory laid out in dimension order `order` (outermost first)."""
    return x.permute(order).contiguous().permute(tuple(order.index(i) for i in range(x.dim())))


def _padded(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x's values as every other element of a buffer twice as long along dim (stride 2)."""
    shape = list(x.shape)
    shape[dim] *= 2
    buffer = torch.full(shape, math.nan, dtype=x.dtype, device=x.device)
    index = [slice(None)] * x.dim()
    index[dim] = slice(None, None, 2)
    buffer[tuple(index)] = x
    return buffer[tuple(index)]


def _broadcast(x: torch.Tensor, dim: int) -> torch.Tensor:
    """A stride-0 view along dim: only defined for tensors whose values repeat along dim, so it
    returns an expand of the first slice (callers compare against that slice made contiguous)."""
    return x.narrow(dim, 0, 1).expand(x.shape)


# Memory layouts of a (b, n, heads, d) tensor: name -> fn(x) giving the SAME values (except for
# the stride-0 layouts, which repeat one slice; compare against fn(x).contiguous()) in another
# layout. Every fast path must give what the contiguous input gives.
LAYOUTS = {
    "contiguous": lambda x: x,
    "head_dim_strided": lambda x: _strided_copy(x, (3, 0, 1, 2)),  # rearrange "(d h)" gives this
    "heads_outermost": lambda x: _strided_copy(x, (2, 0, 1, 3)),
    "seq_outermost": lambda x: _strided_copy(x, (1, 0, 2, 3)),
    "seq_sliced": lambda x: _padded(x, 1),
    "head_dim_sliced": lambda x: _padded(x, 3),
    "packed_qkv": lambda x: torch.stack([x, x + 1, x - 1], dim=3).unbind(3)[0],  # (b,n,h,3,d)
    "head_dim_expanded": lambda x: _broadcast(x, 3),
    "seq_expanded": lambda x: _broadcast(x, 1),
    "heads_expanded": lambda x: _broadcast(x, 2),
    "batch_expanded": lambda x: _broadcast(x, 0),
}


# Modules whose tests launch training runs (DeepSpeed, several processes, kill and resume),
# build wheels or run the benchmark scripts: `pytest -m "not slow"` leaves them out for the
# edit-test loop; CI runs everything. test_cuda's "cpu" cases repeat the core suite's numbers
# on the CPU kernels (benchmarks/gpu.sh runs the file on a GPU, whatever the marker).
SLOW_MODULES = {
    "test_benchmarks",
    "test_cuda",
    "test_evaluate",
    "test_export",
    "test_fail_safe",
    "test_install",
    "test_process_grid",
    "test_training",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def tiered(cases, quick) -> list:
    """Parametrize cases (tuples), those not in `quick` marked slow: the quick tier keeps a
    subset that still covers each kind, the full suite runs them all."""
    slow = pytest.mark.slow
    return [case if case in quick else pytest.param(*case, marks=slow) for case in cases]
