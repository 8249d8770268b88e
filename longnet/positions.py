"""Relative positional encodings, applied to q and k before dilated attention.

Notation
    b   batch        n   tokens          h   query heads     g   key/value heads
    d   head dim     p   token position  B   xPos scale base

Dilated attention attends a sparse subset of each segment, but the distances it sees must be true
token distances, never indices inside a sparsified segment: every encoding acts on q and k BEFORE
the attention function, from each token's own global position (position_offset + index under
sequence parallelism). Only differences of positions matter, and two tokens interact only inside
one segment of one pattern, which always lies inside one PERIOD (the lcm of the segment lengths).
So `relative_positions` measures each position from the middle of its period: exact, and it keeps
angles, xPos scales and ALiBi biases bounded however long the sequence grows.

Each encoding has `encode(positions, dtype)`, run once per forward and shared by all layers, and
`apply(q, k, encoding) -> (q, k)` per layer; `extra_dims` is how many dims apply adds to q and k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longnet.kernels import accumulation_dtype

POSITIONS = ("xpos", "rotary", "alibi", "none")
XPOS_GAMMA = 0.4  # Sun et al. 2022, section 3.2


def relative_positions(start: int, length: int, period: int | None, device=None) -> torch.Tensor:
    """(length,) int64: positions start .. start+length-1, from the middle of their period (as
    they are when period is None: tokens at any distance interact)."""
    return fold(torch.arange(start, start + length, device=device), period)


def fold(positions: torch.Tensor, period: int | None) -> torch.Tensor:
    """int64 positions (any shape) from the middle of their period (unchanged for None)."""
    return positions if period is None else positions % period - period // 2


def xpos_max_exponent(period: int, scale_base: float) -> float:
    """The largest |ln| of an xPos scale factor for positions within +-period/2."""
    return (period / 2) / scale_base * math.log((1 + XPOS_GAMMA) / XPOS_GAMMA)


class NoPositions:
    extra_dims = 0

    def encode(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple:
        return ()

    def apply(self, q: torch.Tensor, k: torch.Tensor, encoding: tuple):
        return q, k


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, n, heads, d) with each pair (x_i, x_{i+R/2}) of its first R dims rotated and the
    others unchanged; cos, sin ([b,] n, 1, R/2)."""
    dims, dtype = 2 * cos.shape[-1], accumulation_dtype(x.dtype)
    x1, x2 = x[..., :dims].to(dtype).chunk(2, dim=-1)
    cos, sin = cos.to(dtype), sin.to(dtype)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return rotated if dims == x.shape[-1] else torch.cat([rotated, x[..., dims:]], dim=-1)


