"""The decoder of today's open-weight families (Llama 3, Qwen3 dense and MoE, Gemma 3): GPT-2's plan with
newer parts, each switched on by the config.

From GPT-2 (gpt.py) to here, one change at a time (docs/gpt2-to-llama-qwen-gemma.md walks through them):
- LayerNorm -> RMSNorm (parts.py); no biases anywhere.
- GELU MLP -> gated MLP: SwiGLU (Llama, Qwen) or GeGLU (Gemma) (parts.GatedFeedForward).
- Learned position vectors -> rotary embeddings of queries and keys (parts.py), with Llama 3's
  frequency scaling, or one base for global and one for local layers (Gemma 3).
- Multi-head -> grouped-query attention (gqa.py): fewer key/value heads, a smaller KV cache.
- QK-norm (Qwen3, Gemma 3); a sliding window on some layers (Gemma 3); a mixture of experts instead of
  the MLP (Qwen3 MoE, moe.py); Gemma's extra norms after attention and MLP and its scaled embeddings.

The families are configs of this one model (llama3.py, qwen3.py, gemma3.py hold their defaults,
presets and Hugging Face names). Block and layer names follow gpt.py: `trf_blocks`, `att`, `ff`,
`norm1`/`norm2`, `final_norm`, `out_head`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..errors import ScratchLLMError
from .attention import KVCache, step_inputs
from .base import CausalLM, ModelConfig, check_token_ids
from .gqa import GroupedQueryAttention, window_mask
from .moe import MoEFeedForward
from .parts import ACTIVATIONS, GatedFeedForward, RMSNorm, rope_inverse_frequencies, rope_tables

LAYER_TYPES = ("full", "sliding")
ROPE_SCALING_KEYS = {
    "linear": {"type", "factor"},
    "llama3": {"type", "factor", "low_freq_factor", "high_freq_factor", "original_context_length"},
}


@dataclass
class TransformerConfig(ModelConfig):
    """Everything that fixes the shape of a Llama-style decoder; the defaults are Llama 3.2 1B's."""

    vocab_size: int = 128_256
    context_length: int = 131_072
    emb_dim: int = 2048
    n_heads: int = 32
    n_kv_groups: int = 8  # key/value heads, each shared by n_heads / n_kv_groups query heads
    head_dim: int = 0  # one head's width; 0: emb_dim // n_heads (Qwen3 and Gemma 3 set their own)
    n_layers: int = 16
    hidden_dim: int = 8192  # the gated MLP's width
    drop_rate: float = 0.0
    qkv_bias: bool = False
    tie_weights: bool = True
    n_classes: int = 0
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # Gemma's RMSNorm: weight stored as an offset from 1
    activation: str = "silu"  # silu: SwiGLU; gelu_tanh: GeGLU
    qk_norm: bool = False
    post_norms: bool = False  # Gemma: norms on the attention and MLP outputs too
    embed_scale: bool = False  # Gemma: token embeddings times sqrt(emb_dim)
    query_scale: float = 0.0  # attention scores times query_scale^-0.5 (0: head_dim's)
    rope_base: float = 500_000.0
    rope_scaling: dict | None = None  # see parts.rope_inverse_frequencies
    rope_local_base: float = 0.0  # sliding layers' RoPE base, unscaled (0: rope_base)
    sliding_window: int = 0  # the window of "sliding" layers (0: none)
    layer_types: list | None = None  # "full" or "sliding" per layer (None: all full)
    n_experts: int = 0  # > 0: every block's MLP is a mixture of this many experts
    n_experts_per_tok: int = 0
    moe_hidden_dim: int = 0
    norm_topk_prob: bool = True
    architecture: str = "llama3"

    OTHER_NAMES: ClassVar[Mapping[str, str]] = {
        "num_kv_groups": "n_kv_groups",
        "n_kv_heads": "n_kv_groups",
        "intermediate_size": "hidden_dim",
        "rope_theta": "rope_base",
        "rope_freq": "rope_scaling",
        "num_experts": "n_experts",
        "num_experts_per_tok": "n_experts_per_tok",
        "moe_intermediate_size": "moe_hidden_dim",
        "query_pre_attn_scalar": "query_scale",
    }

    def __post_init__(self) -> None:
        self.check_common()
        self.check_ints(["vocab_size", "context_length", "emb_dim", "n_heads", "n_kv_groups", "n_layers"])
        self.check_ints(["hidden_dim", "head_dim", "sliding_window"], minimum=0)
        self.check_ints(["n_experts", "n_experts_per_tok", "moe_hidden_dim"], minimum=0)
        self.check_bools(["qkv_bias", "tie_weights", "norm_unit_offset", "qk_norm", "post_norms"])
        self.check_bools(["embed_scale", "norm_topk_prob"])
        if self.n_heads % self.n_kv_groups:
            raise ScratchLLMError(
                f"model config: n_heads ({self.n_heads}) must be divisible by n_kv_groups "
                f"({self.n_kv_groups})"
            )
        if not self.head_dim:
            if self.emb_dim % self.n_heads:
                raise ScratchLLMError(
                    f"model config: emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}), "
                    "or set head_dim"
                )
            self.head_dim = self.emb_dim // self.n_heads
        if self.head_dim % 2:
            raise ScratchLLMError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.activation not in ACTIVATIONS:
            raise ScratchLLMError(
                f"model config: activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"
            )
        self._check_layers()
        self._check_rope()
        if self.n_experts and not (1 <= self.n_experts_per_tok <= self.n_experts and self.moe_hidden_dim):
            raise ScratchLLMError(
                f"model config: a mixture of {self.n_experts} experts needs n_experts_per_tok in "
                f"[1, {self.n_experts}] and moe_hidden_dim > 0"
            )
        if not self.n_experts and not self.hidden_dim:
            raise ScratchLLMError("model config: hidden_dim must be > 0 (the MLP's width)")

    def _check_layers(self) -> None:
        if self.layer_types is None:
            return
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.n_layers or not set(self.layer_types) <= set(LAYER_TYPES):
            raise ScratchLLMError(
                f"model config: layer_types must list {' or '.join(LAYER_TYPES)} for each of the "
                f"{self.n_layers} layers, got {self.layer_types!r}"
            )
        if "sliding" in self.layer_types and self.sliding_window < 1:
            raise ScratchLLMError("model config: sliding layers need a sliding_window >= 1")

    def _check_rope(self) -> None:
        for name in ("rope_base", "rope_local_base", "query_scale", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ScratchLLMError(f"model config: {name} must be a number >= 0, got {value!r}")
        if self.rope_base <= 0:
            raise ScratchLLMError(f"model config: rope_base must be > 0, got {self.rope_base}")
        scaling = self.rope_scaling
        if scaling is None:
            return
        wanted = ROPE_SCALING_KEYS.get(scaling.get("type") if isinstance(scaling, dict) else None)
        if wanted is None or set(scaling) != wanted:
            raise ScratchLLMError(
                f"model config: rope_scaling must be null or one of "
                f"{'; '.join(f'{k}: {sorted(v)}' for k, v in ROPE_SCALING_KEYS.items())}, got {scaling!r}"
            )

    def layer_type(self, i: int) -> str:
        """ "full" or "sliding": what layer `i` attends to."""
        return self.layer_types[i] if self.layer_types else "full"


class TransformerBlock(nn.Module):
    """Pre-norm block: x + att(norm1(x)), then x + ff(norm2(x)); with `post_norms` (Gemma) each branch's
    output is normalized too before it is added."""

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__()
        self.sliding = cfg.layer_type(layer) == "sliding"

        def norm() -> RMSNorm:
            return RMSNorm(cfg.emb_dim, cfg.norm_eps, cfg.norm_unit_offset)

        self.att = GroupedQueryAttention(
            cfg.emb_dim,
            cfg.n_heads,
            cfg.n_kv_groups,
            cfg.head_dim,
            qkv_bias=cfg.qkv_bias,
            qk_norm=cfg.qk_norm,
            norm_eps=cfg.norm_eps,
            norm_unit_offset=cfg.norm_unit_offset,
            scale=cfg.query_scale**-0.5 if cfg.query_scale else None,
            dropout=cfg.drop_rate,
        )
        if cfg.n_experts:
            self.ff: nn.Module = MoEFeedForward(
                cfg.emb_dim,
                cfg.moe_hidden_dim,
                cfg.n_experts,
                cfg.n_experts_per_tok,
                cfg.norm_topk_prob,
                cfg.activation,
            )
        else:
            self.ff = GatedFeedForward(cfg.emb_dim, cfg.hidden_dim, cfg.activation)
        self.norm1, self.norm2 = norm(), norm()
        self.post_att_norm = norm() if cfg.post_norms else nn.Identity()
        self.post_ff_norm = norm() if cfg.post_norms else nn.Identity()
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        h = self.att(self.norm1(x), rope, mask=mask, kv_cache=kv_cache, layer=layer)
        x = x + self.drop_shortcut(self.post_att_norm(h))
        x = x + self.drop_shortcut(self.post_ff_norm(self.ff(self.norm2(x))))
        return x


class Transformer(CausalLM):
    """Token embedding, `n_layers` blocks, final RMSNorm, output head; positions enter through RoPE."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if not isinstance(cfg, TransformerConfig):
            raise ScratchLLMError(f"Transformer takes a TransformerConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps, cfg.norm_unit_offset)
        if cfg.n_classes:
            self.out_head = nn.Linear(cfg.emb_dim, cfg.n_classes)
        else:
            self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        # RoPE frequencies are derived from the config, not weights: kept off the state dict
        self._inv_freq = {
            "full": rope_inverse_frequencies(cfg.head_dim, cfg.rope_base, cfg.rope_scaling),
            "sliding": rope_inverse_frequencies(cfg.head_dim, cfg.rope_local_base or cfg.rope_base),
        }
        self.reset_parameters()
        self.tie_weights()

    @property
    def n_kv_heads(self) -> int:
        return self.cfg.n_kv_groups

    def cache_windows(self) -> list[int]:
        cfg = self.cfg
        return [cfg.sliding_window if cfg.layer_type(i) == "sliding" else 0 for i in range(cfg.n_layers)]

    def reset_parameters(self) -> None:
        """N(0, 0.02) weights, zero biases, norms at 1 (Gemma's offsets at 0), and the projections that
        write into the residual stream scaled by 1/sqrt(2 n_layers), as for GPT-2."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                nn.init.constant_(module.weight, 0.0 if module.unit_offset else 1.0)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                writes_residual = name.endswith(("att.out_proj", "down"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if writes_residual else 0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

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
        """Logits (batch, T, vocab_size or n_classes), the final-norm hidden states, or with `targets`
        the mean next-token loss; `kv_cache` and `padding_mask` as for `GPTModel.forward`."""
        x, ropes, masks = self.layer_inputs(in_idx, kv_cache, padding_mask)
        for i, block in enumerate(self.trf_blocks):
            kind = self.cfg.layer_type(i)
            x = block(x, ropes[kind], mask=masks[kind], kv_cache=kv_cache, layer=i)
        if kv_cache is not None:
            kv_cache.advance(in_idx.shape[1])
        return self._outputs(x, return_hidden, targets, ignore_index)

    def layer_inputs(
        self,
        in_idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor | None]]:
        """What the first block takes: the (scaled) token embeddings, and per layer kind ("full",
        "sliding") the RoPE tables (cos, sin) of the new positions and the attention mask."""
        check_token_ids(in_idx, type(self).__name__)
        cfg, t = self.cfg, in_idx.shape[1]
        pos, mask = step_inputs(t, in_idx.device, cfg.context_length, kv_cache, padding_mask)
        x = self.tok_emb(in_idx)
        if cfg.embed_scale:
            x = x * torch.tensor(cfg.emb_dim**0.5).to(x.dtype)  # rounded as Gemma's weights' type
        x = self.drop_emb(x)
        kinds = {cfg.layer_type(i) for i in range(cfg.n_layers)}
        # cast once per step to the activations' type, not in every layer (apply_rope's cast is then a no-op)
        ropes = {kind: tuple(r.to(x.dtype) for r in rope_tables(self._inv_freq[kind], pos)) for kind in kinds}
        masks = {"full": mask}
        if "sliding" in kinds:
            masks["sliding"] = window_mask(mask, t, cfg.sliding_window, in_idx.device, kv_cache)
        return x, ropes, masks


def flops_per_token(cfg: TransformerConfig, seq_len: int | None = None) -> int:
    """Forward-pass FLOPs per token: 2 per multiply-add of the projections, the MLP (for a mixture, the
    router and the experts a token uses) and the head, plus attention's scores and weighted sum."""
    t = seq_len or cfg.context_length
    d, hd = cfg.emb_dim, cfg.head_dim
    attention_proj = d * (cfg.n_heads + 2 * cfg.n_kv_groups) * hd + cfg.n_heads * hd * d
    if cfg.n_experts:
        mlp = d * cfg.n_experts + cfg.n_experts_per_tok * 3 * d * cfg.moe_hidden_dim
    else:
        mlp = 3 * d * cfg.hidden_dim
    matmul = cfg.n_layers * (attention_proj + mlp) + d * (cfg.n_classes or cfg.vocab_size)
    spans = [min(t, cfg.sliding_window) if cfg.layer_type(i) == "sliding" else t for i in range(cfg.n_layers)]
    attention = sum(2 * span * cfg.n_heads * hd for span in spans)
    return 2 * matmul + 2 * attention


# The small shapes every family has for pretraining from scratch on a CPU (`--arch qwen3 --model nano`),
# with GPT-2's vocabulary size until a tokenizer sets its own, heads of emb_dim / n_heads; families add
# their own settings.
SMALL_SHAPES: dict[str, dict[str, Any]] = {
    "nano": dict(emb_dim=64, n_heads=4, n_kv_groups=2, n_layers=2, hidden_dim=192, context_length=128),
    "micro": dict(emb_dim=128, n_heads=4, n_kv_groups=2, n_layers=4, hidden_dim=384, context_length=256),
    "mini": dict(emb_dim=256, n_heads=8, n_kv_groups=4, n_layers=6, hidden_dim=768, context_length=256),
    "small-cpu": dict(emb_dim=384, n_heads=6, n_kv_groups=2, n_layers=6, hidden_dim=1024, context_length=256),
}


def small_sizes(
    common: Mapping[str, Any], per_size: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """`SMALL_SHAPES` with a family's `common` settings, then each size's own (`per_size`)."""
    per_size = per_size or {}
    return {
        name: {"vocab_size": 50257, "head_dim": 0, **shape, **common, **per_size.get(name, {})}
        for name, shape in SMALL_SHAPES.items()
    }


def layer_types_every(n_layers: int, period: int) -> list[str]:
    """Gemma 3's pattern: `period - 1` sliding layers, then a full one, repeated."""
    return ["full" if (i + 1) % period == 0 else "sliding" for i in range(n_layers)]


__all__ = [
    "LAYER_TYPES",
    "SMALL_SHAPES",
    "Transformer",
    "TransformerBlock",
    "TransformerConfig",
    "flops_per_token",
    "layer_types_every",
    "small_sizes",
]
