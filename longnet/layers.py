"""DilatedAttention: the drop-in multi-head attention layer of the seed README."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states

from longnet import varlen
from longnet.dilated import (
    attend,
    check_documents,
    check_options,
    check_ranking_dims,
    dilated_attention,
    resolve_softmax_scale,
)

AttentionFn = Callable[..., torch.Tensor]


class MagnetoLinear(nn.Linear):
    """nn.Linear with MAGNETO's initialisation (Wang et al. 2022, "Foundation Transformers",
    section 2.2): xavier_normal_ per block of rows, each block with its own gain, bias zero.

    `parts` lists (rows, gain): a fused projection (qkv, SwiGLU's fc1) is initialised per part,
    each with its own fan-out, as the paper's separate projections would be.

    NOTE: the initialisation lives in reset_parameters, which nn.Linear's constructor calls, so
    it runs while the weight is whole even under a wrapper that partitions each module as soon
    as it is built, and again from the model's `init_weights()` after a build on the meta
    device.
    """

    def __init__(self, in_features: int, parts, bias: bool = True, device=None, dtype=None):
        self.parts = tuple((int(rows), float(gain)) for rows, gain in parts)
        rows = sum(r for r, _ in self.parts)
        super().__init__(in_features, rows, bias=bias, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        blocks = self.weight.data.split([rows for rows, _ in self.parts])
        for block, (_, gain) in zip(blocks, self.parts, strict=True):
            nn.init.xavier_normal_(block, gain=gain)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class DilatedAttention(nn.Module):
    """Multi-head (grouped-query) self-attention with LongNet's dilated attention.

    Maps x (batch, seq, d_model) to (batch, seq, d_model). The pattern is either one segment
    length and dilation rate (`segment_size`, `dilation_rate`, the seed README's arguments) or the
    paper's mixture (`segment_lengths`, `dilation_rates` lists). Dropout applies to the attention
    output, as the seed documents. head_shift moves every head's offset to (head + shift) mod r;
    select_top_k > 0 adds the content-selected pattern (see dilated_attention).
    `attention_fn` replaces longnet.dilated_attention by anything with its signature, such as
    the sequence-parallel version. init_gain switches the projections from nn.Linear's default
    initialisation to MAGNETO's (gain 1 on q and k, init_gain on v and the output projection).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dilation_rate: int | None = None,
        segment_size: int | None = None,
        dropout: float = 0.0,
        *,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        causal: bool = False,
        num_kv_heads: int | None = None,
        qk_norm: bool = False,
        bias: bool = True,
        softmax_scale: float | None = None,
        backend: str = "auto",
        head_shift: int = 0,
        select_top_k: int = 0,
        select_block_size: int = 32,
        select_pooled: bool = False,
        select_query_span: int = 1,
        select_within_segment: bool = False,
        select_ranking_dims: int = 0,
        select_span_max: bool = False,
        attention_fn: AttentionFn = dilated_attention,
        init_gain: float | None = None,
    ):
        super().__init__()
        if (segment_lengths is None) != (dilation_rates is None):
            raise ValueError("segment_lengths and dilation_rates must be given together")
        if segment_lengths is None:
            if segment_size is None:
                raise ValueError(
                    "give segment_size (and dilation_rate), or segment_lengths and dilation_rates"
                )
            segment_lengths = [segment_size]
            dilation_rates = [1 if dilation_rate is None else dilation_rate]
        elif segment_size is not None or dilation_rate is not None:
            raise ValueError(
                "give either segment_size/dilation_rate or segment_lengths/dilation_rates, not both"
            )
        # Every argument of the attention call checked here, once: forward runs unchecked.
        self.patterns = check_options(
            segment_lengths, dilation_rates, causal, backend, head_shift, select_top_k,
            select_block_size, select_pooled, select_query_span, select_within_segment,
            select_ranking_dims, select_span_max,
        )  # fmt: skip
        self.select_top_k, self.select_block_size = select_top_k, select_block_size
        self.select_pooled, self.select_query_span = select_pooled, select_query_span
        self.select_within_segment = select_within_segment
        self.select_ranking_dims, self.select_span_max = select_ranking_dims, select_span_max
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = d_model // num_heads
        check_ranking_dims(select_ranking_dims, self.head_dim)
        self.causal, self.softmax_scale, self.backend = causal, softmax_scale, backend
        self.scale = resolve_softmax_scale(softmax_scale, self.head_dim)
        self.head_shift = head_shift
        self.attention_fn = attention_fn
        q_rows, kv_rows = num_heads * self.head_dim, num_kv_heads * self.head_dim
        if init_gain is None:
            self.qkv = nn.Linear(d_model, q_rows + 2 * kv_rows, bias=bias)
        else:
            parts = [(q_rows, 1.0), (kv_rows, 1.0), (kv_rows, init_gain)]
            self.qkv = MagnetoLinear(d_model, parts, bias=bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        if init_gain is None:
            self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        else:
            self.out_proj = MagnetoLinear(d_model, [(d_model, init_gain)], bias=bias)
        self.dropout = nn.Dropout(dropout)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (b, n, d_model) -> q (b, n, h, d), k and v (b, n, g, d), q and k normed."""
        q, k, v = self.qkv(x).split(
            [
                self.num_heads * self.head_dim,
                self.num_kv_heads * self.head_dim,
                self.num_kv_heads * self.head_dim,
            ],
            dim=-1,
        )
        q = self.q_norm(rearrange(q, "b n (h d) -> b n h d", d=self.head_dim))
        k = self.k_norm(rearrange(k, "b n (g d) -> b n g d", d=self.head_dim))
        v = rearrange(v, "b n (g d) -> b n g d", d=self.head_dim)
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        documents: varlen.Documents | None = None,
    ) -> torch.Tensor:
        """(b, n, h, d) attention output of projected q, k, v; documents as check_documents
        returns them (each its own sequence)."""
        if self.attention_fn is dilated_attention:  # its arguments were checked in __init__
            return attend(
                q,
                k,
                v,
                self.patterns,
                causal=self.causal,
                scale=self.scale,
                backend=self.backend,
                head_shift=self.head_shift,
                select_top_k=self.select_top_k,
                select_block_size=self.select_block_size,
                select_pooled=self.select_pooled,
                select_query_span=self.select_query_span,
                select_within_segment=self.select_within_segment,
                select_ranking_dims=self.select_ranking_dims,
                select_span_max=self.select_span_max,
                documents=documents,
            )
        lengths, rates = zip(*self.patterns, strict=True)
        return self.attention_fn(
            q,
            k,
            v,
            lengths,
            rates,
            causal=self.causal,
            softmax_scale=self.softmax_scale,
            backend=self.backend,
            # only when set, so that attention functions written before head_shift still work
            **({"head_shift": self.head_shift} if self.head_shift else {}),
            **self.selection_arguments(),
            **({"documents": documents} if documents is not None else {}),
        )

    def selection_arguments(self) -> dict:
        """The content-selected pattern's arguments, only when it is on (as for head_shift)."""
        if not self.select_top_k:
            return {}
        arguments = {"select_top_k": self.select_top_k, "select_block_size": self.select_block_size}
        if self.select_pooled:
            arguments["select_pooled"] = True
        if self.select_query_span > 1:
            arguments["select_query_span"] = self.select_query_span
        if self.select_within_segment:
            arguments["select_within_segment"] = True
        if self.select_ranking_dims:
            arguments["select_ranking_dims"] = self.select_ranking_dims
        if self.select_span_max:
            arguments["select_span_max"] = True
        return arguments

    def forward(
        self, x: torch.Tensor, cu_seqlens=None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (b, n, d_model) -> (b, n, d_model); cu_seqlens or attention_mask as for
        dilated_attention (each document its own sequence; the attention is zero on padding)."""
        if x.dim() != 3 or x.shape[-1] != self.out_proj.in_features:
            raise ValueError(
                f"x must have shape (batch, seq, {self.out_proj.in_features}), got {tuple(x.shape)}"
            )
        documents = check_documents(x.shape, cu_seqlens, attention_mask)
        out = self.attend(*self.project(x), documents)
        return self.dropout(self.out_proj(rearrange(out, "b n h d -> b n (h d)")))


class _SequenceTiled(torch.autograd.Function):
    """fn over the tokens of x, tile_tokens at a time, saving x alone: see sequence_tiled."""

    @staticmethod
    def forward(ctx, fn, tile_tokens, preserve_rng_state, x, *params):
        ctx.fn, ctx.tile_tokens, ctx.rng = fn, tile_tokens, None
        if preserve_rng_state:  # each tile's dropout mask drawn again in backward
            devices = get_device_states(x) if x.device.type != "cpu" else ([], [])
            ctx.rng = (torch.get_rng_state(), x.device.type, *devices)
        ctx.save_for_backward(x, *params)
        flat = x.detach().reshape(-1, x.shape[-1])  # (t, D): every row's tokens, in order
        out = fn(flat) if not len(flat) else None  # no tokens: no tile
        for start in range(0, flat.shape[0], tile_tokens):
            part = fn(flat[start : start + tile_tokens])  # (tile, D_out)
            if out is None:
                out = part.new_empty(flat.shape[0], part.shape[-1])
            out[start : start + tile_tokens] = part
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, *params = ctx.saved_tensors
        if ctx.rng is None:
            return _SequenceTiled._tiles_backward(ctx, grad, x, params)
        cpu_state, device_type, devices, states = ctx.rng
        with torch.random.fork_rng(devices, device_type=device_type):
            torch.set_rng_state(cpu_state)
            set_device_states(devices, states, device_type=device_type)
            return _SequenceTiled._tiles_backward(ctx, grad, x, params)

    @staticmethod
    def _tiles_backward(ctx, grad, x, params):
        need_x, *need_params = ctx.needs_input_grad[3:]
        flat, grad = x.detach().reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_x = torch.empty_like(flat) if need_x else None
        wanted = [p for p, need in zip(params, need_params, strict=True) if need]
        sums: list[torch.Tensor | None] = [None] * len(wanted)
        for start in range(0, flat.shape[0], ctx.tile_tokens):
            end = start + ctx.tile_tokens
            part = flat[start:end].detach().requires_grad_(need_x)
            with torch.enable_grad():
                out = ctx.fn(part)
            inputs = [part] * need_x + wanted
            grads = torch.autograd.grad(out, inputs, grad[start:end], allow_unused=True)
            if need_x:
                grad_x[start:end] = grads[0]
            for i, g in enumerate(grads[need_x:]):
                if g is not None:
                    sums[i] = g if sums[i] is None else sums[i].add_(g)
        grads = iter(sums)
        params_grads = [next(grads) if need else None for need in need_params]
        grad_x = None if grad_x is None else grad_x.view_as(x)
        return None, None, None, grad_x, *params_grads


def sequence_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile_tokens: int,
    params: Sequence[torch.Tensor],
    preserve_rng_state: bool = False,
) -> torch.Tensor:
    """fn(x) computed tile_tokens tokens at a time: x (..., D) -> (..., D_out).

    fn must treat each token alone (a feed-forward sublayer and its norms) and use no trainable
    tensors but `params`. Forward keeps only x; backward recomputes each tile and its gradients
    (ALST's TiledMLP, Bekman et al. 2025, arXiv 2506.13996): no (tokens, hidden) tensor of fn is
    alive beyond one tile's, in forward or backward. The result and the gradients are fn's
    own up to the order of the parameter gradients' sums over tiles. preserve_rng_state draws
    the same random numbers (dropout) again in backward, as torch.utils.checkpoint does.
    """
    if tile_tokens < 1:
        raise ValueError(f"tile_tokens must be an int >= 1, got {tile_tokens!r}")
    return _SequenceTiled.apply(fn, tile_tokens, preserve_rng_state, x, *params)


def saved_on_host(device: torch.device):
    """Context in which the tensors autograd saves live in host memory until backward needs
    them: torch.autograd.graph.save_on_cpu, pinned on CUDA (the copies run asynchronously).
    The model wraps the checkpointed block calls in it, so only their inputs move (ALST's
    activation checkpoint offload); inside a block, the checkpoint's own hooks take over."""
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
