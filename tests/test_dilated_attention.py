"""longnet.dilated_attention against the dense float64 reference (../shared/SPEC.md)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    TOLERANCE,
    assert_matches,
    make_qkv,
    max_error,
    mixture_of_patterns,
    outputs_and_grads,
    randn,
    reference_fn,
)

import longnet.dilated
from longnet import dilated_attention
from longnet.reference import dense_dilated_attention

# (batch, seq, heads, kv_heads, head_dim, segment_lengths, dilation_rates)
CASES = {
    "one_pattern": (2, 64, 4, 4, 8, [16], [2]),
    "paper_scaled_down": (1, 256, 12, 12, 8, [16, 32, 64, 128, 256], [1, 2, 4, 6, 12]),
    "w_not_divisible_by_r": (1, 60, 6, 3, 8, [14, 20], [3, 6]),
    "w_longer_than_seq": (2, 40, 4, 2, 8, [64, 16], [2, 1]),
    "seq_not_multiple_of_any_w": (1, 100, 6, 2, 16, [16, 24, 36], [1, 2, 3]),
    "heads_not_multiple_of_r": (2, 50, 5, 1, 8, [8, 16, 32], [3, 4, 2]),
    "overlapping_equal_patterns": (1, 48, 2, 1, 8, [16, 16, 48], [1, 2, 1]),
    "seq_1": (2, 1, 4, 2, 8, [4, 2], [2, 1]),
    "seq_2": (1, 2, 4, 4, 8, [4, 1], [3, 1]),
    "seq_3": (1, 3, 4, 1, 8, [2, 8], [2, 3]),
    "seq_5": (3, 5, 2, 2, 8, [4, 2, 16], [2, 1, 4]),
}


def dilated(lengths, rates, causal=False, backend="auto", softmax_scale=None):
    def fn(q, k, v):
        return dilated_attention(
            q, k, v, lengths, rates, causal=causal, softmax_scale=softmax_scale, backend=backend
        )

    return fn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["fused", "math"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(rng, case, causal, backend, dtype):
    """Output and q/k/v gradients; bfloat16 is compared with the float64 reference on its
    bf16-rounded inputs (tolerances in conftest.TOLERANCE)."""
    batch, seq_len, heads, kv_heads, dim, lengths, rates = CASES[case]
    q, k, v = make_qkv(rng, batch, seq_len, heads, kv_heads, dim, dtype)
    assert_matches(
        dilated(lengths, rates, causal, backend),
        q,
        k,
        v,
        reference_fn(lengths, rates, causal),
        TOLERANCE[dtype],
    )


@pytest.mark.parametrize("backend", ["fused", "math"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kv_heads", [8, 4, 1])
def test_grouped_query_heads(rng, kv_heads, causal, backend):
    q, k, v = make_qkv(rng, 2, 70, 8, kv_heads, 8)
    lengths, rates = [8, 32, 64], [1, 2, 4]
    assert_matches(
        dilated(lengths, rates, causal, backend),
        q,
        k,
        v,
        reference_fn(lengths, rates, causal),
        TOLERANCE[torch.float64],
    )


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softmax_scale(rng, causal):
    q, k, v = make_qkv(rng, 1, 30, 4, 2, 8)
    lengths, rates = [8, 16], [1, 2]
    assert_matches(
        dilated(lengths, rates, causal, softmax_scale=0.9),
        q,
        k,
        v,
        reference_fn(lengths, rates, causal, softmax_scale=0.9),
        TOLERANCE[torch.float64],
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fused_and_math_agree(rng, causal, dtype):
    batch, seq_len, heads, kv_heads, dim, lengths, rates = CASES["paper_scaled_down"]
    q, k, v = make_qkv(rng, batch, 200, heads, 3, dim, dtype)
    grad_out = randn(rng, *q.shape, dtype=dtype)
    fused = outputs_and_grads(dilated(lengths, rates, causal, "fused"), q, k, v, grad_out)
    math = outputs_and_grads(dilated(lengths, rates, causal, "math"), q, k, v, grad_out)
    for a, b in zip(fused, math, strict=True):
        assert a.dtype == dtype and max_error(a, b) <= TOLERANCE[dtype] / 10


def test_non_contiguous_inputs(rng):
    q, k, v = (x.detach().transpose(1, 2) for x in make_qkv(rng, 2, 4, 33, 33, 8))
    assert not q.is_contiguous()
    assert_matches(
        dilated([8, 16], [1, 2], True),
        q,
        k,
        v,
        reference_fn([8, 16], [1, 2], True),
        TOLERANCE[torch.float64],
    )


@pytest.mark.parametrize("max_block_queries", [1, 64, 1 << 19])
@pytest.mark.parametrize("min_call_pairs", [0, 32, 1 << 30])
def test_call_planning_changes_no_numbers(rng, monkeypatch, min_call_pairs, max_block_queries):
    """Segments chunked into many calls, and small blocks packed or not, give the same numbers."""
    monkeypatch.setattr(longnet.dilated, "MIN_CALL_PAIRS", min_call_pairs)
    monkeypatch.setattr(longnet.dilated, "MAX_BLOCK_QUERIES", max_block_queries)
    longnet.dilated.pattern_blocks.cache_clear()  # blocks are planned with the patched sizes
    try:
        q, k, v = make_qkv(rng, 2, 70, 6, 2, 8)
        lengths, rates = [8, 16, 32, 64], [1, 2, 3, 6]
        for causal in (False, True):
            fn = dilated(lengths, rates, causal, "fused")
            assert_matches(fn, q, k, v, reference_fn(lengths, rates, causal), TOLERANCE[q.dtype])
    finally:
        longnet.dilated.pattern_blocks.cache_clear()


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("seq_len", [64, 60], ids=["spanning", "short_last_segment"])
def test_spanning_result_becomes_the_accumulator(rng, monkeypatch, seq_len, kv_heads):
    """Where one r = 1 call covers the sequence its kernel results are used in place as the
    running output, log-sum-exp and (without grouped heads) gradients; the numbers match."""
    adopted = []

    def recording_adopt(*args):
        result = adopt(*args)
        adopted.append(result is not None)
        return result

    adopt = longnet.dilated.adopt
    monkeypatch.setattr(longnet.dilated, "adopt", recording_adopt)
    q, k, v = make_qkv(rng, 2, seq_len, 4, kv_heads, 8)
    lengths, rates = [32, 16], [2, 1]
    for causal in (False, True):
        adopted.clear()
        fn = dilated(lengths, rates, causal, "fused")
        assert_matches(fn, q, k, v, reference_fn(lengths, rates, causal), TOLERANCE[q.dtype])
        if seq_len == 60:
            assert adopted == []
        else:  # out, lse, then grad q, k, v in the backward
            assert adopted == [True, True, True, kv_heads == 4, kv_heads == 4]


@pytest.mark.parametrize("backend", ["fused", "math"])
def test_expanded_upstream_gradient(rng, backend):
    # out.sum().backward() hands the backward a stride-0 gradient.
    q, k, v = make_qkv(rng, 2, 33, 4, 2, 8)
    lengths, rates = [8, 16], [1, 2]
    dilated_attention(q, k, v, lengths, rates, causal=True, backend=backend).sum().backward()
    reference = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    dense_dilated_attention(*reference, lengths, rates, causal=True).sum().backward()
    for x, expected in zip((q, k, v), reference, strict=True):
        assert max_error(x.grad, expected.grad) <= TOLERANCE[torch.float64]


# Properties.


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("segment_length", [23, 64])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_one_full_segment_is_standard_attention(rng, causal, segment_length, kv_heads):
    q, k, v = make_qkv(rng, 2, 23, 4, kv_heads, 8)

    def sdpa(q, k, v):
        group = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        out = F.scaled_dot_product_attention(
            *(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal
        )
        return out.transpose(1, 2)

    for backend in ("fused", "math"):
        fn = dilated([segment_length], [1], causal, backend)
        assert_matches(fn, q, k, v, sdpa, TOLERANCE[torch.float64])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_pattern_twice_or_permuted_changes_nothing(rng, causal):
    # Doubling every multiplicity adds log 2 to every score of a row: the softmax is unchanged.
    q, k, v = make_qkv(rng, 2, 45, 4, 2, 8)
    lengths, rates = [8, 16, 32], [1, 2, 4]
    grad_out = randn(rng, *q.shape)
    base = outputs_and_grads(dilated(lengths, rates, causal), q, k, v, grad_out)
    variants = {
        "twice": (lengths * 2, rates * 2),
        "interleaved": ([8, 8, 16, 16, 32, 32], [1, 1, 2, 2, 4, 4]),
        "permuted": ([32, 8, 16], [4, 1, 2]),
    }
    for name, (ls, rs) in variants.items():
        other = outputs_and_grads(dilated(ls, rs, causal), q, k, v, grad_out)
        for a, b in zip(base, other, strict=True):
            assert max_error(a, b) < 1e-12, name


@pytest.mark.parametrize("backend", ["fused", "math"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_one_pattern_twice_weighs_twice(rng, causal, backend):
    """A key counted by two patterns weighs twice: repeating ONE pattern changes the output."""
    q, k, v = make_qkv(rng, 1, 40, 4, 4, 8)
    once = dilated_attention(q, k, v, [8, 40], [1, 2], causal=causal, backend=backend)
    lengths, rates = [8, 40, 8], [1, 2, 1]
    twice = dilated_attention(q, k, v, lengths, rates, causal=causal, backend=backend)
    assert max_error(twice, once) > 1e-2
    assert_matches(
        dilated(lengths, rates, causal, backend),
        q,
        k,
        v,
        reference_fn(lengths, rates, causal),
        TOLERANCE[torch.float64],
    )


@pytest.mark.parametrize("backend", ["fused", "math"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_uncovered_queries_get_zero_output_and_gradient(rng, causal, backend):
    # Head h keeps position p when (p mod 8) mod 3 == h or p mod 4 == h (w = 10 covers seq 10).
    # E.g. head 2 keeps nothing of the short segment [8, 10) of the first pattern (inner indices
    # 0 and 1) and neither 8 nor 9 in the second, so (9, head 2) is uncovered.
    q, k, v = make_qkv(rng, 2, 10, 3, 3, 4)
    lengths, rates = [8, 10], [3, 4]
    grad_out = randn(rng, *q.shape)
    out, grad_q, grad_k, grad_v = outputs_and_grads(
        dilated(lengths, rates, causal, backend), q, k, v, grad_out
    )
    position, head = torch.arange(10)[:, None], torch.arange(3)[None, :]
    kept = ((position % 8) % 3 == head % 3) | ((position % 10) % 4 == head % 4)  # (n, h)
    assert (~kept).any() and kept.any()
    assert (out[:, ~kept] == 0).all() and (grad_q[:, ~kept] == 0).all()
    # Nobody attends a key its head does not keep, so its k and v get no gradient either.
    assert (grad_k[:, ~kept] == 0).all() and (grad_v[:, ~kept] == 0).all()
    assert (out[:, kept] != 0).all()
    assert_matches(
        dilated(lengths, rates, causal, backend),
        q,
        k,
        v,
        reference_fn(lengths, rates, causal),
        TOLERANCE[torch.float64],
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", ["fused", "math"])
def test_short_last_segment_attends_no_padding(rng, backend, dtype):
    # seq = w + 1: the last token is alone in its segment; non-causal, it attends only itself,
    # so its output is exactly its own value vector (zero padding keys would dilute it).
    q, k, v = make_qkv(rng, 2, 17, 2, 2, 8, dtype)
    out = dilated_attention(q, k, v, [16], [1], backend=backend)
    assert torch.equal(out[:, -1], v[:, -1].detach())
    # With r = 2 the last token has inner index 0: head 0 keeps it (output v), head 1 does not.
    out = dilated_attention(q, k, v, [16], [2], backend=backend)
    assert torch.equal(out[:, -1, 0], v[:, -1, 0].detach())
    assert (out[:, -1, 1] == 0).all()
    # seq = w + 3, r = 1: the last three tokens attend each other only.
    q, k, v = (x[:, :19].detach() for x in make_qkv(rng, 2, 19, 2, 2, 8, dtype))
    out = dilated_attention(q, k, v, [16], [1], backend=backend)
    tail = F.scaled_dot_product_attention(*(x[:, 16:].transpose(1, 2) for x in (q, k, v)))
    assert max_error(out[:, 16:], tail.transpose(1, 2)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("backend", ["fused", "math"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradient_flows_through_mixing_weights(rng, causal, backend):
    """The official implementation's no_grad mixing weights give a gradient this test rejects."""
    q, k, v = make_qkv(rng, 1, 48, 4, 2, 8)
    lengths, rates = [16, 48, 24], [1, 2, 1]  # overlapping patterns: the weights matter
    grad_out = randn(rng, *q.shape)
    actual = outputs_and_grads(dilated(lengths, rates, causal, backend), q, k, v, grad_out)
    exact = outputs_and_grads(
        lambda *x: mixture_of_patterns(*x, lengths, rates, causal=causal), q, k, v, grad_out
    )
    detached = outputs_and_grads(
        lambda *x: mixture_of_patterns(*x, lengths, rates, causal=causal, detach=True),
        q,
        k,
        v,
        grad_out,
    )
    for name, a, e in zip(("out", "grad_q", "grad_k", "grad_v"), actual, exact, strict=True):
        assert max_error(a, e) <= TOLERANCE[torch.float64], name
    # The weights depend on q and k only: constant weights change exactly those gradients, by
    # about 0.1 of their magnitude here (measured 0.10 to 0.19), far outside the tolerance.
    assert max_error(detached[0], exact[0]) <= TOLERANCE[torch.float64]
    assert max_error(detached[1], exact[1]) > 1e-2
    assert max_error(detached[2], exact[2]) > 1e-2


