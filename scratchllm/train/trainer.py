"""The one training loop. Pretraining, classifier finetuning and instruction finetuning plug into it.

What differs between them is a `Task`: which batch comes at each step, how a batch becomes a loss, and
how to evaluate. Everything else lives here once: the optimizer (optim.py) and learning-rate schedule
(schedule.py), gradient accumulation and clipping, mixed precision, evaluation and samples, metrics
(JSONL + a loss plot), checkpoints with exact resume (state.py) in a run directory with its rules
(rundir.py), SIGINT/SIGTERM handling, budgets in steps, tokens or minutes, and DistributedDataParallel
or FSDP under torchrun (distributed.py).

Exact resume rests on one rule: a task's batch number `i` is a pure function of `i` (and the seed), so the
data position is just the step counter; together with the model, optimizer and RNG states in the
checkpoint, a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..checkpoint import save_model
from ..device import autocast, check_compile, peak_flops, resolve_precision
from ..errors import ScratchLLMError
from ..fileio import METRICS_FILE, atomic_path, atomic_write_text
from ..model.gpt import GPTModel, flops_per_token
from . import state
from .distributed import (
    DistInfo,
    all_reduce_mean,
    broadcast_flag,
    init_distributed,
    max_over_processes,
    shard_model,
    wrap_ddp,
)
from .optim import make_optimizer
from .plots import plot_losses
from .rundir import (
    PLOT_FILE,
    RUN_CONFIG_FILE,
    check_run_start,
    clear_earlier_run,
    later_outputs,
    list_checkpoints,
    run_lock,
    set_aside,
)
from .schedule import lr_at
from .task import Task, TrainResult
from .trainer_config import TrainerConfig


@dataclass
class _Window:
    """The steps since the last train-loss record."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0


