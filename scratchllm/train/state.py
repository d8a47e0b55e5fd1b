"""Trainer checkpoints: what of a `Trainer` a resumable checkpoint holds (checkpoints/step-N/: a complete
model directory plus trainer_state.pt with the optimizer, step, tokens seen, RNG states and settings),
and how it is put back so that training continues exactly, or refused with a one-line reason."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from safetensors import SafetensorError

from ..checkpoint import (
    WEIGHTS_FILE,
    load_state_dict_strict,
    meta_model,
    read_config,
    read_weights,
    write_model_files,
)
from ..errors import ScratchLLMError, first_line
from ..fileio import CHECKPOINTS_DIR, STATE_FILE, atomic_dir
from .distributed import barrier, gather_objects
from .rundir import list_checkpoints, metrics_until, prune_checkpoints

if TYPE_CHECKING:
    from .trainer import Trainer

# settings that shape the rest of a run: a resume that changes them warns (see _check_settings)
RESUME_SETTINGS = (
    "batch_size",
    "grad_accum",
    "max_steps",
    "lr",
    "min_lr",
    "warmup_steps",
    "schedule",
    "weight_decay",
    "beta1",
    "beta2",
    "muon_momentum",
    "grad_clip",
    "precision",
    "seed",
)


class UnreadableCheckpoint(ScratchLLMError):
    """A checkpoint whose files cannot be read (truncated, corrupt, foreign): `--resume` (latest) takes
    the one before it."""

    def __init__(self, problem: str):
        super().__init__(f"{problem}; resume from an earlier checkpoint")
        self.problem = problem


# ----------------------------------------------------------------------------------------------
# saving


def full_model(model: nn.Module, fsdp: bool, is_main: bool) -> nn.Module | None:
    """The model to write: itself, or under FSDP a full copy gathered onto the main process's CPU
    (a collective call: every process takes part; the others get None)."""
    if not fsdp:
        return model if is_main else None
    # torch.distributed.checkpoint takes most of a second to import: only FSDP runs pay it
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    copy = meta_model(model.cfg)
    load_state_dict_strict(copy, full, source="the sharded model", assign=True)
    return copy


def _optimizer_state(trainer: Trainer) -> dict[str, Any]:
    if not trainer.fsdp:
        return trainer.optimizer.state_dict()
    # torch.distributed.checkpoint takes most of a second to import: only FSDP runs pay it
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(trainer.model, trainer.optimizer, options=opts)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(trainer: Trainer) -> Path:
    """Write a resumable checkpoint of `trainer` at its step and prune the oldest beyond `keep_last`
    (a collective call under torchrun: every process takes part, the main one writes)."""
    model = full_model(trainer.model, trainer.fsdp, trainer.is_main)
    optimizer_state = _optimizer_state(trainer)
    rng_states = gather_objects(_rng_state(), trainer.dist)  # every process's dropout RNG: exact on each
    path = trainer.out_dir / CHECKPOINTS_DIR / f"step-{trainer.step:06d}"
    if trainer.is_main:
        state = {
            "step": trainer.step,
            "tokens_seen": trainer.tokens_seen,
            "train_seconds": trainer.train_seconds,
            "best": trainer.best,
            "total_steps": trainer.total_steps,
            "world_size": trainer.dist.world_size,
            "fsdp": trainer.fsdp,
            "optimizer": optimizer_state,
            "scaler": trainer.scaler.state_dict() if trainer.scaler else None,
            "rng": rng_states,
            "cpu_threads": torch.get_num_threads(),
            "trainer_config": asdict(trainer.cfg),
        }
        _write(path, model, trainer.tokenizer, trainer.extra, state)
        prune_checkpoints(trainer.out_dir, trainer.cfg.keep_last)
    barrier(trainer.dist)
    return path


def _write(path: Path, model: nn.Module | None, tokenizer: Any, extra: dict[str, Any], state: dict) -> None:
    try:
        with atomic_dir(path, marker=STATE_FILE, what="checkpoint") as tmp:
            write_model_files(tmp, model, tokenizer, extra)
            torch.save(state, tmp / STATE_FILE)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "inline_container" not in str(e):
            raise  # not torch.save's file writer, which reports a full disk this way
        found = list_checkpoints(path.parent.parent)
        keep = f"the last checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
        raise ScratchLLMError(
            f"cannot write the checkpoint {path} ({first_line(e)}; is the disk full or read-only?); {keep}"
        ) from e


# ----------------------------------------------------------------------------------------------
# loading


def load_checkpoint(trainer: Trainer, path: Path) -> None:
    """Restore a checkpoint written by `save_checkpoint` into `trainer`: weights, optimizer, step, tokens
    seen, RNG states and the metrics logged up to it, so that training continues exactly."""
    state = read_state(path)
    _check_processes(trainer, path, state)
    _check_settings(trainer, path, state.get("trainer_config", {}))
    _load_weights_and_optimizer(trainer, path, state["optimizer"])
    if trainer.scaler and state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.step = int(state["step"])
    trainer.tokens_seen = int(state["tokens_seen"])
    trainer.train_seconds = float(state["train_seconds"])
    trainer.best = state["best"]
    _set_rng_state(state["rng"][trainer.dist.rank])
    _check_threads(trainer, state.get("cpu_threads"))
    history = metrics_until(trainer.out_dir, trainer.step, rewrite=trainer.is_main)
    if history is not None:
        trainer.history = history


def _check_threads(trainer: Trainer, threads: Any) -> None:
    """CPU kernels sum in an order that depends on the thread count: a resume with another count goes on
    as well, but not bitwise as the stopped run would have; said, with the fix."""
    if trainer.device.type == "cpu" and isinstance(threads, int) and threads != torch.get_num_threads():
        trainer.log(
            f"note: resuming with {torch.get_num_threads()} CPU threads where the run had {threads}: "
            "training goes on, but its numbers will not match an uninterrupted run's bit for bit (set "
            f"OMP_NUM_THREADS={threads} for that)"
        )


def load_resume_checkpoint(trainer: Trainer, path: Path, latest: bool) -> Path:
    """Load `path`, or for `--resume` (`latest`: `path` is the newest checkpoint) the newest one that
    can be read, saying which were skipped; returns the one loaded."""
    if not latest:
        trainer.load_checkpoint(path)
        return path
    newest: UnreadableCheckpoint | None = None
    for candidate in reversed(list_checkpoints(trainer.out_dir)):
        try:
            trainer.load_checkpoint(candidate)
            return candidate
        except UnreadableCheckpoint as e:
            newest = newest or e
            trainer.log(f"skipping the checkpoint {candidate.name}: {e.problem}; trying the one before it")
    problem = newest.problem if newest else "none"
    raise ScratchLLMError(
        f"--resume: no readable checkpoint in {trainer.out_dir / CHECKPOINTS_DIR} (the newest: {problem}); "
        "start over with --overwrite true (deletes them)"
    )


def read_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `path`; an unreadable or foreign file is an `UnreadableCheckpoint`."""
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: torch raises many types, and its advice
        # (weights_only=False) would unpickle an untrusted file: not given here
        first = first_line(e)
        if "weights only" in first.lower() or "weights_only" in first:
            first = f"{type(e).__name__}: truncated, or not a checkpoint state written by scratchllm"
        raise UnreadableCheckpoint(f"cannot read {path / STATE_FILE} ({first})") from e
    if isinstance(state, dict):
        missing = [k for k in ("step", "tokens_seen", "train_seconds", "optimizer", "rng") if k not in state]
    else:
        missing = ["a dict of training state"]
    if missing:
        raise UnreadableCheckpoint(
            f"{path / STATE_FILE} is not a checkpoint state written by scratchllm (no {', '.join(missing)})"
        )
    return state


