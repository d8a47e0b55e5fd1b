"""The classification task of `scratchllm finetune classify`: labelled texts split into train/val/test,
their token ids, and the batches, loss and evaluation that the one trainer runs.

The SMS Spam Collection is balanced (every class downsampled to the rarest one's count) and split as the
book does; any other table is cut by the split fractions, except for splits given as separate files.
Texts of a batch are right-padded (classifier.py); the loss is cross-entropy of the pooled class logits,
optionally weighted by inverse class frequency.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ScratchLLMError
from ..train.task import Task
from ..train.trainer_config import TrainerConfig
from .classifier import collate, pooled_logits, predict_logits
from .data import Example, balance_classes, class_counts, read_examples, split_by_fractions
from .spam import is_spam_file, read_spam, spam_file

if TYPE_CHECKING:  # classify.py imports this module
    from .classify import ClassifyConfig

SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------------------------
# data: splits


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]
    description: str


def load_splits(cfg: ClassifyConfig) -> Splits:
    """Train/val/test examples: the SMS Spam Collection with the book's balancing and split, or any
    table, cut by `cfg.split` (after optional balancing) except for splits given as separate files."""
    is_spam = cfg.data == "spam" or is_spam_file(cfg.data)
    if is_spam:
        defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        layout = [
            f"--{k.replace('_', '-')}"
            for k in ("text_column", "label_column", "header")
            if getattr(cfg, k) != defaults[k]
        ]
        if layout and not (cfg.val_data or cfg.test_data):  # else they are for those files
            raise ScratchLLMError(
                f"--data {cfg.data} is the SMS Spam Collection, whose layout is known (label, tab, text; no "
                f"header); leave out {', '.join(layout)}"
            )
        path = spam_file() if cfg.data == "spam" else Path(cfg.data)
        examples = read_spam(path)
    else:
        path = Path(cfg.data)
        examples = read_examples(path, cfg.text_column, cfg.label_column, cfg.header)
    balance = is_spam if cfg.balance is None else cfg.balance
    if balance:
        examples = balance_classes(examples, cfg.split_seed)

    given = [None, cfg.val_data, cfg.test_data]
    fractions = [0.0 if g else f for f, g in zip(cfg.split, given)]
    if fractions[0] <= 0:
        raise ScratchLLMError("classifier settings: the training fraction of --split must be > 0")
    total = sum(fractions)
    parts = list(split_by_fractions(examples, [f / total for f in fractions], cfg.split_seed))
    for i, g in enumerate(given):
        if g:
            parts[i] = read_examples(g, cfg.text_column, cfg.label_column, cfg.header)
    train, val, test = parts
    if not val:
        raise ScratchLLMError(
            "the validation split is empty: give --val-data FILE or a validation fraction in --split (e.g. "
            "0.7 0.1 0.2)"
        )
    desc = (
        f"{'SMS Spam Collection ' if is_spam else ''}{path}{' (balanced)' if balance else ''}: "
        + ", ".join(f"{name} {len(s)} {class_counts(s)}" for name, s in zip(SPLITS, (train, val, test)))
    )
    return Splits(train, val, test, desc)


# ----------------------------------------------------------------------------------------------
# the task


@dataclass
class EncodedSplit:
    ids: list[list[int]]
    labels: np.ndarray  # class ids

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, n: int) -> EncodedSplit:
        return EncodedSplit(self.ids[:n], self.labels[:n])


class ClassificationTask(Task):
    """Batches of (ids, lengths, labels) in epochs: epoch e shuffles the training split with the seed
    and e, and drops the last incomplete batch (as the book's DataLoader does); a batch is therefore a
    pure function of its index. Loss: cross-entropy of the pooled logits, optionally class-weighted."""

    best_lower_is_better = True

    def __init__(
        self,
        train: EncodedSplit,
        val: EncodedSplit,
        n_classes: int,
        batch_size: int,
        seed: int,
        pad_id: int,
        pooling: str = "last",
        eval_batches: int = 0,
        class_weights: torch.Tensor | None = None,
        select_metric: str = "val_loss",
        patience: int = 0,
        epochs: int = 1,
    ):
        if len(train) == 0:
            raise ScratchLLMError("the training split is empty; use more data or a larger train fraction")
        self.train, self.val = train, val
        self.n_classes = n_classes
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.pooling = pooling
        self.eval_batches = eval_batches
        self.class_weights = class_weights
        self.best_metric = select_metric
        self.best_lower_is_better = select_metric.endswith("loss")
        self.patience = patience
        self.epochs = epochs
        self._best: float | None = None
        self._evals_without_gain = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def batches_per_epoch(self, world_size: int = 1) -> int:
        return max(1, len(self.train) // (self.batch_size * world_size))

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.train)))
        return self._perm[1]

    def train_batch(self, index: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, ...]:
        epoch, pos = divmod(index, self.batches_per_epoch(world_size))
        start = (pos * world_size + rank) * self.batch_size
        rows = self._permutation(epoch)[np.arange(start, start + self.batch_size) % len(self.train)]
        ids, lengths = collate([self.train.ids[i] for i in rows], self.pad_id)
        return ids, lengths, torch.from_numpy(self.train.labels[rows])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ids, lengths, labels = batch
        logits = pooled_logits(model, ids, lengths, self.pooling)
        weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
        return F.cross_entropy(logits.float(), labels, weight=weight)

    def batch_tokens(self, batch: tuple[torch.Tensor, ...]) -> int:
        return int(batch[1].sum())

    def default_steps(self, cfg: TrainerConfig, world_size: int) -> int | None:
        return max(1, math.ceil(self.epochs * self.batches_per_epoch(world_size) / cfg.grad_accum))

    def split_metrics(
        self,
        model: nn.Module,
        split: EncodedSplit,
        amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> tuple[float, float, np.ndarray]:
        """Mean (unweighted) loss, accuracy and the predicted class ids over a split."""
        logits = predict_logits(model, split.ids, self.pad_id, self.pooling, max(32, self.batch_size), amp)
        labels = torch.from_numpy(split.labels)
        loss = float(F.cross_entropy(logits, labels))
        pred = logits.argmax(-1)
        return loss, float((pred == labels).float().mean()), pred.numpy()

    def evaluate(
        self, model: nn.Module, amp: Callable[[], contextlib.AbstractContextManager]
    ) -> dict[str, float]:
        """Loss and accuracy on the validation split (or its first `eval_batches` batches), and on as
        many examples from the start of the training split, for the book's train-vs-validation curves."""
        n = self.eval_batches * self.batch_size or len(self.val)
        val_loss, val_acc, _ = self.split_metrics(model, self.val.head(n), amp)
        train_loss, train_acc, _ = self.split_metrics(model, self.train.head(n), amp)
        metrics = {
            "train_loss": train_loss,
            "val_loss": val_loss,
            "train_accuracy": train_acc,
            "val_accuracy": val_acc,
        }
        value = metrics[self.best_metric]
        gained = self._best is None or (
            value < self._best if self.best_lower_is_better else value > self._best
        )
        if gained:
            self._best, self._evals_without_gain = value, 0
        else:
            self._evals_without_gain += 1
        return metrics

    def should_stop(self) -> bool:
        return self.patience > 0 and self._evals_without_gain >= self.patience


def balanced_class_weights(labels: np.ndarray, n: int) -> torch.Tensor:
    """Loss weights of `n` classes by inverse frequency in `labels` (class ids)."""
    counts = np.bincount(labels, minlength=n).astype(np.float64)
    # n_examples / (n_classes * count): every class then weighs as much in total; an absent class gets 0
    w = np.divide(len(labels), n * counts, out=np.zeros(n), where=counts > 0)
    return torch.tensor(w, dtype=torch.float32)
