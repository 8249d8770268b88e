"""longnet.integrations.transformers: attn_implementation="longnet" on transformers models built
from config (Llama, Qwen2), against sdpa where one pattern covers the sequence and against the
unpadded rows for padded batches; LongNetForCausalLM loading LongNetLM's folders through
AutoModelForCausalLM, with transformers' conventions."""

from __future__ import annotations

import pytest
import torch
import transformers

import longnet.integrations.transformers as longnet_hf  # registers "longnet"
from longnet import LongNetConfig, LongNetLM

FAMILIES = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
}


def build(family: str, implementation: str, lengths, rates, seed: int = 0):
    config = FAMILIES[family](
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    config.segment_lengths, config.dilation_rates = lengths, rates
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation=implementation
    )
    model.generation_config.eos_token_id = None  # decode every token asked for
    return model.double().eval()


def logits_and_grads(model, ids, mask=None):
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.logits.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_pattern_over_the_sequence_is_sdpa(family):
    """w >= n, r = 1 is dense causal attention: logits and gradients equal sdpa's."""
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = build(family, "longnet", [32], [1])
    sdpa = build(family, "sdpa", [32], [1])
    sdpa.load_state_dict(ours.state_dict())
    (logits, grads), (expected, expected_grads) = (logits_and_grads(m, ids) for m in (ours, sdpa))
    assert (logits - expected).abs().max() < 1e-10
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert (grad - expected_grad).abs().max() < 1e-10


@pytest.mark.parametrize("lengths, rates", [([32], [1]), ([4, 8, 16], [1, 2, 4])])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_rows_equal_the_unpadded_rows(family, lengths, rates):
    """Left and right padding: each row's logits are those of its tokens alone, for the dense
    pattern and a real mixture."""
    model = build(family, "longnet", lengths, rates)
    ids = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, :6] = 0  # left
    mask[1, 15:] = 0  # right
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        for row in range(3):
            tokens = mask[row].bool()
            alone = model(ids[row : row + 1, tokens]).logits[0]
            assert (logits[row, tokens] - alone).abs().max() < 1e-5, row


def left_padded_prompts():
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("lengths, rates", [([32], [1]), ([4, 8, 16], [1, 2, 4])])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_generation_equals_uncached_and_each_row_alone(family, lengths, rates):
    """Greedy decoding of left-padded prompts with DynamicCache and StaticCache equals
    decoding without a cache, and each row's tokens equal its prompt decoded alone."""
    model = build(family, "longnet", lengths, rates)
    ids, mask = left_padded_prompts()
    greedy = dict(max_new_tokens=40, do_sample=False)
    dynamic = model.generate(ids, attention_mask=mask, **greedy)
    static = model.generate(ids, attention_mask=mask, cache_implementation="static", **greedy)
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **greedy)
    assert torch.equal(dynamic, static) and torch.equal(dynamic, uncached)
    for row in range(3):
        alone = model.generate(ids[row : row + 1, mask[row].bool()], **greedy)[0]
        assert torch.equal(dynamic[row, 12:], alone[-40:]), row


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_pattern_over_the_sequence_generates_what_sdpa_generates(family):
    """100 greedy tokens of a left-padded batch, with the cache: sdpa's tokens."""
    ours = build(family, "longnet", [128], [1])
    sdpa = build(family, "sdpa", [128], [1])
    sdpa.load_state_dict(ours.state_dict())
    ids, mask = left_padded_prompts()
    greedy = dict(attention_mask=mask, max_new_tokens=100, do_sample=False)
    assert torch.equal(ours.generate(ids, **greedy), sdpa.generate(ids, **greedy))


