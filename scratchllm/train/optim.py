"""The optimizer: AdamW with weight decay on matrices only, or Muon (train/muon.py) for the transformer
blocks' matrices with AdamW for the rest."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..errors import ScratchLLMError
from .muon import Muon, muon_param_groups

if TYPE_CHECKING:
    from .trainer_config import TrainerConfig

OPTIMIZERS = ("adamw", "muon")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear weights, embeddings) only: decaying biases and LayerNorm scales
    toward zero only hurts. Frozen parameters are left out."""
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) tensors come once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(
    model: nn.Module, cfg: TrainerConfig, device: torch.device, precision: str = "fp32"
) -> torch.optim.Optimizer:
    """AdamW, with the fused kernel where this torch has one for the device, else the foreach one;
    or `Muon` (train/muon.py) with AdamW inside it for what is not a transformer block's matrix.
    `precision` (resolved, not `auto`): fp32 keeps Muon's Newton-Schulz products in fp32 too."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ScratchLLMError("no trainable parameters: everything is frozen")
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if cfg.optimizer == "muon":
        try:
            groups = muon_param_groups(model, groups)
        except ValueError as e:
            raise ScratchLLMError(f"--optimizer muon: {e}; use --optimizer adamw") from None
        ns_dtype = torch.float32 if precision == "fp32" else None  # None: bf16 where the device is fast at it
        return Muon(groups, momentum=cfg.muon_momentum, ns_dtype=ns_dtype, **kwargs)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=device.type != "mps", **kwargs)
