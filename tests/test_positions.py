"""Positional encodings (longnet.positions): relative positions are true token distances."""

import math

import pytest
import torch

from longnet.positions import (
    XPOS_GAMMA,
    alibi_slopes,
    make_positions,
    relative_positions,
)

HEADS, KV_HEADS, DIM = 4, 2, 16


def encoded_logits(kind, q, k, positions, **kwargs):
    """(h, n, n) scaled logits q_i . k_j after the encoding at the given positions (float64)."""
    encoding = make_positions(kind, HEADS, DIM, **kwargs)
    q, k = encoding.apply(q, k, encoding.encode(positions, torch.float64))
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=2)
    return torch.einsum("bihd,bjhd->hij", q, k) / math.sqrt(DIM)


def random_qk(seq_len=24):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, seq_len, HEADS, DIM, generator=generator, dtype=torch.float64)
    k = torch.randn(1, seq_len, KV_HEADS, DIM, generator=generator, dtype=torch.float64)
    positions = torch.randint(-3000, 3000, (seq_len,), generator=generator)
    return q, k, positions


@pytest.mark.parametrize("kind", ["xpos", "rotary"])
def test_shifting_positions_leaves_logits_unchanged(kind):
    q, k, positions = random_qk()
    expected = encoded_logits(kind, q, k, positions)
    for shift in (1, 517, 4096, -2500):
        actual = encoded_logits(kind, q, k, positions + shift)
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_shifting_positions_moves_alibi_logits_by_a_constant_per_query():
    """The folded ALiBi bias is m_h p' up to a per-query constant, which the softmax drops."""
    q, k, positions = random_qk()
    expected = encoded_logits("alibi", q, k, positions)
    for shift in (1, 517, 4096, -2500):
        actual = encoded_logits("alibi", q, k, positions + shift)
        difference = actual - expected  # (h, n, n): the same along every row
        torch.testing.assert_close(
            difference, difference[..., :1].expand_as(difference), rtol=0, atol=1e-9
        )
        torch.testing.assert_close(actual.softmax(-1), expected.softmax(-1), rtol=0, atol=1e-12)


def test_alibi_fold_adds_exactly_the_explicit_bias():
    """Folded logits = plain logits - m_h (p - p') + (a constant per query: m_h p)."""
    q, k, positions = random_qk()
    folded = encoded_logits("alibi", q, k, positions)
    plain = encoded_logits("none", q, k, positions)
    slopes = torch.tensor(alibi_slopes(HEADS), dtype=torch.float64)[:, None, None]
    p = positions.double()
    explicit = plain - slopes * (p[:, None] - p[None, :])
    torch.testing.assert_close(
        folded - explicit, (slopes * p[:, None]).expand_as(folded), rtol=1e-12, atol=1e-9
    )


def test_alibi_bias_keeps_its_precision_in_bfloat16():
    """Positions near 30000 in one bfloat16 number would be rounded to multiples of 128; the
    hi/lo split keeps the bias between neighbouring keys right to 1e-2 (the kernels sum the
    bfloat16 products in float32, as done here)."""
    encoding = make_positions("alibi", HEADS, DIM)
    positions = torch.arange(30000, 30064)
    zeros = torch.zeros(1, len(positions), HEADS, DIM, dtype=torch.bfloat16)
    q, k = encoding.apply(zeros, zeros[:, :, :KV_HEADS], encoding.encode(positions, torch.float32))
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=2)
    bias = torch.einsum("bihd,bjhd->hij", q.float(), k.float())[:, 0] / math.sqrt(DIM)  # (h, n)
    slopes = torch.tensor(alibi_slopes(HEADS))[:, None]
    expected = slopes * (positions - positions[0]).float()
    assert (bias - bias[:, :1] - expected).abs().max() < 1e-2


@pytest.mark.parametrize("kind", ["xpos", "rotary"])
def test_rotary_logits_follow_the_closed_form(kind):
    """q'.k' = Re sum_i q_i conj(k_i) e^(i theta_i (p - p')) zeta_i^((p - p')/B), with the pairs
    (x_i, x_{i + d/2}) as complex numbers; zeta_i = 1 for rotary."""
    base, scale_base = 10000.0, 512.0
    q, k, positions = random_qk()
    actual = encoded_logits(kind, q, k, positions, rotary_base=base, xpos_scale_base=scale_base)
    half = DIM // 2
    exponents = torch.arange(0, DIM, 2, dtype=torch.float64) / DIM
    theta = base**-exponents  # (d/2,)
    zeta = (exponents + XPOS_GAMMA) / (1 + XPOS_GAMMA) if kind == "xpos" else torch.ones(half)
    qc = torch.complex(q[..., :half], q[..., half:])[0]  # (n, h, d/2)
    kc = torch.complex(k[..., :half], k[..., half:])[0].repeat_interleave(2, dim=1)
    distance = (positions[:, None] - positions[None, :]).double()[..., None]  # (n, n, 1)
    factor = torch.polar(zeta ** (distance / scale_base), theta * distance)  # (n, n, d/2)
    expected = torch.einsum("ihf,jhf,ijf->hij", qc, kc.conj(), factor).real / math.sqrt(DIM)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_alibi_slopes_match_press_et_al():
    assert alibi_slopes(8) == [2.0**-i for i in range(1, 9)]
    # 6 heads: the 4-head slopes, then every other slope of the 8-head list.
    assert alibi_slopes(6) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


def test_relative_positions_are_true_distances_within_a_period():
    period = 16
    positions = relative_positions(37, 40, period)  # tokens 37 .. 76
    tokens = torch.arange(37, 77)
    same_period = tokens[:, None] // period == tokens[None, :] // period
    distances = positions[:, None] - positions[None, :]
    assert torch.equal(distances[same_period], (tokens[:, None] - tokens[None, :])[same_period])
    assert positions.min() == -period // 2 and positions.max() == period // 2 - 1
    assert torch.equal(relative_positions(37 + 3 * period, 40, period), positions)


def test_partial_rotary_turns_the_first_dims_only():
    """unencoded_dims: the last dims pass unchanged, the first R follow the closed form of a
    rotary encoding of R dims (relative: shifting every position leaves the logits alone)."""
    unencoded, rotated = 6, DIM - 6
    q, k, positions = random_qk()
    encoding = make_positions("rotary", HEADS, DIM, unencoded_dims=unencoded)
    q_out, k_out = encoding.apply(q, k, encoding.encode(positions, torch.float64))
    assert torch.equal(q_out[..., rotated:], q[..., rotated:])
    assert torch.equal(k_out[..., rotated:], k[..., rotated:])
    whole = make_positions("rotary", HEADS, rotated)
    q_r, k_r = whole.apply(
        q[..., :rotated], k[..., :rotated], whole.encode(positions, torch.float64)
    )
    torch.testing.assert_close(q_out[..., :rotated], q_r, rtol=0, atol=0)
    torch.testing.assert_close(k_out[..., :rotated], k_r, rtol=0, atol=0)
    expected = encoded_logits("rotary", q, k, positions, unencoded_dims=unencoded)
    shifted = encoded_logits("rotary", q, k, positions + 977, unencoded_dims=unencoded)
    torch.testing.assert_close(shifted, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("unencoded", [3, 16, 17, -2])
def test_partial_rotary_refuses_what_it_cannot_turn(unencoded):
    with pytest.raises(ValueError, match=f"got {DIM - unencoded}"):
        make_positions("rotary", HEADS, DIM, unencoded_dims=unencoded)
