"""longnet.kernels without a GPU: the private aten ops it calls, their results' layouts, and which
kernel runs where.

The CUDA kernels cannot run here, so three things stand in for them:
- each op's schema in the installed torch: the arguments we pass (by name) and the results we
  unpack must be the ones it declares, so a torch upgrade that renames, adds or moves one fails
  here rather than on the first GPU;
- each op's meta implementation, run on fake CUDA tensors: shapes and dtypes of out, lse and
  gradients, and the 32-row padding of the memory-efficient kernel's lse;
- torch's CUDA capability checks, replaced by stand-ins: which kernel resolve_backend picks from
  their answers. What torch answers on a real GPU is tested in tests/test_cuda.py.

NOTE: only the kernel calls run on fake CUDA tensors, not longnet.engine around them: Python
indexing (x[:, a:b]) opens a CUDA device guard, even for a fake tensor, and a CPU-only build of
torch has none ("PyTorch is not linked with support for cuda devices").
"""

import math

import pytest
import torch
from conftest import TOLERANCE, max_error, randn
from torch._subclasses.fake_tensor import FakeTensorMode

from longnet import kernels

FUSED = list(kernels.OPS)
# Result names of each op, as its schema declares them, for the results we unpack: forward
# (out, lse), backward (dq, dk, dv). The memory-efficient backward leaves its results unnamed.
RESULTS = {
    "cpu_flash": (("output", "logsumexp"), ("grad_query", "grad_key", "grad_value")),
    "flash": (("output", "logsumexp"), ("grad_query", "grad_key", "grad_value")),
    "efficient": (("output", "log_sumexp"), ("", "", "")),
}
# Which Python values a schema type takes. None for a plain Tensor is the undefined tensor (the
# memory-efficient backward's attn_bias, as torch's own derivative passes it).
SCHEMA_TYPES = {
    "Tensor": (torch.Tensor, type(None)),
    "Optional[Tensor]": (torch.Tensor, type(None)),
    "float": (float,),
    "Optional[float]": (float, type(None)),
    "bool": (bool,),
    "int": (int,),  # SymInt
    "List[bool]": (list,),
}


def schema(name: str) -> torch.FunctionSchema:
    return getattr(torch.ops.aten, name).default._schema


def qkvo(device="cpu", dtype=torch.float32, n=40, s=72, d=64, dv=64):
    """q (2, 4, n, d), k (2, 4, s, d), v (2, 4, s, dv), a gradient (2, 4, n, dv)."""
    make = torch.randn if device == "cpu" else torch.empty
    shapes = ((2, 4, n, d), (2, 4, s, d), (2, 4, s, dv), (2, 4, n, dv))
    return tuple(make(shape, device=device, dtype=dtype) for shape in shapes)


def all_arguments(kernel):
    """(op name, arguments we pass, result names we rely on) for the forward and backward."""
    q, k, v, grad = qkvo()
    lse = torch.zeros(2, 4, 40)
    forward = kernels.forward_arguments(kernel, q, k, v, causal=True, scale=0.5)
    backward = kernels.backward_arguments(kernel, grad, q, k, v, grad, lse, causal=True, scale=0.5)
    return list(zip(kernels.OPS[kernel], (forward, backward), RESULTS[kernel], strict=True))


@pytest.mark.parametrize("kernel", FUSED)
def test_arguments_and_results_match_the_installed_schemas(kernel):
    for op, arguments, results in all_arguments(kernel):
        declared = {argument.name: argument for argument in schema(op).arguments}
        unknown = set(arguments) - set(declared)
        assert not unknown, f"{op}: torch {torch.__version__} has no arguments {unknown}"
        for name, argument in declared.items():
            if name not in arguments:
                # Left to its default only where that default turns a feature off.
                assert argument.has_default_value() and argument.default_value is None, (
                    f"{op}: argument {name} ({argument.type}) is not passed"
                )
                continue
            value, kind = arguments[name], str(argument.type)
            assert kind in SCHEMA_TYPES, f"{op}: {name} has type {kind}, new to this test"
            assert isinstance(value, SCHEMA_TYPES[kind]), f"{op}: {name} is {kind}, got {value!r}"
            if argument.N is not None:  # a fixed-length list: bool[4]
                assert len(value) == argument.N, f"{op}: {name} takes {argument.N} values"
        returns = schema(op).returns
        assert tuple(r.name for r in returns[: len(results)]) == results, op
        assert all(str(r.type) == "Tensor" for r in returns[: len(results)]), op


