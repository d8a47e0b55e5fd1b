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
from . import gpt, gpt2_hf

DEFAULT_ARCHITECTURE = gpt.ARCHITECTURE  # config.json files from before configs named their family


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


def preset_config(name: str, **overrides: Any) -> Any:
    """The config of a named preset of any family (or an alias of one), with keyword overrides."""
    for arch in ARCHITECTURES.values():
        key = arch.aliases.get(name, name)
        if key in arch.presets:
            return arch.config_class.from_dict({**arch.presets[key], **overrides})
    raise ScratchLLMError(f"unknown model preset {name!r}; choose one of {', '.join(preset_names())}")


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