@pytest.mark.parametrize("backend", ["fused", "math"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck(rng, causal, backend):
    q, k, v = make_qkv(rng, 1, 6, 2, 1, 3)
    fn = dilated([4, 6, 2], [1, 2, 1], causal, backend)
    assert torch.autograd.gradcheck(fn, (q, k, v))


# Bad arguments: ValueError naming the argument.


def qkv(batch=1, seq=8, heads=4, kv_heads=4, dim=8, dtype=torch.float32):
    return (
        torch.zeros(batch, seq, heads, dim, dtype=dtype),
        torch.zeros(batch, seq, kv_heads, dim, dtype=dtype),
        torch.zeros(batch, seq, kv_heads, dim, dtype=dtype),
    )


@pytest.mark.parametrize(
    "lengths, rates, name",
    [
        ([4, 8], [1], "dilation_rates"),
        ([4], [1, 2], "dilation_rates"),
        ([], [], "segment_lengths"),
        ([0], [1], "segment_lengths"),
        ([4, -2], [1, 1], "segment_lengths"),
        ([4], [0], "dilation_rates"),
        ([2.5], [1], "segment_lengths"),
        ([4], [1.0], "dilation_rates"),
        ([True], [1], "segment_lengths"),
        ([4], [True], "dilation_rates"),
        (4, [1], "segment_lengths"),
        ([4], "1", "dilation_rates"),
        (None, [1], "segment_lengths"),
    ],
)
def test_bad_patterns(lengths, rates, name):
    with pytest.raises(ValueError, match=name):
        dilated_attention(*qkv(), lengths, rates)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda q, k, v: (q[0], k, v), "^q must have shape"),
        (lambda q, k, v: (q, k[..., None], v), "^k must have shape"),
        (lambda q, k, v: (q, k, v[0]), "^v must have shape"),
        (lambda q, k, v: (q, k, v[:, :, :1]), "^k and v must have the same shape"),
        (lambda q, k, v: (q, k[:, :, :3], v[:, :, :3]), "kv_heads"),
        (lambda q, k, v: (q.expand(2, -1, -1, -1), k, v), "batch"),
        (lambda q, k, v: (q[:, :7], k, v), "seq"),
        (lambda q, k, v: (q[..., :4], k, v), "head_dim"),
        (lambda q, k, v: (q.double(), k, v), "^k has dtype"),
        (lambda q, k, v: (q, k, v.half()), "^v has dtype"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), "^q must be a floating-point"),
        (lambda q, k, v: (q, torch.empty(k.shape, device="meta"), v), "^k is on meta"),
        (lambda q, k, v: (q.numpy(), k, v), "^q must be a torch.Tensor"),
        (lambda q, k, v: (q[:, :0], k[:, :0], v[:, :0]), "^q must have non-empty dimensions"),
    ],
)
def test_bad_tensors(make, message):
    with pytest.raises(ValueError, match=message):
        dilated_attention(*make(*qkv()), [4], [1])


def test_bad_backend_and_scale():
    with pytest.raises(ValueError, match="backend"):
        dilated_attention(*qkv(), [4], [1], backend="flash")
    with pytest.raises(ValueError, match="softmax_scale"):
        dilated_attention(*qkv(), [4], [1], softmax_scale="0.5")
