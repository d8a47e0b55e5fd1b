"""Model directories: write one (`save_model`), read one back (`load_model`, `read_config`).

The format is described in checkpoint/__init__.py; weights files and strict state-dict loading are
in weights.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import __version__
from ..device import pick_device
from ..errors import ScratchLLMError, first_line
from ..fileio import CONFIG_FILE, atomic_dir, atomic_write_json
from ..model.gpt import count_parameters
from ..model.lora import apply_lora_config, lora_config, merge_lora
from ..model.quantize import check_quantize, is_quantized, quantize_model
from ..model.registry import architecture_of, build_model, config_from_dict
from ..text.registry import load_tokenizer
from ..text.tokenizer import META_FILE, Tokenizer
from .weights import (
    check_finite,
    check_state_dict,
    load_state_dict_strict,
    model_tensors,
    read_weights,
    unwrap_model,
    write_weights,
)

FORMAT = "scratchllm-model"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
# Top-level keys of config.json. A new section (say, LoRA adapters) is added here with its loader.
CONFIG_KEYS = ("format", "version", "model", "extra", "info", "lora")

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass
class LoadedModel:
    """What `load_model` returns: the model in eval mode and everything saved with it."""

    model: nn.Module
    tokenizer: Tokenizer | None
    config: Any  # the model's config (GPTConfig for GPT-2)
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def save_model(
    directory: str | os.PathLike,
    model: nn.Module,
    tokenizer: Tokenizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (+ tokenizer, + `extra`) as a model directory, atomically: readers see either
    the old complete directory or the new one. Returns the directory."""
    if isinstance(directory, nn.Module):
        raise ScratchLLMError("save_model takes the directory first: save_model(directory, model, tokenizer)")
    directory = Path(directory)
    existed = (directory / CONFIG_FILE).is_file()
    try:
        with atomic_dir(directory, marker=CONFIG_FILE, what="model directory") as tmp:
            write_model_files(tmp, model, tokenizer, extra)
    except OSError as e:
        raise write_error(directory, "model directory", e, existed) from e
    return directory


def write_error(path: Path, what: str, error: OSError, existed: bool) -> ScratchLLMError:
    """The one-line error for an atomic write of the `what` at `path` that failed (a full or read-only
    disk): what the write left is the old complete output (`existed`) or nothing."""
    left = f"the {what} there is unchanged" if existed else "nothing was written"
    return ScratchLLMError(
        f"cannot write the {what} {path} ({first_line(error)}; is the disk full or read-only?); {left}"
    )


def write_model_files(
    directory: str | os.PathLike,
    model: nn.Module,
    tokenizer: Tokenizer | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """The files of a model directory, written into an existing directory: for callers that add
    their own files (the trainer's state) inside one `fileio.atomic_dir`. A failed write (a full
    disk) raises OSError."""
    model = unwrap_model(model)
    try:
        architecture_of(model)
    except TypeError as e:
        raise TypeError(f"save_model: {e}") from e
    if is_quantized(model):
        raise ScratchLLMError(
            "a quantized model cannot be saved (it is for inference); save the model before quantize_model"
        )
    cfg = model.cfg
    tensors = model_tensors(model)
    lora = lora_config(model)  # unmerged adapters are saved as they are, so training can resume
    # Refuse now what load_model would refuse later: the weights must fit a model built from cfg.
    check_state_dict(
        meta_model(cfg, lora), {k: tuple(v.shape) for k, v in tensors.items()}, source="the model to save"
    )
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ScratchLLMError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {cfg.vocab_size}: "
            "its ids would fall outside the embedding; use a matching tokenizer or a larger vocab_size"
        )
    extra = dict(extra or {})
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise ScratchLLMError(
            f"model extra settings must be JSON values (str, number, list, dict): {e}"
        ) from e

    directory = Path(directory)
    if tokenizer is not None:
        tokenizer.save(directory)  # first, so its files can never overwrite ours
    write_weights(tensors, directory / WEIGHTS_FILE)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "model": cfg.to_dict(),
        "extra": extra,
        "info": {
            "parameters": count_parameters(model),
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "tokenizer": tokenizer.name if tokenizer is not None else None,
            "written_by": f"scratchllm {__version__}",
        },
    }
    if lora is not None:
        doc["lora"] = lora
    atomic_write_json(directory / CONFIG_FILE, doc)


