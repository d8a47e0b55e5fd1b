"""Llama 3, Qwen3 (dense and MoE) and Gemma 3 in Hugging Face's form: weight names both ways, and the
config.json readings they share.

The families name their weights alike (`model.layers.N.self_attn.q_proj.weight` ...); three things
differ from a rename: our `att.qkv` is HF's q_proj, k_proj and v_proj stacked (one matrix multiply);
Gemma's four norms per block (HF's post_attention_layernorm is Gemma's norm after attention, but
Llama's and Qwen's norm before the MLP); and a mixture of experts' router and experts. Each family's
own settings are read and written in its module (llama3.py, qwen3.py, gemma3.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from ..errors import ScratchLLMError
from .transformer import TransformerConfig

HF_PREFIX = "model."
HF_HEAD = "lm_head.weight"
QKV = ("q_proj", "k_proj", "v_proj")


def name_table(cfg: TransformerConfig) -> dict[str, list[str]]:
    """Our name -> the HF names it is made of (several when we fuse them), for every weight but the head."""
    table = {"tok_emb.weight": ["embed_tokens.weight"], "final_norm.weight": ["norm.weight"]}
    for i in range(cfg.n_layers):
        ours, hf = f"trf_blocks.{i}.", f"layers.{i}."
        table[ours + "att.qkv.weight"] = [f"{hf}self_attn.{p}.weight" for p in QKV]
        if cfg.qkv_bias:
            table[ours + "att.qkv.bias"] = [f"{hf}self_attn.{p}.bias" for p in QKV]
        table[ours + "att.out_proj.weight"] = [hf + "self_attn.o_proj.weight"]
        if cfg.qk_norm:
            table[ours + "att.q_norm.weight"] = [hf + "self_attn.q_norm.weight"]
            table[ours + "att.k_norm.weight"] = [hf + "self_attn.k_norm.weight"]
        table[ours + "norm1.weight"] = [hf + "input_layernorm.weight"]
        if cfg.post_norms:
            table[ours + "post_att_norm.weight"] = [hf + "post_attention_layernorm.weight"]
            table[ours + "norm2.weight"] = [hf + "pre_feedforward_layernorm.weight"]
            table[ours + "post_ff_norm.weight"] = [hf + "post_feedforward_layernorm.weight"]
        else:
            table[ours + "norm2.weight"] = [hf + "post_attention_layernorm.weight"]
        if cfg.n_experts:
            table[ours + "ff.router.weight"] = [hf + "mlp.gate.weight"]
            for e in range(cfg.n_experts):
                for part in ("gate", "up", "down"):
                    table[f"{ours}ff.experts.{e}.{part}.weight"] = [f"{hf}mlp.experts.{e}.{part}_proj.weight"]
        else:
            for part in ("gate", "up", "down"):
                table[f"{ours}ff.{part}.weight"] = [f"{hf}mlp.{part}_proj.weight"]
    return table


def from_hf_state_dict(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    cfg: TransformerConfig,
    source: str = "Hugging Face weights",
) -> dict[str, torch.Tensor]:
    """HF tensors (name -> tensor, or pairs read one at a time) -> ours by name; q, k and v are stacked
    as soon as a layer's three have been read. Missing tensors and wrong shapes are left for
    `load_state_dict_strict` to report."""
    target = {hf: (ours, j) for ours, parts in name_table(cfg).items() for j, hf in enumerate(parts)}
    sizes = {ours: len(parts) for ours, parts in name_table(cfg).items()}
    pending: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    head, unknown = None, []
    for key, tensor in tensors.items() if isinstance(tensors, Mapping) else tensors:
        name = key.removeprefix(HF_PREFIX)
        if key == HF_HEAD:
            head = tensor
        elif name in target:
            ours, j = target[name]
            pieces = pending.setdefault(ours, {})
            pieces[j] = tensor
            if len(pieces) == sizes[ours]:
                del pending[ours]
                out[ours] = torch.cat([pieces[i] for i in range(len(pieces))]) if len(pieces) > 1 else tensor
        else:
            unknown.append(key)
    if unknown:
        raise ScratchLLMError(
            f"{source}: tensors that are not part of this {cfg.architecture} language model: "
            f"{', '.join(unknown[:5])}" + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        )
    if head is not None:
        if not cfg.tie_weights:
            out["out_head.weight"] = head
        elif "tok_emb.weight" in out and not torch.equal(head, out["tok_emb.weight"]):
            raise ScratchLLMError(
                f"{source}: config.json ties the head (tie_word_embeddings true) but lm_head.weight differs "
                "from embed_tokens.weight; set tie_word_embeddings to false to keep a separate head"
            )
    return out


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our model -> HF tensors by name (qkv split back into q, k and v; an untied head as lm_head)."""
    cfg = model.cfg
    if cfg.n_classes:
        raise ScratchLLMError(
            f"this model is a classifier ({cfg.n_classes} classes), not a language model: export its "
            "language model before the classifier head was added"
        )
    ours = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    kv = cfg.n_kv_groups * cfg.head_dim
    split = [cfg.n_heads * cfg.head_dim, kv, kv]
    out = {}
    for name, parts in name_table(cfg).items():
        pieces = ours[name].split(split) if len(parts) == 3 else [ours[name]]
        for hf, piece in zip(parts, pieces):
            out[HF_PREFIX + hf] = piece.contiguous()
    if not model.weights_tied:
        out[HF_HEAD] = ours["out_head.weight"].contiguous()
    return out


