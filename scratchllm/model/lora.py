"""LoRA: low-rank adaptation, as in the book's appendix E.

A frozen linear layer `y = x W^T + b` gets a trainable detour through a rank-r bottleneck:

    y = x W^T + b + alpha * (x A) B          A: (in, r), B: (r, out)

`A` starts random and `B` at zero, so a freshly adapted model computes exactly what it did before,
and training moves only the r * (in + out) numbers of A and B per layer. `merge_lora` folds the
detour into the weight (`W += alpha * (A B)^T`), leaving a plain model that runs as fast as the
original. The scale is the book's `alpha` (the LoRA paper scales by alpha / r instead: its alpha 16 at
rank 8 is alpha 2 here).

`LinearWithLoRA` subclasses `nn.Linear` and keeps its `weight` and `bias`, so the wrapped model's
state dict keeps every original name and only adds `<layer>.lora.A` / `<layer>.lora.B`; a model
directory stores the adapters beside the weights and a `lora` section in config.json says where
they go (see checkpoint/). Training stages add adapters through `train.setup.setup_model`.

    n_added = apply_lora(model, rank=8, alpha=16)       # attention + MLP projections of every block
    mark_only_lora_trainable(model, also=("out_head",)) # freeze the rest (a new head stays trainable)
    ... train ...
    merge_lora(model)                                   # back to plain nn.Linear layers
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ScratchLLMError

#: The linear layers of a transformer block: attention's, then the MLP's in GPT-2 (gpt.py) and in the
#: other families (transformer.py; a mixture's experts too, its router not).
DEFAULT_TARGETS = ("qkv", "out_proj", "ff.layers.0", "ff.layers.2", "gate", "up", "down")


class LoRALayer(nn.Module):
    """The low-rank detour: `alpha * (x @ A @ B)` (the book's `LoRALayer`)."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ScratchLLMError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ScratchLLMError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        # like nn.Linear's own initialization, so x A has the scale of a normal layer's output
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))  # zero: adapting changes nothing yet
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * (self.dropout(x) @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """What the detour adds to the layer's weight, in nn.Linear's (out, in) layout."""
        return self.alpha * (self.A @ self.B).T

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


class LinearWithLoRA(nn.Linear):
    """An `nn.Linear` plus a `LoRALayer` (the book's `LinearWithLoRA`), sharing the original
    layer's weight and bias tensors so parameter names do not change."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        # build on the meta device (no memory), then take over the original tensors
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        # built beside the layer it adapts (on the meta device while a model directory loads)
        with torch.device(linear.weight.device):
            self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha, dropout)
        self.lora.to(dtype=linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora(x).to(x.dtype)

    def merged_linear(self) -> nn.Linear:
        """A plain `nn.Linear` computing the same function (weight + the detour folded in)."""
        with torch.device("meta"):
            out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            merged = self.weight + self.lora.delta_weight().to(self.weight.dtype)
        out.weight = nn.Parameter(merged, requires_grad=self.weight.requires_grad)
        out.bias = self.bias
        return out


def _matches(name: str, targets: Iterable[str]) -> bool:
    """`name` is a target, or ends with `.target` (so `qkv` finds every block's `att.qkv`)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: Iterable[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
) -> int:
    """Wrap every `nn.Linear` of `model` whose name matches `targets` (a full module name, or its
    ending after a dot: `qkv`, `ff.layers.0`, `trf_blocks.11.att.out_proj`, `out_head`) in a
    `LinearWithLoRA`. Returns the number of parameters added (r * (in + out) per layer); they are
    trainable, and nothing else's `requires_grad` changes (see `mark_only_lora_trainable`)."""
    targets = tuple(targets)
    if not targets:
        raise ScratchLLMError("LoRA needs at least one target layer (e.g. qkv, out_proj, ff.layers.0)")
    shared = _shared_tensor_ids(model)
    chosen: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) and _matches(name, targets)):
            continue
        if isinstance(module, LinearWithLoRA):
            raise ScratchLLMError(f"LoRA: {name} already has an adapter; apply LoRA once (or merge first)")
        if id(module.weight) in shared:
            raise ScratchLLMError(
                f"LoRA: {name}'s weight is tied to another layer (the token embedding); merging would change "
                "both, so leave it out of the targets"
            )
        chosen.append((name, module))
    if not chosen:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ScratchLLMError(
            f"LoRA targets {list(targets)} match no linear layer; layer names look like "
            f"{', '.join(linears[:6])}{' ...' if len(linears) > 6 else ''}"
        )
    added = 0
    for name, module in chosen:
        wrapped = LinearWithLoRA(module, rank, alpha, dropout)
        _set_module(model, name, wrapped)
        added += sum(p.numel() for p in wrapped.lora.parameters())
    return added


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its layer's weight and put plain `nn.Linear` layers back; the model
    then computes the same function without the detour. Returns the number of layers merged."""
    names = [name for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)]
    for name in names:
        _set_module(model, name, model.get_submodule(name).merged_linear())
    return len(names)


def lora_layers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    """The adapted layers of `model`, by full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)}


