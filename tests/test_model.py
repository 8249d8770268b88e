"""LongNetLM and LongNetConfig: numbers against the dense float64 reference, positions that are
global token positions, the loss, MAGNETO's initialisation, presets and bad configurations."""

import math

import pytest
import torch
import torch.nn.functional as F

import longnet.model
from longnet import LongNetConfig, LongNetLM, dilated_attention
from longnet.positions import alibi_slopes, relative_positions
from longnet.reference import dense_dilated_attention, multiplicity


def reference_attention(
    q, k, v, segment_lengths, dilation_rates, *, causal, softmax_scale, backend
):
    """longnet.reference.dense_dilated_attention with dilated_attention's signature."""
    out = dense_dilated_attention(
        q, k, v, segment_lengths, dilation_rates, causal=causal, softmax_scale=softmax_scale
    )
    return out.to(q.dtype)


def small_config(**overrides) -> LongNetConfig:
    fields = dict(
        vocab_size=40,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_dim=48,
        segment_lengths=(4, 8, 16),
        dilation_rates=(1, 2, 4),
    )
    return LongNetConfig(**{**fields, **overrides})


def twin_models(config, attention_fn, dtype=torch.float64, seed=0):
    """A model with the default attention and one with attention_fn, with the same weights."""
    torch.manual_seed(seed)
    model = LongNetLM(config).to(dtype)
    twin = LongNetLM(config, attention_fn=attention_fn).to(dtype)
    twin.load_state_dict(model.state_dict())
    return model, twin


def random_tokens(config, batch, seq_len, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator)


@pytest.mark.parametrize(
    "position, num_kv_heads, activation, qk_norm",
    [
        ("xpos", 4, "gelu", False),
        ("rotary", 2, "swiglu", True),
        ("alibi", 1, "gelu", True),
        ("alibi", 2, "swiglu", False),
        ("none", 2, "gelu", False),
    ],
)
def test_lm_on_fused_kernels_matches_lm_on_dense_reference(
    position, num_kv_heads, activation, qk_norm
):
    config = small_config(
        position=position, num_kv_heads=num_kv_heads, activation=activation, qk_norm=qk_norm
    )
    model, reference = twin_models(config, reference_attention)
    tokens = random_tokens(config, 2, 37)  # not a multiple of any segment length
    labels = random_tokens(config, 2, 37, seed=1)
    results = []
    for m in (model, reference):
        output = m(tokens, labels)
        output.loss.backward()
        results.append((output.logits, {n: p.grad for n, p in m.named_parameters()}))
    (logits, grads), (expected_logits, expected_grads) = results
    torch.testing.assert_close(logits, expected_logits, rtol=1e-9, atol=1e-9)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-8, atol=1e-9, msg=name)


def rotate(x, positions, scale_power, config):
    """Rotary/xPos from its definition, at the given (global, unreduced) positions, float64."""
    half = x.shape[-1] // 2
    exponents = torch.arange(0, 2 * half, 2, dtype=torch.float64) / (2 * half)
    theta = config.rotary_base**-exponents
    zeta = (exponents + 0.4) / 1.4 if config.position == "xpos" else torch.ones(half)
    p = positions.double()[:, None, None]  # (n, 1, 1)
    factor = torch.polar(zeta ** (scale_power * p / config.xpos_scale_base), theta * p)
    turned = torch.complex(x[..., :half], x[..., half:]) * factor
    return torch.cat([turned.real, turned.imag], dim=-1)


