"""Model families by name: which class builds a config, which presets it has, how it maps to Hugging Face.

A config names its family (`cfg.architecture`, saved in a model directory's config.json; a
directory without it holds GPT-2). Code that builds a model from a config, reads a config back,
counts its FLOPs or converts its weights asks this registry, so a new family is one module in
model/ (its config, model and HF mapping) plus one `register(...)` call at the end of this file.

The interface the rest of the package relies on, which a family's classes provide:

Config (a dataclass):
    architecture                  the family's registry name
    to_dict() / from_dict(d)      config.json's "model" section: plain values, unknown keys an error
    replace(**changes)            a checked copy (training sets drop_rate, finetuning n_classes)
    vocab_size, context_length    the embedding rows and the longest sequence (generation, data windows)
    emb_dim, n_layers, n_heads    the shape (a classifier head, reports, `scratchllm info`)
    head_dim, drop_rate           the attention heads' width (a KV cache's shape), dropout
    n_classes                     0: a language model; N: a classifier with N outputs
    tie_weights                   the head shares the token-embedding matrix

Model (an nn.Module built as `model_class(cfg)`, also under `torch.device("meta")`):
    cfg                           its config
    tok_emb                       nn.Embedding; its weight's device and dtype are the model's
    trf_blocks                    nn.ModuleList of the blocks: Muon's matrices, blocks to finetune or shard
    final_norm                    the last norm (unfrozen with the last blocks when finetuning)
    out_head                      nn.Linear to vocab_size (no bias) or n_classes; finetuning may replace it
    weights_tied                  whether the head shares the token-embedding matrix now
    forward(in_idx, *, kv_cache=None, padding_mask=None, return_hidden=False, targets=None,
            ignore_index=-100)    logits, final-norm hidden states, or the mean loss (`loss.head_loss`);
                                  `attention.step_inputs` gives the positions and mask of a step
    new_kv_cache(batch_size, max_len=None, dtype=None)   an `attention.KVCache`
    hidden_at(seqs, positions)    hidden states at chosen positions (scoring)
    Linear layers are `nn.Linear` (quantization and LoRA replace them by module name: lora.DEFAULT_TARGETS).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..errors import ScratchLLMError
from . import gemma3, gpt, gpt2_hf, llama3, qwen3, transformer, transformer_hf

DEFAULT_ARCHITECTURE = gpt.ARCHITECTURE  # config.json files from before configs named their family
SIZE_NAMES = ("nano", "micro", "mini", "small-cpu")  # every family's small shapes


@dataclass(frozen=True)
class HFMapping:
    """How a family converts to and from Hugging Face's form (hub/ reads and writes the files)."""

    model_type: str  # config.json's model_type
    label: str  # the family's name for people, in messages
    repos: Mapping[str, str]  # hub name (a preset) -> Hugging Face repository
    config_from_hf: Callable[[Mapping[str, Any], str], Any]  # (HF config, source) -> our config
    config_to_hf: Callable[[Any, int | None, torch.dtype], dict]  # (config, eot id, dtype) -> HF config
    # (HF tensors by name or as pairs, our config, source) -> our tensors by name
    from_hf_state_dict: Callable[[Any, Any, str], dict[str, torch.Tensor]]
    to_hf_state_dict: Callable[[nn.Module], dict[str, torch.Tensor]]  # our model -> HF tensors
    is_buffer: Callable[[str], bool] = lambda name: False  # HF tensors that are no weights


