"""Dilated attention (LongNet, Ding et al. 2023, section 2.2): exact, on fused kernels.

Semantics (docs/semantics.md): for pattern i, head j keeps the positions p of each segment of
w_i tokens with (p mod w_i) mod r_i == (j + head_shift) mod r_i; kept queries attend the kept
keys of their segment (causal by token position); the patterns' outputs mix with weights
proportional to their softmax denominators (paper Eq. 10).

This module validates what users pass and hands the rest to the planner (longnet/plan.py) and
the executor (longnet/engine.py), wrapped as a torch custom op so that torch.compile sees one
opaque call with a known output shape and no data-dependent values.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from longnet import engine, selection
from longnet.kernels import accumulation_dtype, resolve_backend
from longnet.plan import make_plan

# Pattern values must fit a 64-bit integer (the planner's tensors and the cache's positions).
MAX_PATTERN_VALUE = 2**63 - 1


def _positive_ints(name: str, values) -> tuple[int, ...]:
    if isinstance(values, (str, bytes, torch.Tensor)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of positive ints, got {values!r}")
    try:
        ints = tuple(operator.index(x) for x in values if not isinstance(x, bool))
    except TypeError:
        ints = ()
    if len(ints) != len(values) or any(x < 1 for x in ints):
        raise ValueError(f"{name} must be a list of positive ints, got {list(values)!r}")
    if any(x > MAX_PATTERN_VALUE for x in ints):
        raise ValueError(f"{name} must be ints below 2**63, got {list(values)!r}")
    return ints


def check_patterns(segment_lengths, dilation_rates) -> tuple[tuple[int, int], ...]:
    """Validated ((w_1, r_1), ...); ValueError naming the bad argument otherwise."""
    lengths = _positive_ints("segment_lengths", segment_lengths)
    rates = _positive_ints("dilation_rates", dilation_rates)
    if not lengths:
        raise ValueError("segment_lengths must hold at least one pattern, got []")
    if len(lengths) != len(rates):
        raise ValueError(
            f"segment_lengths and dilation_rates must have the same length, got "
            f"{len(lengths)} segment_lengths {list(lengths)} and {len(rates)} dilation_rates "
            f"{list(rates)}"
        )
    return tuple(zip(lengths, rates, strict=True))


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q (b, n, h, d), k and v (b, n, g, d) with g dividing h, on one device in one dtype."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{name} must have shape (batch, seq, heads, head_dim), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    batch, seq_len, heads, dim = q.shape
    if k.shape[0] != batch or k.shape[1] != seq_len or k.shape[3] != dim:
        raise ValueError(
            f"k and v must have q's batch, seq and head_dim {batch, seq_len, dim}, "
            f"got {tuple(k.shape)}"
        )
    if batch < 1 or seq_len < 1 or heads < 1 or dim < 1:
        raise ValueError(f"q must have non-empty dimensions, got {tuple(q.shape)}")
    if heads % k.shape[2] != 0:
        raise ValueError(
            f"heads of q ({heads}) must be a multiple of the kv_heads of k and v ({k.shape[2]})"
        )


def resolve_softmax_scale(softmax_scale, head_dim: int) -> float:
    """The scale of the scores: 1/sqrt(head_dim) by default; ValueError unless a finite
    number > 0 (0 or less would make every score equal or reverse them)."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale must be a number, got {softmax_scale!r}")
    if not 0 < softmax_scale < math.inf:
        raise ValueError(f"softmax_scale must be a finite number > 0, got {softmax_scale!r}")
    return float(softmax_scale)


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def check_head_shift(head_shift) -> int:
    if isinstance(head_shift, bool) or not isinstance(head_shift, int):
        raise ValueError(f"head_shift must be an int, got {head_shift!r}")
    return head_shift


