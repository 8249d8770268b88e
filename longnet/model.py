"""LongNetLM: the paper's decoder-only language model, and the MAGNETO blocks it shares with
LongNetViT.

Notation
    b   batch       n   tokens        D   d_model       V   vocabulary
    h   query heads g   kv heads      d   head dim      N   layers

A block is MAGNETO's sub-LayerNorm layout (Wang et al. 2022, "Foundation Transformers",
arXiv 2210.06423), the architecture LongNet trains: each sublayer is x + f(LN(x)), and f carries
one more LayerNorm before its output projection:
    attention: LN -> qkv -> positions -> dilated attention -> LN -> out_proj
    FFN:       LN -> fc1 -> activation -> LN -> fc2
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from longnet import varlen
from longnet.config import BlockConfig, LongNetConfig
from longnet.dilated import check_documents, dilated_attention
from longnet.generation import KVCache, LayerCache, check_sampling, decode_attention, sample_next
from longnet.kernels import accumulation_dtype, reads_values_on_host
from longnet.layers import (
    AttentionFn,
    DilatedAttention,
    MagnetoLinear,
    saved_on_host,
    sequence_tiled,
)
from longnet.positions import fold, make_positions, relative_positions

IGNORE_INDEX = -100


def magneto_gain(num_layers: int) -> float:
    """MAGNETO's gamma = sqrt(log(2N)) (Wang et al. 2022, "Foundation Transformers", section
    2.2), the gain of the value, output and FFN projections for encoder-only and decoder-only
    models; q and k keep gain 1. Biases start at zero."""
    return math.sqrt(math.log(2 * num_layers))


def reset_submodules(model: nn.Module, skip=()) -> None:
    """reset_parameters() of every submodule that has one (those in `skip` left out), in
    construction order: from the same seed, the values the constructor draws."""
    for module in model.modules():
        if module is not model and module not in skip and hasattr(module, "reset_parameters"):
            module.reset_parameters()


class SelfAttention(DilatedAttention):
    """The attention sublayer after its input LayerNorm: (b, n, D) -> (b, n, D).

    `positions` encodes q and k (see longnet.positions); an encoding that widens them (ALiBi)
    gets v padded to the same width for the attention function, and the padding sliced off.
    """

    def __init__(
        self,
        config: BlockConfig,
        causal: bool,
        attention_fn: AttentionFn,
        positions,
        layer: int,
        gain: float,
    ):
        super().__init__(
            config.d_model,
            config.num_heads,
            dropout=config.dropout,
            segment_lengths=config.segment_lengths,
            dilation_rates=config.dilation_rates,
            causal=causal,
            num_kv_heads=config.num_kv_heads,
            qk_norm=config.qk_norm,
            bias=config.bias,
            # explicit, since an encoding may widen q and k beyond head_dim
            softmax_scale=config.head_dim**-0.5,
            backend=config.backend,
            head_shift=layer if config.shift_heads_by_layer else 0,
            select_top_k=config.select_top_k,
            select_block_size=config.select_block_size,
            select_pooled=config.select_pooled,
            select_query_span=config.select_query_span,
            select_within_segment=config.select_within_segment,
            select_ranking_dims=config.select_ranking_dims,
            select_span_max=config.select_span_max,
            attention_fn=attention_fn,
            init_gain=gain,
        )
        self.positions = positions
        self.inner_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        encoding: tuple,
        cache: LayerCache | None = None,
        documents: varlen.Documents | None = None,
    ) -> torch.Tensor:
        q, k, v = self.project(x)
        q, k = self.positions.apply(q, k, encoding)
        if cache is not None and cache.length:  # one new token against the cache
            cache.append(k, v)
            out = decode_attention(
                q,
                cache,
                self.patterns,
                self.softmax_scale,
                self.head_shift,
                **self.selection_arguments(),
            )
        else:
            if cache is not None:  # prefill
                cache.append(k, v)
            extra = k.shape[-1] - v.shape[-1]
            out = self.attend(q, k, F.pad(v, (0, extra)) if extra else v, documents)
            out = out[..., : self.head_dim]
        if cache is not None and self.select_query_span > 1:
            cache.keep_queries(q, self.select_query_span - 1)
        out = self.out_proj(self.inner_norm(rearrange(out, "b n h d -> b n (h d)")))
        return self.dropout(out)


class FeedForward(nn.Module):
    """(b, n, D) -> (b, n, D): fc1 -> GELU (or SwiGLU) -> LN -> fc2."""

    def __init__(self, config: BlockConfig, gain: float):
        super().__init__()
        self.swiglu = config.activation == "swiglu"
        parts = (2 if self.swiglu else 1) * [(config.ffn_dim, gain)]  # SwiGLU: gate, up
        self.fc1 = MagnetoLinear(config.d_model, parts, bias=config.bias)
        self.inner_norm = nn.LayerNorm(config.ffn_dim, eps=config.layer_norm_eps)
        self.fc2 = MagnetoLinear(config.ffn_dim, [(config.d_model, gain)], bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if self.swiglu:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden)
        return self.dropout(self.fc2(self.inner_norm(hidden)))


class TransformerBlock(nn.Module):
    def __init__(
        self,
        config: BlockConfig,
        causal: bool,
        attention_fn: AttentionFn,
        positions,
        layer: int,
        gain: float,
    ):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config, causal, attention_fn, positions, layer, gain)
        self.ffn_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config, gain)
        self.ffn_tile_tokens = config.ffn_tile_tokens

    def forward(
        self,
        x: torch.Tensor,
        encoding: tuple = (),
        cache: LayerCache | None = None,
        documents: varlen.Documents | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), encoding, cache, documents)
        if not self.ffn_tile_tokens:
            return x + self.ffn(self.ffn_norm(x))
        params = [*self.ffn_norm.parameters(), *self.ffn.parameters()]
        dropout = self.training and self.ffn.dropout.p > 0
        return x + sequence_tiled(self._feed_forward, x, self.ffn_tile_tokens, params, dropout)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.ffn_norm(x))


class TransformerStack(nn.ModuleList):
    """N blocks with MAGNETO's initialisation (see magneto_gain), run with activation
    checkpointing if configured."""

    def __init__(self, config: BlockConfig, causal: bool, attention_fn: AttentionFn, positions):
        gain = magneto_gain(config.num_layers)
        super().__init__(
            TransformerBlock(config, causal, attention_fn, positions, layer, gain)
            for layer in range(config.num_layers)
        )
        self.checkpointing = config.activation_checkpointing
        self.offload = config.offload_checkpoints  # the checkpointed inputs kept on the host

    def forward(
        self,
        x: torch.Tensor,
        encoding: tuple = (),
        cache: KVCache | None = None,
        documents: varlen.Documents | None = None,
    ) -> torch.Tensor:
        for i, block in enumerate(self):
            if cache is not None:
                x = block(x, encoding, cache.layers[i], documents)
            elif self.checkpointing and self.training and torch.is_grad_enabled():
                with saved_on_host(x.device) if self.offload else contextlib.nullcontext():
                    x = checkpoint(block, x, encoding, None, documents, use_reentrant=False)
            else:
                x = block(x, encoding, None, documents)
        return x


class ScaledEmbedding(nn.Embedding):
    """nn.Embedding ~ N(0, 1/D), torchscale's MAGNETO decoder (unscaled in the forward)."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.embedding_dim**-0.5)


