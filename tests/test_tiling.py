"""Memory options of the blocks (docs/capacity.md): the FFN over token tiles
(longnet.layers.sequence_tiled, config ffn_tile_tokens) and the checkpointed blocks' inputs in
host memory (longnet.layers.saved_on_host, config offload_checkpoints). Both leave the numbers
as they are: float64 outputs and gradients equal the plain model's to 1e-12."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from longnet import LongNetConfig, LongNetLM, engine, layers, model, selection

TOL = dict(rtol=0, atol=1e-12)
N = 50  # tokens per row; batches of 2 rows: tiles run over the 100 tokens, across the rows


def small_config(**overrides) -> LongNetConfig:
    fields = dict(
        vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
        segment_lengths=(8, 16), dilation_rates=(1, 2), position="rotary",
    )  # fmt: skip
    return LongNetConfig(**{**fields, **overrides})


def step(lm: LongNetLM, tokens: torch.Tensor, seed: int = 5):
    """The trainer's step (labels, chunked loss, backward): (loss, {name: gradient})."""
    lm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks
    loss = lm(tokens, labels=tokens.roll(-1, 1), return_logits=False).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in lm.named_parameters()}


def twins(config: LongNetConfig, **options):
    """A float64 model with `config` and one with `options` added, with the same weights."""
    torch.manual_seed(0)
    plain = LongNetLM(config).double()
    other = LongNetLM(replace(config, **options)).double()
    other.load_state_dict(plain.state_dict())
    return plain, other


def tokens_for(config, batch=2, n=N):
    return torch.randint(
        0, config.vocab_size, (batch, n), generator=torch.Generator().manual_seed(1)
    )


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("tile", [1, 7, 16, 50, 64, 1000])
def test_sequence_tiled_equals_the_feed_forward(tile, activation):
    """A block's FFN and its norm, x (2, 50, D) in float64: output, input gradient and every
    parameter gradient; tiles of 1 to more than the 100 tokens, dividing them (1, 50) or not,
    some across the two rows (16, 64)."""
    block = LongNetLM(small_config(activation=activation)).double().blocks[0]
    fn = block._feed_forward
    params = [*block.ffn_norm.parameters(), *block.ffn.parameters()]
    x = torch.randn(2, N, 32, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, N, 32, dtype=torch.float64)
    results = []
    for tiled in (False, True):
        out = layers.sequence_tiled(fn, x, tile, params) if tiled else fn(x)
        results.append((out, *torch.autograd.grad(out, [x, *params], grad)))
    for expected, got in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("tile", [1, 13, 32, 100, 4096])
def test_the_model_with_tiles_equals_the_model_without(tile, checkpointing):
    """LongNetLM's loss and every parameter gradient, batch 2 of 50 tokens, float64."""
    config = small_config(activation_checkpointing=checkpointing)
    plain, tiled = twins(config, ffn_tile_tokens=tile)
    tokens = tokens_for(config)
    (loss, grads), (tiled_loss, tiled_grads) = step(plain, tokens), step(tiled, tokens)
    torch.testing.assert_close(tiled_loss, loss, **TOL)
    for name, g in grads.items():
        torch.testing.assert_close(tiled_grads[name], g, **TOL, msg=name)
    with torch.no_grad():  # inference takes the tiles too
        torch.testing.assert_close(tiled(tokens).logits, plain(tokens).logits, **TOL)


