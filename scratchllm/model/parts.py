"""Layers that model families share: normalization and activations.

Written out for reading, run on PyTorch's fused kernels (`F.layer_norm`, `F.gelu`); tests check
them against the book's formulas. Attention and its KV cache are in attention.py.
"""

from __future__ import annotations

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


__all__ = ["GELU", "GELU_FORMS", "LayerNorm"]
