"""`TrainerConfig`: the settings of the training loop itself, shared by every training command (tasks
add their own data and model settings)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from ..config import reject_unused_flags, setting
from ..errors import ScratchLLMError
from .optim import OPTIMIZERS
from .schedule import SCHEDULES


@dataclass
class TrainerConfig:
    """Settings of the loop itself (tasks add their own data and model settings)."""

    out_dir: str = setting(
        "runs/run",
        "directory for checkpoints, metrics, the loss plot and the final model",
        "run",
        path=True,
    )
    batch_size: int = setting(16, "sequences per micro-batch and process", "train")
    grad_accum: int = setting(
        1, "micro-batches per optimizer step (global batch = batch_size x grad_accum x processes)", "train"
    )
    max_steps: int = setting(1000, "optimizer steps (0: the task decides, e.g. from epochs)", "train")
    max_tokens: int = setting(0, "stop after this many training tokens (0: no limit)", "train")
    max_minutes: float = setting(
        0.0,
        "stop after this many minutes of training (0: no limit); the lr decay then ends by this time, "
        "or at max_steps if that comes first",
        "train",
    )
    lr: float = setting(6e-4, "peak learning rate, reached after warmup", "train")
    min_lr: float = setting(6e-5, "learning rate at the end of the decay", "train")
    warmup_steps: int = setting(100, "steps of linear warmup from 0 to lr", "train")
    schedule: str = setting("cosine", "decay after warmup: cosine, linear or constant", "train")
    optimizer: str = setting(
        "adamw",
        "adamw, or muon: orthogonalized momentum for the transformer blocks' matrices, AdamW for the rest "
        "(same lr and weight decay; train/muon.py)",
        "train",
    )
    weight_decay: float = setting(0.1, "decoupled weight decay, applied to weight matrices only", "train")
    beta1: float = setting(0.9, "AdamW beta1", "train")
    beta2: float = setting(0.95, "AdamW beta2", "train")
    muon_momentum: float = setting(0.95, "Muon's momentum (with --optimizer muon)", "train")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: off)", "train")
    precision: str = setting(
        "auto", "auto (bf16 where the hardware runs it fast), bf16, fp16 (CUDA) or fp32", "system"
    )
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps", "system")
    compile: bool = setting(False, "torch.compile the model for training", "system")
    fsdp: bool = setting(
        False,
        "under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP",
        "system",
    )
    seed: int = setting(1337, "seed for initialization, data order and dropout", "system")
    eval_every: int = setting(100, "evaluate every N steps (0: only at the end)", "eval")
    eval_batches: int = setting(
        20, "validation batches per evaluation (0: the whole validation split)", "eval"
    )
    log_every: int = setting(10, "write a train-loss record every N steps", "eval")
    checkpoint_every: int = setting(
        0, "save a resumable checkpoint every N steps (0: only at the end)", "run"
    )
    keep_last: int = setting(2, "resumable checkpoints to keep (the best model is kept apart)", "run")
    overwrite: bool = setting(
        False, "start over in an out_dir that holds an earlier run's checkpoints (deleting them)", "run"
    )
    progress: bool = setting(True, "show a progress bar", "run")

    def check_fsdp(self, world_size: int) -> None:
        """`fsdp` needs several processes, and no Muon (Newton-Schulz needs whole matrices, FSDP holds
        shards)."""
        if not self.fsdp:
            return
        if self.optimizer == "muon":
            raise ScratchLLMError("--optimizer muon does not work with --fsdp; use DDP (leave out --fsdp)")
        if world_size < 2:
            raise ScratchLLMError(
                "--fsdp shards a model over processes: start the run with torchrun --nproc_per_node=N"
            )

    def validate(self) -> None:
        """Raise `ScratchLLMError` naming the first setting of the wrong type or out of range."""
        self.check_fsdp(int(os.environ.get("WORLD_SIZE", "1")))  # torchrun's; before any data work

        def bad(msg: str) -> ScratchLLMError:
            return ScratchLLMError(f"training settings: {msg}")

        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_steps",
            "max_tokens",
            "warmup_steps",
            "eval_every",
            "eval_batches",
            "log_every",
            "checkpoint_every",
        ):
            if getattr(self, name) < 0:
                raise bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_last < 1:
            raise bad(f"keep_last must be >= 1, got {self.keep_last}")
        for name in ("lr", "min_lr", "max_minutes", "weight_decay", "grad_clip", "beta1", "beta2"):
            if not math.isfinite(getattr(self, name)):
                raise bad(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise bad(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.schedule not in SCHEDULES:
            raise bad(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise bad(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (math.isfinite(self.muon_momentum) and 0 <= self.muon_momentum < 1):
            raise bad(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        for name in ("max_minutes", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise bad(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")

    def check_flags(self, flags: dict[str, Any]) -> None:
        """Command-line `flags` that these settings would silently ignore are a one-line error."""
        if self.optimizer != "muon":
            reject_unused_flags(flags, "muon_", "--optimizer muon")


__all__ = ["TrainerConfig"]