def test_dropout_is_replayed_in_the_tiles_backward():
    """With dropout, backward recomputes each tile with its own mask: checkpointing the tiled
    model (its own replay) gives the gradients of the tiled model without it."""
    config = small_config(dropout=0.2, ffn_tile_tokens=16)
    torch.manual_seed(0)
    plain = LongNetLM(config).double()
    checkpointed = LongNetLM(replace(config, activation_checkpointing=True)).double()
    checkpointed.load_state_dict(plain.state_dict())
    tokens = tokens_for(config)
    (loss, grads), (c_loss, c_grads) = step(plain, tokens), step(checkpointed, tokens)
    torch.testing.assert_close(c_loss, loss, **TOL)
    for name, g in grads.items():
        torch.testing.assert_close(c_grads[name], g, **TOL, msg=name)
    # and the tiled function against plain autograd over the same tiles, the same draws
    block = plain.blocks[0].train()
    params = [*block.ffn_norm.parameters(), *block.ffn.parameters()]
    x = torch.randn(2, N, 32, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    out = layers.sequence_tiled(block._feed_forward, x, 16, params, preserve_rng_state=True)
    torch.manual_seed(3)
    expected = torch.cat([block._feed_forward(t) for t in x.reshape(-1, 32).split(16)])
    torch.testing.assert_close(out.reshape(-1, 32), expected, **TOL)
    got = torch.autograd.grad(out.sum(), [x, *params])
    want = torch.autograd.grad(expected.sum(), [x, *params])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


class _Widest(TorchDispatchMode):
    """The most elements of any tensor an operation makes with a multiple of ffn_dim in its
    last dim, parameter-shaped ones (weights and their gradients) left out."""

    def __init__(self, ffn_dim: int, params):
        super().__init__()
        self.ffn_dim, self.most = ffn_dim, 0
        shapes = [tuple(p.shape) for p in params]
        self.skip = {*shapes, *(shape[::-1] for shape in shapes)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            wide = isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] % self.ffn_dim == 0
            if wide and tuple(t.shape) not in self.skip:
                self.most = max(self.most, t.numel())
        return out


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_no_tensor_of_all_tokens_by_ffn_dim(activation):
    """The training step with tiles of 16 tokens makes no (tokens, ffn_dim) tensor larger than
    a tile's (SwiGLU: fc1 is 2 x ffn_dim wide); without tiles it does (the check is not moot)."""
    config = small_config(activation=activation, activation_checkpointing=True, ffn_dim=44)
    tokens = tokens_for(config)
    widest = {}
    for tile in (0, 16):
        lm = LongNetLM(replace(config, ffn_tile_tokens=tile))
        with _Widest(config.ffn_dim, lm.parameters()) as mode:
            lm(tokens, labels=tokens, return_logits=False).loss.backward()
        widest[tile] = mode.most
    width = 2 * config.ffn_dim if activation == "swiglu" else config.ffn_dim
    assert widest[16] == 16 * width
    assert widest[0] >= tokens.numel() * config.ffn_dim


def test_tiles_compile():
    """torch.compile takes a tiled FFN sublayer to the same numbers as eager (dynamo runs the
    Function eagerly, a graph break: its backward calls torch.autograd.grad)."""
    torch.manual_seed(0)
    block = LongNetLM(small_config()).double().blocks[0]
    params = [*block.ffn_norm.parameters(), *block.ffn.parameters()]

    def sublayer(x):
        return x + layers.sequence_tiled(block._feed_forward, x, 16, params)

    x = torch.randn(2, N, 32, dtype=torch.float64, requires_grad=True)
    results = []
    for run in (sublayer, torch.compile(sublayer, backend="aot_eager")):
        out = run(x)
        results.append((out, *torch.autograd.grad(out.sum(), [x, *params])))
    for expected, got in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, **TOL)


class _Recorded(torch.autograd.graph.saved_tensors_hooks):
    """saved_on_host's stand-in: records what it packs, keeps it as it is."""

    def __init__(self):
        self.packed = []
        super().__init__(self._pack, lambda t: t)

    def _pack(self, tensor):
        self.packed.append(tuple(tensor.shape))
        return tensor


def test_offload_moves_the_block_inputs_only_and_keeps_the_gradients(monkeypatch):
    """offload_checkpoints: the tensors saved in the offload context are the blocks' inputs,
    one (b, n, D) per block (the encodings and the block's own tensors stay with the
    checkpoint); the gradients equal the run without it (through torch's save_on_cpu, which
    on CPU keeps the tensor: tests/test_capacity.py runs the offload as on an accelerator)."""
    config = small_config(activation_checkpointing=True, ffn_tile_tokens=16)
    plain, offloaded = twins(config, offload_checkpoints=True)
    tokens = tokens_for(config)
    loss, grads = step(plain, tokens)
    recorded = _Recorded()
    with monkeypatch.context() as patch:
        patch.setattr(model, "saved_on_host", lambda device: recorded)
        runs = [step(offloaded, tokens)]
    assert recorded.packed == [(2, N, 32)] * config.num_layers
    runs.append(step(offloaded, tokens))  # torch.autograd.graph.save_on_cpu (a copy on CPU)
    for got_loss, got in runs:
        torch.testing.assert_close(got_loss, loss, **TOL)
        for name, g in grads.items():
            torch.testing.assert_close(got[name], g, **TOL, msg=name)


def test_saved_on_host_pins_on_cuda_only(monkeypatch):
    seen = []
    monkeypatch.setattr(
        torch.autograd.graph, "save_on_cpu", lambda pin_memory: seen.append(pin_memory)
    )
    layers.saved_on_host(torch.device("cpu"))
    layers.saved_on_host(torch.device("cuda", 0))
    assert seen == [False, True]


def test_the_step_with_both_options_has_no_host_sync(monkeypatch):
    """As tests/test_sync_free.py: under FakeTensorMode with the accelerator's policy, any
    data-dependent operation would raise."""
    for module in (engine, model, selection):
        monkeypatch.setattr(module, "reads_values_on_host", lambda device: False)
    config = small_config(
        activation_checkpointing=True, ffn_tile_tokens=7, offload_checkpoints=True
    )
    with FakeTensorMode():
        lm = LongNetLM(config).train()
        tokens = torch.randint(0, 40, (2, 64))
        lm(tokens, tokens, return_logits=False).loss.backward()
        assert all(p.grad is not None for p in lm.parameters())


@pytest.mark.parametrize(
    "overrides, named",
    [
        (dict(ffn_tile_tokens=-1), "-1"),
        (dict(ffn_tile_tokens=2.5), "2.5"),
        (dict(ffn_tile_tokens=True), "True"),
        (dict(offload_checkpoints=1, activation_checkpointing=True), "1"),
        (dict(offload_checkpoints=True), "activation_checkpointing"),
    ],
)
def test_bad_options_name_the_value(overrides, named):
    with pytest.raises(ValueError, match=named):
        small_config(**overrides)
    with pytest.raises(ValueError, match="tile_tokens"):
        layers.sequence_tiled(lambda t: t, torch.zeros(2, 3), 0, [])
