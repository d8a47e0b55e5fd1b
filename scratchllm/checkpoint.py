"""Model directories: the one checkpoint format.

A model directory holds everything needed to rebuild a model, and nothing executable:

    config.json        {"format": "scratchllm-model", "version": 1,
                        "model": {GPTConfig fields}, "extra": {task-specific, e.g. class labels},
                        "lora": {rank, alpha, dropout, layers}: only when LoRA adapters are stored
                        "info": {parameters, dtype, writer: for people, never read back}}
    model.safetensors  the weights by parameter name; a tied head is stored once (as tok_emb.weight);
                       LoRA adapters unmerged as `<layer>.lora.A` / `.lora.B` (model/lora.py)
    tokenizer files    what `Tokenizer.save` writes (tokenizer_meta.json + the kind's own files)

Other files may sit beside these (the trainer keeps its state there); loading ignores them.
Loading never unpickles: weights come from safetensors only, and every mismatch between
config.json and the weights is an error that names the tensor and both shapes.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import __version__
from .device import pick_device
from .errors import ScratchLLMError
from .fileio import CONFIG_FILE, atomic_dir, atomic_write_json
from .model.gpt import GPTConfig, GPTModel, count_parameters
from .model.lora import apply_lora_config, lora_config
from .model.quantize import check_quantize, is_quantized, quantize_model
from .text.tokenizer import META_FILE, Tokenizer, load_tokenizer

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

    model: GPTModel
    tokenizer: Tokenizer | None
    config: GPTConfig
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


# ----------------------------------------------------------------------------------------------
# Saving


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
        f"cannot write the {what} {path} ({_first_line(error)}; is the disk full or read-only?); {left}"
    )


def write_weights(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """`tensors` as a safetensors file; a failed write (a full disk, an I/O error) is raised as the
    OSError it is, which safetensors reports as a SafetensorError."""
    import errno

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    try:
        save_file(dict(tensors), str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        text = str(e)
        if "I/O error" not in text:
            raise
        code = re.search(r"\(os error (\d+)\)", text)
        number = int(code.group(1)) if code else errno.EIO
        raise OSError(number, os.strerror(number), path.name) from e


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
    if not isinstance(model, GPTModel):
        raise TypeError(f"save_model expects a GPTModel, got {type(model).__name__}")
    if is_quantized(model):
        raise ScratchLLMError(
            "a quantized model cannot be saved (int4 is for inference); save the model before quantize_model"
        )
    cfg = model.cfg
    tensors = model_tensors(model)
    lora = lora_config(model)  # unmerged adapters are saved as they are, so training can resume
    # Refuse now what load_model would refuse later: the weights must fit a GPTModel built from cfg.
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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside `torch.compile` and DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as stored on disk: CPU, contiguous, and a tensor shared by several names
    (the tied head) only under its first name."""
    aliases = _aliases(model)
    return {
        name: t.detach().cpu().contiguous() for name, t in model.state_dict().items() if name not in aliases
    }


# ----------------------------------------------------------------------------------------------
# Loading


