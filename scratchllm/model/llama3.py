"""Llama 3 (Meta): GPT-2 with RMSNorm, SwiGLU, rotary embeddings with frequency scaling for long
contexts, and grouped-query attention (8 key/value heads). The model is `Transformer`
(transformer.py); this module holds the family's defaults, presets and Hugging Face settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import transformer_hf as hf_names
from .transformer import TransformerConfig, small_sizes

ARCHITECTURE = "llama3"
MODEL_TYPE = "llama"
HF_CLASS = "LlamaForCausalLM"
ROPE_SCALING_3_2 = {
    "type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_context_length": 8192,
}


@dataclass
class Llama3Config(TransformerConfig):
    """A Llama 3 shape; the defaults are Llama 3.2 1B's."""

    rope_scaling: dict | None = field(default_factory=lambda: dict(ROPE_SCALING_3_2))
    architecture: str = ARCHITECTURE


PRESETS: dict[str, dict[str, Any]] = {
    "llama3.2-1b": dict(emb_dim=2048, n_heads=32, n_kv_groups=8, n_layers=16, hidden_dim=8192),
    "llama3.2-3b": dict(emb_dim=3072, n_heads=24, n_kv_groups=8, n_layers=28, hidden_dim=8192),
    "llama3.1-8b": dict(
        emb_dim=4096,
        n_heads=32,
        n_kv_groups=8,
        n_layers=32,
        hidden_dim=14336,
        tie_weights=False,
        rope_scaling={**ROPE_SCALING_3_2, "factor": 8.0},
    ),
}
SIZES = small_sizes(dict(rope_base=10_000.0, rope_scaling=None))  # short contexts need no scaling
REPOS = {
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
}


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> Llama3Config:
    """Our config for a Hugging Face `LlamaConfig`; an error for settings our model lacks."""
    base, scaling = hf_names.hf_rope(hf, source)
    problems = hf_names.activation_problems(hf, "hidden_act", ("silu",))
    if hf.get("mlp_bias"):
        problems.append("mlp_bias true")
    hf_names.check_unsupported(source, problems)
    settings = hf_names.base_config(hf, source) | {"rope_base": base, "rope_scaling": scaling}
    return hf_names.build_config(Llama3Config, settings, source)


def config_to_hf(cfg: Llama3Config, eot_id: int | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """A `LlamaConfig` dict for our config."""
    theta, scaling = hf_names.rope_to_hf(cfg.rope_base, cfg.rope_scaling)
    return {
        "architectures": [HF_CLASS],
        "model_type": MODEL_TYPE,
        **hf_names.base_config_to_hf(cfg, eot_id, dtype),
        "hidden_act": "silu",
        "mlp_bias": False,
        "rope_theta": theta,
        "rope_scaling": scaling,
    }