def test_a_model_without_patterns_is_refused():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="longnet")
    with pytest.raises(ValueError, match="segment_lengths and dilation_rates"):
        model(torch.zeros(1, 8, dtype=torch.long))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A LongNetLM and the folder its save_pretrained (what launch/export.py calls) wrote."""
    config = LongNetConfig(
        vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
        segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4), position="rotary",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LongNetLM(config).eval()
    return model, model.save_pretrained(tmp_path_factory.mktemp("export") / "model")


def test_auto_model_loads_an_exported_folder(exported, tmp_path):
    """AutoModelForCausalLM gives LongNetForCausalLM with LongNetLM's state dict and logits;
    its own save loads back into LongNetLM; dtype and device_map are honoured."""
    model, folder = exported
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(loaded, longnet_hf.LongNetForCausalLM)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert loaded.lm_head.weight is loaded.embed.weight
    tokens = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
        loaded.save_pretrained(tmp_path)
        assert torch.equal(LongNetLM.from_pretrained(tmp_path)(tokens).logits, model(tokens).logits)
    half = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert half.embed.weight.dtype == torch.bfloat16
    placed = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="auto").eval()
    with torch.no_grad():  # accelerate's placement: the same logits
        assert torch.equal(placed(tokens.to(placed.device)).logits.cpu(), model(tokens).logits)


def test_transformers_conventions(exported):
    """labels=input_ids is LongNetLM's shifted loss; attention_mask pads; greedy generate of a
    left-padded batch, with and without the cache, equals LongNetLM's."""
    model, folder = exported
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss = loaded(tokens, labels=tokens).loss
        assert abs(loss - model(tokens[:, :-1], tokens[:, 1:]).loss) < 1e-6
        mask = torch.ones(2, 20, dtype=torch.long)
        mask[0, :5] = 0
        padded = loaded(tokens, attention_mask=mask).logits
        assert (padded[0, 5:] - model(tokens[:1, 5:]).logits[0]).abs().max() < 1e-5
    expected = model.generate(tokens, 12, top_k=1, attention_mask=mask.bool())
    greedy = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    for cache in ("dynamic", "static"):  # through LongNetLM's decoding
        generated = loaded.generate(tokens, cache_implementation=cache, **greedy)
        assert torch.equal(generated, expected), cache
    assert torch.equal(loaded.generate(tokens, use_cache=False, **greedy), expected)
    short = transformers.StaticCache(config=loaded.config, max_cache_len=25)
    with pytest.raises(ValueError, match="the cache holds 25 tokens, the sequence needs 26"):
        loaded.generate(tokens, past_key_values=short, **greedy)


def exported_selecting(tmp_path, **selection):
    """A small LongNetLM with the content-selected pattern and the model AutoModelForCausalLM
    loads from its export (no end-of-text token: generation runs its full length)."""
    config = LongNetConfig(
        vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
        segment_lengths=(8,), dilation_rates=(1,), position="rotary", select_top_k=2,
        select_block_size=4, select_pooled=True, **selection,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LongNetLM(config).eval()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(model.save_pretrained(tmp_path))
    loaded.generation_config.eos_token_id = None
    return model, loaded.eval()


@pytest.mark.parametrize("span_max", [False, True])
def test_a_query_span_decodes_without_the_cache_and_refuses_it(tmp_path, span_max):
    """select_query_span ranks by queries a transformers cache does not hold: generate with
    use_cache=False equals LongNetLM's cached decoding, and the cache is refused by name."""
    model, loaded = exported_selecting(tmp_path, select_query_span=5, select_span_max=span_max)
    tokens = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(4))
    greedy = dict(max_new_tokens=10, do_sample=False)
    expected = model.generate(tokens, 10, top_k=1)
    assert torch.equal(loaded.generate(tokens, use_cache=False, **greedy), expected)
    with pytest.raises(ValueError, match="select_query_span=5: a transformers cache"):
        loaded.generate(tokens, **greedy)


def test_ranking_dims_export_and_decode_with_the_cache(tmp_path):
    """select_ranking_dims (and the partial rotary it brings) survives the export: the loaded
    model's logits and its greedy generation with a transformers cache equal LongNetLM's."""
    model, loaded = exported_selecting(tmp_path, select_ranking_dims=4)
    assert loaded.config.to_longnet().select_ranking_dims == 4
    tokens = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    expected = model.generate(tokens, 10, top_k=1)
    assert torch.equal(loaded.generate(tokens, max_new_tokens=10, do_sample=False), expected)