@pytest.mark.parametrize("position", ["xpos", "rotary", "alibi", "none"])
def test_attention_layer_matches_its_definition_at_global_positions(position):
    """A layer fed the model's period-reduced positions equals the layer written out from the
    papers: rotations (and xPos scales) at the true global positions, or the explicit ALiBi bias
    -m_h (p - p'), added to the scores with log(multiplicity) in one softmax (docs/semantics.md)."""
    config = small_config(position=position, num_kv_heads=2, qk_norm=True)
    torch.manual_seed(0)
    model = LongNetLM(config).double()
    attention = model.blocks[0].attn
    seq_len, offset = 30, 3 * config.position_period
    x = torch.randn(2, seq_len, config.d_model, dtype=torch.float64)
    reduced = relative_positions(offset, seq_len, config.position_period)
    actual = attention(x, model.positions.encode(reduced, torch.float64))

    q, k, v = attention.project(x)
    positions = torch.arange(offset, offset + seq_len)
    if position in ("xpos", "rotary"):
        q, k = rotate(q, positions, 1, config), rotate(k, positions, -1, config)
    group = config.num_heads // config.num_kv_heads
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    counts = multiplicity(
        seq_len, config.num_heads, config.segment_lengths, config.dilation_rates, causal=True
    )
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(config.head_dim) + counts.log()
    if position == "alibi":
        slopes = torch.tensor(alibi_slopes(config.num_heads), dtype=torch.float64)
        distance = (positions[:, None] - positions[None, :]).double()
        scores = scores - slopes[:, None, None] * distance
    out = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).flatten(2)
    expected = attention.out_proj(attention.inner_norm(out))
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("position", ["xpos", "rotary", "alibi", "none"])
def test_shards_at_their_global_positions_reproduce_the_full_forward(position):
    """Sequence parallelism in one process: each shard runs with position_offset = its start and
    an attention function that places its q, k, v among the other shards' (taken from the full
    run) before dilated attention, as the sequence-parallel function does by communication. The
    16-token segment spans 4 shards, so a shard's encodings must use its global positions."""
    config = small_config(position=position)
    seq_len, shard_len = 32, 8
    recorded = []

    def recording_attention(q, k, v, *args, **kwargs):
        recorded.append((q, k, v))
        return dilated_attention(q, k, v, *args, **kwargs)

    torch.manual_seed(0)
    model = LongNetLM(config, attention_fn=recording_attention).double()
    tokens = random_tokens(config, 2, seq_len)
    with torch.no_grad():
        full = model(tokens).logits
        shards = []
        for start in range(0, seq_len, shard_len):
            here = slice(start, start + shard_len)
            layers = iter(recorded[: config.num_layers])

            def shard_attention(q, k, v, *args, here=here, layers=layers, **kwargs):
                full_q, full_k, full_v = (x.clone() for x in next(layers))
                full_q[:, here], full_k[:, here], full_v[:, here] = q, k, v
                return dilated_attention(full_q, full_k, full_v, *args, **kwargs)[:, here]

            for block in model.blocks:
                block.attn.attention_fn = shard_attention
            shards.append(model(tokens[:, here], position_offset=start).logits)
    torch.testing.assert_close(torch.cat(shards, dim=1), full, rtol=1e-9, atol=1e-9)


def test_local_shards_concatenate_to_the_full_forward_and_loss():
    """When every segment length divides the shard length, the full causal forward restricted to
    a shard is that shard run alone at its position_offset; losses add up by sum and count."""
    config = small_config(segment_lengths=(4, 8), dilation_rates=(1, 2))
    torch.manual_seed(0)
    model = LongNetLM(config).double()
    tokens, labels = random_tokens(config, 2, 32), random_tokens(config, 2, 32, seed=1)
    labels[0, 3] = labels[1, 20] = -100
    full = model(tokens, labels)
    shards = [
        model(tokens[:, s : s + 8], labels[:, s : s + 8], position_offset=s) for s in (0, 8, 16, 24)
    ]
    torch.testing.assert_close(torch.cat([s.logits for s in shards], dim=1), full.logits)
    loss_sum = sum(s.loss_sum for s in shards)
    num_tokens = sum(s.num_tokens for s in shards)
    torch.testing.assert_close(loss_sum, full.loss_sum)
    assert num_tokens == full.num_tokens == 62
    torch.testing.assert_close(loss_sum / num_tokens, full.loss)


def test_loss_is_the_mean_next_token_cross_entropy_over_labelled_tokens():
    config = small_config()
    model = LongNetLM(config)
    tokens, labels = random_tokens(config, 3, 20), random_tokens(config, 3, 20, seed=1)
    labels[:, :5] = -100
    output = model(tokens, labels)
    expected = F.cross_entropy(output.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected)
    torch.testing.assert_close(output.loss_sum, expected * 45)
    assert output.num_tokens == 45