def read_checkpoint_weights(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of checkpoint `path`; a missing or unreadable file is an `UnreadableCheckpoint`."""
    try:
        return read_weights(path / WEIGHTS_FILE, model)
    except ScratchLLMError as e:
        if not isinstance(e.__cause__, SafetensorError) and (path / WEIGHTS_FILE).is_file():
            raise  # readable, but not this model's: the shape check's message
        why = f"truncated or corrupt: {first_line(e.__cause__)}" if e.__cause__ is not None else "missing"
        raise UnreadableCheckpoint(f"cannot read {path / WEIGHTS_FILE} ({why})") from e


def _check_processes(trainer: Trainer, path: Path, state: dict[str, Any]) -> None:
    """The data order depends on the number of processes, and the optimizer state's shape on FSDP."""
    if state.get("world_size", 1) != trainer.dist.world_size:
        raise ScratchLLMError(
            f"{path} was written by {state.get('world_size')} processes, this run has "
            f"{trainer.dist.world_size}; resume with the same number of processes (the data order depends on "
            "it)"
        )
    if bool(state.get("fsdp")) != trainer.fsdp:
        raise ScratchLLMError(
            f"{path} was written {'with' if state.get('fsdp') else 'without'} --fsdp; resume the same way"
        )


def _check_settings(trainer: Trainer, path: Path, saved: dict[str, Any]) -> None:
    """A checkpoint of another model shape or optimizer is a one-line error naming the differences
    (not a list of tensor shapes); changed training settings are allowed (e.g. more steps) with a
    warning, since the continuation then differs from the run that was stopped."""
    cfg = trainer.cfg
    written_with = saved.get("optimizer", "adamw")
    if written_with != cfg.optimizer:
        raise ScratchLLMError(
            f"{path} was written with --optimizer {written_with}, this run has --optimizer {cfg.optimizer}; "
            "resume with the same optimizer"
        )
    try:
        theirs = read_config(path)[0].to_dict()
    except ScratchLLMError:
        theirs = {}  # a broken checkpoint: the weights' check names the problem
    ours = trainer.model.cfg.to_dict()
    shape = [k for k in ours if k != "drop_rate" and k in theirs and theirs[k] != ours[k]]
    if shape:
        raise ScratchLLMError(
            f"{path} holds a model with {', '.join(f'{k} {theirs[k]}' for k in shape)}; this run builds "
            f"{', '.join(f'{k} {ours[k]}' for k in shape)}; resume with the run's settings (its config.toml)"
        )
    now = asdict(cfg)
    unused = () if cfg.optimizer == "muon" else ("muon_momentum",)
    changed = [k for k in RESUME_SETTINGS if k in saved and saved[k] != now[k] and k not in unused]
    if changed:
        trainer.log(
            "warning: resuming with changed settings ("
            + ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in changed)
            + "): training goes on, but not as the stopped run would have"
        )


def _load_weights_and_optimizer(trainer: Trainer, path: Path, optimizer_state: dict[str, Any]) -> None:
    """The optimizer's moments come from the checkpoint, its settings (betas, weight decay, momentum)
    from this run: `load_state_dict` alone would bring back the stopped run's."""
    model, optimizer = trainer.model, trainer.optimizer
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        if trainer.fsdp:
            _load_sharded(model, optimizer, path, optimizer_state)
        else:
            load_state_dict_strict(model, read_checkpoint_weights(path, model), source=str(path))
            optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError) as e:
        raise ScratchLLMError(
            f"{path}: optimizer state does not fit this model ({e}); was it another run?"
        ) from e
    for group, ours in zip(optimizer.param_groups, settings):
        group.update(ours)


def _load_sharded(
    model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, optimizer_state: dict[str, Any]
) -> None:
    # torch.distributed.checkpoint takes most of a second to import: only FSDP runs pay it
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    weights = read_checkpoint_weights(path, meta_model(model.cfg))
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=opts)
