"""Dense attention kernels that return the log-sum-exp and accept it back in the backward.

Dilated attention (and its sequence-parallel form) runs many dense attentions whose outputs are
merged by their log-sum-exps. The exact backward of the merged result runs each attention's
backward with the MERGED output and log-sum-exp (the identity behind flash, blockwise and ring
attention), so every kernel here exposes forward -> (out, lse) and
backward(grad_out, q, k, v, out, lse) -> (dq, dk, dv) with out and lse supplied by the caller.

Notation: b batch, h heads, n query positions, s key positions, d head_dim.
Layout of every tensor: (b, h, n, d) for queries, (b, h, s, d) for keys and values, (b, h, n) for
the log-sum-exp, which is natural-log, of the SCALED scores, in float32 (float64 for float64).
`causal` is torch's convention: query i sees keys j <= i (top-left aligned).

Backends:
- "fused": torch's fused kernels, private aten ops (OPS) called with their schema's argument
  names. CPU: the flash kernel for CPU. CUDA: flash attention when torch says it can run the
  shapes (fp16/bf16), else the memory-efficient kernel (not yet run on a GPU: tests/test_cuda.py).
- "math": plain matmuls and softmax on any device and dtype; quadratic memory per call, the
  fallback and the thing tests compare the fused path against.
- "auto": "fused" where it can run, else "math".
- "triton": dilated attention's own Triton kernels (longnet/triton_attention.py, imported only
  when asked for: triton is an optional extra), on CUDA, or on CPU under Triton's interpreter.
  Only the single-device op runs them (longnet.dilated.attend); the dense calls that other paths
  make with it (decoding, sequence-parallel exchanges) run the "auto" kernel. "auto" never picks
  it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "fused", "math", "triton")

_aten = torch.ops.aten
# The memory-efficient CUDA kernel pads its log-sum-exp along the query axis to this multiple.
_EFFICIENT_LSE_ALIGNMENT = 32


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of log-sum-exps and merged outputs: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cuda_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> str | None:
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, causal, False)
    if torch.backends.cuda.can_use_flash_attention(params):
        return "flash"
    if torch.backends.cuda.can_use_efficient_attention(params):
        return "efficient"
    return None


def resolve_backend(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> str:
    """The kernel that runs: "cpu_flash", "flash", "efficient", "math" or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "math":
        return "math"
    if backend == "triton":
        try:
            from longnet import triton_attention  # imports triton: only when asked for
        except ImportError as error:
            raise ValueError(
                f"backend='triton' needs the triton package (pip install 'longnet[triton]'); "
                f"importing it failed: {error}"
            ) from error
        triton_attention.check_device(q)
        return "triton"
    if q.device.type == "cpu":
        fused = "cpu_flash"
    elif q.device.type == "cuda":
        fused = _cuda_kernel(q, k, v, causal)
    else:
        fused = None
    if fused is None:
        if backend == "fused":
            raise ValueError(
                f"backend='fused': no fused attention kernel for device {q.device}, dtype "
                f"{q.dtype}, head_dim {q.shape[-1]}; use backend='auto' or 'math'"
            )
        return "math"
    return fused


def _math_scores(q, k, causal, scale):
    dtype = accumulation_dtype(q.dtype)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale  # (b, h, n, s)
    if causal:
        n, s = scores.shape[-2:]
        future = torch.ones(n, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, -math.inf)
    return scores


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """x, or a contiguous copy where its last dimension is not dense.

    NOTE: the fused kernels read head_dim as contiguous memory whatever x.stride(-1) says, and
    silently compute with the wrong numbers otherwise (a transposed, sliced or expanded head_dim,
    as `rearrange(x, "b n (d h) -> b n h d")` gives). Every other dimension may have any stride,
    0 included, so the strided views dilated attention hands over stay views.
    """
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