def check_selection(select_top_k, select_block_size, causal: bool) -> None:
    """ValueError naming the value unless select_top_k is an int >= 0 (0: no content-selected
    pattern) and, when it is on, select_block_size an int >= 1 and causal True."""
    for name, value, low in (
        ("select_top_k", select_top_k, 0),
        ("select_block_size", select_block_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if select_top_k and not causal:
        raise ValueError("select_top_k > 0 (the content-selected pattern) needs causal=True")


def check_arguments(
    q, k, v, segment_lengths, dilation_rates, causal, softmax_scale, backend, head_shift
):
    """Validated (patterns, scale, kernel) of a dilated attention call; ValueError naming the
    first bad argument."""
    patterns = check_patterns(segment_lengths, dilation_rates)
    check_qkv(q, k, v)
    check_flag("causal", causal)
    check_head_shift(head_shift)
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    queries = q.transpose(1, 2)  # (b, h, n, d): what the kernels see, for the backend check
    return patterns, scale, resolve_backend(backend, queries, queries, queries, causal)


@torch.library.custom_op("longnet::dilated_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: list[int],
    dilation_rates: list[int],
    causal: bool,
    scale: float,
    kernel: str,
    head_shift: int,
    select_top_k: int,
    select_block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    plan = _plan(q, k, segment_lengths, dilation_rates, causal, head_shift)
    if not select_top_k:
        out, lse, _ = engine.forward(q, k, v, plan, scale=scale, kernel=kernel)
        return out, lse
    acc = accumulation_dtype(q.dtype)
    out, lse, _ = engine.forward(q, k, v, plan, scale=scale, kernel=kernel, out_dtype=acc)
    window = segment_lengths[0]
    chosen = selection.forward(q, k, v, select_block_size, select_top_k, window, scale, kernel)
    out, lse = selection.mix(out, lse, *chosen)
    return out.to(q.dtype), lse


@torch.library.custom_op("longnet::dilated_attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    segment_lengths: list[int],
    dilation_rates: list[int],
    causal: bool,
    scale: float,
    kernel: str,
    head_shift: int,
    select_top_k: int,
    select_block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan(q, k, segment_lengths, dilation_rates, causal, head_shift)
    grads = engine.backward(grad_out, q, k, v, out, lse, None, plan, scale=scale, kernel=kernel)
    if not select_top_k:
        return grads
    window = segment_lengths[0]
    chosen = selection.backward(
        grad_out, q, k, v, out, lse, select_block_size, select_top_k, window, scale, kernel
    )
    return tuple((a + b).to(a.dtype) for a, b in zip(grads, chosen, strict=True))


def _plan(q, k, segment_lengths, dilation_rates, causal, head_shift):
    patterns = tuple(zip(segment_lengths, dilation_rates, strict=True))
    return make_plan(q.shape[1], q.shape[2], k.shape[2], patterns, causal, head_shift)


@_attention_op.register_fake
def _(q, k, v, segment_lengths, dilation_rates, causal, scale, kernel, head_shift, *selection):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *ctx.arguments = inputs
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, grad_out, grad_lse):
    # lse is internal (dilated_attention returns out only), so grad_lse is always zero.
    grads = _attention_backward_op(grad_out, *ctx.saved_tensors, *ctx.arguments)
    return *grads, *[None] * len(ctx.arguments)


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    backend: str = "auto",
    head_shift: int = 0,
    select_top_k: int = 0,
    select_block_size: int = 32,
) -> torch.Tensor:
    """LongNet dilated attention, exactly as docs/semantics.md defines it.

    q (b, n, h, d); k, v (b, n, g, d) with g dividing h (multi-query and grouped-query
    attention), in any memory layout. Pattern i cuts the sequence into segments of
    segment_lengths[i] tokens (the last may be shorter) and keeps every dilation_rates[i]-th
    position of each, at offset (head + head_shift) mod r (head_shift = 0 is the paper).
    Returns (b, n, h, d) in q's dtype. backend: "auto", "fused" (torch's fused kernels) or
    "math" (see kernels.py).

    select_top_k > 0 adds the content-selected pattern (longnet/selection.py, causal only): each
    query also attends the select_top_k complete blocks of select_block_size tokens before its
    segment of the first pattern that score highest by q . mean(k of the block), mixed by Eq. 10
    as one more pattern.
    """
    patterns, scale, kernel = check_arguments(
        q, k, v, segment_lengths, dilation_rates, causal, softmax_scale, backend, head_shift
    )
    check_selection(select_top_k, select_block_size, causal)
    lengths, rates = (list(values) for values in zip(*patterns, strict=True))
    out, _ = _attention_op(
        q, k, v, lengths, rates, causal, scale, kernel, head_shift, select_top_k, select_block_size
    )
    return out