class Rotary:
    """RoPE (Su et al. 2021): pair (x_i, x_{i+R/2}) turns by p * base^(-2i/R), so the logit of
    query p and key p' depends on p - p' only. R = `dims`, the head dim by default; the last
    d - R dims carry no position (partial rotary, as GPT-NeoX's rotary_pct)."""

    extra_dims = 0

    def __init__(self, head_dim: int, base: float = 10000.0, dims: int | None = None):
        dims = head_dim if dims is None else dims
        if not 0 < dims <= head_dim or dims % 2:
            raise ValueError(
                f"rotary turns an even number of dims in 2 .. {head_dim} (the head dim), got {dims}"
            )
        self.dims, self.base = dims, base

    def _exponents(self, device) -> torch.Tensor:
        """(R/2,) float64: 2i/R."""
        return torch.arange(0, self.dims, 2, dtype=torch.float64, device=device) / self.dims

    def encode(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple:
        """positions (n,) or (b, n) -> cos and sin ([b,] n, 1, d/2)."""
        # float64 angles, so that positions far from 0 keep their full precision.
        angles = positions.double()[..., None] * self.base ** -self._exponents(positions.device)
        return tuple(x.unsqueeze(-2).to(dtype) for x in (angles.cos(), angles.sin()))

    def apply(self, q: torch.Tensor, k: torch.Tensor, encoding: tuple):
        cos, sin = encoding
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


class XPos(Rotary):
    """xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer"): rotary with q scaled by
    zeta_i^(p/B) and k by zeta_i^(-p/B), zeta_i = (2i/d + gamma) / (1 + gamma), so the logit of
    query p and key p' carries zeta_i^((p - p')/B): it decays with distance."""

    def __init__(self, head_dim: int, base: float = 10000.0, scale_base: float = 512.0):
        super().__init__(head_dim, base)
        self.scale_base = scale_base

    def encode(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple:
        cos, sin = super().encode(positions, torch.float64)
        zeta = (self._exponents(positions.device) + XPOS_GAMMA) / (1 + XPOS_GAMMA)
        scale = (zeta ** (positions.double()[..., None] / self.scale_base)).unsqueeze(-2)
        return tuple(x.to(dtype) for x in (cos * scale, sin * scale, cos / scale, sin / scale))

    def apply(self, q: torch.Tensor, k: torch.Tensor, encoding: tuple):
        q_cos, q_sin, k_cos, k_sin = encoding
        return _rotate(q, q_cos, q_sin), _rotate(k, k_cos, k_sin)


def alibi_slopes(num_heads: int) -> list[float]:
    """Press et al. 2022: 2^(-8/n), 2^(-16/n), ..., 2^(-8) for n heads, n a power of 2; otherwise
    the slopes of the power of 2 below n and every other slope of the one above."""
    below = 2 ** math.floor(math.log2(num_heads))
    slopes = [2 ** (-8 * (i + 1) / below) for i in range(below)]
    if below < num_heads:
        slopes += alibi_slopes(2 * below)[0::2][: num_heads - below]
    return slopes


def _split(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x (float64) as hi + lo, both in dtype: 16 bits of x in bfloat16, all of x in float64."""
    hi = x.to(dtype)
    return hi, (x - hi.double()).to(dtype)


class ALiBi:
    """ALiBi (Press et al. 2022) for CAUSAL attention, folded into q and k so that the fused
    kernels, dilated attention and its sequence-parallel form run it unchanged.

    The bias of query p and key p', -m_h (p - p'), is m_h p' minus m_h p. The second term is the
    same for every key of a query: the softmax cancels it, and so does the mixing of patterns
    (it shifts every pattern's log-sum-exp of that query alike). What remains, m_h p', is the
    product of an extra q dim holding a_h = m_h / softmax_scale and an extra k dim holding p'.
    Both factors are split into high and low parts in the input dtype (q: [a_hi, a_hi, a_lo,
    a_lo], k: [p_hi, p_lo, p_hi, p_lo]), whose products the kernels sum in float32, so bfloat16
    keeps positions up to 2^16 exact and the slopes to ~16 bits. The extra dims are padded to 8
    to keep head_dim a multiple of 8 for the CUDA kernels; v must be padded to match for the
    attention call (and the output sliced back). Non-causal ALiBi, -m_h |p - p'|, has no such fold.
    """

    extra_dims = 8

    def __init__(self, num_heads: int, head_dim: int):
        self.slopes = alibi_slopes(num_heads)
        self.softmax_scale = head_dim**-0.5

    def encode(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple:
        return (positions.double(),)

    def apply(self, q: torch.Tensor, k: torch.Tensor, encoding: tuple):
        (positions,) = encoding
        batch, length, heads, _ = q.shape
        kv_heads = k.shape[2]
        factors = torch.tensor(self.slopes, dtype=torch.float64, device=q.device)
        a_hi, a_lo = _split(factors / self.softmax_scale, q.dtype)  # (h,)
        p_hi, p_lo = _split(positions, k.dtype)  # (n,) or (b, n)
        pad = (0, self.extra_dims - 4)
        q_extra = F.pad(torch.stack([a_hi, a_hi, a_lo, a_lo], dim=-1), pad)  # (h, 8)
        k_extra = F.pad(torch.stack([p_hi, p_lo, p_hi, p_lo], dim=-1), pad).unsqueeze(-2)
        q = torch.cat([q, q_extra.expand(batch, length, heads, -1)], dim=-1)
        k = torch.cat([k, k_extra.expand(batch, length, kv_heads, -1)], dim=-1)
        return q, k


def make_positions(
    kind: str,
    num_heads: int,
    head_dim: int,
    rotary_base: float = 10000.0,
    xpos_scale_base: float = 512.0,
    unencoded_dims: int = 0,
):
    """The encoding named by kind, one of POSITIONS; rotary leaves the last unencoded_dims of
    each head without position."""
    if kind == "xpos":
        return XPos(head_dim, rotary_base, xpos_scale_base)
    if kind == "rotary":
        return Rotary(head_dim, rotary_base, head_dim - unencoded_dims)
    if kind == "alibi":
        return ALiBi(num_heads, head_dim)
    if kind == "none":
        return NoPositions()
    raise ValueError(f"position must be one of {POSITIONS}, got {kind!r}")