def test_efficient_backward_returns_one_gradient_per_grad_input_mask_entry():
    """Its results are unnamed: (dq, dk, dv, d attn_bias), in grad_input_mask's order."""
    forward_op, backward_op = kernels.OPS["efficient"]
    declared = {a.name: a for a in schema(backward_op).arguments}
    assert declared["grad_input_mask"].N == len(schema(backward_op).returns) == 4


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
def test_cpu_kernels_run_the_arguments_they_build(rng, kernel, causal):
    """Numbers against the float64 math kernel, with queries and keys of different lengths and a
    multi-query key/value head broadcast with stride 0."""
    n = 24 if causal else 40  # causal is top-left aligned, so a square one is what dilation uses
    q, k, v, grad = (randn(rng, *x.shape) for x in qkvo(n=n, s=n if causal else 72, d=16, dv=16))
    k, v = k[:, :1].expand_as(k), v[:, :1].expand_as(v)
    options = dict(causal=causal, scale=0.3)
    out, lse = kernels.attention_forward(q.float(), k.float(), v.float(), kernel=kernel, **options)
    expected_out, expected_lse = kernels.attention_forward(q, k, v, kernel="math", **options)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert max_error(out, expected_out) <= TOLERANCE[torch.float32]
    assert max_error(lse, expected_lse) <= TOLERANCE[torch.float32]
    grads = kernels.attention_backward(
        grad.float(), q.float(), k.float(), v.float(), out, lse, kernel=kernel, **options
    )
    expected = kernels.attention_backward(
        grad, q, k, v, expected_out, expected_lse, kernel="math", **options
    )
    for name, a, e in zip(("dq", "dk", "dv"), grads, expected, strict=True):
        assert a.shape == e.shape and max_error(a, e) <= TOLERANCE[torch.float32], name


CUDA_KERNEL_DTYPES = [
    ("flash", torch.bfloat16),
    ("flash", torch.float16),
    ("efficient", torch.bfloat16),
    ("efficient", torch.float16),
    ("efficient", torch.float32),
]


@pytest.mark.parametrize("n, s, causal", [(40, 72, False), (33, 33, True), (64, 64, True)])
@pytest.mark.parametrize("kernel, dtype", CUDA_KERNEL_DTYPES, ids=str)
def test_cuda_call_sequence_on_fake_tensors(kernel, dtype, n, s, causal):
    """torch's meta implementations of the CUDA ops: out (b, h, n, d) in the input dtype, lse
    (b, h, n) in float32 (the memory-efficient kernel's padded to a multiple of 32 queries and
    cut back), gradients shaped like q, k, v (v with a head_dim of its own, so dk and dv cannot
    be swapped unnoticed), keys and values of one head broadcast to all (stride 0)."""
    dv = 64 if kernel == "flash" else 32  # flash takes one head_dim for q, k and v
    with FakeTensorMode():
        q, k, v, grad = qkvo("cuda", dtype, n, s, 64, dv)
        # narrow, not k[:, :1]: indexing asks for a CUDA device guard, which this build lacks.
        k, v = k.narrow(1, 0, 1).expand_as(k), v.narrow(1, 0, 1).expand_as(v)
        assert k.stride(1) == 0 and kernels.unit_stride(k) is k  # stays a view
        options = dict(causal=causal, scale=0.125)
        forward_op, _ = kernels.OPS[kernel]
        raw = kernels._run(forward_op, kernels.forward_arguments(kernel, q, k, v, **options))
        padded = math.ceil(n / 32) * 32 if kernel == "efficient" else n
        assert raw[1].shape == (2, 4, padded)
        out, lse = kernels.attention_forward(q, k, v, kernel=kernel, **options)
        assert (out.shape, out.dtype, out.device.type) == ((2, 4, n, dv), dtype, "cuda")
        assert (lse.shape, lse.dtype) == ((2, 4, n), torch.float32)
        arguments = kernels.backward_arguments(kernel, grad, q, k, v, out, lse, **options)
        assert arguments["logsumexp"].shape == raw[1].shape  # the layout the kernel returned
        grads = kernels.attention_backward(grad, q, k, v, out, lse, kernel=kernel, **options)
        for name, g, x in zip(("dq", "dk", "dv"), grads, (q, k, v), strict=True):
            assert (g.shape, g.dtype, g.device.type) == (x.shape, dtype, "cuda"), name


