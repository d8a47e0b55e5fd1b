"""Layers that model families share: normalization, activations, feed-forward networks and rotary
position embeddings.

GPT-2 uses `LayerNorm` and `GELU` (written out for reading, run on PyTorch's fused kernels; tests
check them against the book's formulas). Llama 3, Qwen3 and Gemma 3 replace them with `RMSNorm`,
a gated feed-forward (`GatedFeedForward`: SwiGLU or GeGLU) and rotary position embeddings
(`rope_inverse_frequencies`, `rope_tables`, `apply_rope`). Attention is in attention.py and gqa.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

GELU_FORMS = ("tanh", "exact")


class LayerNorm(nn.Module):
    """Normalize each token's vector to zero mean and unit variance, then scale and shift.

    The book's formula is `scale * (x - mean) / sqrt(var + eps) + shift` with the biased variance;
    `F.layer_norm` computes exactly that in one fused kernel.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GELU, by default in GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)));
    `form="exact"`: x Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))."""

    def __init__(self, form: str = "tanh"):
        super().__init__()
        if form not in GELU_FORMS:
            raise ValueError(f"GELU form must be {' or '.join(GELU_FORMS)}, got {form!r}")
        self.form = form
        self._approximate = "tanh" if form == "tanh" else "none"  # F.gelu's names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self._approximate)

    def extra_repr(self) -> str:
        return f"form={self.form!r}"


class RMSNorm(nn.Module):
    """Scale each token's vector to unit root-mean-square, then by a learned weight: no mean is taken
    away and no shift is added (cheaper than LayerNorm, and as good in practice).

    x / sqrt(mean(x^2) + eps) * weight, computed in fp32 whatever the input type. `unit_offset`
    (Gemma): the weight is stored as an offset from 1 (`1 + weight`, initialized to 0) and multiplies
    before the result is cast back; otherwise (Llama, Qwen) the normalized x is cast back first.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm: x * rsqrt(mean(x^2) + eps), the same kernels in one call (decoding runs 4 per block)
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.type_as(x)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, unit_offset={self.unit_offset}"


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class GatedFeedForward(nn.Module):
    """A gated MLP: down(act(gate(x)) * up(x)). With SiLU it is SwiGLU (Llama, Qwen), with GELU GeGLU
    (Gemma). The gate decides, per hidden unit, how much of `up`'s value passes; the book calls the
    three layers fc1 (gate), fc2 (up) and fc3 (down)."""

    def __init__(self, emb_dim: int, hidden_dim: int, activation: str = "silu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.gate = nn.Linear(emb_dim, hidden_dim, bias=False)
        self.up = nn.Linear(emb_dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, emb_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(ACTIVATIONS[self.activation](self.gate(x)) * self.up(x))


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings (RoPE)


def rope_inverse_frequencies(
    head_dim: int, base: float, scaling: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """The rotation speed of each of the head's head_dim / 2 dimension pairs: base^(-2i / head_dim),
    fast for the first pairs (local order), slow for the last (long range).

    `scaling` stretches the slow ones for contexts longer than the model was pretrained on:
    {"type": "linear", "factor": f} divides every frequency by f (Gemma 3's global layers);
    {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_context_length"}
    divides only the frequencies whose wavelength exceeds the original context by `low_freq_factor`,
    keeps those shorter than it by `high_freq_factor`, and blends between (Llama 3.1 and 3.2).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (base**exponents)  # on the CPU even while a model is built on the meta device
    if not scaling:
        return inv_freq
    kind, factor = scaling["type"], float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"unknown RoPE scaling {kind!r} (known: linear, llama3)")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_context_length"])
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(medium, blended, scaled)


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, shape (*positions.shape, head_dim), in fp32: each
    dimension pair rotates by position * frequency (the pair's two halves share the angle)."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + head_dim/2]) pair of x (batch, heads, T, head_dim) by its angle, so that
    a query-key dot product depends only on how far apart the two positions are. `cos`/`sin`: (T,
    head_dim), or (batch, T, head_dim) when rows have their own positions (left padding)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


__all__ = [
    "ACTIVATIONS",
    "GELU",
    "GELU_FORMS",
    "GatedFeedForward",
    "LayerNorm",
    "RMSNorm",
    "apply_rope",
    "rope_inverse_frequencies",
    "rope_tables",
]
