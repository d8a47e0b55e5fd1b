"""Attention, the production path.

`CausalSelfAttention` is what `GPTModel` runs: one fused q/k/v projection, heads split by
reshaping, PyTorch's fused `scaled_dot_product_attention`, and an optional preallocated KV cache
for generation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class KVCache:
    """Preallocated keys and values for every layer, filled left to right during generation.

    `k` and `v` have shape (n_layers, batch, n_heads, max_len, head_dim); `pos` counts the
    positions filled so far (the same for every row: batches of different prompt lengths are
    left-padded and the padding is masked out).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layers, batch_size, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values at `pos` and return all keys/values so far for `layer`."""
        start, end = self.pos, self.pos + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (used when finished sequences leave a batch)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on `F.scaled_dot_product_attention`.

    The query, key and value projections are one `nn.Linear` of width 3 * d_out (the same math as
    three separate ones, with one matrix multiply instead of three); `out_proj` mixes the heads.
    """

    def __init__(self, d_in: int, d_out: int, n_heads: int, dropout: float = 0.0, qkv_bias: bool = False):
        super().__init__()
        if d_out % n_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by n_heads ({n_heads})")
        self.d_out = d_out
        self.n_heads = n_heads
        self.head_dim = d_out // n_heads
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x: (batch, T, d_in). `mask` is None for plain causal attention, else a boolean
        (batch or 1, 1, T, S) tensor that is True where a query may attend to a key."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(self.d_out, dim=2)
        # (b, t, d_out) -> (b, n_heads, t, head_dim)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            # Without a cache the square causal mask applies; with a cache and one new token per
            # row, that token may see every cached key, so no mask is needed at all.
            is_causal = kv_cache is None or kv_cache.pos == 0
            if kv_cache is not None and not is_causal and t > 1:
                raise ValueError("a multi-token step on a non-empty cache needs an explicit mask")
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal and t > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(b, t, self.d_out)
        return self.out_proj(y)
