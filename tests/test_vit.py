"""LongNetViT: the encoder against the dense reference, training, positions, bad inputs."""

import pytest
import torch
from test_model import reference_attention

from longnet import LongNetConfig, LongNetViT, LongNetViTConfig
from longnet.vit import sincos_2d


def small_config(**overrides) -> LongNetViTConfig:
    fields = dict(
        patch_size=4,
        in_channels=3,
        num_classes=2,
        d_model=32,
        num_layers=2,
        num_heads=4,
        ffn_dim=64,
        segment_lengths=(16, 64),
        dilation_rates=(1, 4),
    )
    return LongNetViTConfig(**{**fields, **overrides})


@pytest.mark.parametrize("num_kv_heads, activation", [(4, "gelu"), (1, "swiglu")])
def test_vit_on_fused_kernels_matches_vit_on_dense_reference(num_kv_heads, activation):
    config = small_config(num_kv_heads=num_kv_heads, activation=activation, qk_norm=True)
    torch.manual_seed(0)
    model = LongNetViT(config).double()
    reference = LongNetViT(config, attention_fn=reference_attention).double()
    reference.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 28, 36, dtype=torch.float64)  # 7 x 9 = 63 patches
    labels = torch.tensor([0, 1])
    results = []
    for m in (model, reference):
        output = m(images, labels)
        output.loss.backward()
        results.append((output.logits, [p.grad for p in m.parameters()]))
    (logits, grads), (expected_logits, expected_grads) = results
    torch.testing.assert_close(logits, expected_logits, rtol=1e-9, atol=1e-9)
    for grad, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-9)


def test_vit_learns_where_a_bright_square_is():
    """Class = which half of the image holds a bright 8 x 8 square, on noise."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (16,), generator=generator)
    images = 0.5 * torch.randn(16, 3, 32, 32, generator=generator)
    rows = torch.randint(0, 24, (16,), generator=generator)
    cols = torch.randint(0, 8, (16,), generator=generator) + 16 * labels
    for image, row, col in zip(images, rows, cols, strict=True):
        image[:, row : row + 8, col : col + 8] += 2.0
    torch.manual_seed(0)
    model = LongNetViT(small_config(num_layers=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(16):
        loss = model(images, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_sincos_positions_are_distinct_and_relative():
    """Every patch gets its own embedding, and the dot product of two embeddings depends only
    on their displacement (row and column)."""
    rows, cols, dim = 12, 20, 32
    table = sincos_2d(rows, cols, dim).view(rows, cols, dim).double()
    assert torch.cdist(table.flatten(0, 1), table.flatten(0, 1)).add(torch.eye(240)).min() > 1e-3
    dots = torch.einsum("abd,ced->abce", table, table)
    for down, right in [(3, 5), (0, 7), (11, 0), (4, -6)]:
        a = torch.arange(rows - down)[:, None]
        b = torch.arange(max(0, -right), cols - max(0, right))[None, :]
        same_displacement = dots[a, b, a + down, b + right]
        torch.testing.assert_close(
            same_displacement, same_displacement[0, 0].expand_as(same_displacement)
        )


def test_bad_vit_inputs_raise_value_error():
    with pytest.raises(ValueError, match="multiple of 4"):
        small_config(d_model=30, num_heads=3)
    with pytest.raises(ValueError, match="patch_size"):
        small_config(patch_size=0)
    with pytest.raises(ValueError, match="num_classes"):
        small_config(num_classes=0)
    with pytest.raises(ValueError, match="LongNetViTConfig"):
        LongNetViT(LongNetConfig())
    model = LongNetViT(small_config())
    with pytest.raises(ValueError, match="multiples of patch_size"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(1, 1, 32, 32))