def is_buffer(name: str) -> bool:
    """These families save no buffers (RoPE frequencies are computed, not stored)."""
    return name.endswith("rotary_emb.inv_freq")


# ----------------------------------------------------------------------------------------------
# config.json readings the families share


def hf_int(hf: Mapping[str, Any], key: str, source: str, default: int | None = None) -> int:
    """An integer setting of a HF config."""
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScratchLLMError(f"{source}: missing or bad setting {key} ({value!r}); expected an integer")
    return value


def hf_rope(
    hf: Mapping[str, Any], source: str, layer_type: str | None = None
) -> tuple[float, dict[str, Any] | None]:
    """(base, scaling) of a HF config's rotary embeddings, written either way transformers has written
    them: `rope_theta` + `rope_scaling` (the hub's files), or `rope_parameters` (transformers 5;
    per layer type for Gemma 3, `layer_type` picks one)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    scaling = dict(params) if isinstance(params, dict) else dict(hf.get("rope_scaling") or {})
    base = scaling.pop("rope_theta", None) or hf.get("rope_theta")
    if not isinstance(base, (int, float)) or isinstance(base, bool):
        raise ScratchLLMError(f"{source}: missing or bad rope_theta ({base!r})")
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if kind == "default":
        return float(base), None
    if kind == "linear":
        return float(base), {"type": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        try:
            return float(base), {
                "type": "llama3",
                "factor": float(scaling["factor"]),
                "low_freq_factor": float(scaling["low_freq_factor"]),
                "high_freq_factor": float(scaling["high_freq_factor"]),
                "original_context_length": int(scaling["original_max_position_embeddings"]),
            }
        except (KeyError, TypeError, ValueError) as e:
            raise ScratchLLMError(f"{source}: llama3 rope scaling lacks {e}") from e
    raise ScratchLLMError(f"{source}: RoPE scaling {kind!r} is not supported (ours: default, linear, llama3)")


def rope_to_hf(base: float, scaling: Mapping[str, Any] | None) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) in the hub's config.json form, which every transformers version reads."""
    if not scaling:
        return base, None
    out = {"rope_type": scaling["type"], "factor": scaling["factor"]}
    if scaling["type"] == "llama3":
        out |= {
            "low_freq_factor": scaling["low_freq_factor"],
            "high_freq_factor": scaling["high_freq_factor"],
            "original_max_position_embeddings": scaling["original_context_length"],
        }
    return base, out


def activation_problems(hf: Mapping[str, Any], key: str, ours: tuple[str, ...]) -> list[str]:
    """The MLP activation `hf[key]` described as a problem, unless it is one of `ours` (or unset)."""
    value = hf.get(key, ours[0])
    return [] if value in ours else [f"{key} {value!r} (ours: {ours[0]})"]


def check_unsupported(source: str, problems: list[str]) -> None:
    """One error listing every setting our model cannot represent, or nothing."""
    if problems:
        raise ScratchLLMError(f"{source}: settings this model cannot represent: {'; '.join(problems)}")


def base_config(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The settings every family stores under the same HF names, as our config's keys."""
    return {
        "vocab_size": hf_int(hf, "vocab_size", source),
        "context_length": hf_int(hf, "max_position_embeddings", source),
        "emb_dim": hf_int(hf, "hidden_size", source),
        "n_heads": hf_int(hf, "num_attention_heads", source),
        "n_kv_groups": hf_int(hf, "num_key_value_heads", source, hf.get("num_attention_heads")),
        "head_dim": hf_int(hf, "head_dim", source, 0) if hf.get("head_dim") is not None else 0,
        "n_layers": hf_int(hf, "num_hidden_layers", source),
        "hidden_dim": hf_int(hf, "intermediate_size", source),
        "qkv_bias": bool(hf.get("attention_bias", False)),
        "tie_weights": bool(hf.get("tie_word_embeddings", True)),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
    }


def base_config_to_hf(cfg: TransformerConfig, eot_id: int | None, dtype: torch.dtype) -> dict[str, Any]:
    """The HF settings every family stores under the same names."""
    return {
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.hidden_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_groups,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": cfg.n_layers,
        "rms_norm_eps": cfg.norm_eps,
        "attention_bias": cfg.qkv_bias,
        "attention_dropout": cfg.drop_rate,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": None,
        "eos_token_id": eot_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def build_config(cls: type[TransformerConfig], settings: dict[str, Any], source: str) -> TransformerConfig:
    """`cls(**settings)`, its complaints told as coming from `source`."""
    try:
        return cls(**settings)
    except (ScratchLLMError, TypeError, ValueError) as e:
        raise ScratchLLMError(f"{source}: {e}") from e


__all__ = [
    "activation_problems",
    "base_config",
    "base_config_to_hf",
    "build_config",
    "check_unsupported",
    "from_hf_state_dict",
    "hf_int",
    "hf_rope",
    "is_buffer",
    "name_table",
    "rope_to_hf",
    "to_hf_state_dict",
]
