"""Attention, step by step, then the production path.

The book builds self-attention in small steps; each step is a class here, with the book's name,
so a reader can run and compare them (tests/model/test_attention.py checks that they agree):

1. `SelfAttention_v0` (and the function `simple_self_attention`): no trainable weights. Each
   token's output is an average of all token vectors, weighted by softmax(dot products).
2. `SelfAttention_v1`: trainable query/key/value matrices as raw `nn.Parameter`s, and scores
   scaled by 1/sqrt(d_k) so the softmax does not saturate as the width grows.
3. `SelfAttention_v2`: the same with `nn.Linear` layers (better initialization, optional bias).
4. `CausalAttention`: a token may only look back (mask the upper triangle with -inf before the
   softmax), plus dropout on the attention weights.
5. `MultiHeadAttentionWrapper`: several independent causal heads, outputs concatenated.
6. `MultiHeadAttention`: the same heads computed at once: one projection each for q/k/v, split
   into heads by reshaping, and an output projection that mixes the heads.
7. `CausalSelfAttention` (what `GPTModel` runs): step 6 with the three projections fused into
   one `qkv` matrix multiply, PyTorch's fused `F.scaled_dot_product_attention`, and a
   preallocated `KVCache` for generation.

Shapes: x is (batch, num_tokens, d_in); the v0-v2 steps also take an unbatched (num_tokens, d_in).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# The teaching steps (the book's chapter 3)


def simple_self_attention(x: torch.Tensor) -> torch.Tensor:
    """Self-attention without trainable weights: context_i = sum_j softmax_j(x_i . x_j) x_j."""
    attn_scores = x @ x.transpose(-2, -1)  # every token's dot product with every token
    attn_weights = torch.softmax(attn_scores, dim=-1)  # each row sums to 1
    return attn_weights @ x


class SelfAttention_v0(nn.Module):
    """Step 1 as a module (no parameters): see `simple_self_attention`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return simple_self_attention(x)


class SelfAttention_v1(nn.Module):
    """Step 2: queries, keys and values are learned projections of the input (raw parameters)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = x @ self.W_key
        queries = x @ self.W_query
        values = x @ self.W_value
        attn_scores = queries @ keys.transpose(-2, -1)
        # dividing by sqrt(d_k) keeps the scores' variance near 1, so the softmax stays soft
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        return attn_weights @ values


class SelfAttention_v2(nn.Module):
    """Step 3: step 2 with `nn.Linear` (stores W transposed: `W_query.weight` is v1's `W_query.T`)."""

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.W_key(x)
        queries = self.W_query(x)
        values = self.W_value(x)
        attn_scores = queries @ keys.transpose(-2, -1)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        return attn_weights @ values


def _check_length(num_tokens: int, context_length: int) -> None:
    if num_tokens > context_length:
        raise ValueError(
            f"{num_tokens} tokens exceed the context_length {context_length} this attention layer was built "
            "for"
        )


class CausalAttention(nn.Module):
    """Step 4: one causal head. Scores above the diagonal (future tokens) become -inf, so they get
    weight 0 after the softmax; dropout then zeroes random attention weights while training."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False):
        super().__init__()
        self.d_out = d_out
        self.context_length = context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # a buffer moves with the module to the GPU; 1 above the diagonal marks the future
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, d_in = x.shape
        _check_length(num_tokens, self.context_length)
        keys = self.W_key(x)
        queries = self.W_query(x)
        values = self.W_value(x)
        attn_scores = queries @ keys.transpose(1, 2)
        attn_scores = attn_scores.masked_fill(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ values


class MultiHeadAttentionWrapper(nn.Module):
    """Step 5: `num_heads` independent causal heads side by side; the output has num_heads * d_out
    features (each head's d_out are the head dimension)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
    ):
        super().__init__()
        self.heads = nn.ModuleList(
            CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(x) for head in self.heads], dim=-1)


