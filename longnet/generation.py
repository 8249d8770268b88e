"""Incremental decoding for LongNetLM: a ring-buffer key/value cache and the exact dilated
attention of one new token against it.

Notation
    b   batch        t   position of the new token    s   cached keys the token may see
    h   query heads  g   key/value heads              d   head dim of q and k (v may be narrower)

The new query at position t is what dilated causal attention makes of the last row: for pattern
(w, r), head j keeps it iff longnet.plan.keeps(t, j, w, r, shift), and then it sees the kept keys
of its segment at positions <= t. The patterns mix by Eq. 10, i.e. one softmax over the scores plus
log(multiplicity) (docs/semantics.md); a head no pattern keeps outputs zero. Every key a token
can see lies in the segment of t of some pattern, so a step reads keys from the earliest of those
segment starts on: fewer than max(w) positions, however long the text. The cache keeps just those.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange

from longnet.kernels import accumulation_dtype
from longnet.plan import keeps
from longnet.selection import block_means, candidates, select_blocks


class LayerCache:
    """The keys (after positional encoding) and values of one layer's last `capacity` positions,
    in a ring buffer: position p lives in slot p mod capacity."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.keys: torch.Tensor | None = None  # (b, capacity, g, d)
        self.values: torch.Tensor | None = None  # (b, capacity, g, dv)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k (b, n, g, d) and v (b, n, g, dv) of the next n positions (only the last
        `capacity` of them stay)."""
        if self.keys is None:
            self.keys = k.new_empty(k.shape[0], self.capacity, *k.shape[2:])
            self.values = v.new_empty(v.shape[0], self.capacity, *v.shape[2:])
        n = k.shape[1]
        kept = min(n, self.capacity)
        slots = torch.arange(self.length + n - kept, self.length + n, device=k.device)
        self.keys.index_copy_(1, slots % self.capacity, k[:, n - kept :])
        self.values.index_copy_(1, slots % self.capacity, v[:, n - kept :])
        self.length += n

    def window(self, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (b, s, g, d) and values (b, s, g, dv) of positions first .. length - 1."""
        if self.length - first > self.capacity:
            raise ValueError(
                f"the cache holds {self.capacity} positions; decoding position "
                f"{self.length - 1} needs {self.length - first} (the longest segment)"
            )
        slots = torch.arange(first, self.length, device=self.keys.device) % self.capacity
        return self.keys.index_select(1, slots), self.values.index_select(1, slots)


class KVCache:
    """One LayerCache per layer; `length` is the number of positions decoded so far. A capacity
    of max(segment_lengths) suffices for any length of text."""

    def __init__(self, num_layers: int, capacity: int):
        self.layers = [LayerCache(capacity) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length


def visible_counts(
    position: int,
    first_key: int,
    heads: int,
    patterns: Sequence[tuple[int, int]],
    head_shift: int = 0,
    device=None,
) -> torch.Tensor:
    """(h, s) multiplicity of the query at `position` against keys first_key .. position."""
    keys = torch.arange(first_key, position + 1, device=device)  # (s,)
    head = torch.arange(heads, device=device)[:, None]  # (h, 1)
    counts = torch.zeros(heads, len(keys), device=device)
    for w, r in patterns:
        same_segment = keys // w == position // w  # (s,)
        kept = keeps(position, head, w, r, head_shift) & keeps(keys, head, w, r, head_shift)
        counts += kept & same_segment
    return counts


def decode_attention(
    q: torch.Tensor,
    cache: LayerCache,
    patterns: Sequence[tuple[int, int]],
    softmax_scale: float,
    head_shift: int = 0,
    select_top_k: int = 0,
    select_block_size: int = 32,
) -> torch.Tensor:
    """Dilated causal attention of the last cached position: q (b, 1, h, d) -> (b, 1, h, dv),
    with the content-selected pattern when select_top_k > 0 (the cache then holds every key)."""
    position = cache.length - 1
    first_key = 0 if select_top_k else min(position // w * w for w, _ in patterns)
    keys, values = cache.window(first_key)  # (b, s, g, .)
    heads, kv_heads = q.shape[2], keys.shape[2]
    counts = visible_counts(position, first_key, heads, patterns, head_shift, q.device)  # (h, s)
    dtype = accumulation_dtype(q.dtype)
    window = patterns[0][0]  # candidates end by the start of the first pattern's segment
    if select_top_k and candidates(position, window, select_block_size) > 0:
        means = block_means(keys, select_block_size)  # (b, m, g, d)
        at = torch.tensor([position], device=q.device)
        index, valid = select_blocks(
            q.to(dtype), means, at, select_block_size, select_top_k, window
        )
        index, valid = index[:, 0], valid[:, 0]  # (b, h, k)
        blocks = torch.zeros(*index.shape[:2], means.shape[1] + 1, device=q.device)
        blocks.scatter_(-1, torch.where(valid, index, means.shape[1]), 1.0)  # (b, h, m + 1)
        chosen = blocks[..., :-1].repeat_interleave(select_block_size, dim=-1)  # (b, h, m*B)
        counts = counts + torch.nn.functional.pad(chosen, (0, counts.shape[-1] - chosen.shape[-1]))
    queries = rearrange(q[:, 0], "b (g j) d -> b g j d", g=kv_heads).to(dtype)
    scores = torch.einsum("bgjd,bsgd->bgjs", queries, keys.to(dtype)) * softmax_scale
    scores = rearrange(scores, "b g j s -> b (g j) s") + counts.to(dtype).log()  # (b, h, s)
    covered = counts.sum(-1, keepdim=True) > 0  # ([b,] h, 1): a head no pattern keeps outputs 0
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
