"""The ground truth checked against docs/semantics.md on cases small enough to write out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_qkv, max_error, mixture_of_patterns, outputs_and_grads, randn

from longnet.reference import dense_dilated_attention, multiplicity


def matrix(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_multiplicity_one_pattern_is_block_diagonal():
    expected = matrix([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(multiplicity(4, 1, [2], [1]), expected[None])


def test_multiplicity_dilation_gives_each_head_its_offset():
    # w = 4, r = 2: head 0 keeps positions 0 and 2, head 1 keeps 1 and 3; head 2 is head 0 again.
    head0 = matrix([[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    head1 = matrix([[0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 1]])
    assert torch.equal(multiplicity(4, 3, [4], [2]), torch.stack([head0, head1, head0]))


def test_multiplicity_short_last_segment_and_causal():
    # seq 5, w = 3, r = 2: segments [0, 3) and [3, 5); inner indices 0 1 2 | 0 1.
    # Head 0 keeps inner 0 and 2 (positions 0, 2 | 3), head 1 keeps inner 1 (positions 1 | 4).
    head0 = matrix(
        [
            [1, 0, 1, 0, 0],
            [0, 0, 0, 0, 0],
            [1, 0, 1, 0, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    head1 = matrix(
        [
            [0, 0, 0, 0, 0],
            [0, 1, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 1],
        ]
    )
    assert torch.equal(multiplicity(5, 2, [3], [2]), torch.stack([head0, head1]))
    causal = multiplicity(5, 2, [3], [2], causal=True)
    assert torch.equal(causal, torch.stack([head0.tril(), head1.tril()]))


def test_multiplicity_counts_patterns_and_segments_longer_than_seq():
    # w = 2 and w = 8 > seq, both r = 1: pairs inside a 2-block are seen by both patterns.
    expected = matrix([[2, 2, 1, 1], [2, 2, 1, 1], [1, 1, 2, 2], [1, 1, 2, 2]])
    assert torch.equal(multiplicity(4, 1, [2, 8], [1, 1]), expected[None])
    # w not divisible by r: w = 3, r = 2, seq 6 -> head 0 keeps inner 0, 2 of both segments.
    kept = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.float64)
    same_segment = torch.arange(6)[:, None] // 3 == torch.arange(6)[None, :] // 3
    assert torch.equal(multiplicity(6, 1, [3], [2])[0], kept[:, None] * kept * same_segment)


def test_multiplicity_position_offset_is_a_window_of_the_whole_sequence():
    whole = multiplicity(12, 3, [4, 8], [1, 3], causal=True)
    window = multiplicity(4, 3, [4, 8], [1, 3], causal=True, position_offset=4)
    assert torch.equal(window, whole[:, 4:8, 4:8])


def test_reference_by_hand():
    # seq 3, one head, d = 1, patterns (w=2, r=1) and (w=4, r=2): multiplicity m below and
    # out_i = sum_j m_ij exp(q_i k_j) v_j / sum_j m_ij exp(q_i k_j).
    q, k, v = [0.3, -1.2, 0.8], [1.5, 0.2, -0.7], [2.0, -1.0, 0.5]
    m = [[2, 1, 1], [1, 1, 0], [1, 0, 2]]
    expected = []
    for i in range(3):
        weights = [m[i][j] * math.exp(q[i] * k[j]) for j in range(3)]
        expected.append(sum(a * b for a, b in zip(weights, v, strict=True)) / sum(weights))
    as_input = [torch.tensor(x, dtype=torch.float64).view(1, 3, 1, 1) for x in (q, k, v)]
    out = dense_dilated_attention(*as_input, [2, 4], [1, 2])
    assert torch.allclose(out.flatten(), torch.tensor(expected, dtype=torch.float64), atol=1e-14)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_is_eq10_mixture_with_exact_gradients(rng, causal):
    """docs/semantics.md: one softmax with log-multiplicity bias == the paper's Eq. 10 mixture."""
    q, k, v = make_qkv(rng, 2, 37, 4, 2, 8)
    lengths, rates = [8, 16, 64], [1, 2, 3]
    grad_out = randn(rng, *q.shape)
    expected = outputs_and_grads(
        lambda *x: mixture_of_patterns(*x, lengths, rates, causal=causal), q, k, v, grad_out
    )
    actual = outputs_and_grads(
        lambda *x: dense_dilated_attention(*x, lengths, rates, causal=causal), q, k, v, grad_out
    )
    for a, e in zip(actual, expected, strict=True):
        assert max_error(a, e) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_reference_is_standard_attention_for_one_full_segment(rng, causal):
    q, k, v = make_qkv(rng, 2, 11, 4, 4, 8)
    out = dense_dilated_attention(q, k, v, [11], [1], causal=causal)
    expected = F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal
    )
    assert max_error(out, expected.transpose(1, 2)) < 1e-12


def test_reference_zeroes_uncovered_queries(rng):
    # One pattern, r = 3, two heads: inner index 2 of every segment is kept by no head.
    q, k, v = make_qkv(rng, 1, 9, 2, 2, 4)
    out = dense_dilated_attention(q, k, v, [9], [3])
    out.backward(torch.ones_like(out))
    # (position, head) pairs no pattern keeps: head h keeps inner index h mod 3.
    uncovered = torch.arange(9)[:, None] % 3 != torch.arange(2)[None, :]  # (n, h)
    assert torch.isfinite(q.grad).all()
    assert (out[0][uncovered] == 0).all() and (q.grad[0][uncovered] == 0).all()
    assert (out[0][~uncovered] != 0).all() and (q.grad[0][~uncovered] != 0).all()
