"""LongNetLM.generate: the key/value cache decodes exactly what dilated attention computes."""

import pytest
import torch
from conftest import tiered

from longnet import KVCache, LongNetConfig, LongNetLM

PROMPT, NEW = 5, 27  # 32 tokens: two segments of the longest pattern, many of the shorter ones


def make_model(seed=0, **overrides):
    fields = dict(
        vocab_size=48,
        d_model=32,
        num_layers=2,
        num_heads=4,
        ffn_dim=64,
        segment_lengths=(4, 8, 16),
        dilation_rates=(1, 2, 4),
    )
    torch.manual_seed(seed)
    model = LongNetLM(LongNetConfig(**{**fields, **overrides})).double().eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, PROMPT))
    return model, prompt


CASES = [
    (position, kv_heads)
    for position in ("xpos", "rotary", "alibi", "none")
    for kv_heads in (4, 2, 1)  # multi-head, grouped-query, multi-query
]


# Each encoding and each kind of heads once in the quick tier.
QUICK_CASES = {("xpos", 4), ("rotary", 2), ("alibi", 1), ("none", 2)}


@pytest.mark.parametrize("position, num_kv_heads", tiered(CASES, QUICK_CASES))
def test_cached_greedy_generation_equals_uncached(position, num_kv_heads):
    model, prompt = make_model(position=position, num_kv_heads=num_kv_heads)
    cached = model.generate(prompt, NEW, top_k=1, use_cache=True)
    uncached = model.generate(prompt, NEW, top_k=1, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :PROMPT], prompt)


@pytest.mark.parametrize("position, num_kv_heads", [("xpos", 2), ("alibi", 1), ("rotary", 4)])
def test_each_cached_step_gives_the_logits_of_the_full_forward(position, num_kv_heads):
    model, _ = make_model(position=position, num_kv_heads=num_kv_heads, qk_norm=True)
    tokens = torch.randint(0, model.config.vocab_size, (2, PROMPT + NEW))
    with torch.no_grad():
        expected = model(tokens).logits
        cache = KVCache(model.config.num_layers, tokens.shape[1])
        steps = [model(tokens[:, :PROMPT], cache=cache).logits]
        steps += [model(tokens[:, t : t + 1], cache=cache).logits for t in range(PROMPT, 32)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-10, atol=1e-10)


def test_positions_no_head_keeps_decode_to_the_same_logits():
    """One pattern (w=8, r=4) with 2 heads keeps in-segment positions 0, 1, 4, 5 only: the other
    tokens' attention outputs are zero, in the cache path as in the full forward."""
    model, _ = make_model(num_heads=2, segment_lengths=(8,), dilation_rates=(4,))
    tokens = torch.randint(0, model.config.vocab_size, (1, 20))
    with torch.no_grad():
        expected = model(tokens).logits
        cache = KVCache(model.config.num_layers, 20)
        steps = [model(tokens[:, :1], cache=cache).logits]
        steps += [model(tokens[:, t : t + 1], cache=cache).logits for t in range(1, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-10, atol=1e-10)


def test_top_k_sampling_draws_among_the_top_k_tokens():
    model, prompt = make_model()
    torch.manual_seed(1)
    tokens = model.generate(prompt, 12, temperature=0.7, top_k=3)
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits[:, PROMPT - 1 :]  # (b, 12, V)
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == tokens[:, PROMPT:, None]).any(-1).all()


def test_bad_generation_arguments_raise_value_error():
    model, prompt = make_model()
    for kwargs, message in [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=2, temperature=0.0), "temperature"),
        (dict(max_new_tokens=2, top_k=0), "top_k"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.generate(prompt, **kwargs)
    cache = KVCache(model.config.num_layers, 8)
    model(prompt, cache=cache)
    with pytest.raises(ValueError, match="one token at a time"):
        model(prompt[:, :2], cache=cache)
    with pytest.raises(ValueError, match="position_offset or cache"):
        model(prompt[:, :1], position_offset=8, cache=cache)


@pytest.mark.parametrize(
    "position, num_kv_heads", tiered([("xpos", 2), ("rotary", 1), ("alibi", 4)], {("xpos", 2)})
)
def test_ring_buffer_cache_decodes_exactly_across_many_segments(position, num_kv_heads):
    """The cache holds max(w) = 16 positions; 70 tokens span four periods of the longest
    segment, and every cached step still gives the logits of the full forward."""
    model, _ = make_model(position=position, num_kv_heads=num_kv_heads)
    tokens = torch.randint(0, model.config.vocab_size, (2, 70))
    with torch.no_grad():
        expected = model(tokens).logits
        cache = KVCache(model.config.num_layers, 16)
        steps = [model(tokens[:, :21], cache=cache).logits]  # a prompt longer than the cache
        steps += [model(tokens[:, t : t + 1], cache=cache).logits for t in range(21, 70)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-10, atol=1e-10)
    assert all(layer.keys.shape[1] == 16 for layer in cache.layers)
    cached = model.generate(tokens[:, :3], 60, top_k=1)
    assert torch.equal(cached, model.generate(tokens[:, :3], 60, top_k=1, use_cache=False))


def test_cache_smaller_than_the_longest_segment_raises():
    model, prompt = make_model()
    cache = KVCache(model.config.num_layers, 8)  # the longest segment is 16
    with torch.no_grad():
        model(prompt, cache=cache)
        model(prompt[:, :1], cache=cache)
        model(prompt[:, :1], cache=cache)
        model(prompt[:, :1], cache=cache)  # position 8 needs keys 0..8: 9 positions
        with pytest.raises(ValueError, match="the cache holds 8 positions"):
            model(prompt[:, :1], cache=cache)  # position 8 reads keys 0..8


def test_heads_shifted_by_layer_decode_exactly():
    """shift_heads_by_layer: layer i keeps offsets (head + i) mod r; 2 heads and r = 4 leave
    positions that no head of a layer keeps, and the cache must decode the same logits."""
    model, _ = make_model(
        num_heads=2, segment_lengths=(8, 16), dilation_rates=(4, 2), shift_heads_by_layer=True
    )
    assert [block.attn.head_shift for block in model.blocks] == [0, 1]
    tokens = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        expected = model(tokens).logits
        cache = KVCache(model.config.num_layers, 16)
        steps = [model(tokens[:, :3], cache=cache).logits]
        steps += [model(tokens[:, t : t + 1], cache=cache).logits for t in range(3, 40)]
        unshifted, _ = make_model(num_heads=2, segment_lengths=(8, 16), dilation_rates=(4, 2))
        assert (unshifted(tokens).logits - expected).abs().max() > 1e-3  # the option acts
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-10, atol=1e-10)