def load_model(
    spec: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
) -> LoadedModel:
    """Load a model directory, or a hub name (`gpt2`, `gpt2-medium`, `124M`, ...: converted once
    into the cache, see hub.py). `dtype` None keeps the stored precision. `quantize` "int4":
    quantize the linear layers for inference on a CPU (model/quantize.py)."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    if quantize:  # before the (slow) load
        check_quantize(quantize, dev)
    directory = resolve_model(spec)
    cfg, extra = read_config(directory)
    weights = directory / WEIGHTS_FILE
    target_dtype = _parse_dtype(dtype)

    model = meta_model(cfg, read_lora_config(directory), source=str(directory / CONFIG_FILE))
    tensors = read_weights(weights, model, device=dev)
    common = _common_dtype(tensors, weights)  # also refuses integer tensors, whatever `dtype` says
    target_dtype = target_dtype or common
    if target_dtype is not None:
        narrower = target_dtype == torch.float16
        for k, v in tensors.items():
            tensors[k] = v.to(target_dtype)
            if narrower and v.dtype != torch.float16:  # fp32 and bf16 reach beyond fp16's 65504
                check_finite(k, tensors[k], weights, cast="float16")
    load_state_dict_strict(model, tensors, source=str(weights), assign=True)
    model.eval()
    if quantize:
        from .model.lora import merge_lora

        merge_lora(model)  # for inference, the adapters fold into the weights that are quantized
        quantize_model(model, quantize)

    tokenizer = load_tokenizer(directory) if (directory / META_FILE).exists() else None
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, extra=extra, path=directory)


def _common_dtype(tensors: Mapping[str, torch.Tensor], source: Path) -> torch.dtype | None:
    """None when the weights share one floating-point dtype; for a file that mixes several (edited by
    hand, or merged from two saves) the one most of the numbers have, which the rest are cast to:
    a forward pass cannot mix them. Integer tensors are no model's weights: an error."""
    counts: dict[torch.dtype, int] = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ScratchLLMError(
                f"{source}: tensor {name!r} holds {str(t.dtype).removeprefix('torch.')} numbers, not floating "
                "point; the file is not a model's weights, save the model again"
            )
        counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if len(counts) > 1 else None


def resolve_model(spec: str | os.PathLike) -> Path:
    """A model directory for `spec`: an existing directory as is, a hub name through hub.py
    (the cached conversion, or a download on first use)."""
    check_model_spec(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    from . import hub

    return hub.fetch_model(str(spec))


def check_model_spec(spec: str | os.PathLike) -> None:
    """A one-line error unless `spec` is a directory or a hub name (nothing is read or fetched):
    commands check their model this way before slower work such as loading or downloading data."""
    path = Path(spec).expanduser()
    from . import hub

    if path.is_dir() or hub.is_hub_name(str(spec)):
        return
    if path.exists():
        raise ScratchLLMError(
            f"{path} is a file; a model is a directory with {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    raise ScratchLLMError(
        f"model {str(spec)!r} not found: give a model directory (with {CONFIG_FILE} and {WEIGHTS_FILE}) "
        f"or one of {', '.join(hub.HUB_NAMES)}"
    )


def read_config(directory: str | os.PathLike) -> tuple[GPTConfig, dict[str, Any]]:
    """The model config and the `extra` settings of a model directory, without touching the weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ScratchLLMError(f"model directory {directory} does not exist")
    path = directory / CONFIG_FILE
    if not path.is_file():
        hint = ""
        if (directory / "model.safetensors").exists() or (directory / "pytorch_model.bin").exists():
            hint = "; if it is a Hugging Face GPT-2 directory, convert it with `scratchllm download gpt2 --from DIR`"
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
            hint = "; it is a Hugging Face GPT-2 config: convert the directory with `scratchllm download gpt2 --from DIR`"
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
        cfg = GPTConfig.from_dict(model_cfg)
    except ScratchLLMError as e:
        raise ScratchLLMError(f"{path}: {e}") from e
    except TypeError as e:  # a wrong value type that GPTConfig's checks trip over
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


def read_weights(
    path: str | os.PathLike, model: nn.Module | None = None, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file. With `model`, names and shapes are checked against it
    from the file's header first, before any data is read."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ScratchLLMError(f"{path} is missing: the model directory has no weights; save the model again")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            names = list(f.keys())
            if model is not None:
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in names}
                check_state_dict(model, shapes, source=str(path))
            tensors = {}
            for name in names:
                tensors[name] = f.get_tensor(name)
                check_finite(name, tensors[name], path)
            return tensors
    except SafetensorError as e:
        raise ScratchLLMError(
            f"{path}: not a readable safetensors file, probably truncated or corrupt ({e}); "
            "save or download the model again"
        ) from e


def check_finite(name: str, tensor: torch.Tensor, source: str | os.PathLike, cast: str = "") -> None:
    """A one-line error naming the tensor when it holds NaN or infinity: such weights load, but
    every output would be NaN (blank generations, a loss of nan). `cast`: the dtype the weights were
    just converted to, whose range they overflowed."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return
    bad = tensor.isnan().sum().item(), tensor.isinf().sum().item()
    found = " and ".join(f"{n:,} {what}" for n, what in zip(bad, ("NaN", "infinite")) if n)
    if cast:
        raise ScratchLLMError(
            f"{source}: tensor {name!r} overflows {cast}: {found} of its {tensor.numel():,} values after the "
            "conversion; load the model in fp32 or bf16 (e.g. --dtype fp32)"
        )
    raise ScratchLLMError(
        f"{source}: tensor {name!r} is not finite: {found} of its {tensor.numel():,} values, so every output "
        "would be NaN; the model is broken (a diverged training run?): use an earlier checkpoint, or save or "
        "download the model again"
    )


def load_state_dict_strict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "state dict",
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    assign: bool = False,
) -> None:
    """`model.load_state_dict` with errors a user can act on, and tied weights kept tied.

    Every tensor of `model` must be in `state_dict` with its exact shape, and nothing else may be
    there, except names matching the glob patterns `allow_missing` (left as they are: a new
    classifier head, LoRA adapters) and `allow_unexpected` (skipped). A tensor shared by several
    names (the tied head) is expected once, under its first name (a second copy that equals the
    first is accepted, as in another tied model's state dict). `assign=True` makes the given
    tensors the parameters (no copy; for models built on the meta device), else they are copied in.
    """
    aliases = _aliases(model)
    # another tied model's state dict lists the shared tensor under both names: once is enough
    state_dict = {
        k: v
        for k, v in state_dict.items()
        if not (k in aliases and aliases[k] in state_dict and torch.equal(v, state_dict[aliases[k]]))
    }
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    check_state_dict(
        model, shapes, source=source, allow_missing=allow_missing, allow_unexpected=allow_unexpected
    )
    expected = set(model.state_dict()) - set(aliases)
    wanted = {k: v for k, v in state_dict.items() if k in expected}
    model.load_state_dict(wanted, strict=False, assign=assign)
    # assign replaced the first name's parameter; point its aliases at the new one
    for alias, name in aliases.items():
        _set_tensor(
            model, alias, model.get_parameter(name) if _is_param(model, name) else model.get_buffer(name)
        )
    leftover = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if leftover:
        raise ScratchLLMError(f"{source}: no weights for {_names(leftover)}: they are still uninitialized")