@pytest.mark.parametrize("chunk_tokens", [1, 7, 1000])
def test_chunked_loss_equals_the_full_loss_and_its_gradients(monkeypatch, chunk_tokens):
    """return_logits=False: the loss a chunk of tokens at a time, logits recomputed in the
    backward, gives the loss and parameter gradients of the full logits."""
    config = small_config()
    monkeypatch.setattr(longnet.model, "LOSS_CHUNK_ELEMENTS", chunk_tokens * config.vocab_size)
    torch.manual_seed(0)
    model = LongNetLM(config).double()
    tokens, labels = random_tokens(config, 2, 24), random_tokens(config, 2, 24, seed=1)
    labels[0, :9] = -100
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        output = model(tokens, labels, return_logits=return_logits)
        output.loss.backward()
        assert (output.logits is None) == (not return_logits)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((output.loss_sum.detach(), output.num_tokens, grads))
    (full_sum, full_count, full_grads), (sum_, count, grads) = results
    torch.testing.assert_close(sum_, full_sum, rtol=1e-12, atol=1e-12)
    assert count == full_count == 39
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, labels, return_logits=False).loss_sum, full_sum)


def test_shifting_by_whole_periods_changes_nothing():
    """Positions are relative: a sequence starting at a multiple of every segment length gives
    the same outputs wherever it starts."""
    config = small_config(position="xpos")
    torch.manual_seed(0)
    model = LongNetLM(config).double()
    tokens = random_tokens(config, 1, 24)
    expected = model(tokens).logits
    for periods in (1, 5, 10**6):
        offset = periods * config.position_period
        torch.testing.assert_close(model(tokens, position_offset=offset).logits, expected)


def test_activation_checkpointing_gives_the_same_gradients():
    config = small_config(activation_checkpointing=True, dropout=0.1)
    model, plain = twin_models(config, dilated_attention, dtype=torch.float32)
    plain.blocks.checkpointing = False
    tokens, labels = random_tokens(config, 2, 16), random_tokens(config, 2, 16, seed=1)
    for m in (model, plain):
        torch.manual_seed(5)  # same dropout masks; checkpointing replays them
        m(tokens, labels).loss.backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_magneto_initialisation():
    config = small_config(d_model=256, num_heads=4, num_kv_heads=4, num_layers=6, ffn_dim=1024)
    torch.manual_seed(0)
    model = LongNetLM(config)
    gamma = math.sqrt(math.log(2 * 6))
    block = model.blocks[3]
    q, k, v = block.attn.qkv.weight.split(256)
    expected = {
        "q": (q, math.sqrt(2 / 512)),
        "k": (k, math.sqrt(2 / 512)),
        "v": (v, gamma * math.sqrt(2 / 512)),
        "out_proj": (block.attn.out_proj.weight, gamma * math.sqrt(2 / 512)),
        "fc1": (block.ffn.fc1.weight, gamma * math.sqrt(2 / 1280)),
        "fc2": (block.ffn.fc2.weight, gamma * math.sqrt(2 / 1280)),
        "embed": (model.embed.weight, 256**-0.5),
    }
    for name, (weight, std) in expected.items():
        assert abs(weight.std().item() / std - 1) < 0.03, name
    assert block.attn.qkv.bias.abs().max() == 0 and block.ffn.fc2.bias.abs().max() == 0
    assert model.lm_head.weight is model.embed.weight


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_a_model_built_on_the_meta_device_initialises_to_the_constructors_values(tie_embeddings):
    """Built on meta (no memory), moved with to_empty and init_weights(): from the same seed,
    every parameter equals an ordinary build's, and a tied head stays tied."""
    config = small_config(tie_embeddings=tie_embeddings, activation="swiglu", qk_norm=True)
    torch.manual_seed(0)
    built = LongNetLM(config)
    with torch.device("meta"):
        model = LongNetLM(config)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    expected = built.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in model.state_dict().items())
    assert (model.lm_head.weight is model.embed.weight) == tie_embeddings


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_whole_model_compiles_with_fullgraph_and_matches_eager(backend):
    """torch.compile(fullgraph=True) of a LongNetLM's loss forward and backward (the trainer's
    call, chunked loss included): no graph break, the eager loss and gradients. aot_eager
    traces the graph and its backward in seconds; inductor also generates code (minutes on 2
    cores, so it is in the slow tier)."""
    config = small_config(activation="swiglu", qk_norm=True)
    torch.manual_seed(0)
    model = LongNetLM(config)
    tokens = random_tokens(config, 2, 33)

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn(tokens[:, :-1], tokens[:, 1:], return_logits=False).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    torch._dynamo.reset()
    compiled_loss, compiled_grads = loss_and_grads(
        torch.compile(model, fullgraph=True, backend=backend)
    )
    eager_loss, eager_grads = loss_and_grads(model)
    assert abs(compiled_loss - eager_loss) < 1e-5
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads, strict=True):
        assert (compiled_grad - eager_grad).abs().max() < 1e-5