def lora_config(model: nn.Module) -> dict[str, Any] | None:
    """Where the adapters sit and their shape, as saved in a model directory's config.json
    (`{"rank", "alpha", "dropout", "layers": [full module names]}`), or None without LoRA."""
    layers = lora_layers(model)
    if not layers:
        return None
    shapes = {(m.lora.rank, m.lora.alpha, m.lora.dropout.p) for m in layers.values()}
    if len(shapes) > 1:
        raise ScratchLLMError(
            f"LoRA layers with different rank/alpha/dropout {sorted(shapes)} cannot be saved; use one setting"
        )
    rank, alpha, dropout = shapes.pop()
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "layers": list(layers)}


def apply_lora_config(model: nn.Module, config: Mapping[str, Any], source: str = "config") -> int:
    """Put adapters back where `lora_config` found them (their A and B are then loaded from the weights)."""
    try:
        rank, alpha = int(config["rank"]), float(config["alpha"])
        dropout = float(config.get("dropout", 0.0))
        layers = [str(n) for n in config["layers"]]
        if rank < 1:
            raise ValueError(f"rank {rank}")
    except (KeyError, TypeError, ValueError) as e:
        raise ScratchLLMError(
            f'{source}: the "lora" section needs rank, alpha and layers ({e}); save the model again'
        ) from e
    modules = dict(model.named_modules())
    missing = [n for n in layers if not isinstance(modules.get(n), nn.Linear)]
    if missing:
        raise ScratchLLMError(f"{source}: LoRA layers {missing[:5]} are not linear layers of this model")
    added = 0
    for name in layers:  # exact names only: a suffix match could pick more layers than were saved
        wrapped = LinearWithLoRA(modules[name], rank, alpha, dropout)
        _set_module(model, name, wrapped)
        added += sum(p.numel() for p in wrapped.lora.parameters())
    return added


def mark_only_lora_trainable(model: nn.Module, also: Iterable[str] = ()) -> None:
    """Freeze every parameter except the adapters' A and B and the modules named in `also`
    (e.g. `out_head`, a new classifier head that starts random and must learn)."""
    also = tuple(also)
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        p.requires_grad = ".lora." in f".{name}" or _matches(module, also)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors (`<layer>.lora.A`, `<layer>.lora.B`): what to share of a LoRA finetune."""
    return {k: v for k, v in model.state_dict().items() if ".lora." in f".{k}"}


def count_trainable(model: nn.Module) -> int:
    """How many parameters of `model` learn (`requires_grad`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _shared_tensor_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


__all__ = [
    "DEFAULT_TARGETS",
    "LinearWithLoRA",
    "LoRALayer",
    "apply_lora",
    "apply_lora_config",
    "count_trainable",
    "lora_config",
    "lora_layers",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "merge_lora",
]