class Trainer:
    """Train `model` on `task` with `cfg`; see the module docstring.

    `tokenizer` and `extra` are saved into every checkpoint so each one is a complete model directory;
    `run_config_toml` (the resolved settings of the whole command) is written to `config.toml`.
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
        self.total_steps = self._total_steps()
        self.fsdp = cfg.fsdp
        self.train_model = self._training_module()
        # after sharding: it sees the shards
        self.optimizer = make_optimizer(self.model, cfg, self.device, self.precision)
        if cfg.optimizer == "muon" and not any(g.get("muon") for g in self.optimizer.param_groups):
            self.log(
                "note: --optimizer muon: no matrix of the transformer blocks is trained here (LoRA or "
                "frozen blocks), so every trained parameter gets AdamW's steps"
            )

        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self._elapsed = 0.0  # train_seconds agreed on by all processes (for a time budget)
        self.best: float | None = None
        self.history: list[dict[str, Any]] = []
        self._flops_per_token: float | None = None
        self._peak = peak_flops(self.device, self.precision)

    def _total_steps(self) -> int:
        """`max_steps`, or the task's default; fewer where a token budget ends sooner."""
        cfg, world_size = self.cfg, self.dist.world_size
        total = cfg.max_steps or self.task.default_steps(cfg, world_size)
        per_step = self.task.tokens_per_step(cfg, world_size)
        if cfg.max_tokens and per_step:  # the schedule (warmup, decay) ends where the token budget does
            total = min(total or math.inf, math.ceil(cfg.max_tokens / per_step))
        if not total:
            raise ScratchLLMError(
                "training settings: max_steps is 0 and the task sets no default; give --max-steps"
            )
        return total

    def _training_module(self) -> nn.Module:
        """Shard the model (FSDP); the module the training steps run: the model, compiled and/or under DDP."""
        cfg = self.cfg
        cfg.check_fsdp(self.dist.world_size if self.dist.enabled else 1)
        if self.fsdp:
            shard_model(self.model, self.device, self.dist.world_size)
        if cfg.compile:
            check_compile(self.device)
        module: nn.Module = torch.compile(self.model) if cfg.compile else self.model
        if self.dist.enabled and not self.fsdp:
            module = wrap_ddp(module, self.dist)
        return module

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        """Whether this is the process that writes files and logs."""
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

    # -- checkpoints and outputs -----------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """A resumable checkpoint: a complete model directory plus the trainer state (state.py)."""
        return state.save_checkpoint(self)

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint written by `save_checkpoint`: weights, optimizer, step, tokens seen,
        RNG states and the metrics logged up to it, so that training continues exactly."""
        state.load_checkpoint(self, path)

    def _save_model_dir(self, name: str) -> Path:
        path = self.out_dir / name
        model = state.full_model(self.model, self.fsdp, self.is_main)
        if self.is_main:  # the step tells, after a resume from an earlier checkpoint, which run wrote it
            save_model(path, model, self.tokenizer, {**self.extra, "step": self.step})
        return path

    def _set_aside_later_outputs(self) -> None:
        """Resuming from a checkpoint before the run's newest (a rewind): the later checkpoints, and
        the best model if one of them wrote it, belong to the continuation being replaced. They are
        renamed `*.abandoned-at-step-N`, not deleted (rundir.set_aside)."""
        aside = later_outputs(self.out_dir, self.step) if self.is_main else []
        # decided on the main process, for all: they must agree on when best/ is written (FSDP gathers)
        if broadcast_flag(self.out_dir / "best" in aside, self.dist):
            self.best = None  # its model is gone from best/: the next evaluation writes one again
        if not aside:
            return
        set_aside(aside, self.step)
        self.log(
            f"resuming at step {self.step}, before the run's newest outputs: set aside "
            f"{', '.join(c.name for c in aside)} (renamed *.abandoned-at-step-{self.step}; delete them when "
            "not needed)"
        )

    def _plot(self) -> None:
        if not self.is_main:
            return
        with atomic_path(self.out_dir / PLOT_FILE) as tmp:
            plot_losses(self.history, tmp)

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

    def _eval_and_report(self) -> dict[str, Any]:
        """Evaluate, save best/ if the metric improved, and record, plot and log the result."""
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

    # -- the loop --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask the loop to save a checkpoint and stop at the next step boundary;
        a second SIGINT stops at once."""
        if threading.current_thread() is not threading.main_thread():
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
        self._start(resume)
        bar = self._bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (self.cfg.progress and self.is_main),
        )
        # a resumed run with nothing left to train keeps its last evaluation (unless best/ must be written
        # again)
        evals = [r for r in self.history if r.get("kind") == "eval"] if self.best is not None else []
        last_eval: dict[str, Any] = evals[-1] if evals else {}
        self.model.train()
        try:
            with self._signals():
                stopped, last_eval = self._train_loop(last_eval)
                bar.close()
                self._bar = None
                # still under the handlers: a signal now waits for the saves (a second SIGINT aborts)
                last_eval = self._finish(stopped, last_eval)
        finally:
            bar.close()
            self._bar = None
        metrics = {
            k: v for k, v in last_eval.items() if isinstance(v, (int, float)) and k not in ("step", "tokens")
        }
        return TrainResult(
            self.step,
            self.tokens_seen,
            self.train_seconds,
            metrics,
            stopped,
            self.out_dir,
            self.best,
            self.history,
            self._stop_signal,
        )

    def _start(self, resume: str | None) -> None:
        """Load the checkpoint to resume from, or start fresh (deleting an earlier run's checkpoints and
        metrics, which `--overwrite` allowed); then write the run's settings."""
        path = check_run_start(self.out_dir, resume, self.cfg.overwrite)
        if path is not None:
            path = state.load_resume_checkpoint(self, path, latest=resume in ("", "latest"))
            self.log(f"resumed from {path} at step {self.step}")
            self._set_aside_later_outputs()
            ended = self._budget_used_before()
            if ended:
                self.log(f"the run already ended at step {self.step}: {ended}")
        else:
            torch.manual_seed(self.cfg.seed + self.dist.rank)  # dropout differs per process, reproducibly
            if self.is_main:
                clear_earlier_run(self.out_dir)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.run_config_toml is not None:
                atomic_write_text(self.out_dir / RUN_CONFIG_FILE, self.run_config_toml)

    def _train_loop(self, last_eval: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Train steps, recording, evaluating and saving as the settings say, until the run ends; returns
        why it ended ("done", "budget", "early" or "interrupted") and the last evaluation."""
        cfg = self.cfg
        window = _Window()
        while self.step < self.total_steps:
            if self._budget_used():
                return "budget", last_eval
            t0 = time.perf_counter()
            loss, tokens = self._train_step()
            dt = time.perf_counter() - t0
            self.step += 1
            self.tokens_seen += tokens
            self.train_seconds += dt
            window.loss += loss
            window.steps += 1
            window.tokens += tokens
            window.seconds += dt
            self._bar.update(1)
            at_end = self.step == self.total_steps
            if self.step % max(1, cfg.log_every) == 0 or at_end:
                self._record_train(window)
                window = _Window()
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or at_end:
                last_eval = self._eval_and_report()
                if not at_end and broadcast_flag(self.task.should_stop(), self.dist):
                    return "early", last_eval
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and not at_end:
                self.save_checkpoint()
            if not at_end and broadcast_flag(self._stop_signal is not None, self.dist):
                return "interrupted", last_eval
        return "done", last_eval

    def _record_train(self, window: _Window) -> None:
        tok_s = window.tokens / max(window.seconds, 1e-9)
        record = {
            "kind": "train",
            "step": self.step,
            "tokens": self.tokens_seen,
            "loss": window.loss / window.steps,
            "lr": self.optimizer.param_groups[0]["lr"],
            "tokens_per_s": tok_s,
            "mfu": self._mfu(tok_s),
        }
        self._record(record)
        self._bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_s:,.0f}")

    def _finish(self, stopped: str, last_eval: dict[str, Any]) -> dict[str, Any]:
        """Evaluate the final step (first, so that the checkpoint holds the best loss that best/ holds),
        save the checkpoint and model/; returns the last evaluation."""
        if broadcast_flag(not last_eval or last_eval["step"] != self.step, self.dist):
            last_eval = self._eval_and_report()
        path = self.save_checkpoint()
        if stopped == "interrupted":
            self.log(
                f"stopped by {self._stop_signal} at step {self.step}; resume with --resume (checkpoint "
                f"{path})"
            )
        self._save_model_dir("model")
        return last_eval

    # -- budgets ---------------------------------------------------------------------------------

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

    # -- one step --------------------------------------------------------------------------------

    def _train_step(self) -> tuple[float, int]:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss and tokens used."""
        lr = lr_at(self.step, self.cfg, self.total_steps, self._elapsed)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, tokens = self._accumulate_gradients()
        value = float(all_reduce_mean(loss, self.dist))
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            found = list_checkpoints(self.out_dir)
            keep = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
            raise ScratchLLMError(
                f"training loss became {value} at step {self.step + 1}; stopped without saving this state "
                f"({keep}); lower --lr, raise --warmup-steps or use --precision fp32"
            )
        self._apply_gradients()
        return value, tokens * self.dist.world_size

    def _accumulate_gradients(self) -> tuple[torch.Tensor, int]:
        """Forward and backward over `grad_accum` micro-batches: this process's mean loss, and its tokens."""
        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(cfg.grad_accum):
            index = self.step * cfg.grad_accum + micro
            batch = self._to_device(self.task.train_batch(index, self.dist.rank, self.dist.world_size))
            if self._flops_per_token is None:
                self._flops_per_token = self._estimate_flops(batch)
            last = micro == cfg.grad_accum - 1
            # DDP averages the gradients over the processes at the last micro-batch only
            sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self.train_model.no_sync()
            with sync:
                with self.amp():
                    loss = self.task.loss(self.train_model, batch)
                scaled = loss / cfg.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.detach()
            tokens += self.task.batch_tokens(batch)
        return total / cfg.grad_accum, tokens

    def _apply_gradients(self) -> None:
        """Unscale (fp16), clip and apply the gradients, then clear them."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _estimate_flops(self, batch: Any) -> float:
        seq = batch[0].shape[-1] if isinstance(batch, (tuple, list)) else self.model.cfg.context_length
        return 3.0 * flops_per_token(self.model.cfg, seq)  # forward + backward (2x forward)

    def _mfu(self, tokens_per_s: float) -> float | None:
        if not self._peak or not self._flops_per_token:
            return None
        return tokens_per_s * self._flops_per_token / (self._peak * self.dist.world_size)