def test_tiny_lm_overfits_a_fixed_batch():
    torch.manual_seed(0)
    config = LongNetConfig(
        vocab_size=64,
        d_model=64,
        num_layers=2,
        num_heads=4,
        ffn_dim=128,
        segment_lengths=(8, 32),
        dilation_rates=(1, 2),
    )
    model = LongNetLM(config)
    data = random_tokens(config, 4, 33)
    data[:, 0] = torch.arange(4)  # the first token alone decides the second: make it unique
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(200):
        loss = model(data[:, :-1], data[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if loss.item() < 0.1:
            break
    assert losses[0] > 3.5 and losses[-1] < 0.1, losses[::10]


PAPER_SIZES = {
    "longnet-125m": (12, 768, 12, 125e6),
    "longnet-350m": (24, 1024, 16, 350e6),
    "longnet-760m": (24, 1536, 16, 760e6),
    "longnet-2.7b": (32, 2560, 32, 2.7e9),
}


@pytest.mark.parametrize("name", list(PAPER_SIZES))
def test_paper_presets_have_the_sizes_their_names_promise(name):
    layers, width, heads, nominal = PAPER_SIZES[name]
    config = LongNetConfig.preset(name)
    assert (config.num_layers, config.d_model, config.num_heads) == (layers, width, heads)
    assert config.ffn_dim == 4 * width and config.vocab_size == 50304
    assert config.segment_lengths == (2048, 4096, 8192, 16384, 32768)
    assert config.dilation_rates == (1, 2, 4, 6, 12)
    assert config.position == "xpos"
    with torch.device("meta"):
        count = LongNetLM(config).num_parameters()
    assert abs(count / nominal - 1) < 0.05, count


def test_tiny_preset_starts_near_uniform_and_learns():
    config = LongNetConfig.preset("longnet-tiny")
    assert config.vocab_size == 264
    torch.manual_seed(0)
    model = LongNetLM(config)
    assert model.num_parameters() < 1e6
    tokens = random_tokens(config, 2, 257)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(264)) < 1.0 and losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(d_model=30), "d_model"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(position="learned"), "position"),
        (dict(activation="relu"), "activation"),
        (dict(dropout=1.0), "dropout"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(num_layers=0), "num_layers"),
        (dict(ffn_dim=-1), "ffn_dim"),
        (dict(segment_lengths=(4, 8), dilation_rates=(1,)), "same length"),
        (dict(segment_lengths=(0, 8)), "segment_lengths"),
        (dict(backend="cuda"), "backend"),
        (dict(qk_norm="yes"), "qk_norm"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
        (dict(xpos_scale_base=-1.0), "xpos_scale_base"),
        (dict(d_model=36, position="rotary"), "even head_dim"),
        (dict(segment_lengths=(2**20,), dilation_rates=(1,)), "xpos_scale_base"),
    ],
)
def test_bad_config_raises_value_error(fields, message):
    with pytest.raises(ValueError, match=message):
        small_config(**fields)


def test_bad_model_inputs_raise_value_error():
    with pytest.raises(ValueError, match="unknown preset"):
        LongNetConfig.preset("longnet-1t")
    with pytest.raises(ValueError, match="LongNetConfig"):
        LongNetLM({"d_model": 32})
    config = small_config()
    model = LongNetLM(config)
    tokens = random_tokens(config, 2, 8)
    with pytest.raises(ValueError, match="tokens"):
        model(tokens.float())
    with pytest.raises(ValueError, match="labels"):
        model(tokens, tokens[:, :4])
    with pytest.raises(ValueError, match="position_offset"):
        model(tokens, position_offset=-8)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t, vocab: t.masked_fill(t == t[0, 3], vocab), "tokens must be ids in \\[0, 40\\)"),
        (lambda t, vocab: t.masked_fill(t == t[0, 3], -1), "got -1"),
        (lambda t, vocab: t[:, :0], "tokens must not be empty"),
        (lambda t, vocab: t[:0], "tokens must not be empty"),
    ],
)
def test_token_ids_outside_the_vocabulary_raise_value_error(make, message):
    """On CUDA an id outside the table is a device-side assert that kills the process."""
    config = small_config()
    assert config.vocab_size == 40
    model = LongNetLM(config)
    with pytest.raises(ValueError, match=message):
        model(make(random_tokens(config, 2, 8), config.vocab_size))
