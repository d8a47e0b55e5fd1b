"""`scratchllm finetune classify`: turn a GPT into a text classifier (the book's chapter 6).

The model keeps its transformer and gets a new head: an `nn.Linear(emb_dim, n_classes)` in place of
the vocabulary projection (`GPTConfig.n_classes`). A text becomes token ids, right-padded with the pad
id (`<|endoftext|>` by default) to the longest text of its batch; because attention is causal, padding
on the right never changes the real tokens' hidden states, and the class logits are read at the last
real token (index length - 1), which has seen the whole text. `pooling = "mean"` averages over the
real tokens instead.

Which weights learn is a choice (`trainable`): the head only; the head plus the last k transformer
blocks and the final norm (`last_blocks`, the book's choice with k = 1); or everything (`all`). With
`lora = true`, LoRA adapters on chosen linear layers and the head learn instead (train/setup.py,
model/lora.py), merged into the weights at the end. Training is the one trainer's loop with a
`ClassificationTask` (classify_task.py: the splits, batches, loss and evaluation); early stopping
watches the validation loss or accuracy.

The result is a model directory like any other, whose config.json `extra` holds the label names,
pooling, pad id, maximum length and text template that `Classifier` (and `scratchllm classify`) use.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..checkpoint import (
    WEIGHTS_FILE,
    LoadedModel,
    load_state_dict_strict,
    read_weights,
    save_model,
)
from ..config import dump_toml, load_config, reject_unused_flags, setting
from ..errors import ScratchLLMError
from ..fileio import atomic_path, atomic_write_json
from ..hints import quote, scratchllm_command
from ..hub import check_model_spec
from ..model.gpt import GPTModel, count_parameters
from ..model.lora import count_trainable, merge_lora
from ..train.distributed import init_distributed
from ..train.rundir import check_run_start, run_lock, settings_to_resume
from ..train.setup import LORA_RANK, LoRASettings, setup_model
from ..train.task import TrainResult
from ..train.trainer import Trainer
from ..train.trainer_config import TrainerConfig
from .classifier import encode_texts
from .classify_task import SPLITS, ClassificationTask, EncodedSplit, balanced_class_weights, load_splits
from .data import LabelSet
from .metrics import classification_metrics, format_report, plot_confusion, plot_curves

TRAINABLE = ("head", "last_blocks", "all")
POOLING = ("last", "mean")
REPORT_FILE = "classification.json"
CONFUSION_PLOT = "confusion.png"
CURVES_PLOT = "curves.png"


@dataclass
class ClassifyConfig(LoRASettings, TrainerConfig):
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
        "last_blocks", "what learns without LoRA: head, last_blocks or all (the head always)", "model"
    )
    trainable_blocks: int = setting(1, "with last_blocks: how many of the last transformer blocks", "model")
    drop_rate: float | None = setting(None, "override the model's dropout rate", "model")
    # -- LoRA (with the settings every finetune shares: train/setup.py)
    lora_merge: bool = setting(True, "fold the adapters into the weights of the final model", "lora")
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

    def __post_init__(self) -> None:
        if self.trainable == "lora":  # the old spelling of lora = true
            note = (
                f"; LoRA's default rank is now {LORA_RANK} (it was 8 with trainable = lora): give "
                "--lora-rank 8 for the old default"
                if self.lora_rank == LORA_RANK
                else ""
            )
            warnings.warn(
                f'--trainable lora (trainable = "lora") is deprecated: use --lora true (lora = true){note}',
                FutureWarning,
                stacklevel=3,
            )
            self.lora, self.trainable = True, "last_blocks"

    @property
    def trained_parts(self) -> str:
        """What learns, as the run's records name it: lora (adapters and head), head, last_blocks or all."""
        return "lora" if self.lora else self.trainable

    def validate(self) -> None:
        super().validate()

        def bad(msg: str) -> ScratchLLMError:
            return ScratchLLMError(f"classifier settings: {msg}")

        choices = {
            "pooling": POOLING,
            "trainable": TRAINABLE,
            "class_weights": ("none", "balanced"),
            "select_metric": ("val_loss", "val_accuracy"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("epochs", "trainable_blocks"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("patience", "max_length"):
            if getattr(self, name) < 0:
                raise bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if "{text}" not in self.text_template:
            raise bad(f"text_template must contain {{text}}, got {self.text_template!r}")
        if len(self.split) != 3 or any(f < 0 for f in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise bad(f"split must be three fractions >= 0 summing to 1 (train val test), got {self.split}")
        self.check_lora("classifier settings")
        check_model_spec(self.model)  # before the data is read (or downloaded)

    def check_flags(self, flags: dict[str, Any]) -> None:
        super().check_flags(flags)
        if not self.lora:
            reject_unused_flags(flags, "lora_", "--lora true")
        elif flags.get("trainable") != "lora":  # the old spelling (--trainable lora) let them be
            given = [f"--{n.replace('_', '-')}" for n in ("trainable", "trainable_blocks") if n in flags]
            if given:
                raise ScratchLLMError(
                    f"{' and '.join(given)}: with --lora true the adapters and the head learn; leave "
                    f"{'it' if len(given) == 1 else 'them'} out (or leave out --lora)"
                )


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


def set_trainable(model: GPTModel, trainable: str, blocks: int = 1) -> int:
    """Freeze all but the chosen parts (the head always learns); returns the trainable parameter count.

    head: the head only. last_blocks: the head, the final norm and the last `blocks` transformer blocks
    (the book's choice with 1). all: everything. (LoRA: `setup_model`'s `lora`.)"""
    if trainable not in TRAINABLE:
        raise ScratchLLMError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    n_layers = len(model.trf_blocks)
    if trainable == "last_blocks" and not 1 <= blocks <= n_layers:
        raise ScratchLLMError(f"trainable_blocks must be in 1..{n_layers} (the model's blocks), got {blocks}")
    model.requires_grad_(trainable == "all")
    if trainable == "last_blocks":
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


def build_classifier_model(cfg: ClassifyConfig, labels: LabelSet) -> tuple[GPTModel, Any, int, int]:
    """The model of `cfg.model` with a fresh head for `labels` (kept when it already classifies into
    exactly these labels) and only the chosen parts trainable; also its tokenizer, pad id and max length."""

    def new_head(loaded: LoadedModel) -> None:
        torch.manual_seed(cfg.seed)  # the head's initialization (and LoRA's A) repeat with the seed
        if loaded.extra.get("labels") != labels.names or loaded.model.cfg.n_classes != len(labels):
            add_classifier_head(loaded.model, len(labels))

    loaded = setup_model(
        cfg.model,
        drop_rate=cfg.drop_rate,
        lora=cfg.lora_spec(),
        also_trained=("out_head",),
        prepare=new_head,
        context_length=cfg.max_length or None,
        context_flag="--max-length",
        allow_classifier=True,
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    pad_id = _resolve_pad_id(cfg, tokenizer, model.cfg.vocab_size)
    if not cfg.lora:
        set_trainable(model, cfg.trainable, cfg.trainable_blocks)
    return model, tokenizer, pad_id, cfg.max_length or model.cfg.context_length


def finetune_classify(
    cfg: ClassifyConfig,
    resume: str | None = None,
    run_config_toml: str | None = None,
    log: Callable[[str], None] = print,
) -> ClassifyResult:
    """Finetune `cfg.model` into a classifier on `cfg.data` (see the module docstring); prints the
    before/after metrics and writes the classifier to `out_dir/model`."""
    t_start = time.perf_counter()
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    # before loading the data and the model
    check_run_start(out_dir, resume, cfg.overwrite, files=(REPORT_FILE, CONFUSION_PLOT, CURVES_PLOT))
    dist = init_distributed(cfg.device)
    with run_lock(out_dir, dist.is_main):  # until every output is written
        splits = load_splits(cfg)
        labels = LabelSet(cfg.labels) if cfg.labels else LabelSet.from_examples(splits.train)
        y = {name: labels.encode(getattr(splits, name), name) for name in SPLITS}

        model, tokenizer, pad_id, max_length = build_classifier_model(cfg, labels)
        n_trainable, n_total = count_trainable(model), count_parameters(model)
        texts = {name: [e.text for e in getattr(splits, name)] for name in SPLITS}
        enc = {
            name: EncodedSplit(encode_texts(tokenizer, texts[name], cfg.text_template, max_length), y[name])
            for name in SPLITS
        }
        task = _classification_task(cfg, enc, len(labels), pad_id)
        extra = {
            "task": "classification",
            "labels": labels.names,
            "pooling": cfg.pooling,
            "pad_id": pad_id,
            "max_length": max_length,
            "text_template": cfg.text_template,
            "trainable": cfg.trained_parts,
            "base_model": str(cfg.model),
            "trained_by": "scratchllm finetune classify",
        }
        log(splits.description)
        log(_describe_setup(cfg, n_total, n_trainable, labels.names, pad_id, max_length))
        toml = run_config_toml or dump_toml(cfg)
        trainer = Trainer(
            model, task, cfg, tokenizer=tokenizer, extra=extra, dist=dist, log=log, run_config_toml=toml
        )

        before = _split_metrics(trainer, task, enc, labels.names, "before finetuning", log)
        trained = trainer.fit(resume)
        best_dir = out_dir / "best"
        if cfg.restore_best and (best_dir / WEIGHTS_FILE).exists():
            best = read_weights(best_dir / WEIGHTS_FILE, trainer.model)
            load_state_dict_strict(trainer.model, best, source=str(best_dir))
        stage = f"after finetuning ({'best by ' + cfg.select_metric if cfg.restore_best else 'last step'})"
        after = _split_metrics(trainer, task, enc, labels.names, stage, log)
        result = ClassifyResult(
            out_dir=out_dir,
            model_dir=out_dir / "model",
            labels=labels.names,
            before=before,
            after=after,
            train=trained,
            trainable_params=n_trainable,
            total_params=n_total,
            seconds=0.0,  # set when the outputs are written
            data=splits.description,
            extra=extra,
        )
        if dist.is_main:
            _save_classifier(cfg, trainer.model, tokenizer, result, dist.world_size, log)
        result.seconds = time.perf_counter() - t_start
        return result


def _save_classifier(
    cfg: ClassifyConfig,
    model: nn.Module,
    tokenizer: Any,
    result: ClassifyResult,
    world_size: int,
    log: Callable[[str], None],
) -> None:
    """The classifier (adapters merged unless told not to), its final report and the run's report files."""
    if cfg.lora and cfg.lora_merge:
        merge_lora(model)
    save_model(result.model_dir, model, tokenizer, result.extra)
    after = result.after
    split = "test" if "test" in after else "val"
    log(format_report(after[split], f"{'test' if split == 'test' else 'validation'} split after finetuning:"))
    write_report(
        result.out_dir,
        result.before,
        after,
        result.train,
        result.labels,
        cfg.batch_size * cfg.grad_accum * world_size,
        data=result.data,
        trainable=cfg.trained_parts,
        trainable_params=result.trainable_params,
        total_params=result.total_params,
    )


def _classification_task(
    cfg: ClassifyConfig, enc: dict[str, EncodedSplit], n_classes: int, pad_id: int
) -> ClassificationTask:
    weights = (
        balanced_class_weights(enc["train"].labels, n_classes) if cfg.class_weights == "balanced" else None
    )
    return ClassificationTask(
        enc["train"],
        enc["val"],
        n_classes,
        cfg.batch_size,
        cfg.seed,
        pad_id,
        pooling=cfg.pooling,
        eval_batches=cfg.eval_batches,
        class_weights=weights,
        select_metric=cfg.select_metric,
        patience=cfg.patience,
        epochs=cfg.epochs,
    )


def _describe_setup(
    cfg: ClassifyConfig, n_total: int, n_trainable: int, labels: list[str], pad_id: int, max_length: int
) -> str:
    parts = cfg.trained_parts
    if cfg.lora:
        parts += f", rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g}"
    elif cfg.trainable == "last_blocks":
        parts += f", {cfg.trainable_blocks} block(s)"
    return (
        f"model {cfg.model}: {n_total / 1e6:.2f}M parameters, {n_trainable:,} trainable ({parts}); classes "
        f"{labels}; pooling {cfg.pooling}; pad id {pad_id}; max length {max_length}"
    )


def _split_metrics(
    trainer: Trainer,
    task: ClassificationTask,
    enc: dict[str, EncodedSplit],
    labels: list[str],
    stage: str,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """The classification metrics of every non-empty split, logged as one line of accuracies."""
    was = trainer.model.training
    trainer.model.eval()
    out = {}
    for name, split in enc.items():
        if len(split):
            _, _, pred = task.split_metrics(trainer.model, split, trainer.amp)
            out[name] = classification_metrics(split.labels, pred, labels)
    trainer.model.train(was)
    log(f"{stage}: " + ", ".join(f"{k} accuracy {m['accuracy'] * 100:.2f}%" for k, m in out.items()))
    return out


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
    split = "test" if "test" in after else "val"
    matrices = {
        f"before ({split})": before[split]["confusion"],
        f"after ({split})": after[split]["confusion"],
    }
    with atomic_path(out_dir / CONFUSION_PLOT) as tmp:
        plot_confusion(matrices, labels, tmp)
    with atomic_path(out_dir / CURVES_PLOT) as tmp:
        plot_curves(result.history, tmp, examples_per_step)
    report = {
        **info,
        "labels": labels,
        "steps": result.steps,
        "stopped": result.stopped,
        "train_seconds": result.seconds,
        "before": before,
        "after": after,
    }
    atomic_write_json(out_dir / REPORT_FILE, report)


def summarize(result: ClassifyResult) -> str:
    """The accuracies before and after, and where the classifier and its report went."""
    out = result.out_dir
    rows = [f"{'':<7}{'before':>9}{'after':>9}"]
    for split in SPLITS:
        if split in result.after:
            before, after = result.before[split]["accuracy"], result.after[split]["accuracy"]
            rows.append(f"{split:<7}{before * 100:8.2f}%{after * 100:8.2f}%")
    t = result.train
    model = quote(result.model_dir)
    lines = [
        f"{t.stopped}: {t.steps} steps in {t.seconds:.0f} s of training ({result.seconds:.0f} s in all); "
        "accuracy:",
        *rows,
        f"classifier: {result.model_dir}   try: {scratchllm_command()} classify --model {model} 'some text'",
        f"report: {out / REPORT_FILE}   confusion matrix: {out / CONFUSION_PLOT}   curves: "
        f"{out / CURVES_PLOT}",
    ]
    return "\n".join(lines)


def finetune_classify_command(
    config: str | None, overrides: dict[str, Any], resume: str | None = None
) -> ClassifyResult:
    """`scratchllm finetune classify`: resolve the settings, finetune, print the summary."""
    config, _, overrides = settings_to_resume(ClassifyConfig, config, overrides, resume)
    cfg = load_config(ClassifyConfig, config, overrides)
    cfg.check_flags(overrides)
    result = finetune_classify(cfg, resume)
    if init_distributed(cfg.device).is_main:
        print(summarize(result))
    return result
