"""LongNet: dilated attention for Transformers on very long sequences (Ding et al., 2023)."""

from longnet.dilated import dilated_attention
from longnet.layers import DilatedAttention

__all__ = ["DilatedAttention", "dilated_attention"]
