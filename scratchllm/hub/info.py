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
from ..model.gpt import PRESETS, count_parameters
from ..model.registry import flops_per_token, preset_config
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
        None, f"a model preset: {', '.join(PRESETS)}", "model", exclusive="which", required=True
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
    infos = {name: model_info(preset=name) for name in PRESETS}
    if as_json:
        print(json.dumps(infos, indent=2))
        return
    print(
        f"{'preset':<12} {'layers':>6} {'heads':>5} {'dims':>5} {'context':>7} {'parameters':>11} "
        f"{'fp32 MB':>8}"
    )
    for name, info in infos.items():
        c = info["config"]
        print(
            f"{name:<12} {c['n_layers']:>6} {c['n_heads']:>5} {c['emb_dim']:>5} {c['context_length']:>7} "
            f"{info['parameters'] / 1e6:>10.1f}M {info['bytes_fp32'] / 1e6:>8.1f}"
        )
    print("(GPT-2's vocabulary of 50257 and tied embeddings; a run's own vocabulary changes the count)")


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
    rows = [
        ("layers", f"{cfg['n_layers']}"),
        ("attention heads", f"{cfg['n_heads']} (head size {info['head_dim']})"),
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
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([info["source"], *(f"  {k:<{width}}  {v}" for k, v in rows)])


def _head(cfg: dict[str, Any]) -> str:
    if cfg["n_classes"]:
        return f"classifier, {cfg['n_classes']} classes"
    tied = "tied to the token embedding" if cfg["tie_weights"] else "separate from the token embedding"
    return f"language model, {tied}"


def _human(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _count(n: int) -> str:
    return f"{n:,} ({_human(n)})"
