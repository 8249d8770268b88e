"""Documents (longnet/varlen.py): packed documents (cu_seqlens) and padding (attention_mask) are
each exactly their own sequence, against the float64 reference run on each document alone,
outputs and gradients, for random and adversarial layouts; padding outputs zero and gets no
gradient; bad input is refused naming the value."""

from __future__ import annotations

import functools
import math
import random
import re

import pytest
import torch
from conftest import TOLERANCE, make_qkv, max_error, outputs_and_grads, randn

from longnet import DilatedAttention, KVCache, LongNetConfig, LongNetLM, dilated_attention
from longnet.reference import dense_dilated_attention
from longnet.varlen import from_attention_mask, from_cu_seqlens, groups


def per_document(q, k, v, spans, **options):
    """The reference on each (start, length) span of the flattened tokens alone, zero elsewhere."""
    batch, n, heads, dim = q.shape
    flat = [x.flatten(0, 1) for x in (q, k, v)]
    out = torch.zeros(batch * n, heads, dim, dtype=torch.float64)
    for start, length in spans:
        parts = [x[start : start + length].unsqueeze(0) for x in flat]
        out = out.index_copy(
            0, torch.arange(start, start + length), dense_dilated_attention(*parts, **options)[0]
        )
    return out.view(batch, n, heads, dim)


def spans_of(cu_seqlens):
    return [(a, b - a) for a, b in zip(cu_seqlens, cu_seqlens[1:], strict=False) if b > a]


def random_case(seed: int):
    """A random layout: shapes, patterns (rates that do not divide lengths, segments longer
    than documents), head shift, causal or not, the content-selected pattern, documents."""
    r = random.Random(seed)
    batch, n = r.randint(1, 3), r.randint(1, 40)
    kv_heads = r.choice([1, 2])
    heads = kv_heads * r.choice([1, 2, 3])
    patterns = [(r.randint(1, n + 8), r.randint(1, 5)) for _ in range(r.randint(1, 3))]
    causal = r.random() < 0.6
    options = dict(
        segment_lengths=[w for w, _ in patterns],
        dilation_rates=[rate for _, rate in patterns],
        causal=causal,
        head_shift=r.randint(0, 3),
    )
    if causal and r.random() < 0.4:
        options.update(select_top_k=r.randint(1, 3), select_block_size=r.randint(1, 4))
        options.update(select_pooled=r.random() < 0.5, select_query_span=r.choice([1, 3, 6]))
        options.update(select_within_segment=r.random() < 0.5)
        options.update(select_ranking_dims=r.choice([0, 1, 3]))  # of 4 or 8
    cuts = sorted(r.sample(range(1, batch * n), min(batch * n - 1, r.randint(0, 6))))
    cu_seqlens = [0, *cuts, batch * n]
    if r.random() < 0.3:  # an empty document
        cu_seqlens.insert(1, 0)
    return (batch, n, heads, kv_heads, r.choice([4, 8])), options, cu_seqlens


@pytest.mark.parametrize("seed", range(24))
def test_packed_documents_equal_each_document_alone(seed):
    shape, options, cu_seqlens = random_case(seed)
    generator = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(generator, *shape)
    grad_out = randn(generator, *q.shape)
    fn = functools.partial(dilated_attention, cu_seqlens=torch.tensor(cu_seqlens), **options)
    reference = functools.partial(per_document, spans=spans_of(cu_seqlens), **options)
    actual, expected = outputs_and_grads(fn, q, k, v, grad_out), None
    expected = outputs_and_grads(reference, q, k, v, grad_out)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
        assert max_error(a, e) <= TOLERANCE[torch.float64], (name, options, cu_seqlens)


PADDINGS = {
    "left": [(3, 13), (0, 16), (15, 1)],
    "right": [(0, 9), (0, 16), (0, 0)],
    "both_sides": [(2, 11), (5, 3), (0, 16)],
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("padding", list(PADDINGS))
def test_padding_equals_the_unpadded_rows(padding, causal):
    """attention_mask (b, n): each row's tokens alone; padding outputs exactly zero and its
    q, k, v get no gradient."""
    generator = torch.Generator().manual_seed(len(padding))
    q, k, v = make_qkv(generator, 3, 16, 4, 2, 8)
    grad_out = randn(generator, *q.shape)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    for row, (start, count) in enumerate(PADDINGS[padding]):
        mask[row, start : start + count] = True
    options = dict(segment_lengths=[4, 8, 16], dilation_rates=[1, 2, 4], causal=causal)
    fn = functools.partial(dilated_attention, attention_mask=mask, **options)
    spans = [(row * 16 + start, count) for row, (start, count) in enumerate(PADDINGS[padding])]
    reference = functools.partial(per_document, spans=spans, **options)
    actual = outputs_and_grads(fn, q, k, v, grad_out)
    for name, a, e in zip(
        ("out", "dq", "dk", "dv"), actual, outputs_and_grads(reference, q, k, v, grad_out),
        strict=True,
    ):  # fmt: skip
        assert max_error(a, e) <= TOLERANCE[torch.float64], name
    for grad in actual:
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))


