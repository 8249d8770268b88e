"""backend="triton" (longnet/triton_attention.py) against the dense float64 reference.

The kernels run on CPU tensors under Triton's interpreter: TRITON_INTERPRET=1 must be in the
environment before triton is first imported (triton.jit and triton.language read it then; other
test modules import transformers and deepspeed, which import triton), so tests/conftest.py sets
it, unless the caller set it, before any test module is imported. With TRITON_INTERPRET=0 on a
machine with a GPU the same tests run the compiled kernels on CUDA.

Shapes are small: the interpreter runs each program in Python (about 10 ms each), so the whole
file stays well under a minute on one CPU thread.
"""

import math
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import max_error, randn

from longnet import DilatedAttention, dilated_attention
from longnet import triton_attention as ta
from longnet.kernels import resolve_backend
from longnet.reference import dense_dilated_attention

if ta.INTERPRETED:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("TRITON_INTERPRET=0 and no CUDA GPU", allow_module_level=True)

# The acceptance: float32 exact to 1e-6 (max |error| / max(1, max |expected|)).
FLOAT32_TOLERANCE = 1e-6


def random_config(seed: int) -> dict:
    """A random layout: odd lengths, r > w, several patterns (one may repeat), GQA/MQA, causal
    or not, a head shift; small enough for the interpreter."""
    pick = random.Random(seed)
    heads = pick.choice([1, 2, 3, 4, 6])
    kv_heads = pick.choice([g for g in range(1, heads + 1) if heads % g == 0])
    seq_len = pick.choice([1, 2, 5, 13, 17, 23, 31, 37, 45, 53])
    patterns = []
    for _ in range(pick.choice([1, 2, 2, 3])):
        w = pick.randint(1, seq_len + 8)
        patterns.append((w, pick.choice([1, 1, 2, 3, 5, w + pick.randint(1, 3)])))
    if pick.random() < 0.2:
        patterns.append(patterns[0])  # a pattern listed twice counts twice
    return dict(
        batch=pick.choice([1, 1, 2]),
        seq_len=seq_len,
        heads=heads,
        kv_heads=kv_heads,
        dim=pick.choice([4, 8, 16, 24]),
        lengths=[w for w, _ in patterns],
        rates=[r for _, r in patterns],
        causal=pick.random() < 0.5,
        head_shift=pick.choice([0, 0, 1, 2, -3]),
    )


# Fixed layouts the acceptance names, then random ones.
CONFIGS = {
    "gqa_causal_r_gt_w_shift": dict(
        batch=1, seq_len=37, heads=4, kv_heads=2, dim=8, lengths=[8, 16, 3], rates=[1, 2, 5],
        causal=True, head_shift=1,
    ),
    "mqa_full_tail_segments": dict(
        batch=2, seq_len=29, heads=3, kv_heads=1, dim=16, lengths=[12, 64], rates=[2, 4],
        causal=False, head_shift=0,
    ),
    "dense_causal_multi_tile": dict(
        batch=1, seq_len=45, heads=2, kv_heads=2, dim=24, lengths=[64], rates=[1],
        causal=True, head_shift=0,
    ),
    "uncovered_queries": dict(  # r > heads: offsets no head keeps, zero outputs
        batch=1, seq_len=23, heads=2, kv_heads=1, dim=8, lengths=[10, 23], rates=[4, 6],
        causal=True, head_shift=2,
    ),
    **{f"random_{seed}": random_config(seed) for seed in range(12)},
}  # fmt: skip


def run(config, fn, dtype, layout=None):
    """Output and q/k/v gradients of fn under a random upstream gradient (seeded), and the same
    of the float64 reference on the dtype-rounded values."""
    generator = torch.Generator().manual_seed(0)
    b, n, h, g, d = (config[key] for key in ("batch", "seq_len", "heads", "kv_heads", "dim"))
    values = [randn(generator, b, n, heads, d, dtype=dtype) for heads in (h, g, g)]
    grad_out = randn(generator, b, n, h, d, dtype=dtype)
    leaves = [x.to(DEVICE, copy=True).requires_grad_() for x in values]
    inputs = leaves if layout is None else [layout(x) for x in leaves]
    out = fn(*inputs)
    out.backward(grad_out.to(DEVICE))
    actual = [out.detach().cpu(), *(x.grad.cpu() for x in leaves)]
    reference = [x.double().requires_grad_() for x in values]
    expected = dense_dilated_attention(
        *reference, config["lengths"], config["rates"], causal=config["causal"],
        head_shift=config["head_shift"],
    )  # fmt: skip
    expected.backward(grad_out.double())
    return actual, [expected.detach(), *(x.grad for x in reference)]


def triton_fn(config, **extra):
    def fn(q, k, v):
        return dilated_attention(
            q, k, v, config["lengths"], config["rates"], causal=config["causal"],
            head_shift=config["head_shift"], backend="triton", **extra,
        )  # fmt: skip

    return fn


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float32_matches_reference(name):
    """Outputs and q/k/v gradients exact to 1e-6 (measured worst case: see the commit)."""
    config = CONFIGS[name]
    actual, expected = run(config, triton_fn(config), torch.float32)
    for label, a, e in zip(("out", "grad_q", "grad_k", "grad_v"), actual, expected, strict=True):
        assert a.dtype == torch.float32 and a.shape == e.shape, label
        error = max_error(a, e)
        assert error <= FLOAT32_TOLERANCE, f"{name} {config} {label}: error {error:.3g}"


