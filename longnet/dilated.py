"""Dilated attention (LongNet, Ding et al. 2023, section 2.2): exact, on fused kernels.

Semantics (docs/semantics.md): for pattern i, head j keeps the positions p of each segment of
w_i tokens with (p mod w_i) mod r_i == (j + head_shift) mod r_i; kept queries attend the kept
keys of their segment (causal by token position); the patterns' outputs mix with weights
proportional to their softmax denominators (paper Eq. 10).

This module validates what users pass (check_arguments, at the public boundary) and hands the
rest to the planner (longnet/plan.py) and the executor (longnet/engine.py), wrapped as a torch
custom op so that torch.compile sees one opaque call with a known output shape and no
data-dependent values. `attend` is that call on checked arguments: the layers, which check
theirs once at construction, run it in every step without checking again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from longnet import engine, selection, varlen
from longnet.checks import choice, flag, int_at_least, positive_ints
from longnet.kernels import (
    BACKENDS,
    accumulation_dtype,
    register_attention_autograd,
    resolve_backend,
)
from longnet.plan import make_plan


def check_patterns(segment_lengths, dilation_rates) -> tuple[tuple[int, int], ...]:
    """Validated ((w_1, r_1), ...); ValueError naming the bad argument otherwise."""
    lengths = positive_ints("segment_lengths", segment_lengths)
    rates = positive_ints("dilation_rates", dilation_rates)
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


def check_head_shift(head_shift) -> int:
    if isinstance(head_shift, bool) or not isinstance(head_shift, int):
        raise ValueError(f"head_shift must be an int, got {head_shift!r}")
    return head_shift


def check_selection(
    select_top_k, select_block_size, causal: bool, select_pooled=False, select_query_span=1,
    select_within_segment=False, select_ranking_dims=0, select_span_max=False,
) -> None:  # fmt: skip
    """ValueError naming the value unless select_top_k is an int >= 0 (0: no content-selected
    pattern) and, when it is on, select_block_size an int >= 1 and causal True; select_pooled,
    select_within_segment (flags), select_query_span > 1 and select_ranking_dims > 0 options
    that need select_top_k > 0; select_span_max a flag that needs select_query_span > 1."""
    int_at_least("select_top_k", select_top_k, 0)
    int_at_least("select_block_size", select_block_size, 1)
    if select_top_k and not causal:
        raise ValueError("select_top_k > 0 (the content-selected pattern) needs causal=True")
    if flag("select_pooled", select_pooled) and not select_top_k:
        raise ValueError(
            "select_pooled=True (the pooled pattern of the content-selected blocks) needs "
            f"select_top_k > 0, got select_top_k={select_top_k!r}"
        )
    if flag("select_within_segment", select_within_segment) and not select_top_k:
        raise ValueError(
            "select_within_segment=True (where the content-selected blocks may lie) needs "
            f"select_top_k > 0, got select_top_k={select_top_k!r}"
        )
    int_at_least("select_query_span", select_query_span, 1)
    if select_query_span > 1 and not select_top_k:
        raise ValueError(
            f"select_query_span={select_query_span!r} (how the content-selected blocks are "
            f"ranked) needs select_top_k > 0, got select_top_k={select_top_k!r}"
        )
    int_at_least("select_ranking_dims", select_ranking_dims, 0)
    if select_ranking_dims and not select_top_k:
        raise ValueError(
            f"select_ranking_dims={select_ranking_dims!r} (which head dims rank the "
            f"content-selected blocks) needs select_top_k > 0, got select_top_k={select_top_k!r}"
        )
    if flag("select_span_max", select_span_max) and select_query_span == 1:
        raise ValueError(
            "select_span_max=True (rank each block by its best probability over select_query_span "
            "queries) needs select_query_span > 1, got select_query_span=1"
        )


def check_options(
    segment_lengths, dilation_rates, causal, backend, head_shift, select_top_k, select_block_size,
    select_pooled=False, select_query_span=1, select_within_segment=False, select_ranking_dims=0,
    select_span_max=False,
) -> tuple[tuple[int, int], ...]:  # fmt: skip
    """Validated patterns ((w_1, r_1), ...) after checking every argument of a call but the
    tensors and the scale: what a layer checks once, at construction."""
    patterns = check_patterns(segment_lengths, dilation_rates)
    flag("causal", causal)
    check_head_shift(head_shift)
    choice("backend", backend, BACKENDS)
    check_selection(
        select_top_k, select_block_size, causal, select_pooled, select_query_span,
        select_within_segment, select_ranking_dims, select_span_max,
    )  # fmt: skip
    if backend == "triton" and select_top_k:
        raise ValueError(
            "select_top_k > 0 (the content-selected pattern) is not built for backend='triton'; "
            "use backend='auto'"
        )
    return patterns


def check_arguments(
    q,
    k,
    v,
    segment_lengths,
    dilation_rates,
    causal,
    softmax_scale,
    backend,
    head_shift,
    select_top_k=0,
    select_block_size=32,
    select_pooled=False,
    select_query_span=1,
    select_within_segment=False,
    select_ranking_dims=0,
    select_span_max=False,
) -> tuple[tuple[tuple[int, int], ...], float]:
    """Validated (patterns, scale) of a dilated attention call; ValueError naming the first bad
    argument."""
    patterns = check_options(
        segment_lengths, dilation_rates, causal, backend, head_shift, select_top_k,
        select_block_size, select_pooled, select_query_span, select_within_segment,
        select_ranking_dims, select_span_max,
    )  # fmt: skip
    check_qkv(q, k, v)
    check_ranking_dims(select_ranking_dims, q.shape[-1])
    return patterns, resolve_softmax_scale(softmax_scale, q.shape[-1])


def check_ranking_dims(select_ranking_dims: int, head_dim: int) -> None:
    """ValueError naming the value unless select_ranking_dims <= head_dim."""
    if select_ranking_dims > head_dim:
        raise ValueError(
            f"select_ranking_dims={select_ranking_dims} exceeds the head dim {head_dim}"
        )


def kernel_for(backend: str, q: torch.Tensor, causal: bool) -> str:
    """The kernel that runs for q (b, n, h, d) (see longnet.kernels.resolve_backend)."""
    queries = q.transpose(1, 2)  # (b, h, n, d): what the kernels see
    return resolve_backend(backend, queries, queries, queries, causal)


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
    select_pooled: bool,
    select_query_span: int,
    select_within_segment: bool,
    select_ranking_dims: int,
    select_span_max: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    plan = _plan(q, k, segment_lengths, dilation_rates, causal, head_shift)
    if not select_top_k:
        out, lse, _ = engine.forward(q, k, v, plan, scale=scale, kernel=kernel)
        return out, lse
    acc = accumulation_dtype(q.dtype)
    out, lse, _ = engine.forward(q, k, v, plan, scale=scale, kernel=kernel, out_dtype=acc)
    window = selection.candidate_window(segment_lengths, select_block_size, select_within_segment)
    chosen = selection.forward(
        q, k, v, select_block_size, select_top_k, window, scale, kernel, pooled=select_pooled,
        query_span=select_query_span, ranking_dims=select_ranking_dims, span_max=select_span_max,
    )  # fmt: skip
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
    select_pooled: bool,
    select_query_span: int,
    select_within_segment: bool,
    select_ranking_dims: int,
    select_span_max: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan(q, k, segment_lengths, dilation_rates, causal, head_shift)
    grads = engine.backward(grad_out, q, k, v, out, lse, None, plan, scale=scale, kernel=kernel)
    if not select_top_k:
        return grads
    window = selection.candidate_window(segment_lengths, select_block_size, select_within_segment)
    *chosen, _ = selection.backward(
        grad_out, q, k, v, out, lse, select_block_size, select_top_k, window, scale, kernel,
        pooled=select_pooled, query_span=select_query_span, ranking_dims=select_ranking_dims,
        span_max=select_span_max,
    )  # fmt: skip
    return tuple((a + b).to(a.dtype) for a, b in zip(grads, chosen, strict=True))


def _plan(q, k, segment_lengths, dilation_rates, causal, head_shift):
    patterns = tuple(zip(segment_lengths, dilation_rates, strict=True))
    return make_plan(q.shape[1], q.shape[2], k.shape[2], patterns, causal, head_shift)


@_attention_op.register_fake
def _(q, k, v, segment_lengths, dilation_rates, causal, scale, kernel, head_shift, *selection):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))


register_attention_autograd(_attention_op, _attention_backward_op)


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
    select_pooled: bool = False,
    select_query_span: int = 1,
    select_within_segment: bool = False,
    select_ranking_dims: int = 0,
    select_span_max: bool = False,
    cu_seqlens=None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """LongNet dilated attention, exactly as docs/semantics.md defines it.

    q (b, n, h, d); k, v (b, n, g, d) with g dividing h (multi-query and grouped-query
    attention), in any memory layout. Pattern i cuts the sequence into segments of
    segment_lengths[i] tokens (the last may be shorter) and keeps every dilation_rates[i]-th
    position of each, at offset (head + head_shift) mod r (head_shift = 0 is the paper).
    Returns (b, n, h, d) in q's dtype. backend: "auto", "fused" (torch's fused kernels),
    "math" (see kernels.py) or "triton" (longnet/triton_attention.py: CUDA, or CPU under
    TRITON_INTERPRET=1; without select_top_k and documents).

    select_top_k > 0 adds the content-selected pattern (longnet/selection.py, causal only): each
    query also attends the select_top_k complete blocks of select_block_size tokens before its
    segment of the first pattern that score highest by q . mean(k of the block), mixed by Eq. 10
    as one more pattern. select_pooled adds the pooled pattern beside it: each query also
    attends one key per candidate block, the block's mean key with its mean value (NSA's
    compressed attention), so the scores that choose the blocks get a gradient.
    select_query_span > 1 ranks the blocks (and scores the pooled keys) by the mean of each
    query and the select_query_span - 1 queries before it, so that neighbours choose alike.
    select_within_segment lets the blocks of the query's own segment be chosen too (every
    complete block before its own block), so near and far keys are reached alike.
    select_ranking_dims D > 0 ranks them (and scores the pooled keys) by the last D dims of each
    head of q and k only: dims a model leaves without positional encoding, a choice by content.
    select_span_max ranks each block by the best log-probability the select_query_span queries
    give it (log_softmax of the scaled scores over each one's candidate blocks) instead of their
    mean query (the pooled keys scored by each query's own): a block one of them found
    stays a candidate for the next ones (the later digits of an answer).

    Documents (longnet/varlen.py): each is its own sequence (segments start at its first token,
    no key crosses its boundary), given as cu_seqlens, flash-attn's int offsets 0 = o_0 <= ...
    <= o_D = b * n of the documents in the flattened (b * n) tokens (a packed row, b = 1, or a
    batch), or as attention_mask (b, n), True on tokens and False on padding (one contiguous run
    per row: left or right padding), whose padding outputs zero. Either is read on the host
    (one sync for a CUDA tensor).
    """
    patterns, scale = check_arguments(
        q, k, v, segment_lengths, dilation_rates, causal, softmax_scale, backend, head_shift,
        select_top_k, select_block_size, select_pooled, select_query_span, select_within_segment,
        select_ranking_dims, select_span_max,
    )  # fmt: skip
    documents = check_documents(q.shape, cu_seqlens, attention_mask)
    return attend(
        q,
        k,
        v,
        patterns,
        causal=causal,
        scale=scale,
        backend=backend,
        head_shift=head_shift,
        select_top_k=select_top_k,
        select_block_size=select_block_size,
        select_pooled=select_pooled,
        select_query_span=select_query_span,
        select_within_segment=select_within_segment,
        select_ranking_dims=select_ranking_dims,
        select_span_max=select_span_max,
        documents=documents,
    )


def check_documents(shape, cu_seqlens, attention_mask) -> varlen.Documents | None:
    """The documents of a (b, n, ...) input from cu_seqlens or attention_mask (at most one)."""
    if cu_seqlens is not None and attention_mask is not None:
        raise ValueError("give cu_seqlens or attention_mask, not both")
    if cu_seqlens is not None:
        return varlen.from_cu_seqlens(cu_seqlens, *shape[:2])
    if attention_mask is not None:
        return varlen.from_attention_mask(attention_mask, *shape[:2])
    return None


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    patterns: tuple[tuple[int, int], ...],
    *,
    causal: bool,
    scale: float,
    backend: str = "auto",
    head_shift: int = 0,
    select_top_k: int = 0,
    select_block_size: int = 32,
    select_pooled: bool = False,
    select_query_span: int = 1,
    select_within_segment: bool = False,
    select_ranking_dims: int = 0,
    select_span_max: bool = False,
    documents: varlen.Documents | None = None,
) -> torch.Tensor:
    """dilated_attention on arguments already checked (check_arguments, or a layer's
    construction): no argument check here, since a model runs it in every layer on every step.
    patterns as check_patterns returns them; scale a float; documents as check_documents
    returns them."""
    kernel = kernel_for(backend, q, causal)
    if kernel == "triton":
        from longnet import triton_attention  # imported by kernel_for already

        if documents is not None:
            raise ValueError(
                "documents (cu_seqlens or attention_mask) are not built for backend='triton'; "
                "use backend='auto'"
            )
        return triton_attention.dilated_attention(
            q, k, v, patterns, causal=causal, scale=scale, head_shift=head_shift
        )
    lengths, rates = (list(values) for values in zip(*patterns, strict=True))

    def attend_rows(q, k, v):
        out, _ = _attention_op(
            q, k, v, lengths, rates, causal, scale, kernel, head_shift, select_top_k,
            select_block_size, select_pooled, select_query_span, select_within_segment,
            select_ranking_dims, select_span_max,
        )  # fmt: skip
        return out

    if documents is None:
        return attend_rows(q, k, v)
    return varlen.run(q, k, v, documents, causal, attend_rows)