def test_int_mask_and_the_full_mask():
    """A 0/1 int mask is the bool mask; an all-True mask is no mask at all."""
    q, k, v = make_qkv(torch.Generator().manual_seed(0), 2, 12, 2, 2, 4)
    options = dict(segment_lengths=[4, 12], dilation_rates=[1, 3], causal=True)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    assert torch.equal(
        dilated_attention(q, k, v, attention_mask=mask, **options),
        dilated_attention(q, k, v, attention_mask=mask.bool(), **options),
    )
    assert torch.equal(
        dilated_attention(q, k, v, attention_mask=torch.ones(2, 12, dtype=torch.bool), **options),
        dilated_attention(q, k, v, **options),
    )


def test_row_starts_of_a_padding_mask():
    """Each row's first token within its row: left padding, right padding, none, 0/1 ints."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert from_attention_mask(mask, 4, 5).row_starts() == [2, 0, 0, 4]
    assert from_attention_mask(mask.bool(), 4, 5).row_starts() == [2, 0, 0, 4]
    assert from_attention_mask(torch.ones(3, 5, dtype=torch.bool), 3, 5).row_starts() == [0] * 3
    # An all-padding row has no document: refused, not read as the next row's start.
    empty = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] hold no token"):
        from_attention_mask(empty, 3, 3).row_starts()


def test_any_memory_layout_and_float32():
    """Transposed q, k, v give the contiguous numbers; float32 on the fused kernel is exact to
    float32's tolerance."""
    generator = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(generator, 2, 24, 4, 2, 8, dtype=torch.float32)
    cu_seqlens = [0, 5, 19, 40, 48]
    options = dict(segment_lengths=[4, 8], dilation_rates=[1, 2], causal=True)
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    out = dilated_attention(q, k, v, cu_seqlens=cu_seqlens, **options)
    assert torch.equal(dilated_attention(*strided, cu_seqlens=cu_seqlens, **options), out)
    expected = per_document(q.double(), k.double(), v.double(), spans_of(cu_seqlens), **options)
    assert max_error(out, expected) <= TOLERANCE[torch.float32]


def test_nan_stays_in_its_document():
    q, k, v = (x.detach() for x in make_qkv(torch.Generator().manual_seed(2), 1, 30, 2, 2, 4))
    v[0, 12, 1, 0] = math.nan  # in the second document, kv head 1
    out = dilated_attention(q, k, v, [8], [1], causal=True, cu_seqlens=[0, 10, 20, 30])
    readers = out[0].isnan().any(-1)  # (n, h)
    expected = torch.zeros(30, 2, dtype=torch.bool)
    expected[12:18, 1] = True  # the document's first segment: positions 10 .. 17
    assert torch.equal(readers, expected)


def test_many_short_documents_run_in_few_calls():
    """Linear cost: 2000 documents of 1 to 3000 tokens run in at most 4 calls per octave of
    length (causal), padded by less than a quarter."""
    r = random.Random(0)
    lengths = [r.randint(1, 3000) for _ in range(2000)]
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    documents = from_cu_seqlens(offsets, 1, offsets[-1])
    found = groups(documents, causal=True)
    assert len(found) <= 4 * math.ceil(math.log2(3000)) + 4
    padded = sum(row_len * len(members) for row_len, members in found.items())
    assert padded < 1.25 * offsets[-1]


