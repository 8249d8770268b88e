"""Incremental decoding for LongNetLM: a key/value cache and the exact dilated attention of one
new token against it.

Notation
    b   batch        t   position of the new token    s   cached keys the token may see
    h   query heads  g   key/value heads              d   head dim of q and k (v may be narrower)

The new query at position t is what dilated causal attention makes of the last row: for pattern
(w, r) and head j it is kept iff (t mod w) mod r == j mod r, and then it sees the kept keys of its
segment at positions <= t. The patterns mix by Eq. 10, i.e. one softmax over the scores plus
log(multiplicity) (../shared/SPEC.md); a head no pattern keeps outputs zero. Every key a token can
see lies in the segment of t of some pattern, so a step only reads the keys from the earliest of
those segment starts on: at most max(w) keys however long the text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange

from longnet.kernels import accumulation_dtype


class LayerCache:
    """The keys (after positional encoding) and values of one layer, for max_len positions."""

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.keys: torch.Tensor | None = None  # (b, max_len, g, d)
        self.values: torch.Tensor | None = None  # (b, max_len, g, dv)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k (b, n, g, d) and v (b, n, g, dv); return all keys and values so far."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions, {end} were written")
        if self.keys is None:
            self.keys = k.new_empty(k.shape[0], self.max_len, *k.shape[2:])
            self.values = v.new_empty(v.shape[0], self.max_len, *v.shape[2:])
        self.keys[:, self.length : end] = k
        self.values[:, self.length : end] = v
        self.length = end
        return self.keys[:, :end], self.values[:, :end]


class KVCache:
    """One LayerCache per layer; `length` is the number of positions decoded so far."""

    def __init__(self, num_layers: int, max_len: int):
        self.layers = [LayerCache(max_len) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length


def visible_counts(
    position: int, first_key: int, heads: int, patterns: Sequence[tuple[int, int]], device=None
) -> torch.Tensor:
    """(h, s) multiplicity of the query at `position` against keys first_key .. position."""
    keys = torch.arange(first_key, position + 1, device=device)  # (s,)
    offsets = torch.arange(heads, device=device)[:, None]  # (h, 1)
    counts = torch.zeros(heads, len(keys), device=device)
    for w, r in patterns:
        query_kept = (position % w) % r == offsets % r  # (h, 1)
        key_kept = (keys % w) % r == offsets % r  # (h, s)
        same_segment = keys // w == position // w  # (s,)
        counts += query_kept & key_kept & same_segment
    return counts


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    patterns: Sequence[tuple[int, int]],
    softmax_scale: float,
) -> torch.Tensor:
    """Dilated causal attention of the last position. q (b, 1, h, d); keys (b, t+1, g, d) and
    values (b, t+1, g, dv) of positions 0..t -> (b, 1, h, dv)."""
    position = keys.shape[1] - 1
    first_key = min(position // w * w for w, _ in patterns)
    keys, values = keys[:, first_key:], values[:, first_key:]  # (b, s, g, .)
    heads, kv_heads = q.shape[2], keys.shape[2]
    counts = visible_counts(position, first_key, heads, patterns, q.device)  # (h, s)
    dtype = accumulation_dtype(q.dtype)
    queries = rearrange(q[:, 0], "b (g j) d -> b g j d", g=kv_heads).to(dtype)
    scores = torch.einsum("bgjd,bsgd->bgjs", queries, keys.to(dtype)) * softmax_scale
    scores = rearrange(scores, "b g j s -> b (g j) s") + counts.to(dtype).log()  # (b, h, s)
    covered = counts.sum(-1, keepdim=True) > 0  # (h, 1): a head no pattern keeps outputs zero
    probs = torch.softmax(scores.masked_fill(~covered, 0.0), dim=-1) * covered
    probs = rearrange(probs, "b (g j) s -> b g j s", g=kv_heads)
    out = torch.einsum("bgjs,bsgd->bgjd", probs, values.to(dtype))
    return rearrange(out, "b g j d -> b 1 (g j) d").to(q.dtype)


def check_sampling(max_new_tokens, temperature, top_k) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 < temperature < math.inf
    ):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """(b, V) logits -> (b, 1) tokens; top_k=1 is greedy (argmax), with no randomness."""
    if top_k == 1:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
