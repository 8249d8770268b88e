"""longnet.DilatedAttention, the seed README's layer, against a float64 computation by hand."""

import copy
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCE, max_error, randn

from longnet import DilatedAttention
from longnet.reference import dense_dilated_attention

USAGE = Path(__file__).resolve().parent.parent / "examples" / "usage.py"

# Layer arguments besides d_model=32, num_heads=4 (head_dim 8), and the patterns they mean.
CONFIGS = {
    "seed_arguments": (dict(dilation_rate=2, segment_size=16), [16], [2]),
    "segment_size_only": (dict(segment_size=8), [8], [1]),
    "pattern_lists": (
        dict(segment_lengths=[8, 16, 32], dilation_rates=[1, 2, 4]),
        [8, 16, 32],
        [1, 2, 4],
    ),
    "causal": (dict(segment_lengths=[8, 16], dilation_rates=[1, 3], causal=True), [8, 16], [1, 3]),
    "one_kv_head": (
        dict(segment_lengths=[8, 16], dilation_rates=[1, 2], num_kv_heads=1),
        [8, 16],
        [1, 2],
    ),
    "two_kv_heads": (
        dict(segment_lengths=[8, 16], dilation_rates=[2, 4], num_kv_heads=2),
        [8, 16],
        [2, 4],
    ),
    "qk_norm": (
        dict(segment_lengths=[4, 16], dilation_rates=[1, 2], qk_norm=True),
        [4, 16],
        [1, 2],
    ),
    "no_bias": (dict(segment_size=8, dilation_rate=2, bias=False, causal=True), [8], [2]),
}


def make_layer(generator, d_model=32, num_heads=4, **kwargs):
    torch.manual_seed(generator.initial_seed())
    layer = DilatedAttention(d_model, num_heads, **kwargs)
    with torch.no_grad():  # non-trivial norm affine parameters, so using them wrongly shows
        for norm in (layer.q_norm, layer.k_norm):
            for parameter in norm.parameters():
                parameter.copy_(randn(generator, *parameter.shape))
    return layer


def by_hand(layer, x, segment_lengths, dilation_rates):
    """The layer's maths in float64 with the layer's own weights and the dense reference."""
    h, g, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q, k, v = F.linear(x, layer.qkv.weight, layer.qkv.bias).split([h * d, g * d, g * d], dim=-1)
    q, k, v = q.unflatten(-1, (h, -1)), k.unflatten(-1, (g, -1)), v.unflatten(-1, (g, -1))
    if isinstance(layer.q_norm, torch.nn.LayerNorm):
        q = F.layer_norm(q, (d,), layer.q_norm.weight, layer.q_norm.bias, layer.q_norm.eps)
        k = F.layer_norm(k, (d,), layer.k_norm.weight, layer.k_norm.bias, layer.k_norm.eps)
    out = dense_dilated_attention(q, k, v, segment_lengths, dilation_rates, causal=layer.causal)
    return F.linear(out.flatten(2), layer.out_proj.weight, layer.out_proj.bias)  # (b, n, d_model)


