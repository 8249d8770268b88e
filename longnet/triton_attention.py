"""Dilated attention in Triton (backend="triton"): forward and exact backward, merge fused.

Semantics: docs/semantics.md; the design: docs/algorithm.md, "Triton kernels". One launch per
pattern and pass. A program owns one tile of the kept positions of one segment and one head,
reads q, k and v in place through their (b, n, heads, d) strides (no gather, no layout copy, any
stride, 0 included), and folds its result into the float32 accumulators in its epilogue:

- forward, one program per (batch, segment, query head, tile of BLOCK_M kept queries): flash
  attention over the kept keys of its segment (online softmax), then Eq. 10 in place:
  out, lse <- merge((out, lse), (O_i, lse_i)) at its queries;
- backward, with the MERGED out and lse (docs/semantics.md, "Gradients"): dq per (batch,
  segment, query head, query tile), and dk, dv per (batch, segment, kv head, offset class, key
  tile), looping over the query heads of that kv head that keep the class, so every entry of an
  accumulator belongs to one program of a launch: no atomics, deterministic.

Patterns run one after another (smallest r first; where it is 1 its launches write instead of
merging), so no two programs of different patterns touch an entry at the same time.

Triton has no CPU backend: on CPU the kernels run only under Triton's interpreter, which
`TRITON_INTERPRET=1` in the environment selects when this module is imported (the tests do so;
it is slow, for correctness only). The library imports this module only for backend="triton".
NOTE: NaN in a key or value reaches every query of the tile that holds it, as in flash attention
(p = 0 times NaN), not only the queries that read it (the torch path marks exactly those on CPU).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from longnet.kernels import register_attention_autograd

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rows(X, batch, head, positions, dims, s_b, s_h, s_n, s_d):
    """(len(positions), len(dims)) pointers into head `head` of a (b, n, h, d) tensor with these
    strides: the given rows (token positions) of one batch entry, read in place."""
    return X + batch * s_b + head * s_h + positions[:, None] * s_n + dims[None, :] * s_d


@triton.jit
def _forward_kernel(
    Q, K, V, Out, Lse,
    q_b, q_n, q_h, q_d, k_b, k_n, k_h, k_d, v_b, v_n, v_h, v_d,
    o_b, o_n, o_h, o_d, l_b, l_n, l_h,
    seq_len, heads, group, segment, rate, shift, num_segments, tiles, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, FIRST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    tile = pid % tiles
    rest = pid // tiles
    head = rest % heads
    rest = rest // heads
    seg_start = (rest % num_segments) * segment
    batch = (rest // num_segments).to(tl.int64)
    length = tl.minimum(segment, seq_len - seg_start)
    offset = (head + shift) % rate  # shift is reduced mod rate on the host: both >= 0
    count = (length - offset + rate - 1) // rate  # kept positions (0 where offset >= length)
    if tile * BLOCK_M >= count:
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < count
    positions = (seg_start + offset + rows * rate).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    kv = head // group
    q = tl.load(
        _rows(Q, batch, head, positions, dims, q_b, q_h, q_n, q_d),
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = count
    if CAUSAL:  # queries and keys are the same positions in the same order
        end = tl.minimum(count, (tile + 1) * BLOCK_M)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < count
        key_positions = (seg_start + offset + cols * rate).to(tl.int64)
        kt = tl.load(
            K + batch * k_b + kv * k_h + key_positions[None, :] * k_n + dims[:, None] * k_d,
            mask=col_ok[None, :] & dim_ok[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        scores = tl.dot(q, kt, input_precision=PRECISION) * scale
        ok = col_ok[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None])
        scores = tl.where(ok, scores, -float("inf"))
        # Key 0 is in every row's first tile, so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        values = tl.load(
            _rows(V, batch, kv, key_positions, dims, v_b, v_h, v_n, v_d),
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
        m_i = m_new
    lse = m_i + tl.log(l_i)  # of the scaled scores
    out = acc / l_i[:, None]
    out_ptrs = _rows(Out, batch, head, positions, dims, o_b, o_h, o_n, o_d)
    lse_ptrs = Lse + batch * l_b + head * l_h + positions * l_n
    out_mask = row_ok[:, None] & dim_ok[None, :]
    if not FIRST:  # Eq. 10 in place: the running (out, lse) is (0, -inf) where nothing merged
        old_lse = tl.load(lse_ptrs, mask=row_ok, other=0.0)
        old_out = tl.load(out_ptrs, mask=out_mask, other=0.0)
        top = tl.maximum(old_lse, lse)  # finite: lse is
        old_weight = tl.exp(old_lse - top)  # one of the two weights is 1
        weight = tl.exp(lse - top)
        total = old_weight + weight
        # divided by their sum, the weights add up to 1 up to one rounding: where every pattern
        # gives a query the same output (one key) the mixture keeps it, as <dO, O> needs
        out = (old_out * old_weight[:, None] + out * weight[:, None]) / total[:, None]
        lse = top + tl.log(total)
    tl.store(out_ptrs, out, mask=out_mask)
    tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    q_b, q_n, q_h, q_d, k_b, k_n, k_h, k_d, v_b, v_n, v_h, v_d,
    do_b, do_n, do_h, do_d, l_b, l_n, l_h, dq_b, dq_n, dq_h, dq_d,
    seq_len, heads, group, segment, rate, shift, num_segments, tiles, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, FIRST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dq of one tile of kept queries; Lse and Delta (<dO, O>) are the merged ones, laid out
    alike (strides l_*)."""
    pid = tl.program_id(0)
    tile = pid % tiles
    rest = pid // tiles
    head = rest % heads
    rest = rest // heads
    seg_start = (rest % num_segments) * segment
    batch = (rest // num_segments).to(tl.int64)
    length = tl.minimum(segment, seq_len - seg_start)
    offset = (head + shift) % rate
    count = (length - offset + rate - 1) // rate
    if tile * BLOCK_M >= count:
        return
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < count
    positions = (seg_start + offset + rows * rate).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    kv = head // group
    row_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(
        _rows(Q, batch, head, positions, dims, q_b, q_h, q_n, q_d),
        mask=row_mask,
        other=0.0,
    )
    do = tl.load(
        _rows(DO, batch, head, positions, dims, do_b, do_h, do_n, do_d),
        mask=row_mask,
        other=0.0,
    )
    stats = batch * l_b + head * l_h + positions * l_n
    lse = tl.load(Lse + stats, mask=row_ok, other=0.0)
    delta = tl.load(Delta + stats, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = count
    if CAUSAL:
        end = tl.minimum(count, (tile + 1) * BLOCK_M)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < count
        key_positions = (seg_start + offset + cols * rate).to(tl.int64)
        col_mask = col_ok[:, None] & dim_ok[None, :]
        keys = tl.load(
            _rows(K, batch, kv, key_positions, dims, k_b, k_h, k_n, k_d),
            mask=col_mask,
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        values = tl.load(
            _rows(V, batch, kv, key_positions, dims, v_b, v_h, v_n, v_d),
            mask=col_mask,
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale
        ok = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None])
        p = tl.where(ok, tl.exp(scores - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(values), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(keys.dtype), keys, input_precision=PRECISION)
    dq = dq * scale
    dq_ptrs = _rows(DQ, batch, head, positions, dims, dq_b, dq_h, dq_n, dq_d)
    if not FIRST:
        dq += tl.load(dq_ptrs, mask=row_mask, other=0.0)
    tl.store(dq_ptrs, dq, mask=row_mask)


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    q_b, q_n, q_h, q_d, k_b, k_n, k_h, k_d, v_b, v_n, v_h, v_d,
    do_b, do_n, do_h, do_d, l_b, l_n, l_h, dk_b, dk_n, dk_h, dk_d, dv_b, dv_n, dv_h, dv_d,
    seq_len, kv_heads, group, segment, rate, shift, num_segments, classes, tiles, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, FIRST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dk, dv of one tile of the keys of offset class `offset` of one kv head: the sum over
    the query heads of that kv head whose class it is (none: nothing to add)."""
    pid = tl.program_id(0)
    tile = pid % tiles
    rest = pid // tiles
    offset = rest % classes
    rest = rest // classes
    kv = rest % kv_heads
    rest = rest // kv_heads
    seg_start = (rest % num_segments) * segment
    batch = (rest // num_segments).to(tl.int64)
    length = tl.minimum(segment, seq_len - seg_start)
    count = (length - offset + rate - 1) // rate
    base = kv * group
    first_head = base + ((offset - shift - base) % rate + rate) % rate  # any sign convention
    if (tile * BLOCK_N >= count) | (first_head >= base + group):
        return
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < count
    key_positions = (seg_start + offset + cols * rate).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    col_mask = col_ok[:, None] & dim_ok[None, :]
    keys = tl.load(
        _rows(K, batch, kv, key_positions, dims, k_b, k_h, k_n, k_d),
        mask=col_mask,
        other=0.0,
    )  # (BLOCK_N, BLOCK_D)
    values = tl.load(
        _rows(V, batch, kv, key_positions, dims, v_b, v_h, v_n, v_d),
        mask=col_mask,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    begin = 0
    if CAUSAL:  # query tiles wholly before this key tile see none of its keys
        begin = (tile * BLOCK_N) // BLOCK_M * BLOCK_M
    for head in range(first_head, base + group, rate):
        for start in range(begin, count, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < count
            positions = (seg_start + offset + rows * rate).to(tl.int64)
            row_mask = row_ok[:, None] & dim_ok[None, :]
            q = tl.load(
                _rows(Q, batch, head, positions, dims, q_b, q_h, q_n, q_d),
                mask=row_mask,
                other=0.0,
            )  # (BLOCK_M, BLOCK_D)
            do = tl.load(
                _rows(DO, batch, head, positions, dims, do_b, do_h, do_n, do_d),
                mask=row_mask,
                other=0.0,
            )
            stats = batch * l_b + head * l_h + positions * l_n
            lse = tl.load(Lse + stats, mask=row_ok, other=0.0)
            delta = tl.load(Delta + stats, mask=row_ok, other=0.0)
            scores_t = tl.dot(keys, tl.trans(q), input_precision=PRECISION) * scale
            ok = col_ok[:, None] & row_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[:, None] <= rows[None, :])
            p_t = tl.where(ok, tl.exp(scores_t - lse[None, :]), 0.0)  # (BLOCK_N, BLOCK_M)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(values, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    dk = dk * scale
    dk_ptrs = _rows(DK, batch, kv, key_positions, dims, dk_b, dk_h, dk_n, dk_d)
    dv_ptrs = _rows(DV, batch, kv, key_positions, dims, dv_b, dv_h, dv_n, dv_d)
    if not FIRST:
        dk += tl.load(dk_ptrs, mask=col_mask, other=0.0)
        dv += tl.load(dv_ptrs, mask=col_mask, other=0.0)
    tl.store(dk_ptrs, dk, mask=col_mask)
    tl.store(dv_ptrs, dv, mask=col_mask)


INTERPRETED = isinstance(_forward_kernel, InterpretedFunction)


def check_device(q: torch.Tensor) -> None:
    """ValueError unless the kernels can run on q's device and dtype."""
    if q.device.type == "cpu" and not INTERPRETED:
        raise ValueError(
            "backend='triton' on CPU runs only under Triton's interpreter: set TRITON_INTERPRET=1 "
            "in the environment before longnet.triton_attention is first imported (slow: for "
            "tests); on CPU use backend='auto'"
        )
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"backend='triton' runs on CUDA (or CPU under the interpreter), got {q.device}"
        )
    if q.dtype not in DTYPES:
        raise ValueError(
            f"backend='triton' takes float32, float16 or bfloat16 inputs, got {q.dtype}; use "
            "backend='auto'"
        )
    if q.dtype == torch.bfloat16 and INTERPRETED:
        # NOTE: triton 3.9's interpreter multiplies the raw bits of bfloat16 tiles in tl.dot
        # (numpy has no bfloat16): garbage, not an error
        raise ValueError(
            "backend='triton' under Triton's interpreter takes float32 or float16: its tl.dot "
            "is wrong for bfloat16; use backend='auto'"
        )


def launch_options(head_dim: int) -> dict:
    """Tile sizes (and, compiled, warps and stages). Not tuned: nothing was measured on a GPU
    yet. Under the interpreter, small tiles, so that small tests cross tile boundaries."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if INTERPRETED:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, num_warps=4, num_stages=2)


def _layout(q, pattern):
    """(segment length W = min(w, n), number of segments) of a pattern."""
    n = q.shape[1]
    segment = min(pattern[0], n)
    return segment, -(-n // segment)


def _ordered(patterns) -> tuple[list[tuple[int, int]], bool]:
    """The patterns, smallest r first, and whether the first writes every entry (r = 1)."""
    order = sorted(patterns, key=lambda pattern: pattern[1])
    return order, order[0][1] == 1


def _precision(dtype: torch.dtype) -> str:
    # float32 in full precision (tf32 would miss the 1e-6 the reference is held to)
    return "ieee" if dtype == torch.float32 else "tf32"


def _current(device: torch.device):
    """device made the current GPU while the kernels launch (Triton launches on the current
    one, whatever device its tensors are on)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def forward(q, k, v, patterns, *, causal: bool, scale: float, head_shift: int = 0):
    """(out (b, n, h, d) in q's dtype, lse (b, n, h) float32) of dilated attention: q (b, n, h,
    d), k, v (b, n, g, d) in any layout; patterns ((w, r), ...) validated."""
    batch, seq_len, heads, dim = q.shape
    group = heads // k.shape[2]
    options = launch_options(dim)
    order, covers_all = _ordered(patterns)
    # (0, -inf) where nothing merged yet; no fill where the first pattern writes everything
    fill = (None, None) if covers_all else (0.0, -math.inf)
    out, lse = (
        torch.empty(shape, dtype=torch.float32, device=q.device)
        if value is None
        else torch.full(shape, value, dtype=torch.float32, device=q.device)
        for shape, value in zip((q.shape, q.shape[:3]), fill, strict=True)
    )
    for index, (w, rate) in enumerate(order):
        segment, num_segments = _layout(q, (w, rate))
        tiles = triton.cdiv(triton.cdiv(segment, rate), options["BLOCK_M"])
        grid = (batch * num_segments * heads * tiles,)
        with _current(q.device):
            _forward_kernel[grid](
                q, k, v, out, lse,
                *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
                seq_len, heads, group, segment, rate, head_shift % rate, num_segments, tiles,
                scale,
                HEAD_DIM=dim, CAUSAL=causal, FIRST=index == 0 and covers_all,
                PRECISION=_precision(q.dtype), **options,
            )  # fmt: skip
    return out.to(q.dtype), lse


def backward(grad_out, q, k, v, out, lse, patterns, *, causal, scale, head_shift=0):
    """(dq, dk, dv) in the inputs' dtypes, with the merged out and lse of `forward`."""
    batch, seq_len, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    options = launch_options(dim)
    order, covers_all = _ordered(patterns)
    # <dO, O> per (position, head), and lse, both (b, n, h) contiguous: one set of strides
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    make = torch.empty if covers_all else torch.zeros  # as in forward
    dq, dk, dv = (make(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v))
    tensors = (q, k, v, grad_out, lse, delta)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *lse.stride())
    for index, (w, rate) in enumerate(order):
        segment, num_segments = _layout(q, (w, rate))
        kept = triton.cdiv(segment, rate)  # the most kept positions of a segment
        flags = dict(
            HEAD_DIM=dim, CAUSAL=causal, FIRST=index == 0 and covers_all,
            PRECISION=_precision(q.dtype), **options,
        )  # fmt: skip
        query_tiles = triton.cdiv(kept, options["BLOCK_M"])
        classes = min(rate, segment)  # offset classes with a kept position
        key_tiles = triton.cdiv(kept, options["BLOCK_N"])
        with _current(q.device):
            _dq_kernel[(batch * num_segments * heads * query_tiles,)](
                *tensors, dq, *strides, *dq.stride(),
                seq_len, heads, group, segment, rate, head_shift % rate, num_segments,
                query_tiles, scale, **flags,
            )  # fmt: skip
            _dkdv_kernel[(batch * num_segments * kv_heads * classes * key_tiles,)](
                *tensors, dk, dv, *strides, *dk.stride(), *dv.stride(),
                seq_len, kv_heads, group, segment, rate, head_shift % rate, num_segments,
                classes, key_tiles, scale, **flags,
            )  # fmt: skip
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@torch.library.custom_op("longnet::dilated_attention_triton", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: list[int],
    dilation_rates: list[int],
    causal: bool,
    scale: float,
    head_shift: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    patterns = list(zip(segment_lengths, dilation_rates, strict=True))
    return forward(q, k, v, patterns, causal=causal, scale=scale, head_shift=head_shift)


@torch.library.custom_op("longnet::dilated_attention_triton_backward", mutates_args=())
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
    head_shift: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    patterns = list(zip(segment_lengths, dilation_rates, strict=True))
    return backward(
        grad_out, q, k, v, out, lse, patterns, causal=causal, scale=scale, head_shift=head_shift
    )


@_attention_op.register_fake
def _(q, k, v, segment_lengths, dilation_rates, causal, scale, head_shift):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


register_attention_autograd(_attention_op, _attention_backward_op)


def dilated_attention(q, k, v, patterns, *, causal: bool, scale: float, head_shift: int = 0):
    """Dilated attention on checked arguments (longnet.dilated.attend routes backend="triton"
    here): out (b, n, h, d) in q's dtype, differentiable."""
    lengths, rates = (list(values) for values in zip(*patterns, strict=True))
    out, _ = _attention_op(q, k, v, lengths, rates, causal, scale, head_shift)
    return out
