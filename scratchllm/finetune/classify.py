"""`scratchllm finetune classify`: turn a GPT into a text classifier (the book's chapter 6).

The model keeps its transformer and gets a new head: an `nn.Linear(emb_dim, n_classes)` in place of
the vocabulary projection (`GPTConfig.n_classes`). A text becomes token ids, right-padded with the pad
id (`<|endoftext|>` by default) to the longest text of its batch; because attention is causal, padding
on the right never changes the real tokens' hidden states, and the class logits are read at the last
real token (index length - 1), which has seen the whole text. `pooling = "mean"` averages over the
real tokens instead.

Which weights learn is a choice (`trainable`): the head only; the head plus the last k transformer
blocks and the final norm (`last_blocks`, the book's choice with k = 1); everything (`all`); or LoRA
adapters on chosen linear layers plus the head (`lora`, model/lora.py), merged into the weights at the
end. Training is the one trainer's loop with a `ClassificationTask` (this module's batches, loss and
evaluation); early stopping watches the validation loss or accuracy.

The result is a model directory like any other, whose config.json `extra` holds the label names,
pooling, pad id, maximum length and text template that `Classifier` (and `scratchllm classify`) use.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import reject_unused_flags, setting
from ..errors import ScratchLLMError
from ..hints import quote, scratchllm_command
from ..model.gpt import GPTModel
from ..model.lora import DEFAULT_TARGETS
from ..train.trainer import Task, TrainerConfig, TrainResult
from .data import Example, LabelSet, class_counts

TRAINABLE = ("head", "last_blocks", "all", "lora")
POOLING = ("last", "mean")
REPORT_FILE = "classification.json"
CONFUSION_PLOT = "confusion.png"
CURVES_PLOT = "curves.png"


@dataclass
class ClassifyConfig(TrainerConfig):
    """Settings of a classifier finetune (the trainer's settings plus data, head and what learns).
    Defaults follow the book: batch 8, AdamW at a constant 5e-5 with weight decay 0.1, 5 epochs."""

    # -- data
    data: str = setting(
        "spam",
        "spam (the SMS Spam Collection: downloaded and cached) or a .csv/.tsv/.jsonl/.json file",
        "data",
        path=("spam",),
    )
    val_data: str | None = setting(
        None, "a separate validation file (else cut from --data)", "data", path=True
    )
    test_data: str | None = setting(None, "a separate test file (else cut from --data)", "data", path=True)
    text_column: str = setting("text", "column (or JSON key) holding the text", "data")
    label_column: str = setting("label", "column (or JSON key) holding the class label", "data")
    header: bool = setting(
        True, "CSV/TSV files start with a header row (false: columns are 0, 1, ...)", "data"
    )
    labels: list[str] = setting([], "class names in id order (default: the training labels, sorted)", "data")
    split: list[float] = setting(
        [0.7, 0.1, 0.2], "train/val/test fractions for splits cut from --data", "data"
    )
    split_seed: int = setting(
        123, "seed of the balancing draw and the split shuffle (the book's 123)", "data"
    )
    balance: bool | None = setting(
        None,
        "downsample every class to the rarest one's count before splitting (default: only for spam)",
        "data",
    )
    text_template: str = setting("{text}", "how a text is shown to the model; must contain {text}", "data")
    max_length: int = setting(0, "truncate texts to this many tokens (0: the model's context length)", "data")
    pad_id: int = setting(-1, "padding token id (-1: the tokenizer's <|endoftext|>)", "data")
    # -- model
    model: str = setting(
        "gpt2", "the model to finetune: a model directory or gpt2, gpt2-medium, ...", "model", path="dir"
    )
    pooling: str = setting(
        "last", "last (the last real token's state, the book's) or mean (over real tokens)", "model"
    )
    trainable: str = setting(
        "last_blocks", "what learns: head, last_blocks, all or lora (the head always)", "model"
    )
    trainable_blocks: int = setting(1, "with last_blocks: how many of the last transformer blocks", "model")
    lora_rank: int = setting(8, "LoRA rank r (adds r x (in + out) parameters per adapted layer)", "model")
    lora_alpha: float = setting(
        16.0, "LoRA scale alpha: the detour adds alpha * x A B (the book's form)", "model"
    )
    lora_targets: list[str] = setting(
        list(DEFAULT_TARGETS),
        "linear layers to adapt, by name or name ending (qkv, out_proj, ff.layers.0, ...)",
        "model",
    )
    lora_dropout: float = setting(0.0, "dropout on the LoRA input", "model")
    lora_merge: bool = setting(True, "fold the adapters into the weights of the final model", "model")
    drop_rate: float | None = setting(None, "override the model's dropout rate", "model")
    # -- training (new settings, and the trainer's with the book's defaults)
    epochs: int = setting(5, "passes over the training split (when max_steps is 0)", "train")
    class_weights: str = setting(
        "none", "none, or balanced: weigh the loss by inverse class frequency", "train"
    )
    batch_size: int = setting(8, "texts per micro-batch and process", "train")
    max_steps: int = setting(0, "optimizer steps (0: epochs x batches per epoch)", "train")
    lr: float = setting(5e-5, "peak learning rate", "train")
    min_lr: float = setting(0.0, "learning rate at the end of a cosine/linear decay", "train")
    warmup_steps: int = setting(0, "steps of linear warmup from 0 to lr", "train")
    schedule: str = setting("constant", "after warmup: constant (the book's), cosine or linear", "train")
    beta2: float = setting(0.999, "AdamW beta2", "train")
    # -- evaluation, early stopping
    eval_every: int = setting(50, "evaluate every N steps (0: only at the end)", "eval")
    eval_batches: int = setting(
        0, "validation batches per evaluation (0: the whole validation split)", "eval"
    )
    select_metric: str = setting(
        "val_loss", "the validation metric that picks the best model: val_loss or val_accuracy", "eval"
    )
    patience: int = setting(
        0, "stop after this many evaluations without a better select_metric (0: never)", "eval"
    )
    restore_best: bool = setting(
        True, "the final model is the best one by select_metric (else the last)", "eval"
    )
    out_dir: str = setting(
        "runs/classify",
        "run directory: checkpoints, metrics, plots, the classifier in model/",
        "run",
        path=True,
    )

    def validate(self) -> None:
        super().validate()

        def bad(msg: str) -> ScratchLLMError:
            return ScratchLLMError(f"classifier settings: {msg}")

        choices = {"pooling": POOLING, "trainable": TRAINABLE, "class_weights": ("none", "balanced"),
                   "select_metric": ("val_loss", "val_accuracy")}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("epochs", "trainable_blocks", "lora_rank"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("patience", "max_length"):
            if getattr(self, name) < 0:
                raise bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if "{text}" not in self.text_template:
            raise bad(f"text_template must contain {{text}}, got {self.text_template!r}")
        if len(self.split) != 3 or any(f < 0 for f in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise bad(f"split must be three fractions >= 0 summing to 1 (train val test), got {self.split}")
        if not 0 <= self.lora_dropout < 1:
            raise bad(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        from ..checkpoint import check_model_spec

        check_model_spec(self.model)  # before the data is read (or downloaded)

    def check_flags(self, flags: dict[str, Any]) -> None:
        super().check_flags(flags)
        if self.trainable != "lora":
            reject_unused_flags(flags, "lora_", "--trainable lora")


# ----------------------------------------------------------------------------------------------
# data: splits, token ids, batches


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]
    description: str


def load_splits(cfg: ClassifyConfig) -> Splits:
    """Train/val/test examples: the SMS Spam Collection with the book's balancing and split, or any
    table, cut by `cfg.split` (after optional balancing) except for splits given as separate files."""
    from .data import balance_classes, read_examples, split_by_fractions
    from .spam import is_spam_file, read_spam, spam_file

    is_spam = cfg.data == "spam" or is_spam_file(cfg.data)
    if is_spam:
        default = ClassifyConfig()
        layout = [f"--{k.replace('_', '-')}" for k in ("text_column", "label_column", "header")
                  if getattr(cfg, k) != getattr(default, k)]  # fmt: skip
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
            "the validation split is empty: give --val-data FILE or a validation fraction in --split (e.g. 0.7 0.1 0.2)"
        )
    desc = (
        f"{'SMS Spam Collection ' if is_spam else ''}{path}{' (balanced)' if balance else ''}: "
        + ", ".join(
            f"{name} {len(s)} {class_counts(s)}"
            for name, s in (("train", train), ("val", val), ("test", test))
        )
    )
    return Splits(train, val, test, desc)


def encode_texts(tokenizer: Any, texts: Sequence[str], template: str, max_length: int) -> list[list[int]]:
    """Token ids of each text (shown through `template`), truncated to its first `max_length` tokens."""
    shown = [template.replace("{text}", t) for t in texts]
    return [ids[:max_length] for ids in tokenizer.encode_batch(shown)]


def collate(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (ids (B, T), lengths (B,))."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return ids, lengths


def pooled_logits(
    model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor, pooling: str = "last"
) -> torch.Tensor:
    """Class logits (B, n_classes) of right-padded texts. The head runs at every position (cheap for a
    few classes) so that the call goes through the model's forward (DDP, torch.compile); pooling logits
    equals pooling hidden states because the head is affine."""
    logits = model(ids)  # (B, T, n_classes)
    if pooling == "last":
        return logits[torch.arange(ids.shape[0], device=ids.device), lengths - 1]
    real = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).to(logits.dtype)
    return (logits * real[..., None]).sum(1) / lengths[:, None].to(logits.dtype)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    pooling: str = "last",
    batch_size: int = 32,
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Float32 logits (n, n_classes) on the CPU, in the order of `seqs`. Texts of similar length are
    batched together so little compute goes to padding."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: torch.Tensor | None = None
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, lengths = collate([seqs[i] for i in rows], pad_id)
        with amp():
            logits = pooled_logits(model, ids.to(device), lengths.to(device), pooling).float().cpu()
        if out is None:
            out = torch.empty(len(seqs), logits.shape[1])
        out[rows] = logits
    if out is None:
        raise ScratchLLMError("nothing to classify")
    return out


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


# ----------------------------------------------------------------------------------------------
# the model: head and trainable parts


def add_classifier_head(model: GPTModel, n_classes: int, std: float = 0.02) -> GPTModel:
    """Replace the output head by a fresh `nn.Linear(emb_dim, n_classes)` (GPT-2's N(0, 0.02)
    initialization, zero bias) and record `n_classes` in the config, in place."""
    p = model.tok_emb.weight
    head = nn.Linear(model.cfg.emb_dim, n_classes, device=p.device, dtype=p.dtype)
    nn.init.normal_(head.weight, std=std)
    nn.init.zeros_(head.bias)
    model.out_head = head  # also unties it from the token embedding
    model.cfg = model.cfg.replace(n_classes=n_classes)
    return model


def set_trainable(
    model: GPTModel,
    trainable: str,
    blocks: int = 1,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_targets: Sequence[str] = DEFAULT_TARGETS,
    lora_dropout: float = 0.0,
) -> int:
    """Freeze all but the chosen parts (the head always learns); returns the trainable parameter count.

    head: the head only. last_blocks: the head, the final norm and the last `blocks` transformer blocks
    (the book's choice with 1). all: everything. lora: adapters on `lora_targets` plus the head."""
    from ..model.lora import apply_lora, count_trainable, mark_only_lora_trainable, merge_lora

    if trainable not in TRAINABLE:
        raise ScratchLLMError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    n_layers = len(model.trf_blocks)
    if trainable == "last_blocks" and not 1 <= blocks <= n_layers:
        raise ScratchLLMError(f"trainable_blocks must be in 1..{n_layers} (the model's blocks), got {blocks}")
    model.requires_grad_(trainable == "all")
    if trainable == "lora":
        merge_lora(model)  # a LoRA-finetuned model's own adapters fold into its weights: new ones train
        apply_lora(model, lora_rank, lora_alpha, lora_targets, lora_dropout)
        mark_only_lora_trainable(model, also=("out_head",))
    elif trainable == "last_blocks":
        for block in model.trf_blocks[n_layers - blocks :]:
            block.requires_grad_(True)
        model.final_norm.requires_grad_(True)
    model.out_head.requires_grad_(True)
    return count_trainable(model)


# ----------------------------------------------------------------------------------------------
# finetuning end to end


@dataclass
class ClassifyResult:
    out_dir: Path
    model_dir: Path
    labels: list[str]
    before: dict[str, dict[str, Any]]  # split -> classification_metrics, before finetuning
    after: dict[str, dict[str, Any]]
    train: TrainResult
    trainable_params: int
    total_params: int
    seconds: float
    data: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _resolve_pad_id(cfg: ClassifyConfig, tokenizer: Any, vocab_size: int) -> int:
    pad = cfg.pad_id
    if pad < -1:
        raise ScratchLLMError(
            f"pad_id must be a token id, or -1 for the tokenizer's <|endoftext|>; got {pad}"
        )
    if pad == -1:
        pad = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    if not 0 <= pad < vocab_size:
        raise ScratchLLMError(f"pad_id {pad} is outside the model's vocabulary (0..{vocab_size - 1})")
    return pad


def _class_weights(labels: np.ndarray, n: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=n).astype(np.float64)
    # n_examples / (n_classes * count): every class then weighs as much in total; an absent class gets 0
    w = np.divide(len(labels), n * counts, out=np.zeros(n), where=counts > 0)
    return torch.tensor(w, dtype=torch.float32)


def build_classifier_model(cfg: ClassifyConfig, labels: LabelSet) -> tuple[GPTModel, Any, int, int]:
    """The model of `cfg.model` with a fresh head for `labels` (kept when it already classifies into
    exactly these labels) and only the chosen parts trainable; also its tokenizer, pad id and max length."""
    from ..checkpoint import load_model

    # fp32 weights to train, whatever was stored (bf16 weights would round most updates away)
    loaded = load_model(cfg.model, dtype="fp32")
    model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise ScratchLLMError(f"{cfg.model} has no tokenizer files; save the model with its tokenizer")
    context = model.cfg.context_length
    if cfg.max_length > context:
        raise ScratchLLMError(f"max_length {cfg.max_length} exceeds the model's context length {context}")
    pad_id = _resolve_pad_id(cfg, tokenizer, model.cfg.vocab_size)
    if cfg.drop_rate is not None:
        from ..train.pretrain import _set_dropout

        _set_dropout(model, cfg.drop_rate)
    torch.manual_seed(cfg.seed)  # the head's initialization (and LoRA's A) repeat with the seed
    if loaded.extra.get("labels") != labels.names or model.cfg.n_classes != len(labels):
        add_classifier_head(model, len(labels))
    set_trainable(model, cfg.trainable, cfg.trainable_blocks, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets,
                  cfg.lora_dropout)  # fmt: skip
    return model, tokenizer, pad_id, cfg.max_length or context


def finetune_classify(
    cfg: ClassifyConfig,
    resume: str | None = None,
    run_config_toml: str | None = None,
    log: Callable[[str], None] = print,
) -> ClassifyResult:
    """Finetune `cfg.model` into a classifier on `cfg.data` (see the module docstring); prints the
    before/after metrics and writes the classifier to `out_dir/model`."""
    from ..checkpoint import WEIGHTS_FILE, load_state_dict_strict, read_weights, save_model
    from ..config import dump_toml
    from ..model.gpt import count_parameters
    from ..model.lora import count_trainable, merge_lora
    from ..train.distributed import init_distributed
    from ..train.trainer import Trainer, check_run_start, run_lock
    from .metrics import classification_metrics, format_report

    t_start = time.perf_counter()
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    # before loading the data and the model
    check_run_start(out_dir, resume, cfg.overwrite, files=(REPORT_FILE, CONFUSION_PLOT, CURVES_PLOT))
    dist = init_distributed(cfg.device)
    with run_lock(out_dir, dist.is_main):  # until every output is written
        splits = load_splits(cfg)
        labels = LabelSet(cfg.labels) if cfg.labels else LabelSet.from_examples(splits.train)
        y = {name: labels.encode(getattr(splits, name), name) for name in ("train", "val", "test")}

        model, tokenizer, pad_id, max_length = build_classifier_model(cfg, labels)
        n_trainable, n_total = count_trainable(model), count_parameters(model)

        enc = {name: EncodedSplit(encode_texts(tokenizer, [e.text for e in getattr(splits, name)], cfg.text_template,
                                               max_length), y[name]) for name in ("train", "val", "test")}  # fmt: skip
        weights = _class_weights(y["train"], len(labels)) if cfg.class_weights == "balanced" else None
        task = ClassificationTask(enc["train"], enc["val"], len(labels), cfg.batch_size, cfg.seed, pad_id, cfg.pooling,
                                  cfg.eval_batches, weights, cfg.select_metric, cfg.patience, cfg.epochs)  # fmt: skip
        extra = {
            "task": "classification",
            "labels": labels.names,
            "pooling": cfg.pooling,
            "pad_id": pad_id,
            "max_length": max_length,
            "text_template": cfg.text_template,
            "trainable": cfg.trainable,
            "base_model": str(cfg.model),
            "trained_by": "scratchllm finetune classify",
        }
        log(splits.description)
        log(f"model {cfg.model}: {n_total / 1e6:.2f}M parameters, {n_trainable:,} trainable ({cfg.trainable}"
            + (f", {cfg.trainable_blocks} block(s)" if cfg.trainable == "last_blocks" else "")
            + (f", rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g}" if cfg.trainable == "lora" else "")
            + f"); classes {labels.names}; pooling {cfg.pooling}; pad id {pad_id}; max length {max_length}")  # fmt: skip

        trainer = Trainer(model, task, cfg, tokenizer=tokenizer, extra=extra, dist=dist, log=log,
                          run_config_toml=run_config_toml or dump_toml(cfg))  # fmt: skip

        def report(stage: str) -> dict[str, dict[str, Any]]:
            was = trainer.model.training
            trainer.model.eval()
            out = {}
            for name, split in enc.items():
                if len(split):
                    _, _, pred = task.split_metrics(trainer.model, split, trainer.amp)
                    out[name] = classification_metrics(split.labels, pred, labels.names)
            trainer.model.train(was)
            log(f"{stage}: " + ", ".join(f"{k} accuracy {m['accuracy'] * 100:.2f}%" for k, m in out.items()))
            return out

        before = report("before finetuning")
        result = trainer.fit(resume)
        best_dir = out_dir / "best"
        if cfg.restore_best and (best_dir / WEIGHTS_FILE).exists():
            load_state_dict_strict(
                trainer.model, read_weights(best_dir / WEIGHTS_FILE, trainer.model), source=str(best_dir)
            )
        after = report(
            f"after finetuning ({'best by ' + cfg.select_metric if cfg.restore_best else 'last step'})"
        )

        model_dir = out_dir / "model"
        if dist.is_main:
            if cfg.trainable == "lora" and cfg.lora_merge:
                merge_lora(trainer.model)
            save_model(model_dir, trainer.model, tokenizer, extra)
            final = after.get("test") or after["val"]
            log(
                format_report(final, f"{'test' if 'test' in after else 'validation'} split after finetuning:")
            )
            write_report(out_dir, before, after, result, labels.names, cfg.batch_size * cfg.grad_accum * dist.world_size,
                         data=splits.description, trainable=cfg.trainable, trainable_params=n_trainable,
                         total_params=n_total)  # fmt: skip
        return ClassifyResult(out_dir, model_dir, labels.names, before, after, result, n_trainable, n_total,
                              time.perf_counter() - t_start, splits.description, extra)  # fmt: skip


def write_report(
    out_dir: Path,
    before: dict[str, dict[str, Any]],
    after: dict[str, dict[str, Any]],
    result: TrainResult,
    labels: list[str],
    examples_per_step: int,
    **info: Any,
) -> None:
    """classification.json (the metrics before and after), confusion.png (test split, else validation,
    before and after) and curves.png (the book's loss and accuracy curves)."""
    from ..fileio import atomic_path, atomic_write_json
    from .metrics import plot_confusion, plot_curves

    split = "test" if "test" in after else "val"
    matrices = {
        f"before ({split})": before[split]["confusion"],
        f"after ({split})": after[split]["confusion"],
    }
    with atomic_path(out_dir / CONFUSION_PLOT) as tmp:
        plot_confusion(matrices, labels, tmp)
    with atomic_path(out_dir / CURVES_PLOT) as tmp:
        plot_curves(result.history, tmp, examples_per_step)
    atomic_write_json(out_dir / REPORT_FILE, {
        **info, "labels": labels, "steps": result.steps, "stopped": result.stopped,
        "train_seconds": result.seconds, "before": before, "after": after,
    })  # fmt: skip


def summarize(result: ClassifyResult) -> str:
    out = result.out_dir
    rows = [f"{'':<7}{'before':>9}{'after':>9}"]
    for split in ("train", "val", "test"):
        if split in result.after:
            rows.append(
                f"{split:<7}{result.before[split]['accuracy'] * 100:8.2f}%{result.after[split]['accuracy'] * 100:8.2f}%"
            )
    t = result.train
    return "\n".join([
        f"{t.stopped}: {t.steps} steps in {t.seconds:.0f} s of training ({result.seconds:.0f} s in all); accuracy:",
        *rows,
        f"classifier: {result.model_dir}   try: {scratchllm_command()} classify --model {quote(result.model_dir)} "
        "'some text'",
        f"report: {out / REPORT_FILE}   confusion matrix: {out / CONFUSION_PLOT}   curves: {out / CURVES_PLOT}",
    ])  # fmt: skip


def finetune_classify_command(
    config: str | None, overrides: dict[str, Any], resume: str | None = None
) -> ClassifyResult:
    """`scratchllm finetune classify`: resolve the settings, finetune, print the summary."""
    from ..config import load_config
    from ..train.distributed import init_distributed
    from ..train.trainer import settings_to_resume

    config, _, overrides = settings_to_resume(ClassifyConfig, config, overrides, resume)
    cfg = load_config(ClassifyConfig, config, overrides)
    cfg.check_flags(overrides)
    result = finetune_classify(cfg, resume)
    if init_distributed(cfg.device).is_main:
        print(summarize(result))
    return result


# ----------------------------------------------------------------------------------------------
# using a classifier


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]  # class name -> probability

    @property
    def score(self) -> float:
        return self.probabilities[self.label]


class Classifier:
    """A finetuned classifier: texts in, labels and class probabilities out.

    clf = Classifier.load("runs/classify/model")
    clf.predict(["You won a prize! Call now", "see you at 6"])   # [Prediction(label='spam', ...), ...]
    """

    def __init__(self, model: GPTModel, tokenizer: Any, extra: dict[str, Any]):
        labels = extra.get("labels")
        if not model.cfg.n_classes or not isinstance(labels, list) or len(labels) != model.cfg.n_classes:
            raise ScratchLLMError(
                "not a classifier: the model has no class head with label names; "
                "make one with `scratchllm finetune classify`"
            )
        if tokenizer is None:
            raise ScratchLLMError("the classifier has no tokenizer files; save it with its tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.labels = [str(n) for n in labels]
        self.pooling = extra.get("pooling", "last")
        self.pad_id = int(extra.get("pad_id", tokenizer.eot_id or 0))
        self.max_length = int(extra.get("max_length") or model.cfg.context_length)
        self.text_template = extra.get("text_template", "{text}")

    @classmethod
    def load(cls, spec: str, device: str = "auto", dtype: torch.dtype | str | None = None) -> Classifier:
        from ..checkpoint import load_model

        loaded = load_model(spec, device=device, dtype=dtype)
        return cls(loaded.model, loaded.tokenizer, loaded.extra)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ScratchLLMError(
                    f"text {i + 1} is a {type(t).__name__}, not a string; give texts to classify"
                )
            if not t.strip():
                raise ScratchLLMError(f"text {i + 1} is empty; give some text to classify")
        return encode_texts(self.tokenizer, texts, self.text_template, self.max_length)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Class probabilities (n_texts, n_classes), columns in `self.labels` order."""
        logits = predict_logits(self.model, self.encode(texts), self.pad_id, self.pooling, batch_size)
        return torch.softmax(logits, -1).numpy()

    def predict(self, texts: Sequence[str] | str, batch_size: int = 32) -> list[Prediction]:
        if isinstance(texts, str):
            texts = [texts]
        probs = self.predict_proba(texts, batch_size)
        return [
            Prediction(self.labels[int(p.argmax())], {n: float(v) for n, v in zip(self.labels, p)})
            for p in probs
        ]


def predict(loaded: Any, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, Any]]:
    """`{"label", "probabilities"}` for each text, from a `checkpoint.LoadedModel` classifier (what
    `scratchllm.load(DIR).classify(texts)` returns)."""
    clf = Classifier(loaded.model, loaded.tokenizer, loaded.extra)
    return [
        {"label": p.label, "probabilities": p.probabilities} for p in clf.predict(list(texts), batch_size)
    ]


def classify_command(
    model: str,
    texts: Sequence[str] = (),
    file: str | None = None,
    out: str | None = None,
    text_column: str = "text",
    batch_size: int = 32,
    device: str = "auto",
    header: bool = True,
) -> list[Prediction]:
    """`scratchllm classify`: texts from the command line (one line each: label, probability, text), or
    a table `file` into `out` (JSONL: each input record plus `label` and `probabilities`)."""
    from ..fileio import atomic_write_text, check_output_file
    from .data import read_texts

    if bool(texts) == bool(file):
        what = (
            "texts and --file: give one of them"
            if texts
            else "nothing to classify: give texts, or --file IN.jsonl"
        )
        raise ScratchLLMError(what)
    if out and not file:
        raise ScratchLLMError("--out needs --file")
    if batch_size < 1:
        raise ScratchLLMError(f"--batch-size must be >= 1, got {batch_size}")
    if out:
        check_output_file(out, inputs={"--file": file})
    clf = Classifier.load(model, device=device)
    if texts:
        preds = clf.predict(list(texts), batch_size)
        width = max(len(n) for n in clf.labels)
        for text, p in zip(texts, preds):
            print(f"{p.label:<{width}}  {p.score:.4f}  {text}")
        return preds
    rows = read_texts(file, text_column, header)  # type: ignore[arg-type]
    preds = clf.predict([t for t, _ in rows], batch_size)
    lines = []
    for (_, record), p in zip(rows, preds):
        rec = dict(record)
        if "label" in rec:  # a given label is kept beside the prediction
            rec["given_label"] = rec.pop("label")
        rec.update(label=p.label, probabilities=p.probabilities)
        lines.append(json.dumps(rec, ensure_ascii=False))
    if out:
        atomic_write_text(out, "\n".join(lines) + "\n")
        counts: dict[str, int] = {}
        for p in preds:
            counts[p.label] = counts.get(p.label, 0) + 1
        print(f"classified {len(preds)} texts into {out}: {dict(sorted(counts.items()))}")
    else:
        print("\n".join(lines))
    return preds
