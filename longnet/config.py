"""Model configurations: LongNetConfig (the paper's language model, with presets) and
LongNetViTConfig (the LongViT-style image encoder). Bad values raise ValueError naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from longnet.checks import choice, flag, int_at_least, positive_float, positive_int
from longnet.dilated import check_patterns, check_ranking_dims, check_selection
from longnet.kernels import BACKENDS
from longnet.positions import POSITIONS, xpos_max_exponent

ACTIVATIONS = ("gelu", "swiglu")
# xPos multiplies q by zeta^(p/B) and k by zeta^(-p/B); keep |exponent| of e well inside the
# float32 / bfloat16 range (e^88), see LongNetConfig.position.
XPOS_MAX_EXPONENT = 80.0

PAPER_SEGMENT_LENGTHS = (2048, 4096, 8192, 16384, 32768)
PAPER_DILATION_RATES = (1, 2, 4, 6, 12)


@dataclass(kw_only=True)
class BlockConfig:
    """The Transformer blocks shared by the language model and the image encoder.

    num_kv_heads None means num_heads (multi-head); 1 is multi-query attention. ffn_dim None means
    4 * d_model (for SwiGLU too: the gate doubles fc1's width). dropout applies to each sublayer's
    output. backend is dilated_attention's ("auto", "fused", "math", "triton").
    """

    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int | None = None
    ffn_dim: int | None = None
    segment_lengths: tuple[int, ...] = PAPER_SEGMENT_LENGTHS
    dilation_rates: tuple[int, ...] = PAPER_DILATION_RATES
    qk_norm: bool = False
    activation: str = "gelu"
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    activation_checkpointing: bool = False
    backend: str = "auto"
    # Layer i moves every head's offset to (head + i) mod r (docs/semantics.md): when heads < r
    # the layers together keep every position. False is the paper.
    shift_heads_by_layer: bool = False
    # The content-selected pattern (longnet/selection.py): every query also attends the
    # select_top_k blocks of select_block_size tokens of its causal past whose mean key scores
    # highest against it, mixed with the dilated patterns by Eq. 10. 0 is the paper.
    # select_pooled adds the pooled pattern: one more key per candidate block, its mean key with
    # its mean value (NSA's compressed attention), which gives the block scores a gradient.
    select_top_k: int = 0
    select_block_size: int = 32
    select_pooled: bool = False
    # select_query_span > 1 ranks the blocks (and scores the pooled keys) by the mean of each
    # query and the select_query_span - 1 before it, so that the queries of one answer choose
    # alike. 1: each query by its own. select_span_max ranks each block by the best
    # log-probability those queries give it (the pooled pattern's softmax over a query's
    # candidates) instead of their mean query (the pooled keys scored by each query's own): a
    # block that one query is sure of stays a candidate for the next select_query_span - 1
    # queries, the answer's later digits (docs/long-context.md).
    select_query_span: int = 1
    select_span_max: bool = False
    # select_within_segment lets the blocks of a query's own segment of the first pattern be
    # chosen too (every complete block before its own), so that near and far keys are reached
    # by the same circuit, as in dense attention. False: only blocks before that segment.
    select_within_segment: bool = False
    # select_ranking_dims D > 0 ranks the blocks (and scores the pooled keys) by the last D dims
    # of each head only, which the rotary encoding then leaves unrotated: a choice by content.
    # The mean of a block's rotated keys keeps the slow rotary components, so with D = 0 (all
    # dims, rotated) the choice also follows the block's position (docs/long-context.md).
    select_ranking_dims: int = 0
    # Memory for long sequences (docs/capacity.md). ffn_tile_tokens > 0 runs each block's FFN
    # and its norm over tiles of that many tokens, keeping only its input for backward
    # (longnet.layers.sequence_tiled): no (tokens, ffn_dim) tensor beyond one tile's; the same
    # result. offload_checkpoints keeps the checkpointed blocks' inputs in host memory between
    # forward and backward (longnet.layers.saved_on_host); it needs activation_checkpointing.
    ffn_tile_tokens: int = 0
    offload_checkpoints: bool = False

    def __post_init__(self):
        for name in ("d_model", "num_layers", "num_heads"):
            setattr(self, name, positive_int(name, getattr(self, name)))
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        self.num_kv_heads = positive_int("num_kv_heads", self.num_kv_heads)
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.d_model
        self.ffn_dim = positive_int("ffn_dim", self.ffn_dim)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        patterns = check_patterns(self.segment_lengths, self.dilation_rates)
        self.segment_lengths = tuple(w for w, _ in patterns)
        self.dilation_rates = tuple(r for _, r in patterns)
        # causal: the model decides (a ViT refuses the pattern at its layers' construction)
        check_selection(
            self.select_top_k, self.select_block_size, causal=True,
            select_pooled=self.select_pooled, select_query_span=self.select_query_span,
            select_within_segment=self.select_within_segment,
            select_ranking_dims=self.select_ranking_dims, select_span_max=self.select_span_max,
        )  # fmt: skip
        check_ranking_dims(self.select_ranking_dims, self.head_dim)
        for name in (
            "select_top_k",
            "select_block_size",
            "select_query_span",
            "select_ranking_dims",
        ):
            setattr(self, name, int(getattr(self, name)))  # numpy ints as ints (checked above)
        flags = ("qk_norm", "bias", "activation_checkpointing", "shift_heads_by_layer")
        for name in (*flags, "offload_checkpoints"):
            flag(name, getattr(self, name))
        self.ffn_tile_tokens = int_at_least("ffn_tile_tokens", self.ffn_tile_tokens, 0)
        if self.offload_checkpoints and not self.activation_checkpointing:
            raise ValueError(
                "offload_checkpoints=True moves the checkpointed blocks' inputs to host memory: "
                "it needs activation_checkpointing=True"
            )
        choice("activation", self.activation, ACTIVATIONS)
        choice("backend", self.backend, BACKENDS)
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.layer_norm_eps = positive_float("layer_norm_eps", self.layer_norm_eps)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def position_period(self) -> int | None:
        """lcm of the segment lengths: every segment of every pattern lies inside one period.

        Tokens interact only inside a segment, so positional encodings may measure positions
        within their period (see longnet.positions.relative_positions). None with the
        content-selected pattern, whose keys may lie anywhere before the query.
        """
        return None if self.select_top_k else math.lcm(*self.segment_lengths)


_PRESETS: dict[str, dict] = {
    "longnet-tiny": dict(
        vocab_size=264,
        d_model=128,
        num_layers=4,
        num_heads=4,
        ffn_dim=512,
        segment_lengths=(64, 128, 256),
        dilation_rates=(1, 2, 4),
    ),
    "longnet-125m": dict(d_model=768, num_layers=12, num_heads=12, ffn_dim=3072),
    "longnet-350m": dict(d_model=1024, num_layers=24, num_heads=16, ffn_dim=4096),
    "longnet-760m": dict(d_model=1536, num_layers=24, num_heads=16, ffn_dim=6144),
    "longnet-2.7b": dict(d_model=2560, num_layers=32, num_heads=32, ffn_dim=10240),
}


@dataclass(kw_only=True)
class LongNetConfig(BlockConfig):
    """The LongNet language model (Ding et al. 2023): MAGNETO blocks, dilated causal attention.

    The defaults are the paper's 125M model (12 layers, 768 wide, 12 heads, FFN 3072, xPos,
    w = 2048..32768, r = 1..12) with GPT-2's vocabulary padded to 50304 and tied embeddings.

    position: "xpos" (the paper's; Sun et al. 2022), "rotary", "alibi" or "none". Positions are
    true token distances; xPos scales q and k by zeta^(+-p/B) with p measured from the middle of
    the position period (lcm of segment_lengths), so (period / 2) / xpos_scale_base * ln(1/zeta)
    must stay below 80 to fit float32 and bfloat16 (period <= 65390 at B = 512; float16 cannot
    hold xPos beyond a period of ~9000 at B = 512).
    """

    vocab_size: int = 50304
    position: str = "xpos"
    rotary_base: float = 10000.0
    xpos_scale_base: float = 512.0
    tie_embeddings: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.vocab_size = positive_int("vocab_size", self.vocab_size)
        choice("position", self.position, POSITIONS)
        self.rotary_base = positive_float("rotary_base", self.rotary_base)
        self.xpos_scale_base = positive_float("xpos_scale_base", self.xpos_scale_base)
        flag("tie_embeddings", self.tie_embeddings)
        if self.position in ("rotary", "xpos") and self.head_dim % 2:
            raise ValueError(
                f"position={self.position!r} needs an even head_dim, got d_model / num_heads = "
                f"{self.head_dim}"
            )
        unencoded = self.select_ranking_dims
        if unencoded and self.position not in ("rotary", "none"):
            raise ValueError(
                f"select_ranking_dims={unencoded} needs position='rotary' or 'none' (dims "
                f"without position to rank by), got position={self.position!r}"
            )
        if unencoded and self.position == "rotary" and (self.head_dim - unencoded) % 2:
            raise ValueError(
                f"select_ranking_dims={unencoded} leaves {self.head_dim - unencoded} of the "
                f"{self.head_dim} head dims to rotate: rotary needs an even number"
            )
        if unencoded == self.head_dim and self.position == "rotary":
            raise ValueError(
                f"select_ranking_dims={unencoded} leaves none of the {self.head_dim} head dims "
                "to rotate: use position='none'"
            )
        if self.position == "xpos" and self.select_top_k:
            raise ValueError(
                "position='xpos' cannot go with select_top_k > 0: xPos scales grow without "
                "bound over the unbounded distances the content-selected pattern reaches; use "
                "position='rotary'"
            )
        if self.position == "xpos":
            exponent = xpos_max_exponent(self.position_period, self.xpos_scale_base)
            if exponent > XPOS_MAX_EXPONENT:
                raise ValueError(
                    f"position='xpos' with segment_lengths {list(self.segment_lengths)} (period "
                    f"{self.position_period}) and xpos_scale_base {self.xpos_scale_base} scales q "
                    f"and k by up to e^{exponent:.0f}, beyond float32 range; raise "
                    f"xpos_scale_base or use position='rotary'"
                )

    PRESETS = tuple(_PRESETS)  # the names preset() takes

    def to_dict(self) -> dict:
        """Every field, JSON-ready (tuples as lists); from_dict reads it back."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: dict) -> LongNetConfig:
        """A config from to_dict's output; unknown keys raise ValueError naming them. A
        transformers config of model_type "longnet" (its config.json) also reads: the keys that
        transformers adds are left out."""
        if not isinstance(values, dict):
            raise ValueError(f"a LongNetConfig is read from a mapping, got {values!r}")
        fields = {field.name for field in dataclasses.fields(cls)}
        if "model_type" in values:
            if values["model_type"] != "longnet":
                raise ValueError(
                    f"model_type {values['model_type']!r} is not a LongNet model ('longnet')"
                )
            values = {key: value for key, value in values.items() if key in fields}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown LongNetConfig fields {unknown}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides) -> LongNetConfig:
        """A named configuration, with any field overridden.

        longnet-125m / -350m / -760m / -2.7b mirror the paper's Table 4 (layers / hidden / heads:
        12/768/12, 24/1024/16, 24/1536/16, 32/2560/32, FFN 4x hidden, xPos, w = {2048, ...,
        32768}, r = {1, 2, 4, 6, 12}) with GPT-2's 50257-token vocabulary padded to 50304 and
        tied embeddings: 123.8M, 354.1M, 757.6M and 2.647B parameters. longnet-tiny (0.83M
        parameters: 4 layers, 128 wide, 4 heads, w = {64, 128, 256}, r = {1, 2, 4}) has a byte
        vocabulary of 264 (256 byte values and 8 special tokens) and trains on a CPU in minutes.
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {list(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})


@dataclass(kw_only=True)
class LongNetViTConfig(BlockConfig):
    """A LongViT-style encoder (Wang et al. 2023, "When an Image is Worth 1,024 x 1,024 Words"):
    patches of patch_size x patch_size pixels in raster order, non-causal dilated attention.

    Positions are fixed 2-D sine-cosine embeddings added to the patch embeddings (so d_model must
    be a multiple of 4); they take any grid size. The default pattern keeps w / r = 256 for every
    pattern, so each costs the same and the attention cost is linear in the patch count.
    """

    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    segment_lengths: tuple[int, ...] = (256, 1024, 4096, 16384)
    dilation_rates: tuple[int, ...] = (1, 4, 16, 64)

    def __post_init__(self):
        super().__post_init__()
        for name in ("patch_size", "in_channels", "num_classes"):
            setattr(self, name, positive_int(name, getattr(self, name)))
        if self.d_model % 4:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of 4 for 2-D sine-cosine positions"
            )