# Kernel selection.


@pytest.mark.parametrize("head_dim", [3, 64, 512])
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str
)
def test_cpu_takes_its_flash_kernel_for_every_dtype_and_head_dim(rng, dtype, head_dim):
    q = randn(rng, 1, 2, 5, head_dim, dtype=dtype)
    for backend, expected in (("auto", "cpu_flash"), ("fused", "cpu_flash"), ("math", "math")):
        assert kernels.resolve_backend(backend, q, q, q, True) == expected
    # ... and the kernel runs there: its numbers are the math kernel's.
    fused = kernels.attention_forward(q, q, q, causal=True, scale=0.5, kernel="cpu_flash")
    exact = kernels.attention_forward(
        q.double(), q.double(), q.double(), causal=True, scale=0.5, kernel="math"
    )
    tolerance = TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])  # float16 is finer than bfloat16
    for a, e in zip(fused, exact, strict=True):
        assert max_error(a, e) <= tolerance


@pytest.fixture
def cuda_capabilities(monkeypatch):
    """Stand-ins for torch's CUDA checks: set answers["flash"] / answers["efficient"]; every
    SDPAParams they were asked about is recorded in asked."""
    answers, asked = {"flash": False, "efficient": False}, []

    def check(name):
        def can_use(params, debug=False):
            asked.append(params)
            return answers[name]

        return can_use

    monkeypatch.setattr(torch.backends.cuda, "can_use_flash_attention", check("flash"))
    monkeypatch.setattr(torch.backends.cuda, "can_use_efficient_attention", check("efficient"))
    return answers, asked


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "flash, efficient, expected",
    [
        (True, True, "flash"),
        (True, False, "flash"),
        (False, True, "efficient"),
        (False, False, None),
    ],
)
def test_cuda_prefers_flash_then_efficient_then_math(
    cuda_capabilities, flash, efficient, expected, causal
):
    """What torch's checks answer depends on the GPU, the dtype and the head_dim (flash: 16-bit
    and head_dim <= 256; efficient: also float32): here only what resolve_backend makes of the
    answers, and that it asks about the tensors as given."""
    answers, asked = cuda_capabilities
    answers.update(flash=flash, efficient=efficient)
    with FakeTensorMode():
        q, k, v, _ = qkvo("cuda", torch.bfloat16, 40, 40, 48)
        assert kernels.resolve_backend("auto", q, k, v, causal) == (expected or "math")
        if expected is None:
            with pytest.raises(ValueError, match="dtype torch.bfloat16, head_dim 48"):
                kernels.resolve_backend("fused", q, k, v, causal)
        else:
            assert kernels.resolve_backend("fused", q, k, v, causal) == expected
        assert kernels.resolve_backend("math", q, k, v, causal) == "math"
    assert asked
    for params in asked:
        assert params.query is q and params.key is k and params.value is v
        assert params.attn_mask is None and params.dropout == 0.0
        assert params.is_causal == causal and not params.enable_gqa


def test_other_devices_take_math_and_unknown_backends_raise():
    q = torch.empty(1, 2, 5, 8, device="meta")
    assert kernels.resolve_backend("auto", q, q, q, False) == "math"
    with pytest.raises(ValueError, match="no fused attention kernel for device meta"):
        kernels.resolve_backend("fused", q, q, q, False)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.resolve_backend("flash", q, q, q, False)