class MultiHeadAttention(nn.Module):
    """Step 6: all heads at once. One d_in x d_out projection each for queries, keys and values;
    the d_out features are split into `num_heads` heads of `head_dim` by a reshape, every head
    attends in one batched matrix multiply, and `out_proj` mixes the concatenated heads."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
    ):
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, d_in = x.shape
        _check_length(num_tokens, self.context_length)
        # (b, num_tokens, d_out) -> (b, num_tokens, num_heads, head_dim)
        #                        -> (b, num_heads, num_tokens, head_dim)
        keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        attn_scores = queries @ keys.transpose(2, 3)  # (b, num_heads, num_tokens, num_tokens)
        attn_scores = attn_scores.masked_fill(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)

        context_vec = (attn_weights @ values).transpose(1, 2)  # (b, num_tokens, num_heads, head_dim)
        context_vec = context_vec.reshape(b, num_tokens, self.d_out)  # heads side by side again
        return self.out_proj(context_vec)


# ----------------------------------------------------------------------------------------------
# The production path


class KVCache:
    """Preallocated keys and values for every layer, filled left to right during generation.

    While generating, each new token needs the keys and values of all earlier tokens; the cache
    keeps them so every step computes them for the new token only. `k` and `v` hold one tensor
    per layer of shape (batch, n_heads, max_len, head_dim), allocated once (separate tensors, so
    that a compiled step writes each in place rather than copying a whole stacked cache); `pos`
    counts the positions filled so far (the same for every row: batches of different prompt
    lengths are left-padded and the padding is masked out).

    Static mode (`freeze()`), for decoding under torch.compile and CUDA graphs: a one-token step
    then has the same shapes and reads the same tensors every time. The slot it writes (`slot`),
    the keys it may see (`valid`, batch x max_len) and the new tokens' positions (`positions`) are
    tensors that the step updates in place, attention spans all `max_len` slots with `valid` as
    its mask, and `tokens` is the step's input buffer. `pos` stays the host's count of filled
    slots; the caller advances it after each static step.
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
        windows: Sequence[int] | None = None,
    ) -> None:
        """`windows`: per layer, 0 for a layer that sees every position, W for a sliding-window layer,
        whose cache then keeps only the W latest positions (a ring, when W < max_len)."""
        self.windows = [w if 0 < w < max_len else 0 for w in (windows or [0] * n_layers)]
        self.k = [
            torch.zeros((batch_size, n_heads, w or max_len, head_dim), device=device, dtype=dtype)
            for w in self.windows
        ]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.max_len = max_len
        self.pos = 0
        self.static = False
        self.slot: torch.Tensor | None = None  # the static-mode buffers, allocated by the first freeze()
        self.valid: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None

    def ring_span(self, window: int) -> int | None:
        """For layers of sliding `window` kept in a ring: how many cached positions the next step sees
        (they come before its new keys); None when those layers keep every position."""
        if window not in self.windows:
            return None
        return min(self.pos, window - 1)

    @property
    def batch_size(self) -> int:
        """The rows the cache holds."""
        return self.k[0].shape[0]

    def reset(self) -> None:
        """Empty the cache for reuse (the tensors are kept) and leave static mode."""
        self.pos = 0
        self.static = False

    def truncate(self, n: int) -> None:
        """Forget every position from `n` on (speculative decoding drops the rejected tokens' keys and
        values). A ring of a sliding-window layer has overwritten older positions, so a cache with one
        cannot go back: make it with `new_kv_cache(..., bounded=False)`."""
        if self.static or any(self.windows):
            raise RuntimeError("truncate() needs a cache outside static mode that keeps every position")
        if not 0 <= n <= self.pos:
            raise ValueError(f"cannot truncate a cache of {self.pos} positions to {n}")
        self.pos = n

    def freeze(self, padding_mask: torch.Tensor | None = None) -> None:
        """Enter static mode after a prompt pass filled `pos` slots. `padding_mask` (batch, >= pos)
        is False at left padding (None: no padding). The buffers are allocated once and refilled in
        place afterwards, so a recorded CUDA graph keeps reading the right memory."""
        if any(self.windows):
            raise RuntimeError("static mode needs a cache that keeps every position (windows=None)")
        b, dev = self.batch_size, self.k[0].device
        if self.slot is None:
            self.slot = torch.zeros((), dtype=torch.long, device=dev)
            self.valid = torch.zeros((b, self.max_len), dtype=torch.bool, device=dev)
            self.positions = torch.zeros((b, 1), dtype=torch.long, device=dev)
            self.tokens = torch.zeros((b, 1), dtype=torch.long, device=dev)
        filled = torch.zeros((b, self.max_len), dtype=torch.bool, device=dev)
        filled[:, : self.pos] = True if padding_mask is None else padding_mask[:, : self.pos]
        self.valid.copy_(filled)
        self.positions.copy_(filled.sum(dim=1, keepdim=True))  # real tokens so far = the next position
        self.slot.fill_(self.pos)
        self.static = True

    def static_step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Static mode: mark the slot this step writes as visible; return the new tokens' positions
        (batch, 1) and the attention mask (batch, 1, 1, max_len)."""
        self.valid.index_fill_(1, self.slot.view(1), True)
        return self.positions, self.valid[:, None, None, :]

    def static_step_done(self) -> None:
        """Static mode: move the write slot and the positions one step on."""
        self.slot.add_(1)
        self.positions.add_(1)

    def advance(self, t: int) -> None:
        """Count the `t` new positions a forward step wrote (static mode: move the slot on)."""
        if self.static:
            self.static_step_done()
        else:
            self.pos += t

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values at `pos` and return all keys/values so far for `layer`
        (static mode: at `slot`, returning all `max_len` slots)."""
        if self.static:
            slot = self.slot.view(1)
            keys, values = self.k[layer], self.v[layer]
            keys.index_copy_(2, slot, k.to(keys.dtype))
            values.index_copy_(2, slot, v.to(values.dtype))
            return keys, values
        if self.windows[layer]:
            return self._update_ring(layer, k, v, self.windows[layer])
        start, end = self.pos, self.pos + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def _update_ring(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, window: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A sliding-window layer: position p lives in slot p % window. Returns the cached positions the
        new queries can see (`ring_span`, oldest first) followed by the new ones; keeps the latest."""
        start, t = self.pos, k.shape[2]
        if start + t > self.max_len:
            raise RuntimeError(f"KV cache overflow: {start + t} positions > max_len {self.max_len}")
        seen = torch.arange(start - min(start, window - 1), start, device=k.device) % window
        keys = torch.cat([self.k[layer][:, :, seen], k.to(self.k[layer].dtype)], dim=2)
        values = torch.cat([self.v[layer][:, :, seen], v.to(self.v[layer].dtype)], dim=2)
        kept = min(t, window)
        slots = torch.arange(start + t - kept, start + t, device=k.device) % window
        self.k[layer].index_copy_(2, slots, k[:, :, t - kept :].to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, slots, v[:, :, t - kept :].to(self.v[layer].dtype))
        return keys, values

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (used when finished sequences leave a batch; not in static mode)."""
        if self.slot is not None:
            raise RuntimeError("a cache with static-mode buffers keeps its batch size")
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


class SlotKVCache(KVCache):
    """Keys and values of up to `n_slots` independent sequences, each at its own length: the cache of
    continuous batching, where sequences join and leave a running batch between steps.

    Slot s keeps one sequence's keys and values in columns 0 .. `lengths[s]` - 1: a token's column is
    its position, nothing is padded on the left, and every layer keeps every position (a sliding
    window is a mask, `window_mask`). Before each forward step, `use(slots, counts)` names the slot of
    each batch row and how many of the row's new tokens are real; the rest is padding on the right,
    whose keys land after the row's end (or in a spare last column) where no real query looks. The
    step then writes each row's keys after its own end, each query sees its own row up to itself, and
    `advance` moves each row's end on by its count. Slots given as one ascending range are read as a
    view, others are gathered, so a caller keeps the rows it decodes together in `slots[:n]`, moving
    sequences with `move` and `swap`. The columns (`capacity`) grow, doubling, as the longest sequence
    does, up to `max_len`.
    """

    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        n_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        capacity: int = 256,
    ) -> None:
        self.capacity = min(capacity, max_len)  # columns allocated, and after them the spare one
        super().__init__(n_layers, n_slots, n_heads, head_dim, self.capacity + 1, device, dtype)
        self.max_len = max_len
        self.lengths = [0] * n_slots
        self._slots: list[int] = []
        self._counts: list[int] = []
        self._rows: torch.Tensor | None = None  # (b, 1) the step's slots
        self._cols: torch.Tensor | None = None  # (b, t) the columns the step writes
        self._pos: torch.Tensor | None = None  # (b, t) the new tokens' positions
        self._span = 0  # the columns the step reads
        self.mask: torch.Tensor | None = None  # the step's attention mask, as step_inputs returned it

    def use(self, slots: Sequence[int], counts: Sequence[int] | None = None) -> None:
        """Set the slots of the next step's batch rows, and each row's real new tokens (None: all)."""
        self._slots, self._counts = list(slots), None if counts is None else list(counts)

    def step_inputs(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The positions (batch, t) of the next step's tokens and its attention mask (batch, 1, t, S)."""
        device = self.k[0].device
        starts = [self.lengths[s] for s in self._slots]
        if self._counts is None:
            self._counts = [t] * len(starts)
        need = max(s + c for s, c in zip(starts, self._counts))
        if need > self.max_len:
            raise RuntimeError(f"KV cache overflow: a sequence outgrows max_len {self.max_len}")
        self._grow(need)
        pos = torch.tensor(starts, device=device)[:, None] + torch.arange(t, device=device)
        self._rows = torch.tensor(self._slots, device=device)[:, None]
        self._cols = pos.clamp(max=self.capacity)  # padding past the end writes the spare column
        self._pos = pos.clamp(max=self.max_len - 1)
        self._span = min(max(starts) + t, self.capacity)
        keys = torch.arange(self._span, device=device)
        self.mask = (keys <= pos[..., None])[:, None]  # kept: a fused attention knows its own mask by it
        return self._pos, self.mask

    def _grow(self, need: int) -> None:
        """Make room for `need` columns: twice the capacity at least, up to `max_len`."""
        if need <= self.capacity:
            return
        capacity = min(self.max_len, max(need, 2 * self.capacity))
        for cache in (self.k, self.v):
            for i, x in enumerate(cache):
                grown = x.new_zeros((x.shape[0], x.shape[1], capacity + 1, x.shape[3]))
                grown[:, :, : self.capacity] = x[:, :, : self.capacity]
                cache[i] = grown
        self.capacity = capacity

    def window_mask(self, mask: torch.Tensor, window: int) -> torch.Tensor:
        """`mask` narrowed to a sliding window: a query at position q sees keys after q - window."""
        keys = torch.arange(self._span, device=mask.device)
        return mask & (keys > self._pos[..., None] - window)[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's keys/values after each row's end; return each row's columns so far."""
        keys, values = self.k[layer], self.v[layer]
        keys[self._rows, :, self._cols] = k.transpose(1, 2).to(keys.dtype)
        values[self._rows, :, self._cols] = v.transpose(1, 2).to(values.dtype)
        return self._read(keys), self._read(values)

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        first, n = self._slots[0], len(self._slots)
        if self._slots == list(range(first, first + n)):
            return x[first : first + n, :, : self._span]
        return x[self._rows[:, 0], :, : self._span]

    def advance(self, t: int) -> None:
        for s, c in zip(self._slots, self._counts or [t] * len(self._slots)):
            self.lengths[s] += c

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src`'s sequence into slot `dst` (`src` keeps its copy)."""
        n = self.lengths[src]
        for x in (*self.k, *self.v):
            x[dst, :, :n] = x[src, :, :n]
        self.lengths[dst] = n

    def swap(self, a: int, b: int) -> None:
        """Exchange the sequences of slots `a` and `b`."""
        na, nb = self.lengths[a], self.lengths[b]
        for x in (*self.k, *self.v):
            kept = x[a, :, :na].clone()
            x[a, :, :nb] = x[b, :, :nb]
            x[b, :, :na] = kept
        self.lengths[a], self.lengths[b] = nb, na

    def select(self, rows: torch.Tensor) -> None:
        raise RuntimeError("a SlotKVCache keeps its slots: free one by setting its length to 0")

    def truncate(self, n: int) -> None:
        raise RuntimeError("a SlotKVCache has one length per slot: set `lengths[slot]`")

    def freeze(self, padding_mask: torch.Tensor | None = None) -> None:
        raise RuntimeError("a SlotKVCache has no static mode")


def causal_mask(start: int, t: int, device: torch.device) -> torch.Tensor:
    """(t, start + t) bool: query i (at absolute position start + i) may see keys 0..start + i."""
    q = torch.arange(start, start + t, device=device)[:, None]
    k = torch.arange(start + t, device=device)[None, :]
    return k <= q


def step_inputs(
    t: int,
    device: torch.device,
    context_length: int,
    kv_cache: KVCache | None = None,
    padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The positions of a forward step's `t` new tokens, and their attention mask (None: plain causal).

    Positions continue from `kv_cache.pos`; a multi-token step on a non-empty cache gets an explicit
    causal mask. `padding_mask`: bool (batch, S) with S = cached + new positions, False at left
    padding; padded positions are skipped as keys, and positions count from each row's first real
    token. A cache in static mode (`KVCache.freeze`) keeps the positions and the mask itself, and a
    `SlotKVCache` those of each of its rows.
    """
    if isinstance(kv_cache, SlotKVCache):
        return kv_cache.step_inputs(t)
    static = kv_cache is not None and kv_cache.static
    # static: no Python-side position here, so a compiled step is not specialized on it
    start = kv_cache.pos if kv_cache is not None and not static else 0
    if start + t > context_length:
        raise ValueError(f"sequence of {start + t} tokens exceeds the context length {context_length}")
    if static:
        if t != 1:
            raise ValueError(f"a static-mode cache takes one token per row and step, got {t}")
        return kv_cache.static_step_inputs()
    if padding_mask is None:
        pos = torch.arange(start, start + t, device=device)
        if kv_cache is not None and start > 0 and t > 1:
            return pos, causal_mask(start, t, device)[None, None]
        return pos, None
    # positions count real tokens only: the first real token of each row is position 0
    pos = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start : start + t]
    key_ok = padding_mask[:, None, None, :]  # (b, 1, 1, S)
    causal = causal_mask(start, t, device)[None, None]  # (1, 1, t, S)
    # a padded query sees itself, so no row of the mask is empty (an empty row gives NaN)
    own = torch.zeros_like(causal)
    own[..., torch.arange(t), start + torch.arange(t)] = True
    return pos, (causal & key_ok) | own


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on `F.scaled_dot_product_attention`.

    The query, key and value projections are one `nn.Linear` of width 3 * d_out: its weight is
    `MultiHeadAttention`'s W_query, W_key and W_value weights stacked (the same math, one matrix
    multiply instead of three); `out_proj` mixes the heads.
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
        # (b, t, 3 * d_out) -> (b, t, 3, n_heads, head_dim) -> 3 x (b, n_heads, t, head_dim)
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
            # the cache may keep a wider type than the weights (fp32 keys/values for bf16 weights on
            # CPUs, where fp32 attention is faster); attention then runs in the cache's type
            q = q.to(k.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            # a multi-token step on a non-empty cache needs an explicit mask (`step_inputs` builds one)
            if kv_cache is not None and not kv_cache.static and kv_cache.pos > 0 and t > 1:
                raise ValueError("a multi-token step on a non-empty cache needs an explicit mask")
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=t > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(b, t, self.d_out).to(x.dtype)
        return self.out_proj(y)
