"""LongNet's dilated attention inside Hugging Face transformers models (extra `hf`).

    import longnet.integrations.transformers as longnet_hf   # registers "longnet"
    config = LlamaConfig(..., segment_lengths=[2048, 4096], dilation_rates=[1, 2])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="longnet")

`register()` (run on import) adds the attention implementation "longnet" to transformers'
AttentionInterface, with the mask function that hands it the (b, n) padding mask (flash
attention's: transformers gives implementations without one no mask at all). The patterns come
from the model config: `segment_lengths` and `dilation_rates`, set by the user on any decoder
config; optionally `head_shift`. transformers' layout is (b, h, n, d), longnet's (b, n, h, d):
the adapter transposes views, no copies.

Each row's tokens (the True run of its attention_mask, left or right padding) are one document:
its segments start at its first token, as if it ran alone (longnet/varlen.py).

Cached decoding (DynamicCache or StaticCache, left padding) runs each new token through
longnet.generation.decode_attention: dilated attention's row of its position in its row's
document, exactly (tests: cached equals uncached generation, and one pattern over the sequence
equals sdpa's tokens).

`LongNetForCausalLM` is LongNetLM as a transformers PreTrainedModel (model_type "longnet",
registered with AutoConfig and AutoModelForCausalLM on import): the same modules under the
same state-dict names, so that a folder written by LongNetLM.save_pretrained or
launch/export.py loads into either. It follows transformers' conventions: input_ids,
attention_mask, labels=input_ids (shifted inside; LongNetLM takes labels already shifted).
"""

from __future__ import annotations

import dataclasses
import typing

import torch
import torch.nn.functional as F
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from longnet.config import LongNetConfig
from longnet.dilated import dilated_attention
from longnet.generation import KVCache, LayerCache, decode_attention
from longnet.model import IGNORE_INDEX, LongNetLM
from longnet.varlen import from_attention_mask

NAME = "longnet"


def patterns_of(config) -> tuple[list[int], list[int]]:
    """The model config's segment_lengths and dilation_rates; ValueError naming what is missing."""
    lengths = getattr(config, "segment_lengths", None)
    rates = getattr(config, "dilation_rates", None)
    if lengths is None or rates is None:
        raise ValueError(
            f'attn_implementation="{NAME}" reads segment_lengths and dilation_rates from the '
            f"model config; set both on {type(config).__name__} (e.g. config.segment_lengths = "
            f"[2048, 4096]; config.dilation_rates = [1, 2])"
        )
    return list(lengths), list(rates)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function: query (b, h, q_len, d), key and value (b, g, kv_len, d)
    (kv_len > q_len when a cache holds earlier tokens), attention_mask (b, m) bool or None (no
    padding) -> (out (b, q_len, h, d), None: dilated attention has no weights to return)."""
    if dropout:
        raise ValueError(f'attn_implementation="{NAME}" has no attention dropout, got {dropout}')
    lengths, rates = patterns_of(module.config)
    head_shift = getattr(module.config, "head_shift", 0)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (b, n, h, d)
    if attention_mask is not None:
        k, v = k[:, : attention_mask.shape[1]], v[:, : attention_mask.shape[1]]  # a static cache
        if bool(attention_mask.all()):
            attention_mask = None
    if q.shape[1] == k.shape[1]:  # no cache, or the prompt
        out = dilated_attention(
            q, k, v, lengths, rates,
            causal=getattr(module, "is_causal", True),
            softmax_scale=scaling,
            head_shift=head_shift,
            attention_mask=attention_mask,
        )  # fmt: skip
        return out, None
    # New tokens against the cache: each decoded as dilated attention's row of its position,
    # every row of the batch from its own first token (left padding).
    starts = _starts(attention_mask)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    outs = []
    for i, end in enumerate(range(k.shape[1] - q.shape[1] + 1, k.shape[1] + 1)):
        cache = LayerCache.holding(k[:, :end], v[:, :end])
        cache.starts = starts
        outs.append(
            decode_attention(
                q[:, i : i + 1], cache, list(zip(lengths, rates, strict=True)), scale, head_shift
            )
        )
    return torch.cat(outs, dim=1), None


def _config_fields() -> list[tuple]:
    """LongNetConfig's fields, with their defaults, as transformers config fields."""
    hints = typing.get_type_hints(LongNetConfig)
    return [
        (f.name, hints[f.name], dataclasses.field(default=f.default))
        for f in dataclasses.fields(LongNetConfig)
    ]


LongNetHFConfig = dataclasses.make_dataclass(
    "LongNetHFConfig",
    _config_fields(),
    bases=(PreTrainedConfig,),
    namespace={
        "__doc__": "LongNetConfig's fields as a transformers config (model_type 'longnet').",
        "model_type": NAME,
        # transformers' standard names for LongNet's fields (caches and tools read them).
        "attribute_map": {
            "hidden_size": "d_model",
            "num_hidden_layers": "num_layers",
            "num_attention_heads": "num_heads",
            "num_key_value_heads": "num_kv_heads",
            "intermediate_size": "ffn_dim",
        },
        "tie_word_embeddings": property(lambda self: self.tie_embeddings),
        "to_longnet": lambda self: LongNetConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(LongNetConfig)}
        ),
    },
    repr=False,
    kw_only=True,
)


