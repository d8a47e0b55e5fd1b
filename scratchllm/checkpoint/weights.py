"""Weights files and state dicts: safetensors in and out, and loading a state dict strictly.

Every mismatch between a model and the tensors offered to it is an error that names the tensor
and both shapes; a tensor shared by several names (a tied head) is stored and expected once.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from ..errors import ScratchLLMError


def write_weights(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """`tensors` as a safetensors file; a failed write (a full disk, an I/O error) is raised as the
    OSError it is, which safetensors reports as a SafetensorError."""
    path = Path(path)
    try:
        safetensors.torch.save_file(dict(tensors), str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        text = str(e)
        if "I/O error" not in text:
            raise
        code = re.search(r"\(os error (\d+)\)", text)
        number = int(code.group(1)) if code else errno.EIO
        raise OSError(number, os.strerror(number), path.name) from e


def read_weights(
    path: str | os.PathLike, model: nn.Module | None = None, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file. With `model`, names and shapes are checked against it
    from the file's header first, before any data is read."""
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
    if not tensor.is_floating_point():
        return
    # a sum is finite when every value is (or overflowed: then the exact check below): unlike
    # isfinite, it allocates no tensor-sized temporaries, which the heap kept (up to 0.5x the weights)
    if bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all()):
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


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _plural(n: int, word: str) -> str:
    return word if n == 1 else f"{word}s"