def test_strided_inputs_are_read_in_place():
    """Any layout (transposed head_dim, sliced sequence, stride-0 kv heads) gives the numbers of
    contiguous inputs: the kernels read through strides, nothing is copied."""
    config = dict(CONFIGS["gqa_causal_r_gt_w_shift"], seq_len=21)

    def layout(x):
        if x.shape[2] == config["heads"]:  # q: head_dim outermost in memory
            return x.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
        padded = torch.stack([x, torch.full_like(x, math.nan)], dim=2).flatten(1, 2)
        return padded[:, ::2]  # k, v: every other row of a buffer (NaN between)

    contiguous, _ = run(config, triton_fn(config), torch.float32)
    strided, _ = run(config, triton_fn(config), torch.float32, layout)
    for a, e in zip(strided, contiguous, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    # multi-query keys as a stride-0 expand of one kv head
    q, k, v = (randn(torch.Generator().manual_seed(3), 1, 19, h, 8) for h in (4, 1, 1))
    q, k, v = q.float().to(DEVICE), k.float().to(DEVICE), v.float().to(DEVICE)
    expanded = dilated_attention(q, k.expand(-1, -1, 4, -1), v.expand(-1, -1, 4, -1), [8, 19],
                                 [1, 3], causal=True, backend="triton")  # fmt: skip
    single = dilated_attention(q, k, v, [8, 19], [1, 3], causal=True, backend="triton")
    torch.testing.assert_close(expanded, single, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype):
    """16-bit inputs, float32 accumulation: within the tolerances of the torch path's bf16
    tests (the reference sees the rounded inputs). The interpreter's tl.dot is wrong for
    bfloat16 (triton 3.9): refused there."""
    config = CONFIGS["gqa_causal_r_gt_w_shift"]
    if dtype == torch.bfloat16 and ta.INTERPRETED:
        with pytest.raises(ValueError, match="interpreter"):
            run(config, triton_fn(config), dtype)
        return
    actual, expected = run(config, triton_fn(config), dtype)
    for label, a, e in zip(("out", "grad_q", "grad_k", "grad_v"), actual, expected, strict=True):
        assert a.dtype == dtype, label
        assert max_error(a, e) <= 3e-2, label


def test_layer_with_triton_equals_default_backend():
    """DilatedAttention(backend="triton") gives the default backend's output and gradients."""
    torch.manual_seed(0)
    kwargs = dict(
        segment_lengths=[8, 16], dilation_rates=[1, 2], causal=True, num_kv_heads=2,
        head_shift=1,
    )  # fmt: skip
    layers = [DilatedAttention(16, 4, backend=backend, **kwargs) for backend in ("auto", "triton")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(1, 19, 16)
    results = []
    for layer in layers:
        layer.to(DEVICE)
        leaf = x.to(DEVICE).requires_grad_()
        out = layer(leaf)
        out.square().sum().backward()
        results.append((out.detach(), leaf.grad, layer.qkv.weight.grad))
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_refusals():
    """What the kernels do not cover is a ValueError naming the option."""
    q = torch.randn(1, 8, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="select_top_k"):
        dilated_attention(q, q, q, [4], [1], causal=True, backend="triton", select_top_k=1)
    with pytest.raises(ValueError, match="select_top_k"):
        DilatedAttention(16, 2, segment_lengths=[4], dilation_rates=[1], causal=True,
                         select_top_k=1, backend="triton")  # fmt: skip
    with pytest.raises(ValueError, match="cu_seqlens or attention_mask"):
        dilated_attention(q, q, q, [4], [1], backend="triton", cu_seqlens=torch.tensor([0, 3, 8]))
    with pytest.raises(ValueError, match="float64"):
        dilated_attention(q.double(), q.double(), q.double(), [4], [1], backend="triton")
    # the default never picks it
    assert resolve_backend("auto", q, q, q, True) != "triton"


def test_library_imports_and_refuses_without_triton(tmp_path):
    """Without triton installed the library imports and runs its default backend;
    backend="triton" is a ValueError that says how to install it."""
    script = """
import sys
sys.modules["triton"] = None  # import triton raises ImportError
import torch
import longnet
from longnet import dilated_attention
q = torch.randn(1, 8, 2, 8)
dilated_attention(q, q, q, [4], [1])
try:
    dilated_attention(q, q, q, [4], [1], backend="triton")
except ValueError as error:
    assert "pip install 'longnet[triton]'" in str(error), error
else:
    raise AssertionError("no ValueError")
assert "longnet.triton_attention" not in sys.modules
"""
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    environment.pop("TRITON_INTERPRET", None)
    subprocess.run([sys.executable, "-c", script], check=True, env=environment, timeout=120)
