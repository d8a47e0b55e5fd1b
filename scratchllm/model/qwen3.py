"""Qwen3 (Alibaba), dense and mixture-of-experts: Llama 3's design plus QK-norm (an RMSNorm of each
query and key head before RoPE), a head width of its own (128) and a larger RoPE base. The MoE models
replace every MLP with 128 experts of which each token uses 8 (moe.py). The model is `Transformer`
(transformer.py); this module holds the families' defaults, presets and Hugging Face settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import transformer_hf as hf_names
from .transformer import TransformerConfig, small_sizes

ARCHITECTURE = "qwen3"
MOE_ARCHITECTURE = "qwen3-moe"
MODEL_TYPE, MOE_MODEL_TYPE = "qwen3", "qwen3_moe"
HF_CLASS, MOE_HF_CLASS = "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"


@dataclass
class Qwen3Config(TransformerConfig):
    """A dense Qwen3 shape; the defaults are Qwen3-0.6B's."""

    vocab_size: int = 151_936
    context_length: int = 40_960
    emb_dim: int = 1024
    n_heads: int = 16
    n_kv_groups: int = 8
    head_dim: int = 128
    n_layers: int = 28
    hidden_dim: int = 3072
    norm_eps: float = 1e-6
    qk_norm: bool = True
    rope_base: float = 1_000_000.0
    architecture: str = ARCHITECTURE


@dataclass
class Qwen3MoEConfig(Qwen3Config):
    """A Qwen3 mixture-of-experts shape; the defaults are Qwen3-30B-A3B's."""

    emb_dim: int = 2048
    n_heads: int = 32
    n_kv_groups: int = 4
    n_layers: int = 48
    hidden_dim: int = 6144  # unused by MoE blocks; kept for the HF config
    tie_weights: bool = False
    n_experts: int = 128
    n_experts_per_tok: int = 8
    moe_hidden_dim: int = 768
    norm_topk_prob: bool = True
    architecture: str = MOE_ARCHITECTURE


PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": {},
    "qwen3-1.7b": dict(emb_dim=2048, n_heads=16, n_kv_groups=8, n_layers=28, hidden_dim=6144),
    "qwen3-4b": dict(emb_dim=2560, n_heads=32, n_kv_groups=8, n_layers=36, hidden_dim=9728),
    "qwen3-8b": dict(
        emb_dim=4096, n_heads=32, n_kv_groups=8, n_layers=36, hidden_dim=12288, tie_weights=False
    ),
}
MOE_PRESETS: dict[str, dict[str, Any]] = {"qwen3-30b-a3b": {}}
SIZES = small_sizes(dict(rope_base=10_000.0))
# 8 experts as wide as the model, 2 per token: two thirds of the dense model's MLP compute per token
MOE_SIZES = {
    name: dict(size, n_experts=8, n_experts_per_tok=2, moe_hidden_dim=size["emb_dim"])
    for name, size in SIZES.items()
}
REPOS = {
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B",
}
MOE_REPOS = {"qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B"}


def _common_from_hf(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    base, scaling = hf_names.hf_rope(hf, source)
    problems = hf_names.activation_problems(hf, "hidden_act", ("silu",))
    if hf.get("use_sliding_window"):
        problems.append("use_sliding_window true")
    hf_names.check_unsupported(source, problems)
    return hf_names.base_config(hf, source) | {"rope_base": base, "rope_scaling": scaling, "qk_norm": True}


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> Qwen3Config:
    """Our config for a Hugging Face `Qwen3Config`; an error for settings our model lacks."""
    return hf_names.build_config(Qwen3Config, _common_from_hf(hf, source), source)


def moe_config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> Qwen3MoEConfig:
    """Our config for a Hugging Face `Qwen3MoeConfig`; an error for settings our model lacks."""
    settings = _common_from_hf(hf, source)
    problems = []
    if hf.get("decoder_sparse_step", 1) != 1:
        problems.append(f"decoder_sparse_step {hf['decoder_sparse_step']} (ours: 1, every block a mixture)")
    if hf.get("mlp_only_layers"):
        problems.append(f"mlp_only_layers {hf['mlp_only_layers']} (ours: none)")
    hf_names.check_unsupported(source, problems)
    n_experts = hf.get("num_experts", hf.get("num_local_experts"))  # transformers 5 writes the latter
    settings |= {
        "n_experts": hf_names.hf_int({"num_experts": n_experts}, "num_experts", source),
        "n_experts_per_tok": hf_names.hf_int(hf, "num_experts_per_tok", source),
        "moe_hidden_dim": hf_names.hf_int(hf, "moe_intermediate_size", source),
        "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
    }
    return hf_names.build_config(Qwen3MoEConfig, settings, source)


def config_to_hf(cfg: Qwen3Config, eot_id: int | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """A `Qwen3Config` (or `Qwen3MoeConfig`) dict for our config."""
    theta, scaling = hf_names.rope_to_hf(cfg.rope_base, cfg.rope_scaling)
    out = {
        "architectures": [MOE_HF_CLASS if cfg.n_experts else HF_CLASS],
        "model_type": MOE_MODEL_TYPE if cfg.n_experts else MODEL_TYPE,
        **hf_names.base_config_to_hf(cfg, eot_id, dtype),
        "hidden_act": "silu",
        "rope_theta": theta,
        "rope_scaling": scaling,
        "use_sliding_window": False,
        "sliding_window": None,
    }
    if cfg.n_experts:
        out |= {
            "num_experts": cfg.n_experts,
            "num_local_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.n_experts_per_tok,
            "moe_intermediate_size": cfg.moe_hidden_dim,
            "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    return out
