"""`scratchllm info`: the shape and cost of a preset or a model, from its config alone."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import meta_model, read_config
from ..config import setting
from ..errors import ScratchLLMError
from ..model.gpt import count_parameters
from ..model.registry import flops_per_token, preset_config, preset_names
from .fetch import HUB_NAMES_HELP, cached_model, canonical_name, is_hub_name, resolve_model


@dataclass
class InfoSettings:
    """`scratchllm info`: one preset or model (`--preset`, `--model`), or every preset (`--list`)."""

    list_presets: bool = setting(
        False,
        "every model preset's shape and size",
        "model",
        flags=("--list",),
        exclusive="which",
        required=True,
    )
    preset: str | None = setting(
        None,
        "a model preset (`info --list` shows them all), e.g. gpt2-medium, llama3.2-1b, qwen3-0.6b, "
        "gemma3-270m",
        "model",
        exclusive="which",
        required=True,
    )
    model: str | None = setting(
        None,
        f"a model directory, or {HUB_NAMES_HELP}: read from the cache if downloaded, never downloaded",
        "model",
        exclusive="which",
        required=True,
    )
    json: bool = setting(False, "print the numbers as JSON", "model")


def info_command(settings: InfoSettings) -> None:
    """Print the shape and cost of a preset or model, or (`list_presets`) a table of every preset."""
    if settings.list_presets:
        if settings.preset is not None or settings.model is not None:
            raise ScratchLLMError("info: give one of --list, --preset and --model")
        list_presets(as_json=settings.json)
        return
    if settings.preset is None and settings.model is None:
        raise ScratchLLMError("info: give one of --list, --preset and --model")
    info = model_info(preset=settings.preset, model=settings.model)
    print(json.dumps(info, indent=2) if settings.json else format_model_info(info))


def list_presets(as_json: bool = False) -> None:
    """`info --list`: every model preset's shape and size, from its config alone."""
    infos = {name: model_info(preset=name) for name in preset_names()}
    if as_json:
        print(json.dumps(infos, indent=2))
        return
    print(
        f"{'preset':<14} {'family':<9} {'layers':>6} {'heads':>5} {'kv':>3} {'dims':>5} {'context':>7} "
        f"{'parameters':>11} {'bf16 MB':>8} {'KV KB/tok':>9}"
    )
    for name, info in infos.items():
        c = info["config"]
        print(
            f"{name:<14} {c['architecture']:<9} {c['n_layers']:>6} {c['n_heads']:>5} {info['kv_heads']:>3} "
            f"{c['emb_dim']:>5} {c['context_length']:>7} {info['parameters'] / 1e6:>10.1f}M "
            f"{info['bytes_bf16'] / 1e6:>8.1f} {info['kv_cache_bytes_per_token'] / 1024:>9.1f}"
        )
    print(
        "(each family's own vocabulary; the small gpt2 sizes with GPT-2's. Every family also has the sizes "
        "nano, micro, mini and small-cpu: `pretrain --arch llama3 --model nano`)"
    )


def model_info(preset: str | None = None, model: str | os.PathLike | None = None) -> dict[str, Any]:
    """The shape and cost of a preset or a model (directory or hub name) from its config alone:
    nothing is downloaded and no weights are read. A hub name that is not cached yet is described
    by its preset."""
    if (preset is None) == (model is None):
        raise ScratchLLMError("give either a preset or a model")
    if preset is not None:
        cfg, source = preset_config(preset), f"preset {preset}"
    else:
        cfg, source = _model_config(model)
    net = meta_model(cfg)
    stored = count_parameters(net)
    lm = not cfg.n_classes
    head = net.out_head.weight.numel() if lm else 0
    return {
        "source": source,
        "config": cfg.to_dict(),
        "head_dim": cfg.head_dim,
        "parameters": stored,
        # with and without weight tying, whichever this model has (a classifier has nothing to tie)
        "parameters_tied": stored - head if lm and not net.weights_tied else stored,
        "parameters_untied": count_parameters(net, count_tied_twice=True),
        "bytes_fp32": stored * 4,
        "bytes_bf16": stored * 2,
        "flops_per_token": flops_per_token(cfg),
        **kv_cache_size(cfg),
    }


