"""LongNetViT: dilated attention as an image encoder, the LongViT idea (Wang et al. 2023, "When
an Image is Worth 1,024 x 1,024 Words: A Case Study in Computational Pathology"), which applies
LongNet to gigapixel images.

Notation: b batch, C channels, H x W pixels, P patch size, R x K patch grid (R = H/P, K = W/P),
n = R * K patches in raster order, D d_model.

Patches are embedded by a P x P convolution with stride P, get fixed 2-D sine-cosine positions,
and go through MAGNETO blocks with non-causal dilated attention; the mean of the patch tokens
feeds a LayerNorm and a linear classifier. Attention costs O(n * sum_i w_i / r_i), so patch
counts far beyond what dense O(n^2) attention can take (a 4096 x 4096 image in 16 x 16 patches is
65536 patches) run in linear time and memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from longnet.config import LongNetViTConfig
from longnet.dilated import dilated_attention
from longnet.layers import AttentionFn
from longnet.model import TransformerStack, reset_submodules
from longnet.positions import NoPositions


def sincos_2d(rows: int, cols: int, dim: int, device=None) -> torch.Tensor:
    """(rows * cols, dim) fixed positions of a raster-ordered grid: a quarter of the dims each
    for sin and cos of the row and of the column, at frequencies 10000^(-i / (dim/4))."""
    quarter = dim // 4
    frequencies = 10000.0 ** -(torch.arange(quarter, device=device) / quarter)  # (dim/4,)
    row, col = torch.meshgrid(
        torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij"
    )
    row = row.flatten()[:, None] * frequencies  # (n, dim/4)
    col = col.flatten()[:, None] * frequencies
    return torch.cat([row.sin(), row.cos(), col.sin(), col.cos()], dim=1)


@dataclass
class ViTOutput:
    """logits (b, num_classes); loss: mean cross-entropy when labels were given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class LongNetViT(nn.Module):
    """images (b, C, H, W), H and W multiples of patch_size -> class logits (b, num_classes).

    attention_fn replaces longnet.dilated_attention, as in LongNetLM.
    """

    def __init__(self, config: LongNetViTConfig, attention_fn: AttentionFn = dilated_attention):
        super().__init__()
        if not isinstance(config, LongNetViTConfig):
            raise ValueError(f"config must be a LongNetViTConfig, got {type(config).__name__}")
        self.config = config
        self.patch_embed = nn.Conv2d(
            config.in_channels, config.d_model, config.patch_size, stride=config.patch_size
        )
        self.blocks = TransformerStack(config, False, attention_fn, NoPositions())
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.d_model, config.num_classes)

    def init_weights(self) -> None:
        """As LongNetLM.init_weights: for a model built on the meta device, after to_empty()."""
        reset_submodules(self)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> ViTOutput:
        config = self.config
        if (
            not isinstance(images, torch.Tensor)
            or images.dim() != 4
            or images.shape[1] != config.in_channels
            or images.shape[2] % config.patch_size
            or images.shape[3] % config.patch_size
            or min(images.shape[2:]) < config.patch_size
        ):
            raise ValueError(
                f"images must have shape (batch, {config.in_channels}, H, W) with H and W "
                f"multiples of patch_size {config.patch_size}, got "
                f"{tuple(getattr(images, 'shape', ()))}"
            )
        x = self.patch_embed(images)  # (b, D, R, K)
        rows, cols = x.shape[-2:]
        x = rearrange(x, "b d r k -> b (r k) d")
        x = x + sincos_2d(rows, cols, config.d_model, x.device).to(x.dtype)
        logits = self.head(self.norm(self.blocks(x).mean(dim=1)))  # (b, num_classes)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ViTOutput(logits, loss)
