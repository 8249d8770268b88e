"""longnet.dilated_attention against the dense float64 reference (docs/semantics.md)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    LAYOUTS,
    TOLERANCE,
    assert_matches,
    make_qkv,
    max_error,
    mixture_of_patterns,
    outputs_and_grads,
    randn,
    reference_fn,
)

import longnet.plan
from longnet import dilated_attention
from longnet.reference import dense_dilated_attention, multiplicity

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
    monkeypatch.setattr(longnet.plan, "MIN_CALL_PAIRS", min_call_pairs)
    monkeypatch.setattr(longnet.plan, "MAX_BLOCK_QUERIES", max_block_queries)
    longnet.plan.make_plan.cache_clear()  # planned again with the patched sizes
    try:
        q, k, v = make_qkv(rng, 2, 70, 6, 2, 8)
        lengths, rates = [8, 16, 32, 64], [1, 2, 3, 6]
        for causal in (False, True):
            fn = dilated(lengths, rates, causal, "fused")
            assert_matches(fn, q, k, v, reference_fn(lengths, rates, causal), TOLERANCE[q.dtype])
    finally:
        longnet.plan.make_plan.cache_clear()


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


# Memory layouts: every layout of q, k, v and the upstream gradient gives what the contiguous
# tensors give (the fused kernels read head_dim as dense memory whatever its stride says).


def outputs_and_grads_in_layout(fn, leaves, layout, targets, grad_out):
    """fn's output and the leaves' gradients when the tensors named in targets reach fn (and its
    backward, for "grad_out") in `layout`; the others, and the reference, contiguous."""
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    inputs = [
        LAYOUTS[layout](x) if name in targets else LAYOUTS[layout](x).contiguous()
        for name, x in zip("qkv", leaves, strict=True)
    ]
    grad = LAYOUTS[layout](grad_out)
    out = fn(*inputs)
    out.backward(grad if "grad_out" in targets else grad.contiguous())
    return (out.detach(), *(x.grad for x in leaves))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "targets", [["q"], ["k"], ["v"], ["grad_out"], ["q", "k", "v", "grad_out"]], ids=" ".join
)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_memory_layout_gives_the_contiguous_numbers(rng, layout, targets, causal):
    q, k, v = make_qkv(rng, 2, 24, 4, 2, 8)
    grad_out = randn(rng, *q.shape)
    fn = dilated([8, 24], [1, 3], causal)
    actual = outputs_and_grads_in_layout(fn, (q, k, v), layout, targets, grad_out)
    expected = outputs_and_grads_in_layout(fn, (q, k, v), layout, [], grad_out)
    for name, a, e in zip(("out", "grad_q", "grad_k", "grad_v"), actual, expected, strict=True):
        assert max_error(a, e) <= TOLERANCE[torch.float64], name
    # and the contiguous numbers are the reference's
    reference = outputs_and_grads_in_layout(
        reference_fn([8, 24], [1, 3], causal), (q, k, v), layout, [], grad_out
    )
    for a, e in zip(expected, reference, strict=True):
        assert max_error(a, e) <= TOLERANCE[torch.float64]


def test_issue_reproduction_strided_head_dim():
    q, k, v = (torch.randn(1, 12, 2, 4, dtype=torch.float64) for _ in range(3))
    strided = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert strided.stride(-1) == 2
    assert torch.equal(
        dilated_attention(strided, k, v, [12], [1]), dilated_attention(q, k, v, [12], [1])
    )


# NaN reaches exactly the outputs of the queries that read it.


def nan_readers(which, position, head, seq_len, heads, kv_heads, lengths, rates, causal):
    """(n, h) the queries whose output reads a NaN planted at (position, head) of q, k or v."""
    counts = multiplicity(seq_len, heads, lengths, rates, causal=causal)  # (h, n, n)
    readers = torch.zeros(seq_len, heads, dtype=torch.bool)
    if which == "q":
        readers[position, head] = counts[head, position].sum() > 0
        return readers
    for query_head in range(heads):
        if query_head // (heads // kv_heads) == head:
            readers[:, query_head] = counts[query_head, :, position] > 0
    return readers


@pytest.mark.parametrize("backend", ["fused", "math"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_nan_reaches_exactly_the_queries_that_read_it(rng, which, causal, backend):
    lengths, rates = [8, 24], [1, 3]
    for position in (0, 5, 13, 23):
        q, k, v = (x.detach() for x in make_qkv(rng, 1, 24, 4, 2, 8))
        tensors = dict(q=q, k=k, v=v)
        tensors[which][0, position, 1, 2] = math.nan
        out = dilated_attention(*tensors.values(), lengths, rates, causal=causal, backend=backend)
        readers = nan_readers(which, position, 1, 24, 4, 2, lengths, rates, causal)
        assert readers.any() and not readers.all()
        assert torch.equal(out[0].isnan().any(-1), readers), position


# Bad arguments beyond shapes.


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 0.0, -0.5, 0, "0.5", True])
def test_softmax_scale_must_be_a_finite_positive_number(scale):
    with pytest.raises(ValueError, match="softmax_scale"):
        dilated_attention(*qkv(), [4], [1], softmax_scale=scale, causal=True)


@pytest.mark.parametrize("causal", ["no", 1, None, torch.tensor(True)])
def test_causal_must_be_a_bool(causal):
    with pytest.raises(ValueError, match="causal"):
        dilated_attention(*qkv(), [4], [1], causal=causal)


@pytest.mark.parametrize(
    "lengths, rates, name",
    [([4], [10**30], "dilation_rates"), ([10**30], [1], "segment_lengths"), ([4], [2**63], "di")],
)
def test_absurd_pattern_values_raise_value_error(lengths, rates, name):
    with pytest.raises(ValueError, match=name):
        dilated_attention(*qkv(), lengths, rates)


def test_huge_but_valid_patterns_are_exact(rng):
    """r and w far beyond the sequence: one segment, each head keeps one position."""
    q, k, v = make_qkv(rng, 1, 9, 3, 3, 4)
    lengths, rates = [2**62, 5], [2**40 + 1, 1]
    assert_matches(
        dilated(lengths, rates, True), q, k, v, reference_fn(lengths, rates, True), 1e-12
    )


@pytest.mark.parametrize("shift", [1, 2, 7, -1])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_head_shift_matches_reference(rng, causal, shift):
    q, k, v = make_qkv(rng, 2, 30, 4, 2, 8)
    lengths, rates = [6, 16, 30], [1, 3, 6]

    def fn(q, k, v):
        return dilated_attention(q, k, v, lengths, rates, causal=causal, head_shift=shift)

    def reference(q, k, v):
        return dense_dilated_attention(q, k, v, lengths, rates, causal=causal, head_shift=shift)

    assert_matches(fn, q, k, v, reference, TOLERANCE[torch.float64])
    with pytest.raises(ValueError, match="head_shift"):
        dilated_attention(q, k, v, lengths, rates, head_shift=1.5)


def test_compiles_with_fullgraph_and_matches_eager(rng):
    """torch.compile (CPU inductor) sees one custom op: no graph break, the eager numbers."""
    from longnet import DilatedAttention

    torch.manual_seed(0)
    layer = DilatedAttention(32, 4, segment_lengths=[8, 16], dilation_rates=[1, 2], causal=True)
    x = torch.randn(2, 32, 32)
    compiled = torch.compile(layer, fullgraph=True)
    eager_out = layer(x)
    compiled_out = compiled(x)
    assert max_error(compiled_out, eager_out) <= TOLERANCE[torch.float32]
    compiled_out.sum().backward()
    compiled_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    eager_out.sum().backward()
    for compiled_grad, p in zip(compiled_grads, layer.parameters(), strict=True):
        assert max_error(compiled_grad, p.grad) <= TOLERANCE[torch.float32]