def kv_cache_size(cfg: Any) -> dict[str, Any]:
    """What a KV cache costs at bf16: bytes per token of context (keys and values of every layer), what
    multi-head attention (a KV head per query head) would cost, and the local layers' cap in tokens."""
    kv_heads = getattr(cfg, "n_kv_groups", cfg.n_heads)
    types = [cfg.layer_type(i) if hasattr(cfg, "layer_type") else "full" for i in range(cfg.n_layers)]
    full = types.count("full")
    per_layer = 2 * cfg.head_dim * 2  # keys and values, 2 bytes each
    return {
        "kv_heads": kv_heads,
        "kv_cache_bytes_per_token": full * kv_heads * per_layer,
        "kv_cache_bytes_per_token_mha": cfg.n_layers * cfg.n_heads * per_layer,
        "local_layers": len(types) - full,
        "local_window": getattr(cfg, "sliding_window", 0),
        "local_bytes_max": (len(types) - full) * kv_heads * per_layer * getattr(cfg, "sliding_window", 0),
    }


def _model_config(model: str | os.PathLike) -> tuple[Any, str]:
    """The config of a model directory or hub name, and where it came from (never downloads)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        name = str(model)
        if not is_hub_name(name):
            resolve_model(model)  # raises the right not-found error
        cached = cached_model(name)
        if cached is None:
            key = canonical_name(name)
            return preset_config(key), f"{name} (not downloaded yet: the shape of the {key} preset)"
        path = cached
    return read_config(path)[0], str(path)


def format_model_info(info: dict[str, Any]) -> str:
    """`model_info` as aligned lines for people."""
    cfg = info["config"]
    kv = f", {info['kv_heads']} key/value heads" if info["kv_heads"] != cfg["n_heads"] else ""
    rows = [
        ("family", cfg.get("architecture", "gpt2")),
        ("layers", f"{cfg['n_layers']}"),
        ("attention heads", f"{cfg['n_heads']} (head size {info['head_dim']}){kv}"),
        ("embedding size", f"{cfg['emb_dim']}"),
        ("context length", f"{cfg['context_length']:,} tokens"),
    ]
    if "gelu" in cfg:
        rows.append(
            ("activation", "GELU, " + ("tanh approximation" if cfg["gelu"] == "tanh" else "exact (erf)"))
        )
    rows += [
        ("vocabulary", f"{cfg['vocab_size']:,} tokens"),
        ("output head", _head(cfg)),
        ("parameters", _count(info["parameters"])),
    ]
    tied = cfg["tie_weights"] and not cfg["n_classes"]
    if tied:
        rows.append(("without tying", _count(info["parameters_untied"]) + ", the head counted separately"))
    elif not cfg["n_classes"]:
        rows.append(
            ("with tying", _count(info["parameters_tied"]) + ", if the head shared the embedding matrix")
        )
    rows += [
        ("size", f"{info['bytes_fp32'] / 1e6:,.1f} MB at fp32, {info['bytes_bf16'] / 1e6:,.1f} MB at bf16"),
        (
            "forward FLOPs",
            f"{_human(info['flops_per_token'])} per token at context {cfg['context_length']:,} (2 per "
            "multiply-add)",
        ),
        ("KV cache", _kv_cache(info)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([info["source"], *(f"  {k:<{width}}  {v}" for k, v in rows)])


def _head(cfg: dict[str, Any]) -> str:
    if cfg["n_classes"]:
        return f"classifier, {cfg['n_classes']} classes"
    tied = "tied to the token embedding" if cfg["tie_weights"] else "separate from the token embedding"
    return f"language model, {tied}"


def _kv_cache(info: dict[str, Any]) -> str:
    per_token, mha = info["kv_cache_bytes_per_token"], info["kv_cache_bytes_per_token_mha"]
    text = f"{per_token / 1024:,.1f} KB per token at bf16"
    if info["local_layers"]:
        text += (
            f" in the global layers, plus at most {info['local_bytes_max'] / 1e6:,.1f} MB for the "
            f"{info['local_layers']} local layers (window {info['local_window']:,})"
        )
    if mha != per_token:
        text += f"; {mha / 1024:,.1f} KB with a key/value head per query head"
    return text


def _human(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _count(n: int) -> str:
    return f"{n:,} ({_human(n)})"
