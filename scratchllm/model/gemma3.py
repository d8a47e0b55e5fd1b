"""Gemma 3 (Google): five sliding-window layers (each query sees the 512 latest positions) for every
global one, so most of the KV cache stays small; GeGLU; RMSNorm stored as an offset from 1, also on the
outputs of attention and MLP; QK-norm; embeddings scaled by sqrt(emb_dim); one RoPE base for local
layers and another for global ones. The model is `Transformer` (transformer.py); this module holds
the family's defaults, presets and Hugging Face settings (text-only models: 270M and 1B).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import transformer_hf as hf_names
from .transformer import TransformerConfig, layer_types_every, small_sizes

ARCHITECTURE = "gemma3"
MODEL_TYPE = "gemma3_text"
HF_CLASS = "Gemma3ForCausalLM"
PATTERN = 6  # five sliding layers, then a full one
HF_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}


@dataclass
class Gemma3Config(TransformerConfig):
    """A Gemma 3 shape; the defaults are Gemma 3 270M's. Layer types default to Gemma's pattern."""

    vocab_size: int = 262_144
    context_length: int = 32_768
    emb_dim: int = 640
    n_heads: int = 4
    n_kv_groups: int = 1
    head_dim: int = 256
    n_layers: int = 18
    hidden_dim: int = 2048
    norm_eps: float = 1e-6
    norm_unit_offset: bool = True
    activation: str = "gelu_tanh"
    qk_norm: bool = True
    post_norms: bool = True
    embed_scale: bool = True
    query_scale: float = 256.0
    rope_base: float = 1_000_000.0
    rope_local_base: float = 10_000.0
    sliding_window: int = 512
    architecture: str = ARCHITECTURE

    def __post_init__(self) -> None:
        if self.layer_types is None and isinstance(self.n_layers, int):
            self.layer_types = layer_types_every(self.n_layers, PATTERN)
        super().__post_init__()


PRESETS: dict[str, dict[str, Any]] = {
    "gemma3-270m": {},
    "gemma3-1b": dict(emb_dim=1152, n_layers=26, hidden_dim=6912),
}
# one key/value head as Gemma's small models; every size has a global layer after its local ones
SIZES = small_sizes(
    dict(rope_base=10_000.0, query_scale=0.0, n_kv_groups=1, sliding_window=64),
    {
        "nano": dict(sliding_window=32, layer_types=["sliding", "full"]),
        "micro": dict(layer_types=["sliding", "sliding", "sliding", "full"]),
    },
)
REPOS = {"gemma3-270m": "google/gemma-3-270m", "gemma3-1b": "google/gemma-3-1b-pt"}


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> Gemma3Config:
    """Our config for a Hugging Face `Gemma3TextConfig`; an error for settings our model lacks."""
    problems = hf_names.activation_problems(hf, "hidden_activation", ("gelu_pytorch_tanh", "gelu_tanh"))
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            problems.append(f"{key} {hf[key]} (ours: none)")
    if hf.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention true")
    n_layers = hf_names.hf_int(hf, "num_hidden_layers", source)
    types = hf.get("layer_types")
    if types is None:
        types = layer_types_every(n_layers, hf_names.hf_int(hf, "sliding_window_pattern", source, PATTERN))
    elif not isinstance(types, list) or not set(types) <= set(HF_LAYER_TYPES):
        problems.append(f"layer_types {types!r} (ours: {' and '.join(HF_LAYER_TYPES)})")
    else:
        types = [HF_LAYER_TYPES[t] for t in types]
    hf_names.check_unsupported(source, problems)
    base, scaling = hf_names.hf_rope(hf, source, "full_attention")
    if isinstance(hf.get("rope_parameters"), dict) and "sliding_attention" in hf["rope_parameters"]:
        local_base, _ = hf_names.hf_rope(hf, source, "sliding_attention")
    else:
        local_base = float(hf.get("rope_local_base_freq", 10_000.0))
    settings = hf_names.base_config(hf, source) | {
        "rope_base": base,
        "rope_scaling": scaling,
        "rope_local_base": local_base,
        "sliding_window": hf_names.hf_int(hf, "sliding_window", source),
        "layer_types": types,
        "query_scale": float(hf.get("query_pre_attn_scalar", 256)),
    }
    return hf_names.build_config(Gemma3Config, settings, source)


def config_to_hf(cfg: Gemma3Config, eot_id: int | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """A `Gemma3TextConfig` dict for our config."""
    theta, scaling = hf_names.rope_to_hf(cfg.rope_base, cfg.rope_scaling)
    names = {ours: theirs for theirs, ours in HF_LAYER_TYPES.items()}
    return {
        "architectures": [HF_CLASS],
        "model_type": MODEL_TYPE,
        **hf_names.base_config_to_hf(cfg, eot_id, dtype),
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": _number(cfg.query_scale or cfg.head_dim),
        "sliding_window": cfg.sliding_window or None,
        "layer_types": [names[cfg.layer_type(i)] for i in range(cfg.n_layers)],
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_local_base_freq": cfg.rope_local_base or cfg.rope_base,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }


def _number(x: float) -> int | float:
    """A whole number as an int (transformers' config checks want one)."""
    return int(x) if float(x).is_integer() else x