@dataclass(frozen=True)
class Architecture:
    """One model family: its classes, its presets and (optionally) its Hugging Face mapping."""

    name: str
    model_class: type[nn.Module]
    config_class: type
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # name -> config overrides
    aliases: Mapping[str, str] = field(default_factory=dict)  # other name -> preset name
    # small shapes to pretrain from scratch (nano, micro, mini, small-cpu), named within the family
    sizes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    flops_per_token: Callable[[Any, int | None], int] | None = None  # (config, seq_len) -> forward FLOPs
    hf: HFMapping | None = None


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add a family (its presets' names must be new); returns it."""
    if arch.name in ARCHITECTURES:
        raise ValueError(f"model architecture {arch.name!r} is registered already")
    taken = set(preset_names()) & ({*arch.presets, *arch.aliases})
    if taken:
        raise ValueError(f"model architecture {arch.name!r}: preset names {sorted(taken)} are taken")
    ARCHITECTURES[arch.name] = arch
    return arch


def get_architecture(name: str) -> Architecture:
    """The registered family called `name`."""
    if name not in ARCHITECTURES:
        raise ScratchLLMError(
            f"unknown model architecture {name!r}; this scratchllm knows {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[name]


def architecture_of(model: nn.Module) -> Architecture:
    """The registered family of a model instance; a TypeError for anything else."""
    cfg = getattr(model, "cfg", None)
    arch = ARCHITECTURES.get(getattr(cfg, "architecture", None))
    if arch is None or not isinstance(model, arch.model_class):
        known = ", ".join(a.model_class.__name__ for a in ARCHITECTURES.values())
        raise TypeError(
            f"expected a model of a registered architecture ({known}), got {type(model).__name__}"
        )
    return arch


def config_from_dict(d: Mapping[str, Any]) -> Any:
    """The config that `cfg.to_dict()` wrote, as its family's config class."""
    name = d.get("architecture", DEFAULT_ARCHITECTURE)
    if not isinstance(name, str):
        raise ScratchLLMError(f"model config: architecture must be a string, got {name!r}")
    return get_architecture(name).config_class.from_dict(dict(d))


def build_model(cfg: Any) -> nn.Module:
    """A new model of `cfg`'s family (on the current default device: meta for shapes only)."""
    return get_architecture(cfg.architecture).model_class(cfg)


def preset_names() -> list[str]:
    """Every family's preset names, in registration order (aliases left out)."""
    return [name for arch in ARCHITECTURES.values() for name in arch.presets]


def preset_config(name: str, architecture: str | None = None, **overrides: Any) -> Any:
    """The config of a named preset of any family (or an alias of one), with keyword overrides; with
    `architecture`, also that family's small sizes (`preset_config("nano", "llama3")`)."""
    if architecture is not None:
        arch = get_architecture(architecture)
        if name in arch.sizes:
            return arch.config_class.from_dict({**arch.sizes[name], **overrides})
    for arch in ARCHITECTURES.values():
        key = arch.aliases.get(name, name)
        if key in arch.presets:
            if architecture is not None and arch.name != architecture:
                sizes = ", ".join(get_architecture(architecture).sizes)
                raise ScratchLLMError(
                    f"model preset {name!r} is a {arch.name} model, not {architecture}; leave out the "
                    f"architecture, or pick one of its sizes: {sizes}"
                )
            return arch.config_class.from_dict({**arch.presets[key], **overrides})
    sizes = f" (or with an architecture: {', '.join(SIZE_NAMES)})"
    raise ScratchLLMError(f"unknown model preset {name!r}; choose one of {', '.join(preset_names())}{sizes}")


def architecture_of_preset(name: str) -> str | None:
    """The family a preset name belongs to (None: no such preset)."""
    for arch in ARCHITECTURES.values():
        if arch.aliases.get(name, name) in arch.presets:
            return arch.name
    return None


def flops_per_token(cfg: Any, seq_len: int | None = None) -> int:
    """Forward-pass FLOPs per token of `cfg`'s family at `seq_len` (default: the context length)."""
    arch = get_architecture(cfg.architecture)
    if arch.flops_per_token is None:
        raise ScratchLLMError(f"model architecture {arch.name!r} does not count its FLOPs")
    return arch.flops_per_token(cfg, seq_len)


def hf_architectures() -> Iterable[Architecture]:
    """The families that convert to and from Hugging Face."""
    return [arch for arch in ARCHITECTURES.values() if arch.hf is not None]


register(
    Architecture(
        name=gpt.ARCHITECTURE,
        model_class=gpt.GPTModel,
        config_class=gpt.GPTConfig,
        presets=gpt.PRESETS,
        aliases=gpt.PRESET_ALIASES,
        sizes={name: gpt.PRESETS[name] for name in SIZE_NAMES},  # also presets of their own, as before
        flops_per_token=gpt.flops_per_token,
        hf=HFMapping(
            model_type=gpt2_hf.MODEL_TYPE,
            label="GPT-2",
            repos=gpt2_hf.REPOS,
            config_from_hf=gpt2_hf.config_from_hf,
            config_to_hf=gpt2_hf.config_to_hf,
            from_hf_state_dict=gpt2_hf.from_hf_state_dict,
            to_hf_state_dict=gpt2_hf.to_hf_state_dict,
            is_buffer=gpt2_hf.is_buffer,
        ),
    )
)


def _transformer_hf(model_type: str, label: str, repos: Mapping[str, str], config_from_hf, config_to_hf):
    return HFMapping(
        model_type=model_type,
        label=label,
        repos=repos,
        config_from_hf=config_from_hf,
        config_to_hf=config_to_hf,
        from_hf_state_dict=transformer_hf.from_hf_state_dict,
        to_hf_state_dict=transformer_hf.to_hf_state_dict,
        is_buffer=transformer_hf.is_buffer,
    )


for _name, _config, _presets, _sizes, _hf in (
    (
        llama3.ARCHITECTURE,
        llama3.Llama3Config,
        llama3.PRESETS,
        llama3.SIZES,
        _transformer_hf(
            llama3.MODEL_TYPE, "Llama 3", llama3.REPOS, llama3.config_from_hf, llama3.config_to_hf
        ),
    ),
    (
        qwen3.ARCHITECTURE,
        qwen3.Qwen3Config,
        qwen3.PRESETS,
        qwen3.SIZES,
        _transformer_hf(qwen3.MODEL_TYPE, "Qwen3", qwen3.REPOS, qwen3.config_from_hf, qwen3.config_to_hf),
    ),
    (
        qwen3.MOE_ARCHITECTURE,
        qwen3.Qwen3MoEConfig,
        qwen3.MOE_PRESETS,
        qwen3.MOE_SIZES,
        _transformer_hf(
            qwen3.MOE_MODEL_TYPE, "Qwen3 MoE", qwen3.MOE_REPOS, qwen3.moe_config_from_hf, qwen3.config_to_hf
        ),
    ),
    (
        gemma3.ARCHITECTURE,
        gemma3.Gemma3Config,
        gemma3.PRESETS,
        gemma3.SIZES,
        _transformer_hf(
            gemma3.MODEL_TYPE, "Gemma 3", gemma3.REPOS, gemma3.config_from_hf, gemma3.config_to_hf
        ),
    ),
):
    register(
        Architecture(
            name=_name,
            model_class=transformer.Transformer,
            config_class=_config,
            presets=_presets,
            sizes=_sizes,
            flops_per_token=transformer.flops_per_token,
            hf=_hf,
        )
    )