def load_model(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
) -> LoadedModel:
    """Load a model directory (`hub.load_model` also takes hub names such as `gpt2`). `dtype` None
    keeps the stored precision. `quantize` "int4": quantize the linear layers for inference on a
    CPU (model/quantize.py)."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    if quantize:  # before the (slow) load
        check_quantize(quantize, dev)
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise missing_model_error(directory)
    cfg, extra = read_config(directory)
    weights = directory / WEIGHTS_FILE
    target_dtype = _parse_dtype(dtype)

    model = meta_model(cfg, read_lora_config(directory), source=str(directory / CONFIG_FILE))
    tensors = read_weights(weights, model, device=dev)
    common = _common_dtype(tensors, weights)  # also refuses integer tensors, whatever `dtype` says
    _cast(tensors, target_dtype or common, weights)
    load_state_dict_strict(model, tensors, source=str(weights), assign=True)
    model.eval()
    if quantize:
        merge_lora(model)  # for inference, the adapters fold into the weights that are quantized
        quantize_model(model, quantize)

    tokenizer = load_tokenizer(directory) if (directory / META_FILE).exists() else None
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, extra=extra, path=directory)


def missing_model_error(spec: str | os.PathLike, names: Sequence[str] = ()) -> ScratchLLMError:
    """The error for a model `spec` that is no directory: a file, or nothing; `names`: the other
    names a model may have (hub names), listed in the advice."""
    path = Path(spec).expanduser()
    if path.exists():
        return ScratchLLMError(
            f"{path} is a file; a model is a directory with {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    others = f" or one of {', '.join(names)}" if names else ""
    return ScratchLLMError(
        f"model {str(spec)!r} not found: give a model directory (with {CONFIG_FILE} and "
        f"{WEIGHTS_FILE}){others}"
    )


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, source: Path) -> None:
    """Convert every tensor to `dtype` in place (None: leave them); an overflow of fp16 is an error."""
    if dtype is None:
        return
    narrower = dtype == torch.float16
    for k, v in tensors.items():
        tensors[k] = v.to(dtype)
        if narrower and v.dtype != torch.float16:  # fp32 and bf16 reach beyond fp16's 65504
            check_finite(k, tensors[k], source, cast="float16")


def _common_dtype(tensors: Mapping[str, torch.Tensor], source: Path) -> torch.dtype | None:
    """None when the weights share one floating-point dtype; for a file that mixes several (edited by
    hand, or merged from two saves) the one most of the numbers have, which the rest are cast to:
    a forward pass cannot mix them. Integer tensors are no model's weights: an error."""
    counts: dict[torch.dtype, int] = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ScratchLLMError(
                f"{source}: tensor {name!r} holds {str(t.dtype).removeprefix('torch.')} numbers, not "
                "floating point; the file is not a model's weights, save the model again"
            )
        counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if len(counts) > 1 else None


def read_config(directory: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """The model config and the `extra` settings of a model directory, without touching the weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ScratchLLMError(f"model directory {directory} does not exist")
    path = directory / CONFIG_FILE
    if not path.is_file():
        hint = ""
        if (directory / "model.safetensors").exists() or (directory / "pytorch_model.bin").exists():
            hint = (
                "; if it is a Hugging Face GPT-2 directory, convert it with "
                "`scratchllm download gpt2 --from DIR`"
            )
        elif (directory / "model" / CONFIG_FILE).is_file():
            hint = f"; it looks like a training run: its final model is {directory / 'model'}"
        raise ScratchLLMError(f"{directory} is not a model directory: {CONFIG_FILE} is missing{hint}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScratchLLMError(
            f"{path}: not valid JSON ({e}); restore the file or save the model again"
        ) from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        hint = ""
        if isinstance(doc, dict) and doc.get("model_type") == "gpt2":
            hint = (
                "; it is a Hugging Face GPT-2 config: convert the directory with "
                "`scratchllm download gpt2 --from DIR`"
            )
        raise ScratchLLMError(f'{path}: not a scratchllm model config (expected "format": "{FORMAT}"){hint}')
    version = doc.get("version")
    if not isinstance(version, int) or version > VERSION or version < 1:
        raise ScratchLLMError(
            f"{path}: model format version {version!r} is not supported (this scratchllm reads version "
            f"{VERSION}); upgrade scratchllm"
        )
    unknown = sorted(set(doc) - set(CONFIG_KEYS))
    if unknown:
        raise ScratchLLMError(f"{path}: unknown keys {unknown}; valid keys are {list(CONFIG_KEYS)}")
    model_cfg = doc.get("model")
    if not isinstance(model_cfg, dict):
        raise ScratchLLMError(f'{path}: "model" must be an object of model settings')
    try:
        cfg = config_from_dict(model_cfg)
    except ScratchLLMError as e:
        raise ScratchLLMError(f"{path}: {e}") from e
    except TypeError as e:  # a wrong value type that the config's checks trip over
        raise ScratchLLMError(f"{path}: bad model settings ({e})") from e
    extra = doc.get("extra", {})
    if not isinstance(extra, dict):
        raise ScratchLLMError(f'{path}: "extra" must be an object')
    if not isinstance(doc.get("lora", {}), dict):
        raise ScratchLLMError(f'{path}: "lora" must be an object')
    return cfg, extra


def read_lora_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The `lora` section of a model directory's config.json (where its adapters go), or None."""
    path = Path(directory) / CONFIG_FILE
    try:
        lora = json.loads(path.read_text(encoding="utf-8")).get("lora")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None  # read_config reports a broken file
    return lora if isinstance(lora, dict) else None


def meta_model(
    cfg: Any, lora: Mapping[str, Any] | None = None, source: str = "the LoRA settings"
) -> nn.Module:
    """A model of `cfg`'s family with shapes but no storage: instant even for gpt2-xl, and loading
    assigns the file's tensors instead of first filling random ones. `lora`: a config.json `lora`
    section whose adapters are put in place (see model/lora.py), named `source` in errors."""
    with torch.device("meta"):
        model = build_model(cfg)
        if lora:
            apply_lora_config(model, lora, source=source)
    return model


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ScratchLLMError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
