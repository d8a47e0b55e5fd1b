"""The one training loop. Pretraining, classifier finetuning and instruction finetuning plug into it.

What differs between them is a `Task`: which batch comes at each step, how a batch becomes a loss, and
how to evaluate. Everything else lives here once: AdamW with weight decay on matrices only (or Muon for
the transformer blocks' matrices, train/muon.py), linear warmup and cosine decay, gradient accumulation
and clipping, mixed precision, evaluation and samples, metrics (JSONL + a loss plot), checkpoints with
exact resume, SIGINT/SIGTERM handling, budgets in steps, tokens or minutes, and DistributedDataParallel
under torchrun.

Exact resume rests on one rule: a task's batch number `i` is a pure function of `i` (and the seed), so the
data position is just the step counter; together with the model, optimizer and RNG states in the
checkpoint, a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import setting
from ..device import autocast, check_compile, peak_flops, resolve_precision
from ..errors import ScratchLLMError
from ..fileio import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    STATE_FILE,
    atomic_dir,
    atomic_path,
    atomic_write_text,
    check_parents,
    check_replaceable,
    directory_kind,
)
from ..model.gpt import GPTModel, flops_per_token
from .distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_flag,
    init_distributed,
    max_over_processes,
)
from .muon import Muon, muon_param_groups

PLOT_FILE = "loss.png"
RUN_CONFIG_FILE = "config.toml"
# what every run writes into its directory, checked before any work (check_run_start)
RUN_MODEL_DIRS = ("model", "best")
RUN_FILES = (METRICS_FILE, PLOT_FILE, RUN_CONFIG_FILE)
LOCK_FILE = ".lock"  # run_lock's; left in place once a run wrote anything, it marks the directory as ours
# folders written whole (fileio.atomic_dir) into a run directory: pretrain adds tokenizer/ and data/
ATOMIC_DIRS = (*RUN_MODEL_DIRS, "tokenizer", "data")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "muon")
# settings that shape the rest of a run: a resume that changes them warns (see _check_resume_settings)
RESUME_SETTINGS = ("batch_size", "grad_accum", "max_steps", "lr", "min_lr", "warmup_steps", "schedule",
                   "weight_decay", "beta1", "beta2", "muon_momentum", "grad_clip", "precision", "seed")  # fmt: skip


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
        """`fsdp` needs several processes, and no Muon (Newton-Schulz needs whole matrices, FSDP holds shards)."""
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
        for name in ("max_steps", "max_tokens", "warmup_steps", "eval_every", "eval_batches", "log_every",
                     "checkpoint_every"):  # fmt: skip
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
        from ..config import reject_unused_flags

        if self.optimizer != "muon":
            reject_unused_flags(flags, "muon_", "--optimizer muon")


class Task(ABC):
    """What one kind of training supplies to the loop."""

    #: the metric that picks the best checkpoint, and whether lower is better
    best_metric: str = "val_loss"
    best_lower_is_better: bool = True

    @abstractmethod
    def train_batch(self, index: int, rank: int = 0, world_size: int = 1) -> Any:
        """Micro-batch number `index` (counted over the whole run) for process `rank`: a pure function of
        `index`, so that resuming at a step needs nothing but the step."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean loss of a batch (a scalar with a gradient)."""

    @abstractmethod
    def evaluate(
        self, model: nn.Module, amp: Callable[[], contextlib.AbstractContextManager]
    ) -> dict[str, float]:
        """Validation metrics (including `best_metric`); called with the model in eval mode, no grad."""

    def batch_tokens(self, batch: Any) -> int:
        """Tokens in a batch, for throughput and token budgets."""
        return int(batch[0].numel())

    def tokens_per_step(self, cfg: TrainerConfig, world_size: int) -> int | None:
        """Tokens every optimizer step takes, when that is fixed: a token budget then sizes the schedule."""
        return None

    def samples(self, model: nn.Module) -> list[str]:
        """Texts to show at each evaluation (generated by the model, say)."""
        return []

    def default_steps(self, cfg: TrainerConfig, world_size: int) -> int | None:
        """Steps to run when `max_steps` is 0 (e.g. epochs x steps per epoch)."""
        return None

    def should_stop(self) -> bool:
        """Asked after each evaluation: True ends training early (e.g. no validation gain for a while)."""
        return False


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    metrics: dict[str, float]
    stopped: str  # "done", "budget", "early" (the task's should_stop) or "interrupted"
    out_dir: Path
    best: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    signal: str | None = None  # what interrupted it ("SIGINT", "SIGTERM"; None under DDP on other ranks)


# ----------------------------------------------------------------------------------------------
# optimizer and schedule


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