class LMHead(nn.Linear):
    """The untied LM head, ~ N(0, 1/D) as the embeddings, without bias."""

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__(d_model, vocab_size, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.in_features**-0.5)


# Most logits (tokens x vocabulary) the chunked loss holds at once: 128 MiB in float32.
LOSS_CHUNK_ELEMENTS = 1 << 25


@dataclass
class LMOutput:
    """logits (b, n, V), None when not asked for; with labels: loss = loss_sum / num_tokens, the
    mean cross-entropy in nats over the labels that are not IGNORE_INDEX (0 when there are none).
    Under sequence parallelism sum loss_sum and num_tokens over the ranks before dividing."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None


def _cross_entropy_sum(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """logits (t, V), targets (t,): summed cross-entropy in float32 (float64 for float64),
    IGNORE_INDEX skipped; each term times weights (t,) when given."""
    logits = logits.to(accumulation_dtype(logits.dtype))
    if weights is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    losses = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    return (losses * weights.to(losses.dtype)).sum()


def _document_rows(shape, position_offset: int, cu_seqlens, attention_mask) -> tuple[int, int]:
    """(b, N), the rows the documents lie in: the tokens' (b, n), or the global rows (b, N) of
    which the tokens are a sequence-parallel shard at position_offset (cu_seqlens ending at
    b * N, a (b, N) mask). ValueError when the shard does not lie in those rows."""
    batch, n = shape
    if attention_mask is not None and getattr(attention_mask, "dim", lambda: 0)() == 2:
        total = attention_mask.shape[1]
    elif isinstance(cu_seqlens, (torch.Tensor, list, tuple)) and len(cu_seqlens) and batch:
        last = cu_seqlens[-1]  # NOTE: a host read of a CUDA tensor (its layout is needed)
        if isinstance(last, torch.Tensor) and last.dim() == 0 and not last.is_floating_point():
            last = int(last)
        if isinstance(last, bool) or not isinstance(last, int) or last % batch:
            return batch, n  # check_documents names what is wrong
        total = last // batch
    else:
        return batch, n
    if total != n and not (total > n and position_offset + n <= total):
        raise ValueError(
            f"documents over rows of {total} tokens do not hold tokens {tuple(shape)} at "
            f"position_offset {position_offset} (a shard takes the documents of its global rows)"
        )
    return batch, total


def _cached_documents(cache: KVCache, documents, packed: bool):
    """The prompt's documents when a cache decodes after it: one per row, ending at the row's
    end (left padding), whose starts the cache keeps; None for the later steps."""
    if packed:
        raise ValueError("cu_seqlens do not run with a cache: give attention_mask")
    if cache.length:
        if documents is not None:
            raise ValueError("give attention_mask with the prompt only, not with the cache")
        return None
    if len(documents.starts) != documents.batch:
        raise ValueError("attention_mask: every row needs at least one token to decode from")
    for row, (start, length) in enumerate(zip(documents.starts, documents.lengths, strict=True)):
        if start + length != (row + 1) * documents.seq_len or start // documents.seq_len != row:
            raise ValueError(
                f"attention_mask row {row}: decoding with a cache needs left padding (each row's "
                f"tokens up to its end)"
            )
    cache.starts = documents.row_starts()
    return documents


def check_token_ids(tokens: torch.Tensor, vocab_size: int) -> None:
    """ValueError unless every id is in [0, vocab_size).

    NOTE: an id outside the table is an IndexError on CPU and, on CUDA, a device-side assert that
    kills the process: check first (one reduction and one host sync).
    """
    low, high = (x.item() for x in torch.aminmax(tokens))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"tokens must be ids in [0, {vocab_size}) (vocab_size), got {bad}")


# A saved model: the names huggingface_hub's PyTorchModelHubMixin uses, so Hub tools know them.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _looks_local(path: str | Path) -> bool:
    """Whether from_pretrained's `path` names a folder here rather than a Hub repository id
    ("owner/name"): a Path, something that exists, a path's start (".", "/", "~"), more parts
    than owner/name, or an owner that is a folder here (a mistyped "runs/my-export")."""
    text = str(path)
    parts = text.replace(os.sep, "/").split("/")
    return (
        isinstance(path, os.PathLike)
        or os.path.exists(text)
        or text.startswith((".", "/", "~"))
        or len(parts) > 2
        or "" in parts
        or (len(parts) == 2 and os.path.isdir(parts[0]))
    )


def _hub_module(name: str):
    # NOTE: imported when used: `import longnet` needs only torch and einops.
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(
            f"saving and loading pretrained models needs {name.split('.')[0]}: "
            f"pip install longnet[hub]"
        ) from None


class LongNetLM(nn.Module):
    """The LongNet language model: embeddings, N MAGNETO blocks of dilated causal attention,
    final LayerNorm, LM head (tied to the embeddings or not).

    attention_fn replaces longnet.dilated_attention for every layer (the trainer passes the
    sequence-parallel one); it is called as dilated_attention is, on q and k that already carry
    their positional encoding (ALiBi widens them by 8 dims, and v with them, with the scale
    passed explicitly). The model makes no torch.distributed call.

    Every parameter is initialised by its module's reset_parameters as the module is built, so
    a wrapper that shards modules as they are built keeps the same values. Built on the meta
    device (`with torch.device("meta"): LongNetLM(config)`), it holds no memory until
    `to_empty(device=...)` and `init_weights()`, which draw what the constructor would have
    drawn from the same seed.
    """

    def __init__(self, config: LongNetConfig, attention_fn: AttentionFn = dilated_attention):
        super().__init__()
        if not isinstance(config, LongNetConfig):
            raise ValueError(f"config must be a LongNetConfig, got {type(config).__name__}")
        self.config = config
        self.positions = make_positions(
            config.position,
            config.num_heads,
            config.head_dim,
            config.rotary_base,
            config.xpos_scale_base,
            config.select_ranking_dims,
        )
        self.embed = ScaledEmbedding(config.vocab_size, config.d_model)
        self.blocks = TransformerStack(config, True, attention_fn, self.positions)
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head = LMHead(config.d_model, config.vocab_size)
        self._tie_weights()

    def _tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_weights(self) -> None:
        """Initialise every parameter as the constructor does (the same values from the same
        seed): for a model built on the meta device, after to_empty(), which unties a tied
        head (tied again here)."""
        self._tie_weights()
        reset_submodules(self, skip=(self.lm_head,) if self.config.tie_embeddings else ())

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied head counts once); exclude_embeddings drops the
        embedding table (and an untied head)."""
        skip = {id(self.embed.weight), id(self.lm_head.weight)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        position_offset: int = 0,
        cache: KVCache | None = None,
        cu_seqlens=None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (b, n) -> final-normed hidden states (b, n, D); cu_seqlens and attention_mask
        as for forward."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(
                f"tokens must be an integer tensor of shape (batch, seq), got "
                f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__} "
                f"{tuple(getattr(tokens, 'shape', ()))}"
            )
        if tokens.numel() == 0:
            raise ValueError(f"tokens must not be empty, got shape {tuple(tokens.shape)}")
        # NOTE: checking costs a host sync, which would stall a GPU once per step and break a
        # compiled graph: CUDA batches are checked where they are made (the trainer checks its
        # tokenizer against vocab_size; generate() checks its prompt).
        if reads_values_on_host(tokens.device) and not torch.compiler.is_compiling():
            check_token_ids(tokens, self.config.vocab_size)
        if isinstance(position_offset, bool) or not isinstance(position_offset, int):
            raise ValueError(f"position_offset must be an int >= 0, got {position_offset!r}")
        if position_offset < 0:
            raise ValueError(f"position_offset must be an int >= 0, got {position_offset!r}")
        if cache is not None:
            if position_offset:
                raise ValueError("give position_offset or cache, not both")
            if cache.length and tokens.shape[1] != 1:
                raise ValueError(
                    f"after the prompt, the cache takes one token at a time, got {tokens.shape[1]}"
                )
            position_offset = cache.length
        rows = _document_rows(tokens.shape, position_offset, cu_seqlens, attention_mask)
        documents = check_documents(rows, cu_seqlens, attention_mask)
        if cache is not None and (documents is not None or cache.starts is not None):
            documents = _cached_documents(cache, documents, cu_seqlens is not None)
        x = self.embed(tokens)  # (b, n, D)
        if cache is not None and cache.length and cache.starts is not None:  # (b, 1): each row's
            at = torch.tensor(cache.starts, device=tokens.device)[:, None]
            positions = fold(cache.length - at, self.config.position_period)
        elif documents is None:
            positions = relative_positions(
                position_offset, tokens.shape[1], self.config.position_period, tokens.device
            )
        else:  # each document's from 0, as when it runs alone (a shard: its part of them)
            positions = documents.positions(tokens.device)
            if rows[1] != tokens.shape[1]:
                positions = positions[:, position_offset : position_offset + tokens.shape[1]]
            positions = fold(positions, self.config.position_period)
        encoding = self.positions.encode(positions, accumulation_dtype(x.dtype))
        return self.norm(self.blocks(x, encoding, cache, documents))

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_offset: int = 0,
        cache: KVCache | None = None,
        return_logits: bool = True,
        loss_weights: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens=None,
    ) -> LMOutput:
        """tokens (b, n) int, and optionally labels (b, n): labels[:, i] is the token that should
        follow tokens[:, i] (already shifted; IGNORE_INDEX = -100 where there is none), which lets
        a sequence-parallel shard carry its own targets.

        return_logits=False (with labels) computes the loss chunk by chunk and never holds the
        (b, n, V) logits: what training on long sequences needs (the trainer does so).

        position_offset is the global position of tokens[:, 0] (a shard's start): it moves the
        positional encodings. Segments are cut by the attention function: dilated_attention cuts
        them from tokens[:, 0], so a shard run alone on one device should start at a multiple of
        every segment length. cache (a KVCache) is for generate().

        loss_weights (b, n) float weighs each label's cross-entropy (a retrieval answer can count
        as much as the rest of its row): loss_sum is the weighted sum and num_tokens the sum of
        the weights of the labels that are not IGNORE_INDEX.

        Documents, each its own sequence (segments start at its first token, no key crosses its
        boundary): attention_mask (b, n), True on tokens and False on padding (left or right),
        whose labels are then ignored, or cu_seqlens, flash-attn's offsets of packed documents
        in the flattened (b * n) tokens (the label of a document's last token is the caller's
        to ignore). As for longnet.dilated_attention. A sequence-parallel shard (tokens at
        position_offset of rows of N tokens, the model's attention sequence-parallel) takes the
        documents of the global rows: cu_seqlens over the b * N tokens or a (b, N) mask.
        """
        if labels is not None and (
            not isinstance(labels, torch.Tensor) or labels.shape != tokens.shape
        ):
            raise ValueError(
                f"labels must have the shape of tokens {tuple(tokens.shape)}, got "
                f"{tuple(getattr(labels, 'shape', ()))}"
            )
        if loss_weights is not None and (
            not isinstance(loss_weights, torch.Tensor) or loss_weights.shape != tokens.shape
        ):
            raise ValueError(
                f"loss_weights must have the shape of tokens {tuple(tokens.shape)}, got "
                f"{tuple(getattr(loss_weights, 'shape', ()))}"
            )
        hidden = self.hidden_states(
            tokens, position_offset, cache, cu_seqlens=cu_seqlens, attention_mask=attention_mask
        )  # (b, n, D)
        if labels is not None and attention_mask is not None:
            if attention_mask.shape[1] != tokens.shape[1]:  # the global rows of a shard
                attention_mask = attention_mask[:, position_offset:][:, : tokens.shape[1]]
            labels = labels.masked_fill(~attention_mask.bool(), IGNORE_INDEX)
        if labels is None:
            return LMOutput(self.lm_head(hidden))
        hidden, targets = hidden.flatten(0, 1), labels.flatten()  # (b*n, D), (b*n,)
        weights = None if loss_weights is None else loss_weights.flatten()  # (b*n,)
        if return_logits:
            logits = self.lm_head(hidden)  # (b*n, V)
            loss_sum = _cross_entropy_sum(logits, targets, weights)
            logits = logits.unflatten(0, labels.shape)
        else:
            logits, loss_sum = None, self._chunked_loss_sum(hidden, targets, weights)
        num_tokens = (labels != IGNORE_INDEX).sum()
        if weights is not None:
            num_tokens = (weights * (targets != IGNORE_INDEX)).sum()
        return LMOutput(logits, loss_sum / num_tokens.clamp(min=1), loss_sum, num_tokens)

    def _chunked_loss_sum(
        self, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Summed cross-entropy of hidden (t, D) against targets (t,), a chunk of tokens at a time.

        NOTE: the logits of a long sequence do not fit (1M tokens x 50K vocabulary is 200 GB in
        float32), so each chunk's are recomputed in the backward instead of kept: the LM head
        runs once more, and memory holds one chunk of logits.
        """
        chunk = max(1, LOSS_CHUNK_ELEMENTS // self.config.vocab_size)
        parts = []
        for start in range(0, len(targets), chunk):
            part = hidden[start : start + chunk], targets[start : start + chunk]
            part += (None if weights is None else weights[start : start + chunk],)
            if torch.is_grad_enabled():
                parts.append(checkpoint(self._head_loss_sum, *part, use_reentrant=False))
            else:
                parts.append(self._head_loss_sum(*part))
        return torch.stack(parts).sum()

    def _head_loss_sum(
        self, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        return _cross_entropy_sum(self.lm_head(hidden), targets, weights)

    @torch.no_grad()
    def generate(
        self,
        tokens: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (b, n) followed by max_new_tokens sampled tokens: (b, n + max_new_tokens).

        top_k=1 is greedy. use_cache keeps every layer's last max(segment_lengths) keys and
        values: the prompt runs through dilated attention once, then each new token attends
        exactly the cached keys dilated attention lets it see (longnet.generation).
        use_cache=False recomputes the whole sequence for every token. Dropout follows the
        module's mode: call eval() first. attention_mask (b, n): a batch of prompts of different
        lengths, left-padded (False before each row's tokens); each row decodes as if alone.
        """
        check_sampling(max_new_tokens, temperature, top_k)
        check_token_ids(tokens, self.config.vocab_size)  # once, on any device
        length = tokens.shape[1] + max_new_tokens
        # The content-selected pattern may read any earlier key: it keeps the whole text.
        longest = length if self.config.select_top_k else max(self.config.segment_lengths)
        capacity = min(longest, length)
        cache = KVCache(len(self.blocks), capacity) if use_cache else None
        step, mask = tokens, attention_mask
        for _ in range(max_new_tokens):
            if use_cache:
                hidden = self.hidden_states(step, cache=cache, attention_mask=mask)
                mask = None  # the cache keeps each row's start
            else:
                hidden = self.hidden_states(tokens, attention_mask=mask)
                mask = None if mask is None else F.pad(mask, (0, 1), value=True)
            logits = self.lm_head(hidden[:, -1])  # (b, V)
            next_token = sample_next(logits, temperature, top_k)  # (b, 1)
            tokens = torch.cat([tokens, next_token], dim=1)
            step = next_token
        return tokens

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json and model.safetensors (float weights only, never pickled objects)
        into `directory`; LongNetLM.from_pretrained loads them. A tied head is stored once."""
        save_model = _hub_module("safetensors.torch").save_model
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Each file written whole or not at all: an interrupted save leaves no truncated file.
        weights, config = directory / f"{WEIGHTS_FILE}.tmp", directory / f"{CONFIG_FILE}.tmp"
        save_model(self, str(weights))
        # model_type and architectures: what transformers' AutoConfig and AutoModelForCausalLM
        # read (longnet.integrations.transformers registers "longnet").
        metadata = {"model_type": "longnet", "architectures": ["LongNetForCausalLM"]}
        config.write_text(json.dumps(metadata | self.config.to_dict(), indent=2) + "\n")
        weights.replace(directory / WEIGHTS_FILE)
        config.replace(directory / CONFIG_FILE)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        attention_fn: AttentionFn = dilated_attention,
        revision: str | None = None,
    ) -> LongNetLM:
        """The model saved by save_pretrained (or launch/export.py) in the folder `path`, or in
        the Hugging Face Hub repository `path` (at `revision`), on `device`, in eval mode.
        Reads JSON and safetensors only: loading never runs code from the files.

        FileNotFoundError when `path` looks local (see _looks_local) but is no folder, before
        any Hub lookup; ValueError naming config.json or model.safetensors when unreadable."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            if _looks_local(path):
                what = "is not a folder" if folder.exists() else "does not exist"
                raise FileNotFoundError(f"{str(path)!r} {what}: no saved model there")
            hub = _hub_module("huggingface_hub")
            folder = Path(
                hub.snapshot_download(
                    str(path), revision=revision, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]
                )
            )
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
        if missing:
            raise ValueError(
                f"{str(path)!r} is not a saved LongNet model: it lacks {', '.join(missing)} "
                f"(write one with save_pretrained or launch/export.py)"
            )
        safetensors = _hub_module("safetensors.torch")
        try:
            config = LongNetConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        except (OSError, ValueError) as error:  # ValueError: not JSON, or not a LongNetConfig
            raise ValueError(f"{folder / CONFIG_FILE} is unreadable: {error}") from None
        model = cls(config, attention_fn=attention_fn)
        try:
            safetensors.load_model(model, str(folder / WEIGHTS_FILE))
        except (OSError, RuntimeError, _hub_module("safetensors").SafetensorError) as error:
            # RuntimeError: weights of other names or shapes than the config's model
            raise ValueError(f"{folder / WEIGHTS_FILE} is unreadable: {error}") from None
        return model.to(device).eval()
