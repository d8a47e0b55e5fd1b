"""GPT-2: its config and presets, the transformer block, and `GPTModel`.

Names follow the book (`emb_dim`, `n_heads`, `n_layers`, `drop_rate`, `qkv_bias`; `tok_emb`,
`pos_emb`, `trf_blocks`, `final_norm`, `out_head`) so its readers feel at home. The shared layers
(LayerNorm, GELU) are in parts.py, attention and the KV cache in attention.py; how GPT-2's weights
map to Hugging Face's is in gpt2_hf.py, and registry.py registers the family.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..errors import ScratchLLMError
from .attention import CausalSelfAttention, KVCache, step_inputs
from .base import CausalLM, ModelConfig, check_token_ids
from .parts import GELU, GELU_FORMS, LayerNorm
from .quantize import QuantizedLinear

ARCHITECTURE = "gpt2"


@dataclass
class GPTConfig(ModelConfig):
    """Everything that fixes the shape of a GPT model."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = True
    tie_weights: bool = True  # output head shares the token-embedding matrix (GPT-2 does)
    n_classes: int = 0  # 0: language-model head over the vocabulary; N: a classifier head with N outputs
    # "tanh": GPT-2's tanh approximation of GELU; "exact": x Phi(x) with erf, as nanoGPT (cheaper on CPUs,
    # where PyTorch's tanh kernel is slow)
    gelu: str = "tanh"
    architecture: str = ARCHITECTURE  # the model family (model/registry.py); `to_dict` puts it first

    OTHER_NAMES: ClassVar[Mapping[str, str]] = {
        # what GPT-2's config.json (transformers) and nanoGPT call these keys: the usual slips
        "n_embd": "emb_dim",
        "n_head": "n_heads",
        "n_layer": "n_layers",
        "n_ctx": "context_length",
        "n_positions": "context_length",
        "block_size": "context_length",
        "dropout": "drop_rate",
        "bias": "qkv_bias",
    }

    def __post_init__(self) -> None:
        self.check_common()
        self.check_ints(["vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"])
        self.check_bools(["qkv_bias", "tie_weights"])
        if self.emb_dim % self.n_heads:
            raise ScratchLLMError(
                f"model config: emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.gelu not in GELU_FORMS:
            raise ScratchLLMError(f"model config: gelu must be {' or '.join(GELU_FORMS)}, got {self.gelu!r}")

    @property
    def head_dim(self) -> int:
        """The width of one attention head."""
        return self.emb_dim // self.n_heads


# The four OpenAI GPT-2 sizes, and small shapes that train on a laptop CPU.
PRESETS: dict[str, dict] = {
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
    "nano": dict(emb_dim=64, n_layers=2, n_heads=2, context_length=128, drop_rate=0.0),
    "micro": dict(emb_dim=128, n_layers=4, n_heads=4, context_length=256, drop_rate=0.0),
    "mini": dict(emb_dim=256, n_layers=6, n_heads=8, context_length=256, drop_rate=0.0),
    "small-cpu": dict(emb_dim=384, n_layers=6, n_heads=6, context_length=256, drop_rate=0.0),
}
# Other names of presets: the family's own name, and the sizes
PRESET_ALIASES = {
    "gpt2": "gpt2-small",
    "124M": "gpt2-small",
    "355M": "gpt2-medium",
    "774M": "gpt2-large",
    "1558M": "gpt2-xl",
}


def preset_config(name: str, **overrides) -> GPTConfig:
    """A `GPTConfig` for a named preset (see `PRESETS`), with keyword overrides."""
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        raise ScratchLLMError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig.from_dict({**PRESETS[key], **overrides})


class FeedForward(nn.Module):
    """Position-wise MLP: expand 4x, GELU, project back."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            GELU(cfg.gelu),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + drop(att(norm1(x))), then x + drop(ff(norm2(x)))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = CausalSelfAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            n_heads=cfg.n_heads,
            dropout=cfg.drop_rate,
            qkv_bias=cfg.qkv_bias,
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), mask=mask, kv_cache=kv_cache, layer=layer))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(CausalLM):
    """Token + position embeddings, `n_layers` transformer blocks, final norm, output head."""

    def __init__(self, cfg: GPTConfig | Mapping[str, Any]):
        """`cfg`: a `GPTConfig`, or a dict of its keys (the book's `GPT_CONFIG_124M` style). The head
        shares the token embedding's weights unless `tie_weights` is False, as GPT-2 does: 124M
        parameters for that config; the book's chapter 4 model, untied, has 163M."""
        super().__init__()
        if isinstance(cfg, Mapping):
            cfg = GPTConfig.from_dict(dict(cfg))
        elif not isinstance(cfg, GPTConfig):
            raise ScratchLLMError(
                f"GPTModel takes a GPTConfig or a dict of its keys, got {type(cfg).__name__}"
            )
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = LayerNorm(cfg.emb_dim)
        if cfg.n_classes:
            self.out_head = nn.Linear(cfg.emb_dim, cfg.n_classes)
        else:
            self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.reset_parameters()
        self.tie_weights()

    def reset_parameters(self) -> None:
        """GPT-2's initialization: N(0, 0.02) weights, zero biases, and the projections that write into
        the residual stream scaled by 1/sqrt(2 n_layers) so its variance does not grow with depth."""
        for name, p in self.named_parameters():
            if name.endswith(("scale",)):
                nn.init.ones_(p)
            elif name.endswith(("shift", "bias")):
                nn.init.zeros_(p)
            elif name.endswith(("att.out_proj.weight", "ff.layers.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def forward(
        self,
        in_idx: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        padding_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
    ) -> torch.Tensor:
        """Logits of shape (batch, T, vocab_size or n_classes), or the final-norm hidden states.

        `targets` (batch, T): return instead the mean next-token cross-entropy against them (targets
        equal to `ignore_index` do not count), computed with the head by `head_loss`, which in eager
        mode never materializes the fp32 logits (model/loss.py).

        `kv_cache`: positions continue from `kv_cache.pos`; the new keys/values are appended.
        `padding_mask`: bool (batch, S) with S = cached + new positions, False at left padding; padded
        positions are skipped as keys, and positions count from each row's first real token.
        A cache in static mode (`KVCache.freeze`) keeps the positions and the mask itself: a one-token
        step with fixed shapes, for torch.compile and CUDA graphs (`padding_mask` is not used).
        """
        x, mask = self.layer_inputs(in_idx, kv_cache, padding_mask)
        for i, block in enumerate(self.trf_blocks):
            x = block(x, mask=mask, kv_cache=kv_cache, layer=i)
        if kv_cache is not None:
            kv_cache.advance(in_idx.shape[1])
        return self._outputs(x, return_hidden, targets, ignore_index)

    def layer_inputs(
        self,
        in_idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the first block takes: token plus position embeddings, and the attention mask."""
        check_token_ids(in_idx, "GPTModel")
        t, ctx = in_idx.shape[1], self.cfg.context_length
        pos, mask = step_inputs(t, in_idx.device, ctx, kv_cache, padding_mask)
        return self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos)), mask


def count_parameters(model: nn.Module, count_tied_twice: bool = False) -> int:
    """Number of parameters; a tied head counts once unless `count_tied_twice` (the book's 163M figure).
    Works for any registered architecture (model/registry.py)."""
    n = sum(p.numel() for p in model.parameters())  # .parameters() yields shared tensors once
    # quantized layers keep their weights in buffers; a quantized tied head is a copy of the embedding
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    n += sum(m.in_features * m.out_features for m in quantized)
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.tie_weights and not cfg.n_classes:
        if model.out_head in quantized and not count_tied_twice:
            n -= model.out_head.in_features * model.out_head.out_features
        elif count_tied_twice and model.weights_tied:
            n += model.out_head.weight.numel()
    return n


def flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> int:
    """Forward-pass FLOPs per token: 2 per multiply-add in every matrix multiply (the projections,
    the MLP, the LM head) plus attention's scores and weighted sum over `seq_len` positions
    (the average causal span is about seq_len / 2, counted here as the full length as in PaLM's MFU)."""
    t = seq_len or cfg.context_length
    d, n = cfg.emb_dim, cfg.n_layers
    out = cfg.n_classes or cfg.vocab_size
    matmul_params = n * (3 * d * d + d * d + 8 * d * d) + d * out
    attention = n * 2 * t * d  # q.k scores and weights.v, each t*d multiply-adds per token
    return 2 * matmul_params + 2 * attention


def model_size_bytes(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """The bytes of the model's parameters stored in `dtype`."""
    return count_parameters(model) * torch.tensor([], dtype=dtype).element_size()


def from_book_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The book's state dict (llms_from_scratch.ch04: separate W_query/W_key/W_value, causal-mask
    buffers, an untied out_head) -> ours: q/k/v fused into att.qkv, the masks dropped. Load it into a
    GPTModel built from the same settings with tie_weights=False."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        m = re.fullmatch(r"(trf_blocks\.\d+\.att)\.(W_query|W_key|W_value|mask)(?:\.(weight|bias))?", name)
        if m is None:
            out[name] = tensor
        elif m.group(2) != "mask":
            qkv.setdefault(f"{m.group(1)}.qkv.{m.group(3)}", {})[m.group(2)] = tensor
    for name, parts in qkv.items():
        try:
            out[name] = torch.cat([parts["W_query"], parts["W_key"], parts["W_value"]], dim=0)
        except KeyError as e:
            raise ScratchLLMError(f"book state dict: {name} lacks {e.args[0]}") from e
    return out


__all__ = [
    "ARCHITECTURE",
    "PRESETS",
    "PRESET_ALIASES",
    "FeedForward",
    "GPTConfig",
    "GPTModel",
    "TransformerBlock",
    "count_parameters",
    "flops_per_token",
    "from_book_state_dict",
    "model_size_bytes",
    "preset_config",
]
