"""Grouped-query attention, as Llama 3, Qwen3 and Gemma 3 use it.

Three changes from GPT-2's `CausalSelfAttention` (attention.py):

1. Grouped queries: `n_heads` query heads share `n_kv_groups` key/value heads (each KV head serves
   n_heads / n_kv_groups query heads). The KV cache stores only the KV heads: 4x smaller for Llama 3.2
   1B (32 query heads, 8 KV heads), 4x for Gemma 3 (4 and 1).
2. Rotary position embeddings on the queries and keys (parts.py) instead of a learned position
   vector added to the input; optional per-head RMSNorm of queries and keys first (QK-norm: Qwen3,
   Gemma 3), which keeps attention logits in range.
3. A sliding window (Gemma 3's local layers): a query sees only the `window` latest positions,
   itself included. `window_mask` builds that mask.

The head width is a setting of its own (`head_dim`), not always emb_dim / n_heads (Qwen3: 128).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import KVCache, SlotKVCache, causal_mask
from .parts import RMSNorm, apply_rope


class GroupedQueryAttention(nn.Module):
    """Causal attention with `n_kv_groups` key/value heads shared by `n_heads` query heads.

    One fused `qkv` projection of width (n_heads + 2 n_kv_groups) * head_dim (one matrix multiply),
    split into queries, keys and values; `out_proj` mixes the heads back to emb_dim.
    """

    def __init__(
        self,
        emb_dim: int,
        n_heads: int,
        n_kv_groups: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        norm_unit_offset: bool = False,
        scale: float | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if n_heads % n_kv_groups:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_groups ({n_kv_groups})")
        self.n_heads, self.n_kv_groups, self.head_dim = n_heads, n_kv_groups, head_dim
        self.qkv = nn.Linear(emb_dim, (n_heads + 2 * n_kv_groups) * head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(n_heads * head_dim, emb_dim, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps, norm_unit_offset) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps, norm_unit_offset) if qk_norm else None
        self.scale = scale  # None: 1 / sqrt(head_dim)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x: (batch, T, emb_dim); `rope`: the cos/sin tables of the T new positions (`rope_tables`);
        `mask`: None for plain causal attention, else bool (batch or 1, 1, T, S), True where a query
        may attend to a key."""
        b, t, _ = x.shape
        heads = [self.n_heads, self.n_kv_groups]
        qk, v = self.qkv(x).split([sum(heads) * self.head_dim, self.n_kv_groups * self.head_dim], dim=-1)
        # queries and keys side by side as (b, n_heads + n_kv_groups, t, head_dim): one RoPE call for both
        qk = qk.view(b, t, sum(heads), self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_groups, self.head_dim).transpose(1, 2)  # (b, n_kv_groups, t, head_dim)
        if self.q_norm is not None:
            q, k = qk.split(heads, dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        q, k = apply_rope(qk, *rope).split(heads, dim=1)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
            q = q.to(k.dtype)  # the cache may keep a wider type than the weights
        dropout_p = self.dropout if self.training else 0.0
        if mask is None and kv_cache is not None and not kv_cache.static and kv_cache.pos > 0 and t > 1:
            raise ValueError("a multi-token step on a non-empty cache needs an explicit mask")
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=mask is None and t > 1,
            scale=self.scale,
            enable_gqa=self.n_kv_groups != self.n_heads,
        )
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim).to(x.dtype)
        return self.out_proj(y)


def window_mask(
    mask: torch.Tensor | None, t: int, window: int, device: torch.device, kv_cache: KVCache | None = None
) -> torch.Tensor | None:
    """`mask` (a step's attention mask over every position so far, None for plain causal) narrowed to a
    sliding window: query position q sees key position k only if q - window < k. For a cache that keeps
    these layers' keys in a ring, over the keys it returns (`KVCache.ring_span`). None when no query's
    window leaves anything out. A `SlotKVCache` narrows each of its rows' masks itself."""
    if isinstance(kv_cache, SlotKVCache):
        return kv_cache.window_mask(mask, window)
    static = kv_cache is not None and kv_cache.static
    start = 0 if kv_cache is None or static else kv_cache.pos
    if not static and start + t <= window:
        return mask
    if static:
        keys = torch.arange(kv_cache.max_len, device=device)
        return mask & (keys > kv_cache.slot - window)[None, None, None, :]  # one query, at `slot`
    span = kv_cache.ring_span(window) if kv_cache is not None else None
    first = start - span if span is not None else 0
    queries = torch.arange(start, start + t, device=device)[:, None]
    keys = torch.arange(first, start + t, device=device)[None, :]
    if mask is None:
        mask = causal_mask(start, t, device)[None, None]
    return mask[..., first:] & (keys > queries - window)[None, None]


__all__ = ["GroupedQueryAttention", "window_mask"]