def lr_at(step: int, cfg: TrainerConfig, total_steps: int, elapsed_s: float = 0.0) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine/linear decay to `min_lr` at `total_steps`,
    or sooner with a time budget (`max_minutes`): at whichever end comes first, by steps or by the
    `elapsed_s` seconds of training so far, so that a run cut short by the clock still ends decayed."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant" or total_steps <= cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.max_minutes and elapsed_s > 0:
        # the decay's share of the time starts after warmup: its seconds, estimated by its share of the steps
        warm = elapsed_s * cfg.warmup_steps / step if step else 0.0
        budget = cfg.max_minutes * 60
        progress = max(progress, min(1.0, (elapsed_s - warm) / max(budget - warm, 1e-9)))
    if cfg.schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + factor * (cfg.lr - cfg.min_lr)


# ----------------------------------------------------------------------------------------------
# checkpoints


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Resumable checkpoints of a run, oldest first."""
    ck = Path(out_dir) / CHECKPOINTS_DIR
    if not ck.is_dir():
        return []
    found = [p for p in ck.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


_held_locks: dict[Path, bool] = {}  # the run directories whose lock this process holds: had they one before?


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike, main: bool = True) -> Iterator[None]:
    """One run at a time in a run directory: two would replace each other's tokenizer and data,
    interleave their metrics and prune each other's checkpoints. An advisory lock on `.lock` (POSIX
    `flock`), taken by the main process (`main`), re-entrant within a process: commands take it right
    after `check_run_start`, and `Trainer.fit` again. Taking it also removes the leftovers of killed saves.
    The `.lock` file stays once the run wrote anything: it tells a later run that the directory is ours."""
    out_dir = Path(out_dir)
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        fcntl = None
    if fcntl is None or not main or (out_dir.exists() and not out_dir.is_dir()):  # check_run_start says so
        yield
        return
    check_parents(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    key = out_dir.resolve()
    if key in _held_locks:
        yield
        return
    had_lock = (out_dir / LOCK_FILE).is_file()
    before = {p.name for p in out_dir.iterdir()}
    with open(out_dir / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ScratchLLMError(
                f"another process is training in {out_dir} (it holds {out_dir / LOCK_FILE}); wait for it to end, "
                "or give another --out-dir"
            ) from None
        except OSError as e:  # a file system without locks (some NFS and Lustre mounts)
            warnings.warn(f"cannot lock {out_dir / LOCK_FILE} ({e.strerror}): a second run started in {out_dir} "
                          "meanwhile would not be refused", stacklevel=3)  # fmt: skip
            yield
            return
        _held_locks[key] = had_lock
        try:
            _remove_leftovers(out_dir)
            yield
        finally:
            del _held_locks[key]
            fcntl.flock(f, fcntl.LOCK_UN)
            # a run that wrote nothing: no mark of ours is left (nor the directory, if it made it)
            if not had_lock and {p.name for p in out_dir.iterdir()} - {LOCK_FILE} == before:
                (out_dir / LOCK_FILE).unlink(missing_ok=True)
                if created:
                    out_dir.rmdir()


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _remove_leftovers(out_dir: Path) -> None:
    """What a killed save left half done (`fileio.atomic_dir`'s `.NAME.XXXXXXXX.tmp` / `.old` folders, and
    `atomic_path`'s `.NAME.XXXXXXXX.tmp` files), for the checkpoints and the run's other outputs: the
    caller holds the run's lock. A `.old` whose folder is missing (killed between the two renames) is
    put back."""
    folders = {out_dir / CHECKPOINTS_DIR: r"step-\d+", out_dir: "|".join(map(re.escape, ATOMIC_DIRS))}
    for folder, names in folders.items():
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = re.fullmatch(rf"\.({names})\.[a-z0-9_]{{8}}\.(tmp|old)", p.name)
            if not m or not p.is_dir() or p.is_symlink():
                continue
            if m.group(2) == "old" and (p / "dir").is_dir() and not (folder / m.group(1)).exists():
                os.replace(p / "dir", folder / m.group(1))
            shutil.rmtree(p, ignore_errors=True)
    files = "|".join(map(re.escape, RUN_FILES))
    for p in out_dir.iterdir():
        if re.fullmatch(rf"\.({files})\.[a-z0-9_]{{8}}\.tmp", p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)


def check_run_start(
    out_dir: str | os.PathLike,
    resume: str | None,
    overwrite: bool = False,
    dirs: Mapping[str, tuple[str, str]] | None = None,
    files: Iterable[str] = (),
) -> Path | None:
    """The checkpoint a run resumes from (None for a fresh run), or a one-line error: `--resume`
    without a checkpoint, or a fresh run in a directory holding an earlier run's checkpoints (it
    would mix with them: `--resume` would later pick up the earlier run's newer ones) unless
    `overwrite`, or an output of the run that cannot be written (a `model/` folder of something
    else, a directory named `metrics.jsonl`): that would fail only at the first save, after the
    training; or a file where the run writes one (config.toml, metrics.jsonl, ...) in a directory
    that is not a run directory of ours (`is_own_run_directory`): it is the user's, never replaced.
    `dirs` ({name: (marker, kind)}) and `files` name a command's outputs beyond the trainer's own.
    Commands call it before their slow setup; `Trainer.fit` again at the start."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ScratchLLMError(f"--out-dir {out_dir} is a file; give a directory for the run")
    check_parents(out_dir)
    kind = directory_kind(out_dir)
    if kind not in (None, "run directory"):  # a run writes model/, tokenizer/, checkpoints/ into it
        raise ScratchLLMError(
            f"--out-dir {out_dir} is a {kind}, not a run directory; give a new directory for the run"
        )
    _check_run_outputs(Path(out_dir), dirs or {}, files)
    earlier = list_checkpoints(out_dir)
    if resume is not None:
        path = find_resume_checkpoint(resume, out_dir)
        own = (Path(out_dir) / CHECKPOINTS_DIR).resolve()
        if earlier and path.resolve().parent != own:  # continuing another run here would splice the two
            raise ScratchLLMError(
                f"--resume {resume} is not a checkpoint of {out_dir}, which holds another run (the last: "
                f"{earlier[-1].name}); to continue from it, give a new --out-dir"
            )
        return path
    if earlier and not overwrite:
        raise ScratchLLMError(
            f"{out_dir} holds the checkpoints of an earlier run (the last: {earlier[-1].name}): continue it "
            "with --resume, start over with --overwrite true (deletes them), or give another --out-dir"
        )
    return None


def _check_run_outputs(out_dir: Path, dirs: Mapping[str, tuple[str, str]], files: Iterable[str]) -> None:
    def refuse(path: Path, why: str) -> None:
        raise ScratchLLMError(
            f"--out-dir {out_dir} cannot hold this run: {path} {why}; move it away or give another --out-dir"
        )

    if (out_dir / CHECKPOINTS_DIR).exists() and not (out_dir / CHECKPOINTS_DIR).is_dir():
        refuse(out_dir / CHECKPOINTS_DIR, "is a file, where the run keeps its checkpoints")
    for name, (marker, what) in {
        **{d: (CONFIG_FILE, "model directory") for d in RUN_MODEL_DIRS},
        **dirs,
    }.items():
        try:
            check_replaceable(out_dir / name, marker, what)
        except ScratchLLMError:
            refuse(out_dir / name, f"is not a {what}, and the run would replace it as a whole")
    for name in (*RUN_FILES, *files):
        if (out_dir / name).is_dir():
            refuse(out_dir / name, "is a directory, where the run writes a file")
    found = [out_dir / name for name in (*RUN_FILES, *files) if os.path.lexists(out_dir / name)]
    if found and not is_own_run_directory(out_dir):
        others = ", ".join(str(p.relative_to(out_dir)) for p in found[1:])
        are, them = ("is", "it") if not others else (f"(and {others}) are", "them")
        raise ScratchLLMError(
            f"--out-dir {out_dir} cannot hold this run: {found[0]} {are} not an earlier run's (the directory "
            f"holds no .lock, checkpoint or metrics of one), and the run would overwrite {them}; move {them} "
            "away or give another --out-dir"
        )


def is_own_run_directory(out_dir: str | os.PathLike) -> bool:
    """Whether a run of ours wrote into `out_dir`, so that its config.toml, metrics.jsonl, loss.png and
    the commands' reports there are the run's own to replace: it holds the `.lock` that `run_lock`
    leaves once a run wrote anything (not the one this process just made), a checkpoint, or a
    metrics.jsonl of the trainer's records (a run directory copied without its hidden files)."""
    out_dir = Path(out_dir)
    held = _held_locks.get(out_dir.resolve())  # under this process's lock: was the .lock there before?
    if (out_dir / LOCK_FILE).is_file() if held is None else held:
        return True
    return bool(list_checkpoints(out_dir)) or _holds_our_metrics(out_dir / METRICS_FILE)


def _holds_our_metrics(path: Path) -> bool:
    """Whether `path` holds `Trainer` records: JSON objects of kind train or eval with a step, every
    line but the last (which a crash may have cut)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    records = []
    for n, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines) - 1:
                return False
    return bool(records) and all(
        isinstance(r, dict) and r.get("kind") in ("train", "eval") and isinstance(r.get("step"), int)
        for r in records
    )


def settings_to_resume(
    cls: type, config: str | None, overrides: dict[str, Any], resume: str | None, preset: bool = False
) -> tuple[str | None, bool, dict[str, Any]]:
    """The settings a resumed run continues with, as `(config, preset, overrides)` for `load_config`:
    a `--config` file given; else, for `--resume PATH` to a checkpoint of another run (a fork), that
    run's config.toml, with the --out-dir given (or the default: never the other run's directory,
    which it would rewind); else the run's own config.toml in its --out-dir. The flags given change
    them. A run without a saved config.toml keeps `config` (the defaults or the preset)."""
    from ..config import load_config

    if resume is None or (config is not None and not preset):
        return config, preset, overrides
    out_dir = Path(load_config(cls, config, overrides, preset=preset).out_dir).expanduser()
    saved = out_dir / RUN_CONFIG_FILE
    checkpoint = Path(resume).expanduser()
    if resume not in ("", "latest") and checkpoint.parent.name == CHECKPOINTS_DIR:
        source = checkpoint.parent.parent
        if source.resolve() != out_dir.resolve() and (source / RUN_CONFIG_FILE).is_file():
            saved, overrides = source / RUN_CONFIG_FILE, {**overrides, "out_dir": str(out_dir)}
    if not saved.is_file():
        return config, preset, overrides
    if os.environ.get("RANK", "0") == "0":  # before torch.distributed starts: torchrun's rank
        print(f"resuming with the settings of {saved} (and the flags given)")
    return str(saved), False, overrides


def find_resume_checkpoint(resume: str, out_dir: str | os.PathLike) -> Path:
    """`latest` (or empty): the newest checkpoint of `out_dir`; else a checkpoint directory."""
    if resume in ("", "latest"):
        found = list_checkpoints(out_dir)
        if not found:
            raise ScratchLLMError(
                f"--resume: no checkpoint in {Path(out_dir) / CHECKPOINTS_DIR}; start without --resume"
            )
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        found = list_checkpoints(path)
        if found:  # a run directory
            raise ScratchLLMError(
                f"--resume {resume}: a run directory, not a checkpoint; give one of its checkpoints (the newest: "
                f"{found[-1]}), or continue it in place with --out-dir {resume} --resume"
            )
        raise ScratchLLMError(
            f"--resume {resume}: not a resumable checkpoint (no {STATE_FILE}); give a step-N directory"
        )
    return path


class _UnreadableCheckpoint(ScratchLLMError):
    """A checkpoint whose files cannot be read (truncated, corrupt, foreign): `--resume` (latest) takes
    the one before it."""

    def __init__(self, problem: str):
        super().__init__(f"{problem}; resume from an earlier checkpoint")
        self.problem = problem


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# the loop


class Trainer:
    """Train `model` on `task` with `cfg`; see the module docstring.

    `tokenizer` and `extra` are saved into every checkpoint so each one is a complete model directory;
    `run_config` (the resolved settings of the whole command) is written to `config.toml`.
    """

    def __init__(
        self,
        model: GPTModel,
        task: Task,
        cfg: TrainerConfig,
        *,
        tokenizer: Any = None,
        extra: dict[str, Any] | None = None,
        run_config_toml: str | None = None,
        dist: DistInfo | None = None,
        log: Callable[[str], None] | None = None,
    ):
        cfg.validate()
        self.cfg = cfg
        self.task = task
        self.dist = dist or init_distributed(cfg.device)
        self.device = self.dist.device
        self.precision = resolve_precision(cfg.precision, self.device)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        # a base model's own "step" (finetunes copy its extra) would mislabel this run's saves
        self.extra = {k: v for k, v in (extra or {}).items() if k != "step"}
        self.run_config_toml = run_config_toml
        self.out_dir = Path(cfg.out_dir)
        self._log = log or print
        self._stop_signal: str | None = None
        self._bar: Any = None
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

        total = cfg.max_steps or task.default_steps(cfg, self.dist.world_size)
        per_step = task.tokens_per_step(cfg, self.dist.world_size)
        if cfg.max_tokens and per_step:  # the schedule (warmup, decay) ends where the token budget does
            total = min(total or math.inf, math.ceil(cfg.max_tokens / per_step))
        if not total:
            raise ScratchLLMError(
                "training settings: max_steps is 0 and the task sets no default; give --max-steps"
            )
        self.total_steps = total

        self.fsdp = cfg.fsdp
        cfg.check_fsdp(self.dist.world_size if self.dist.enabled else 1)
        if self.fsdp:
            _shard(self.model, self.device, self.dist.world_size)
        if cfg.compile:
            check_compile(self.device)
        self.train_model: nn.Module = torch.compile(self.model) if cfg.compile else self.model
        if self.dist.enabled and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DDP(self.train_model, device_ids=ids)
        # after sharding: it sees the shards
        self.optimizer = make_optimizer(self.model, cfg, self.device, self.precision)
        if cfg.optimizer == "muon" and not any(g.get("muon") for g in self.optimizer.param_groups):
            self.log("note: --optimizer muon: no matrix of the transformer blocks is trained here (LoRA or "
                      "frozen blocks), so every trained parameter gets AdamW's steps")  # fmt: skip

        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self._elapsed = 0.0  # train_seconds agreed on by all processes (for a time budget)
        self.best: float | None = None
        self.history: list[dict[str, Any]] = []
        self._flops_per_token: float | None = None
        self._peak = peak_flops(self.device, self.precision)

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def log(self, msg: str) -> None:
        """Print on the main process (through the progress bar while it is shown, so lines stay clean)."""
        if not self.is_main:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(msg)
        else:
            self._log(msg)

    def amp(self) -> contextlib.AbstractContextManager:
        """The run's mixed-precision context (bf16/fp16 autocast, or nothing for fp32)."""
        return autocast(self.device, self.precision)

    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, (tuple, list)):
            return type(batch)(self._to_device(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        return batch

    def _record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # -- checkpoints -----------------------------------------------------------------------------

    def _savable_model(self) -> nn.Module | None:
        """The model to write: itself, or under FSDP a full copy gathered onto the main process's CPU
        (a collective call: every process takes part; the others get None)."""
        if not self.fsdp:
            return self.model if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from ..checkpoint import load_state_dict_strict, meta_model

        full = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not self.is_main:
            return None
        copy = meta_model(self.model.cfg)
        load_state_dict_strict(copy, full, source="the sharded model", assign=True)
        return copy

    def _optimizer_state(self) -> dict[str, Any]:
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=opts)

    def save_checkpoint(self) -> Path | None:
        """A resumable checkpoint: a complete model directory plus the trainer state."""
        from ..checkpoint import write_model_files

        model = self._savable_model()
        optimizer_state = self._optimizer_state()
        rng = _rng_state()
        if self.dist.enabled:  # every process's dropout RNG, so a resumed run is exact on each
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng)
            rng_states = gathered
        else:
            rng_states = [rng]
        path = self.out_dir / CHECKPOINTS_DIR / f"step-{self.step:06d}"
        if self.is_main:
            state = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "train_seconds": self.train_seconds,
                "best": self.best,
                "total_steps": self.total_steps,
                "world_size": self.dist.world_size,
                "fsdp": self.fsdp,
                "optimizer": optimizer_state,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": rng_states,
                "trainer_config": asdict(self.cfg),
            }
            try:
                with atomic_dir(path, marker=STATE_FILE, what="checkpoint") as tmp:
                    write_model_files(tmp, model, self.tokenizer, self.extra)
                    torch.save(state, tmp / STATE_FILE)
            except (OSError, RuntimeError) as e:
                if isinstance(e, RuntimeError) and "inline_container" not in str(e):
                    raise  # not torch.save's file writer, which reports a full disk this way
                found = list_checkpoints(self.out_dir)
                keep = f"the last checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
                raise ScratchLLMError(
                    f"cannot write the checkpoint {path} ({_first_line(e)}; is the disk "
                    "full or read-only?); "
                    f"{keep}"
                ) from e
            for old in list_checkpoints(self.out_dir)[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.dist)
        return path

    def _check_resume_settings(self, path: Path, saved: dict[str, Any]) -> None:
        """A checkpoint of another model shape or optimizer is a one-line error naming the differences
        (not a list of tensor shapes); changed training settings are allowed (e.g. more steps) with a
        warning, since the continuation then differs from the run that was stopped."""
        from ..checkpoint import read_config

        written_with = saved.get("optimizer", "adamw")
        if written_with != self.cfg.optimizer:
            raise ScratchLLMError(
                f"{path} was written with --optimizer {written_with}, this run has --optimizer {self.cfg.optimizer}; "
                "resume with the same optimizer"
            )

        try:
            theirs = read_config(path)[0].to_dict()
        except ScratchLLMError:
            theirs = {}  # a broken checkpoint: the weights' check below names the problem
        ours = self.model.cfg.to_dict()
        shape = [k for k in ours if k != "drop_rate" and k in theirs and theirs[k] != ours[k]]
        if shape:
            raise ScratchLLMError(
                f"{path} holds a model with {', '.join(f'{k} {theirs[k]}' for k in shape)}; this run builds "
                f"{', '.join(f'{k} {ours[k]}' for k in shape)}; resume with the run's settings (its config.toml)"
            )
        now = asdict(self.cfg)
        unused = () if self.cfg.optimizer == "muon" else ("muon_momentum",)
        changed = [k for k in RESUME_SETTINGS if k in saved and saved[k] != now[k] and k not in unused]
        if changed:
            self.log(
                "warning: resuming with changed settings ("
                + ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in changed)
                + "): training goes on, but not as the stopped run would have"
            )

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint written by `save_checkpoint`: weights, optimizer, step, tokens seen,
        RNG states and the metrics logged up to it, so that training continues exactly."""
        from ..checkpoint import load_state_dict_strict

        try:
            state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt or foreign file: torch raises many types, and its advice
            # (weights_only=False) would unpickle an untrusted file: not given here
            first = _first_line(e)
            if "weights only" in first.lower() or "weights_only" in first:
                first = f"{type(e).__name__}: truncated, or not a checkpoint state written by scratchllm"
            raise _UnreadableCheckpoint(f"cannot read {path / STATE_FILE} ({first})") from e
        missing = [k for k in ("step", "tokens_seen", "train_seconds", "optimizer", "rng") if k not in state] if (
            isinstance(state, dict)
        ) else ["a dict of training state"]  # fmt: skip
        if missing:
            raise _UnreadableCheckpoint(
                f"{path / STATE_FILE} is not a checkpoint state written by scratchllm (no {', '.join(missing)})"
            )
        if state.get("world_size", 1) != self.dist.world_size:
            raise ScratchLLMError(
                f"{path} was written by {state.get('world_size')} processes, this run has {self.dist.world_size}; "
                "resume with the same number of processes (the data order depends on it)"
            )
        if bool(state.get("fsdp")) != self.fsdp:
            raise ScratchLLMError(
                f"{path} was written {'with' if state.get('fsdp') else 'without'} --fsdp; resume the same way"
            )
        self._check_resume_settings(path, state.get("trainer_config", {}))
        # the optimizer's moments come from the checkpoint, its settings (betas, weight decay, momentum)
        # from this run: load_state_dict would bring back the stopped run's
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            if self.fsdp:
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_model_state_dict,
                    set_optimizer_state_dict,
                )

                from ..checkpoint import meta_model

                weights = _read_checkpoint_weights(path, meta_model(self.model.cfg))
                opts = StateDictOptions(full_state_dict=True)
                set_model_state_dict(self.model, weights, options=opts)
                set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
            else:
                load_state_dict_strict(
                    self.model, _read_checkpoint_weights(path, self.model), source=str(path)
                )
                self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise ScratchLLMError(
                f"{path}: optimizer state does not fit this model ({e}); was it another run?"
            ) from e
        for group, ours in zip(self.optimizer.param_groups, settings):
            group.update(ours)
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.train_seconds = float(state["train_seconds"])
        self.best = state["best"]
        _set_rng_state(state["rng"][self.dist.rank])
        self._restore_history()

    def _restore_history(self) -> None:
        """Keep the metrics of the steps before the checkpoint (a crashed run may have logged more)."""
        path = self.out_dir / METRICS_FILE
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("step", 0) <= self.step:
                kept.append(rec)
        self.history = kept
        if self.is_main:
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def _save_model_dir(self, name: str) -> Path:
        from ..checkpoint import save_model

        path = self.out_dir / name
        model = self._savable_model()
        if self.is_main:  # the step tells, after a resume from an earlier checkpoint, which run wrote it
            save_model(path, model, self.tokenizer, {**self.extra, "step": self.step})
        return path

    def _set_aside_later_outputs(self) -> None:
        """Resuming from a checkpoint before the run's newest (a rewind): the later checkpoints, and
        the best model if one of them wrote it, belong to the continuation being replaced. They are
        renamed `*.abandoned-at-step-N`, not deleted, and are no longer picked by `--resume` or pruned
        in place of the new ones. (A resume after a crash has no later checkpoint: nothing is moved,
        and the replay writes the same best/ again.)"""
        from ..checkpoint import read_config

        best, aside = self.out_dir / "best", []
        if self.is_main:
            aside = [c for c in list_checkpoints(self.out_dir) if int(c.name.split("-")[1]) > self.step]
            try:
                best_step = (
                    read_config(best)[1].get("step") if aside and (best / CONFIG_FILE).is_file() else None
                )
            except ScratchLLMError:
                best_step = None
            if isinstance(best_step, int) and best_step > self.step:
                aside.append(best)
        # decided on the main process, for all: they must agree on when best/ is written (FSDP gathers)
        if broadcast_flag(best in aside, self.dist):
            self.best = None  # its model is gone from best/: the next evaluation writes one again
        if not aside:
            return
        for c in aside:
            target, n = c.with_name(f"{c.name}.abandoned-at-step-{self.step}"), 1
            while target.exists():  # rewound to this step before
                n += 1
                target = c.with_name(f"{c.name}.abandoned-at-step-{self.step}-{n}")
            c.rename(target)
        self.log(
            f"resuming at step {self.step}, before the run's newest outputs: set aside {', '.join(c.name for c in aside)} "
            f"(renamed *.abandoned-at-step-{self.step}; delete them when not needed)"
        )

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """The task's evaluation (and samples, on the main process) as one metrics record."""
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(self.model, self.amp)
            # samples run the model on the main process alone, which a sharded model cannot do
            samples = self.task.samples(self.model) if self.is_main and not self.fsdp else []
        self.model.train(was_training)
        record: dict[str, Any] = {"kind": "eval", "step": self.step, "tokens": self.tokens_seen, **metrics}
        if samples:
            record["samples"] = samples
        return record

    def _plot(self) -> None:
        if not self.is_main:
            return
        from .plots import plot_losses

        with atomic_path(self.out_dir / PLOT_FILE) as tmp:
            plot_losses(self.history, tmp)

    # -- the loop --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask the loop to save a checkpoint and stop at the next step boundary;
        a second SIGINT stops at once."""
        if not _in_main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def fit(self, resume: str | None = None) -> TrainResult:
        """Train until the step, token or time budget is used up (or a signal arrives)."""
        with run_lock(self.out_dir, self.is_main):
            return self._fit(resume)

    def _fit(self, resume: str | None) -> TrainResult:
        cfg = self.cfg
        path = check_run_start(self.out_dir, resume, cfg.overwrite)
        if path is not None:
            path = self._load_resume_checkpoint(path, latest=resume in ("", "latest"))
            self.log(f"resumed from {path} at step {self.step}")
            self._set_aside_later_outputs()
            ended = self._budget_used_before()
            if ended:
                self.log(f"the run already ended at step {self.step}: {ended}")
        else:
            torch.manual_seed(cfg.seed + self.dist.rank)  # dropout differs per process, reproducibly
            if self.is_main:
                for old in list_checkpoints(self.out_dir):  # an earlier run's, with --overwrite
                    shutil.rmtree(old)
                (self.out_dir / METRICS_FILE).unlink(missing_ok=True)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.run_config_toml is not None:
                atomic_write_text(self.out_dir / RUN_CONFIG_FILE, self.run_config_toml)

        from tqdm.auto import tqdm

        bar = self._bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                               dynamic_ncols=True, disable=not (cfg.progress and self.is_main))  # fmt: skip
        stopped = "done"
        # a resumed run with nothing left to train keeps its last evaluation (unless best/ must be written again)
        evals = [r for r in self.history if r.get("kind") == "eval"] if self.best is not None else []
        last_eval: dict[str, Any] = evals[-1] if evals else {}
        window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
        self.model.train()
        try:
            with self._signals():
                while self.step < self.total_steps:
                    if self._budget_used():
                        stopped = "budget"
                        break
                    t0 = time.perf_counter()
                    loss, tokens = self._train_step()
                    dt = time.perf_counter() - t0
                    self.step += 1
                    self.tokens_seen += tokens
                    self.train_seconds += dt
                    window_loss += loss
                    window_steps += 1
                    window_tokens += tokens
                    window_time += dt
                    bar.update(1)
                    if self.step % max(1, cfg.log_every) == 0 or self.step == self.total_steps:
                        tok_s = window_tokens / max(window_time, 1e-9)
                        rec = {"kind": "train", "step": self.step, "tokens": self.tokens_seen,
                               "loss": window_loss / window_steps, "lr": self.optimizer.param_groups[0]["lr"],
                               "tokens_per_s": tok_s, "mfu": self._mfu(tok_s)}  # fmt: skip
                        self._record(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
                        window_loss, window_steps, window_tokens, window_time = 0.0, 0, 0, 0.0
                    at_end = self.step == self.total_steps
                    if (cfg.eval_every and self.step % cfg.eval_every == 0) or at_end:
                        last_eval = self._eval_and_report()
                        if not at_end and broadcast_flag(self.task.should_stop(), self.dist):
                            stopped = "early"
                            break
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not at_end:
                        self.save_checkpoint()
                    if not at_end and broadcast_flag(self._stop_signal is not None, self.dist):
                        stopped = "interrupted"
                        break
                bar.close()
                self._bar = None
                # still under the handlers: a signal now waits for the saves (a second SIGINT aborts);
                # evaluated first, so that the checkpoint holds the best loss that best/ holds
                if broadcast_flag(not last_eval or last_eval["step"] != self.step, self.dist):
                    last_eval = self._eval_and_report()
                path = self.save_checkpoint()
                if stopped == "interrupted":
                    self.log(
                        f"stopped by {self._stop_signal} at step {self.step}; resume with --resume (checkpoint {path})"
                    )
                self._save_model_dir("model")
        finally:
            bar.close()
            self._bar = None
        metrics = {
            k: v for k, v in last_eval.items() if isinstance(v, (int, float)) and k not in ("step", "tokens")
        }
        return TrainResult(self.step, self.tokens_seen, self.train_seconds, metrics, stopped, self.out_dir,
                           self.best, self.history, self._stop_signal)  # fmt: skip

    def _load_resume_checkpoint(self, path: Path, latest: bool) -> Path:
        """Load `path`, or for `--resume` (`latest`: `path` is the newest checkpoint) the newest one that
        can be read, saying which were skipped; returns the one loaded."""
        if not latest:
            self.load_checkpoint(path)
            return path
        newest: _UnreadableCheckpoint | None = None
        for candidate in reversed(list_checkpoints(self.out_dir)):
            try:
                self.load_checkpoint(candidate)
                return candidate
            except _UnreadableCheckpoint as e:
                newest = newest or e
                self.log(f"skipping the checkpoint {candidate.name}: {e.problem}; trying the one before it")
        problem = newest.problem if newest else "none"
        raise ScratchLLMError(
            f"--resume: no readable checkpoint in {self.out_dir / CHECKPOINTS_DIR} (the newest: {problem}); "
            "start over with --overwrite true (deletes them)"
        )

    def _budget_used_before(self) -> str | None:
        """What a resumed run has used up before training a step (its steps, tokens or time), and how to
        go on; None when it has steps to go."""
        cfg = self.cfg
        if self.step >= self.total_steps:
            per_step = self.task.tokens_per_step(cfg, self.dist.world_size)
            by_tokens = (
                cfg.max_tokens and per_step and math.ceil(cfg.max_tokens / per_step) == self.total_steps
            )
            if by_tokens or (cfg.max_tokens and self.tokens_seen >= cfg.max_tokens):
                used, flag = f"its token budget (--max-tokens {cfg.max_tokens})", "--max-tokens"
            elif cfg.max_steps:
                used, flag = f"its --max-steps {cfg.max_steps}", "--max-steps"
            else:
                used, flag = f"the {self.total_steps} steps of its epochs", "--max-steps (or --epochs)"
        elif cfg.max_tokens and self.tokens_seen >= cfg.max_tokens:
            used, flag = (
                f"its token budget (--max-tokens {cfg.max_tokens}: {self.tokens_seen} seen)",
                "--max-tokens",
            )
        elif cfg.max_minutes and self.train_seconds >= cfg.max_minutes * 60:
            trained = f"{self.train_seconds / 60:.2f} minutes trained"
            used, flag = (
                f"its time budget (--max-minutes {cfg.max_minutes:g}: {trained})",
                "--max-minutes (0: no limit)",
            )
        else:
            return None
        return f"it used {used}; nothing is left to train: to go on, resume with a larger {flag}"

    def _budget_used(self) -> bool:
        """Whether the token or time budget is used up, agreed on by all processes (one all-reduce):
        each counts tokens as its own batches times the processes, and padded or variable-length
        batches differ between them; time is the slowest process's, so all decay the lr alike."""
        cfg = self.cfg
        if not (cfg.max_tokens or cfg.max_minutes):
            return False
        tokens_used = bool(cfg.max_tokens and self.tokens_seen >= cfg.max_tokens)
        self._elapsed, any_used = max_over_processes([self.train_seconds, float(tokens_used)], self.dist)
        return bool(any_used) or bool(cfg.max_minutes and self._elapsed >= cfg.max_minutes * 60)

    def _train_step(self) -> tuple[float, int]:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss and tokens used."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg, self.total_steps, self._elapsed)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(cfg.grad_accum):
            index = self.step * cfg.grad_accum + micro
            batch = self._to_device(self.task.train_batch(index, self.dist.rank, self.dist.world_size))
            if self._flops_per_token is None:
                self._flops_per_token = self._estimate_flops(batch)
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self.train_model.no_sync()
            with sync:
                with self.amp():
                    loss = self.task.loss(self.train_model, batch)
                scaled = loss / cfg.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.detach()
            tokens += self.task.batch_tokens(batch)
        mean = all_reduce_mean(total / cfg.grad_accum, self.dist)
        value = float(mean)
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            found = list_checkpoints(self.out_dir)
            keep = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
            raise ScratchLLMError(
                f"training loss became {value} at step {self.step + 1}; stopped without saving this state ({keep}); "
                "lower --lr, raise --warmup-steps or use --precision fp32"
            )
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value, tokens * self.dist.world_size

    def _estimate_flops(self, batch: Any) -> float:
        seq = batch[0].shape[-1] if isinstance(batch, (tuple, list)) else self.model.cfg.context_length
        return 3.0 * flops_per_token(self.model.cfg, seq)  # forward + backward (2x forward)

    def _mfu(self, tokens_per_s: float) -> float | None:
        if not self._peak or not self._flops_per_token:
            return None
        return tokens_per_s * self._flops_per_token / (self._peak * self.dist.world_size)

    def _eval_and_report(self) -> dict[str, Any]:
        record = self.evaluate()
        record["train_seconds"] = round(self.train_seconds, 3)
        metric = record.get(self.task.best_metric)
        improved = metric is not None and (
            self.best is None
            or (metric < self.best if self.task.best_lower_is_better else metric > self.best)
        )
        if improved:
            self.best = metric
            self._save_model_dir("best")
        self._record(record)
        self._plot()
        shown = " | ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in record.items()
            if k not in ("kind", "samples", "train_seconds")
        )
        self.log(f"eval | {shown}" + (" | best" if improved else ""))
        for s in record.get("samples", []):
            self.log(f"  sample: {s!r}")
        return record


def _read_checkpoint_weights(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of checkpoint `path`; a missing or unreadable file is an `_UnreadableCheckpoint`."""
    from safetensors import SafetensorError

    from ..checkpoint import WEIGHTS_FILE, read_weights

    try:
        return read_weights(path / WEIGHTS_FILE, model)
    except ScratchLLMError as e:
        if not isinstance(e.__cause__, SafetensorError) and (path / WEIGHTS_FILE).is_file():
            raise  # readable, but not this model's: the shape check's message
        why = f"truncated or corrupt: {_first_line(e.__cause__)}" if e.__cause__ is not None else "missing"
        raise _UnreadableCheckpoint(f"cannot read {path / WEIGHTS_FILE} ({why})") from e


def _shard(model: GPTModel, device: torch.device, world_size: int) -> None:
    """FSDP2: each transformer block, then the rest, becomes a unit whose parameters, gradients and
    optimizer state are split over the processes and gathered only while the unit computes."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:
        raise ScratchLLMError("--fsdp needs PyTorch 2.6 or newer (torch.distributed.fsdp.fully_shard)") from e
    mesh = init_device_mesh(device.type, (world_size,))
    for block in model.trf_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