# The private aten ops behind each fused kernel: (forward, backward). Their schemas change between
# torch releases, so the arguments are passed by name (a renamed one fails loudly instead of
# landing in another's place) and tests/test_kernels.py checks them against the installed torch.
OPS = {
    "cpu_flash": (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
    "flash": (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_backward",
    ),
    "efficient": (
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_efficient_attention_backward",
    ),
}


def forward_arguments(kernel: str, q, k, v, *, causal: bool, scale: float) -> dict:
    """The arguments of OPS[kernel][0], named as in its schema. Its first two results are used:
    out and lse."""
    if kernel == "efficient":
        return dict(
            query=q,
            key=k,
            value=v,
            attn_bias=None,
            compute_log_sumexp=True,
            dropout_p=0.0,
            is_causal=causal,
            scale=scale,
        )
    arguments = dict(query=q, key=k, value=v, dropout_p=0.0, is_causal=causal, scale=scale)
    if kernel == "flash":
        arguments["return_debug_mask"] = False
    return arguments


def backward_arguments(kernel: str, grad_out, q, k, v, out, lse, *, causal, scale) -> dict:
    """The arguments of OPS[kernel][1], named as in its schema. Its first three results are
    used: dq, dk, dv."""
    if kernel == "efficient":  # the kernel reads back the padded layout it returned
        n = q.shape[-2]
        lse = F.pad(lse, (0, -(-n // _EFFICIENT_LSE_ALIGNMENT) * _EFFICIENT_LSE_ALIGNMENT - n))
    tensors = dict(query=q, key=k, value=v, out=out, logsumexp=lse)
    if kernel == "cpu_flash":
        return dict(grad_out=grad_out, **tensors, dropout_p=0.0, is_causal=causal, scale=scale)
    # Without dropout the random state is never read.
    no_rng = torch.empty((), dtype=torch.long, device=q.device)
    if kernel == "flash":
        return dict(
            grad_out=grad_out,
            **tensors,
            cum_seq_q=None,  # dense calls, not varlen ones, have no cumulative lengths
            cum_seq_k=None,
            max_q=q.shape[-2],
            max_k=k.shape[-2],
            dropout_p=0.0,
            is_causal=causal,
            philox_seed=no_rng,
            philox_offset=no_rng,
            scale=scale,
        )
    return dict(
        grad_out_=grad_out,
        **tensors,
        # None is the undefined tensor torch's own derivative passes when there is no bias.
        attn_bias=None,
        philox_seed=no_rng,
        philox_offset=no_rng,
        dropout_p=0.0,
        grad_input_mask=[True, True, True, False],
        is_causal=causal,
        scale=scale,
    )


def _run(op_name: str, arguments: dict):
    return getattr(_aten, op_name).default(**arguments)


# The kernels that take an additive mask (b, h, n, s) (used by the content-selected pattern).
MASKED_KERNELS = ("cpu_flash", "math")


def reads_values_on_host(device: torch.device) -> bool:
    """Whether checks that read tensor values on the host (token ids in range, which outputs a
    NaN reaches) run for tensors on `device`: on CPU, where that costs nothing; not on an
    accelerator, where each read is a host sync that stalls its queue."""
    return device.type == "cpu"


def mark_nan_readers(out, lse, q, readers=None) -> None:
    """Sets out (b, n, h, d) and lse (b, n, h) to NaN, in place, for the queries that read a NaN:
    `readers` (b, n, h), found by the caller (whose kernels saw NaN keys and values as 0), and the
    NaN queries that read anything. NOTE: torch's CPU flash kernel turns a query row with a NaN
    into a zero output with a finite log-sum-exp; a NaN must reach exactly the outputs that read
    it, as in the math."""
    poisoned = q.isnan().any(-1) & (lse != -math.inf)  # (b, n, h): kept queries only
    if readers is not None:
        poisoned |= readers
    out.masked_fill_(poisoned.unsqueeze(-1), math.nan)
    lse.masked_fill_(poisoned, math.nan)


def attention_forward(q, k, v, *, causal: bool, scale: float, kernel: str, mask=None):
    """(out in q's dtype, lse in accumulation dtype) for one dense attention; mask (b, h, n, s),
    0 or -inf in q's dtype, is added to the scaled scores (MASKED_KERNELS only)."""
    if kernel == "triton":  # a dense call of decoding or an exchange: torch's kernels
        kernel = resolve_backend("auto", q, k, v, causal)
    if kernel != "math":
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
        arguments = forward_arguments(kernel, q, k, v, causal=causal, scale=scale)
        if mask is not None:
            arguments["attn_mask"] = mask
        out, lse = _run(OPS[kernel][0], arguments)[:2]
        return out, lse.narrow(-1, 0, q.shape[-2])  # the efficient kernel pads its query axis
    scores = _math_scores(q, k, causal, scale)
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    lse = torch.logsumexp(scores, dim=-1)  # (b, h, n)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.to(scores.dtype))
    return out.to(q.dtype), lse


def attention_backward(
    grad_out, q, k, v, out, lse, *, causal: bool, scale: float, kernel: str, mask=None
):
    """(dq, dk, dv) of one dense attention, with the softmax taken from the given out and lse
    (and mask, as in attention_forward)."""
    if kernel == "triton":
        kernel = resolve_backend("auto", q, k, v, causal)
    if kernel != "math":
        grad_out, q, k, v, out = map(unit_stride, (grad_out, q, k, v, out))
        arguments = backward_arguments(
            kernel, grad_out, q, k, v, out, lse, causal=causal, scale=scale
        )
        if mask is not None:
            arguments["attn_mask"] = mask
        return tuple(_run(OPS[kernel][1], arguments)[:3])
    dtype = lse.dtype
    grad_out, out = grad_out.to(dtype), out.to(dtype)
    scores = _math_scores(q, k, causal, scale)
    if mask is not None:
        scores = scores + mask.to(dtype)
    probs = torch.exp(scores - lse.unsqueeze(-1))  # (b, h, n, s)
    grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
    grad_probs = torch.matmul(grad_out, v.to(dtype).transpose(-1, -2))
    delta = (grad_out * out).sum(-1, keepdim=True)  # (b, h, n, 1)
    grad_scores = probs * (grad_probs - delta) * scale
    grad_q = torch.matmul(grad_scores, k.to(dtype))
    grad_k = torch.matmul(grad_scores.transpose(-1, -2), q.to(dtype))
    return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


def register_attention_autograd(op, backward_op) -> None:
    """The autograd of an attention custom op and the fake kernel of its backward op, for ops of
    the form op(q, k, v, *arguments) -> (out, *saved) and backward_op(grad_out, q, k, v, out,
    *saved, *arguments) -> (dq, dk, dv): q, k, v and every output are saved; the extra outputs
    (lse, exchange buffers) are internal and get no gradient."""

    def setup_context(ctx, inputs, output):
        q, k, v, *ctx.arguments = inputs
        ctx.save_for_backward(q, k, v, *output)

    def backward(ctx, grad_out, *_):
        grads = backward_op(grad_out, *ctx.saved_tensors, *ctx.arguments)
        return *grads, *[None] * len(ctx.arguments)

    def fake_backward(grad_out, q, k, v, *args):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    backward_op.register_fake(fake_backward)
    op.register_autograd(backward, setup_context=setup_context)