class _LayerOf(LayerCache):
    """One layer of a transformers cache as LongNetLM's LayerCache: append stores through the
    cache's update, which returns its key buffer ((b, g, m, d): every key so far for a
    DynamicCache; max_cache_len slots for a StaticCache, the first `length` of them written),
    seen as (b, n, g, d) views of the written keys."""

    def __init__(self, cache, index: int, starts: list[int] | None):
        super().__init__(0)
        self.cache, self.index, self.starts = cache, index, starts
        self.length = int(cache.get_seq_length(index))  # a StaticCache counts in a tensor

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        end = self.length + k.shape[1]
        # -1: grows (DynamicCache). transformers >= 5.25 names it get_max_length.
        max_length = getattr(self.cache, "get_max_length", None) or self.cache.get_max_cache_shape
        slots = max_length(self.index)
        if 0 <= slots < end:
            raise ValueError(
                f"the cache holds {slots} tokens, the sequence needs {end}: "
                f"a larger max_cache_len (or a DynamicCache)"
            )
        keys, values = self.cache.update(k.transpose(1, 2), v.transpose(1, 2), self.index)
        self.keys, self.values = (x[:, :, :end].transpose(1, 2) for x in (keys, values))
        self.capacity = self.length = end


class _CacheOf(KVCache):
    """A transformers cache as LongNetLM's KVCache, for one forward."""

    def __init__(self, cache, num_layers: int, starts: list[int] | None):
        self.layers = [_LayerOf(cache, index, starts) for index in range(num_layers)]


# The output field that carries the cache back to generate(), by transformers version.
_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _starts(attention_mask: torch.Tensor | None) -> list[int] | None:
    """Each row's first token in a (b, m) mask (left padding when decoding): Documents.row_starts
    of its documents, the mask checked as from_attention_mask checks it; None without a mask."""
    if attention_mask is None:
        return None
    return from_attention_mask(attention_mask, *attention_mask.shape).row_starts()


class LongNetForCausalLM(PreTrainedModel, GenerationMixin):
    """LongNetLM under transformers' PreTrainedModel and GenerationMixin; its modules (embed,
    blocks, norm, lm_head) are LongNetLM's, so are its state-dict names."""

    config_class = LongNetHFConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}
    _no_split_modules = ["TransformerBlock"]

    def __init__(self, config):
        super().__init__(config)
        model = LongNetLM(config.to_longnet())
        for name, child in model.named_children():
            self.add_module(name, child)
        # The LongNetLM that runs the forward, sharing these modules (not a second child).
        object.__setattr__(self, "longnet", model)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """LongNet's own initialisation (MAGNETO gains): the module's reset_parameters."""
        tied_head = module is self.lm_head and self.config.tie_embeddings
        if module is not self and hasattr(module, "reset_parameters") and not tied_head:
            module.reset_parameters()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """What generate() passes the forward for a compilable cache (StaticCache), where it
        would build a 4D causal mask: the (b, n) padding mask as it is (each row's tokens are
        its document; LongNet's patterns are the rest)."""
        return attention_mask

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (b, n); attention_mask (b, n) 1 on tokens, 0 on padding (left or right);
        labels (b, n) as transformers has them (labels=input_ids: each position predicts the
        next, shifted here; -100 ignored) -> loss and logits (b, n, V). With use_cache or
        past_key_values (a DynamicCache or a StaticCache: generate() makes one), the tokens after
        the prompt decode through LongNetLM's cached path, each row from its first token (left
        padding)."""
        # transformers >= 5.25 names the cache `cache` (past_key_values before).
        past_key_values = kwargs.pop("cache", None) or past_key_values
        shifted = None if labels is None else F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        if not use_cache and past_key_values is None:  # generate() asks for the cache
            out = self.longnet(input_ids, shifted, attention_mask=attention_mask)
            return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)
        if self.config.select_query_span > 1:
            raise ValueError(
                f"select_query_span={self.config.select_query_span}: a transformers cache holds "
                "keys and values, not the queries the blocks are ranked by; decode with "
                "use_cache=False (or LongNetLM.generate)"
            )
        if past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        cache = _CacheOf(past_key_values, len(self.blocks), None)
        if cache.length:  # decoding: the mask covers the cache and the new token
            cache.starts, attention_mask = _starts(attention_mask), None
        out = self.longnet(input_ids, shifted, cache=cache, attention_mask=attention_mask)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, **{_CACHE: past_key_values})


def register() -> None:
    """Adds attn_implementation="longnet" to transformers, and model_type "longnet" to
    AutoConfig and AutoModelForCausalLM (idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    AutoConfig.register(NAME, LongNetHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(LongNetHFConfig, LongNetForCausalLM, exist_ok=True)


register()