def test_the_layer_and_the_model_take_documents():
    """DilatedAttention and LongNetLM: a padded or packed batch equals each row or document
    run alone (positions restart at each document, padding's labels are ignored)."""
    torch.manual_seed(0)
    layer = DilatedAttention(16, 4, segment_lengths=[4, 8], dilation_rates=[1, 2], causal=True)
    x = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :4] = False
    out = layer(x, attention_mask=mask)
    assert max_error(out[1, 4:], layer(x[1:, 4:])[0]) <= TOLERANCE[torch.float32]
    assert max_error(out[0], layer(x[:1])[0]) <= TOLERANCE[torch.float32]

    config = LongNetConfig(
        vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
        segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4),
    )  # fmt: skip
    model = LongNetLM(config).eval()
    tokens = torch.randint(0, 40, (2, 20))
    cu_seqlens = [0, 3, 11, 26, 40]
    logits = model(tokens, cu_seqlens=cu_seqlens).logits.flatten(0, 1)
    for start, length in spans_of(cu_seqlens):
        alone = model(tokens.flatten()[None, start : start + length]).logits[0]
        assert max_error(logits[start : start + length], alone) <= TOLERANCE[torch.float32]
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, :6] = False
    padded = model(tokens, tokens, attention_mask=mask)
    assert padded.num_tokens == 34  # the padding's labels do not count
    assert max_error(padded.logits[0, 6:], model(tokens[:1, 6:]).logits[0]) <= 1e-5


BAD = [
    (dict(cu_seqlens=[0, 5], attention_mask=torch.ones(1, 8, dtype=torch.bool)), "not both"),
    (dict(cu_seqlens=[1, 8]), "from 0 to batch * seq_len = 8"),
    (dict(cu_seqlens=[0, 5]), "from 0 to batch * seq_len = 8"),
    (dict(cu_seqlens=[0, 6, 3, 8]), "non-decreasing"),
    (dict(cu_seqlens=[0]), "non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0.0, 8.0])), "1-D integer tensor"),
    (dict(cu_seqlens=torch.tensor([[0, 8]])), "1-D integer tensor"),
    (dict(cu_seqlens="0,8"), "a tensor or a list"),
    (dict(cu_seqlens=[0, True, 8]), "non-decreasing ints"),
    (dict(attention_mask=torch.ones(2, 8, dtype=torch.bool)), "shape (batch, seq) = (1, 8)"),
    (dict(attention_mask=torch.ones(1, 8)), "bool or 0/1 ints"),
    (dict(attention_mask=torch.full((1, 8), 2)), "only 0 and 1"),
    (dict(attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]])), "row 0"),
    (dict(attention_mask=[[1] * 8]), "(batch, seq) tensor"),
]


@pytest.mark.parametrize("arguments, message", BAD, ids=[m for _, m in BAD])
def test_bad_documents_are_refused(arguments, message):
    q, k, v = make_qkv(torch.Generator().manual_seed(0), 1, 8, 2, 2, 4)
    with pytest.raises(ValueError, match=re.escape(message)):
        dilated_attention(q, k, v, [4], [1], causal=True, **arguments)


@pytest.mark.parametrize(
    "position, select_top_k",
    [("rotary", 0), ("alibi", 0), ("xpos", 0), ("rotary", 2)],
    ids=["rotary", "alibi", "xpos", "content_selected"],
)
def test_left_padded_generation_equals_each_prompt_alone(position, select_top_k):
    """A batch of prompts of different lengths, left-padded: greedy decoding with the cache
    (rows decoded in groups of equal start) and without it gives each row's tokens alone, over
    more than two periods of the longest segment."""
    config = LongNetConfig(
        vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
        segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4), position=position,
        select_top_k=select_top_k, select_block_size=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LongNetLM(config).eval()
    tokens = torch.randint(0, 40, (3, 14), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 14, dtype=torch.bool)
    mask[0, :5] = False
    mask[2, :1] = False
    cached = model.generate(tokens, 30, top_k=1, attention_mask=mask)
    uncached = model.generate(tokens, 30, top_k=1, attention_mask=mask, use_cache=False)
    assert torch.equal(cached, uncached)
    for row in range(3):
        alone = model.generate(tokens[row : row + 1, mask[row]], 30, top_k=1)[0]
        assert torch.equal(cached[row, 14:], alone[-30:]), row


def test_decoding_refuses_what_it_cannot_continue():
    config = LongNetConfig(
        vocab_size=40, d_model=32, num_layers=1, num_heads=4, ffn_dim=48,
        segment_lengths=(4, 8), dilation_rates=(1, 2),
    )  # fmt: skip
    model = LongNetLM(config).eval()
    tokens = torch.randint(0, 40, (2, 8))
    right = torch.ones(2, 8, dtype=torch.bool)
    right[0, 6:] = False
    with pytest.raises(ValueError, match="row 0: decoding with a cache needs left padding"):
        model.generate(tokens, 2, top_k=1, attention_mask=right)
    empty = torch.ones(2, 8, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ValueError, match="every row needs at least one token"):
        model.generate(tokens, 2, top_k=1, attention_mask=empty)
    with pytest.raises(ValueError, match="cu_seqlens do not run with a cache"):
        model(tokens, cache=KVCache(1, 8), cu_seqlens=[0, 8, 16])