def check_state_dict(
    model: nn.Module,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    source: str = "state dict",
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> None:
    """Raise ScratchLLMError unless `shapes` (name -> shape) fits `model` exactly (see
    `load_state_dict_strict`): names each missing, unexpected or misshapen tensor."""
    allow_missing, allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)
    aliases = _aliases(model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in aliases}
    problems = []
    missing = [k for k in expected if k not in shapes and not _matches(k, allow_missing)]
    if missing:
        problems.append(
            f"missing {_plural(len(missing), 'tensor')} "
            + ", ".join(f"{k} (shape {_shape(expected[k])})" for k in missing[:5])
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    unexpected = [k for k in shapes if k not in expected and not _matches(k, allow_unexpected)]
    tied = [k for k in unexpected if k in aliases]
    if tied:
        problems.append(
            f"unexpected {_names(tied)}: the model ties it to {aliases[tied[0]]} (tie_weights=true), so it "
            "is stored once; set tie_weights to false in the config if the weights are separate"
        )
    other = [k for k in unexpected if k not in aliases]
    if other:
        problems.append(f"unexpected {_plural(len(other), 'tensor')} {_names(other)}")
    wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    if wrong:
        problems.append(
            "; ".join(
                f"tensor {k} has shape {_shape(shapes[k])} but the model config needs {_shape(expected[k])}"
                for k in wrong[:5]
            )
            + (f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else "")
        )
    if problems:
        raise ScratchLLMError(f"{source}: the weights do not match the model config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# Helpers


def meta_model(
    cfg: GPTConfig, lora: Mapping[str, Any] | None = None, source: str = "the LoRA settings"
) -> GPTModel:
    """A GPTModel with shapes but no storage: instant even for gpt2-xl, and loading assigns the
    file's tensors instead of first filling random ones. `lora`: a config.json `lora` section whose
    adapters are put in place (see model/lora.py), named `source` in errors."""
    with torch.device("meta"):
        model = GPTModel(cfg)
        if lora:
            apply_lora_config(model, lora, source=source)
    return model


def _aliases(model: nn.Module) -> dict[str, str]:
    """Second and later names of a tensor shared by several names -> its first name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


def _is_param(model: nn.Module, name: str) -> bool:
    module, _, leaf = name.rpartition(".")
    return leaf in model.get_submodule(module)._parameters


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module), leaf, tensor)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _shape(shape: Iterable[int]) -> str:
    return str(tuple(int(s) for s in shape))


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _plural(n: int, word: str) -> str:
    return word if n == 1 else f"{word}s"


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ScratchLLMError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ----------------------------------------------------------------------------------------------
# `scratchllm info`


def model_info(preset: str | None = None, model: str | os.PathLike | None = None) -> dict[str, Any]:
    """The shape and cost of a preset or a model (directory or hub name) from its config alone:
    nothing is downloaded and no weights are read. A hub name that is not cached yet is described
    by its preset."""
    from .model.gpt import flops_per_token, preset_config

    if (preset is None) == (model is None):
        raise ScratchLLMError("give either a preset or a model")
    if preset is not None:
        cfg, source = preset_config(preset), f"preset {preset}"
    else:
        from . import hub

        name = str(model)
        path: Path | None = Path(model).expanduser()
        if not path.is_dir():
            if not hub.is_hub_name(name):
                resolve_model(model)  # raises the right not-found error
            path = hub.cached_model(name)
            if path is None:
                key = hub.canonical_name(name)
                cfg, source = (
                    preset_config(key),
                    f"{name} (not downloaded yet: the shape of the {key} preset)",
                )
        if path is not None:
            cfg, _ = read_config(path)
            source = str(path)
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


def format_model_info(info: dict[str, Any]) -> str:
    cfg = info["config"]
    tied = cfg["tie_weights"] and not cfg["n_classes"]

    def human(n: float) -> str:
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"

    def count(n: int) -> str:
        return f"{n:,} ({human(n)})"

    if cfg["n_classes"]:
        head = f"classifier, {cfg['n_classes']} classes"
    else:
        head = "language model, " + (
            "tied to the token embedding" if tied else "separate from the token embedding"
        )
    rows = [
        ("layers", f"{cfg['n_layers']}"),
        ("attention heads", f"{cfg['n_heads']} (head size {info['head_dim']})"),
        ("embedding size", f"{cfg['emb_dim']}"),
        ("context length", f"{cfg['context_length']:,} tokens"),
        ("activation", "GELU, " + ("tanh approximation" if cfg["gelu"] == "tanh" else "exact (erf)")),
        ("vocabulary", f"{cfg['vocab_size']:,} tokens"),
        ("output head", head),
        ("parameters", count(info["parameters"])),
    ]
    if not cfg["n_classes"]:
        if tied:
            rows.append(("without tying", count(info["parameters_untied"]) + ", the head counted separately"))
        else:
            rows.append(
                ("with tying", count(info["parameters_tied"]) + ", if the head shared the embedding matrix")
            )
    rows += [
        ("size", f"{info['bytes_fp32'] / 1e6:,.1f} MB at fp32, {info['bytes_bf16'] / 1e6:,.1f} MB at bf16"),
        (
            "forward FLOPs",
            f"{human(info['flops_per_token'])} per token at context {cfg['context_length']:,} (2 per multiply-add)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([info["source"], *(f"  {k:<{width}}  {v}" for k, v in rows)])