def output_and_grads(fn, layer, x, grad_out):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.backward(grad_out.to(out.dtype))
    return [out.detach(), x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("seq_len", [1, 7, 33])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_layer_matches_reference(rng, config, seq_len, dtype):
    """Output and the gradients of the input and of every parameter."""
    kwargs, lengths, rates = CONFIGS[config]
    layer = make_layer(rng, **kwargs).to(dtype)
    reference = copy.deepcopy(layer).double()
    x = randn(rng, 2, seq_len, 32, dtype=dtype)
    grad_out = randn(rng, 2, seq_len, 32)
    actual = output_and_grads(layer, layer, x, grad_out)
    expected = output_and_grads(
        lambda x: by_hand(reference, x, lengths, rates), reference, x.double(), grad_out
    )
    assert actual[0].dtype == dtype
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert max_error(a, e) <= TOLERANCE[dtype], i


def test_bias_and_norm_switches_change_the_parameters(rng):
    names = {name for name, _ in make_layer(rng, segment_size=8, qk_norm=True).named_parameters()}
    assert {"q_norm.weight", "k_norm.bias", "qkv.bias", "out_proj.bias"} <= names
    names = {name for name, _ in make_layer(rng, segment_size=8, bias=False).named_parameters()}
    assert names == {"qkv.weight", "out_proj.weight"}


def test_seed_usage_example(capsys):
    torch.manual_seed(0)
    example = runpy.run_path(str(USAGE), run_name="__main__")
    assert capsys.readouterr().out.strip() == "torch.Size([16, 128, 512])"
    attention, inputs, outputs = example["attention"], example["inputs"], example["outputs"]
    assert outputs.shape == inputs.shape and torch.isfinite(outputs).all()
    attention.eval()  # the example's dropout of 0.2 off, to compare numbers
    with torch.no_grad():
        out = attention(inputs)
        other = attention(torch.randn_like(inputs))
        expected = by_hand(copy.deepcopy(attention).double(), inputs.double(), [64], [2])
    assert max_error(out, expected) <= TOLERANCE[torch.float32]
    assert max_error(other, out) > 0.1


def test_dropout_applies_to_the_output_in_train_mode_only(rng):
    layer = make_layer(rng, segment_size=8, dilation_rate=2, dropout=0.5)
    x = randn(rng, 2, 40, 32, dtype=torch.float32)
    layer.eval()
    plain = layer(x)
    assert torch.equal(layer(x), plain)
    assert max_error(plain, by_hand(copy.deepcopy(layer).double(), x.double(), [8], [2])) <= 1e-5
    layer.train()
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    # Each output element is either dropped or the eval output scaled by 1 / (1 - p).
    dropped = first == 0
    assert 0.4 < dropped.float().mean().item() < 0.6
    assert torch.allclose(first[~dropped], 2 * plain[~dropped], rtol=1e-6, atol=1e-6)


def test_bfloat16_layer_is_close_to_float32(rng):
    layer = make_layer(rng, segment_lengths=[8, 16, 32], dilation_rates=[1, 2, 4], causal=True)
    x = randn(rng, 2, 45, 32, dtype=torch.float32)
    out = layer(x)
    out_bf16 = copy.deepcopy(layer).bfloat16()(x.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    # bf16 rounds inputs, weights, projections and attention: measured error 3.0e-3.
    assert max_error(out_bf16, out) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(d_model=30, num_heads=4, segment_size=8), "d_model"),
        (dict(num_heads=0, segment_size=8), "num_heads"),
        (dict(num_kv_heads=3, segment_size=8), "num_kv_heads"),
        (dict(num_kv_heads=0, segment_size=8), "num_kv_heads"),
        (dict(segment_lengths=[8, 16], dilation_rates=[1]), "dilation_rates"),
        (dict(segment_lengths=[8]), "dilation_rates"),
        (dict(segment_size=8, segment_lengths=[8], dilation_rates=[1]), "segment_size"),
        (dict(dilation_rate=2, segment_lengths=[8], dilation_rates=[1]), "dilation_rate"),
        (dict(dilation_rate=2), "segment_size"),
        (dict(), "segment_size"),
        (dict(segment_size=0), "segment"),
        (dict(segment_size=8, dilation_rate=0), "dilation_rate"),
        (dict(segment_size=8, dilation_rate=1.5), "dilation_rate"),
        (dict(segment_size=8, dropout=1.0), "dropout"),
        (dict(segment_size=8, dropout=-0.1), "dropout"),
        # what the attention call would refuse, refused once here (forward checks nothing more)
        (dict(segment_size=8, causal=1), "causal"),
        (dict(segment_size=8, softmax_scale=0.0), "softmax_scale"),
        (dict(segment_size=8, backend="flash"), "backend"),
        (dict(segment_size=8, head_shift=1.5), "head_shift"),
        (dict(segment_size=8, select_top_k=2), "causal=True"),
    ],
)
def test_bad_constructor_arguments(kwargs, name):
    kwargs = dict(d_model=32, num_heads=4) | kwargs
    with pytest.raises(ValueError, match=name):
        DilatedAttention(**kwargs)


@pytest.mark.parametrize("shape", [(2, 32), (1, 5, 16), (1, 1, 5, 32)])
def test_bad_input_shape(rng, shape):
    with pytest.raises(ValueError, match="x must have shape"):
        make_layer(rng, segment_size=8)(torch.zeros(shape))
