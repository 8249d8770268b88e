"""LongNet: dilated attention for Transformers on very long sequences (Ding et al., 2023)."""

from longnet.config import LongNetConfig, LongNetViTConfig
from longnet.dilated import dilated_attention
from longnet.generation import KVCache
from longnet.layers import DilatedAttention
from longnet.model import LMOutput, LongNetLM
from longnet.vit import LongNetViT, ViTOutput

__all__ = [
    "DilatedAttention",
    "KVCache",
    "LMOutput",
    "LongNetConfig",
    "LongNetLM",
    "LongNetViT",
    "LongNetViTConfig",
    "ViTOutput",
    "dilated_attention",
]
