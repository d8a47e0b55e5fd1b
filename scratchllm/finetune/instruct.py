"""`scratchllm finetune instruct` and `scratchllm respond`: turn a language model into an assistant.

One instruction example, from file to loss (the book's chapter 7):

    {"instruction", "input", "output"}             load_instruction_data (JSON list or JSONL)
      -> prompt + response text                    templates.py (Alpaca by default, or Phi-3 style)
      -> token ids, and how many are the prompt    InstructionDataset
      -> padded batch: inputs, targets             custom_collate_fn: append <|endoftext|>, pad to
                                                   the longest example, targets = inputs shifted by
                                                   one, padding targets -100 except the first
                                                   end-of-text (so the model learns to stop), cut to
                                                   the context length, optionally the prompt -100 too
      -> cross-entropy over the target tokens      InstructionTask.loss, inside the one trainer

Training runs whole epochs over a seeded 85/5/10 train/val/test split (or separate files); the
trained assistant is a normal model directory whose `extra` names its prompt template, so
`respond`, chat and the server prompt it the way it was trained.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import LoadedModel, save_model
from ..config import dump_toml, load_config, reject_unused_flags, setting
from ..errors import ScratchLLMError
from ..fileio import atomic_write_json, read_json_records
from ..generation import Engine, GenerationConfig
from ..hints import next_hint, quote
from ..hub import check_model_spec, load_model
from ..model.gpt import count_parameters
from ..model.lora import merge_lora
from ..text.templates import (
    AUTO_TEMPLATE,
    DEFAULT_TEMPLATE,
    TEMPLATE_KEY,
    PromptTemplate,
    get_template,
    template_names,
)
from ..text.tokenizer import Tokenizer
from ..train.distributed import init_distributed
from ..train.evaluate import next_token_loss
from ..train.rundir import check_run_start, run_lock, settings_to_resume
from ..train.setup import LoRASettings, setup_model
from ..train.task import Task, TrainResult
from ..train.trainer import Trainer
from ..train.trainer_config import TrainerConfig

SPLIT_NAMES = ("train", "val", "test")  # written to out_dir/data/NAME.json
IGNORE_INDEX = -100  # targets with this value do not count in the loss (PyTorch's cross_entropy default)

Entry = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# data: records, split


def load_instruction_data(path: str | Path, require_output: bool = True) -> list[Entry]:
    """Instruction records from a JSON file holding a list (the book's format) or a JSONL file
    (one object per line). Each record needs a non-empty string `instruction`, an optional string
    `input` and, when `require_output`, a string `output`; other fields are kept. A malformed
    record is an error that names the file and the record."""
    records = read_json_records(path, "instruction data", "{instruction, input, output} records")
    for where, _, record in records:
        _check_record(where, record, require_output)
    return [r for _, _, r in records]


def _check_record(where: str, record: Any, require_output: bool) -> None:
    if not isinstance(record, dict):
        raise ScratchLLMError(
            f"{where}: expected an object with instruction/input/output, got {type(record).__name__}"
        )
    instruction = record.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        got = "missing" if instruction is None else repr(instruction)[:40]
        raise ScratchLLMError(f'{where}: "instruction" must be a non-empty string ({got})')
    if not isinstance(record.get("input", ""), (str, type(None))):
        raise ScratchLLMError(
            f'{where}: "input" must be a string (or left out), got {type(record["input"]).__name__}'
        )
    if require_output and not isinstance(record.get("output"), str):
        got = "missing" if record.get("output") is None else type(record["output"]).__name__
        raise ScratchLLMError(
            f'{where}: "output" must be a string ({got}); training needs the expected response'
        )


def split_data(
    data: Sequence[Entry], val_fraction: float = 0.05, test_fraction: float = 0.1, seed: int | None = 123
) -> tuple[list[Entry], list[Entry], list[Entry]]:
    """(train, val, test). `seed` shuffles first; None keeps the file order, which with the default
    fractions is exactly the book's split (first 85% train, next 10% test, last 5% validation)."""
    n = len(data)
    n_test = int(n * test_fraction + 1e-9)
    n_val = int(n * val_fraction + 1e-9)
    n_train = n - n_test - n_val
    order = list(range(n)) if seed is None else np.random.default_rng(seed).permutation(n).tolist()
    items = [data[i] for i in order]
    train, test, val = items[:n_train], items[n_train : n_train + n_test], items[n_train + n_test :]
    if not train or not val:
        raise ScratchLLMError(
            f"splitting {n} records "
            f"{1 - val_fraction - test_fraction:.0%}/{val_fraction:.0%}/{test_fraction:.0%} leaves "
            f"{len(train)} for training and {len(val)} for validation; give more records, a larger "
            "--val-fraction, or a separate --val-data file"
        )
    return train, val, test


# ----------------------------------------------------------------------------------------------
# tokens: dataset and collate


class InstructionDataset(torch.utils.data.Dataset):
    """The book's `InstructionDataset`: each entry rendered with the template and tokenized once.
    `encoded_texts[i]` are the ids of prompt + response; `prompt_lengths[i]` how many of them are
    the prompt (for `--mask-prompt`)."""

    def __init__(
        self, data: Sequence[Entry], tokenizer: Tokenizer, template: str | PromptTemplate = DEFAULT_TEMPLATE
    ):
        self.data = list(data)
        self.template = get_template(template, tokenizer)
        pairs = [self.template.format_example(entry) for entry in self.data]
        specials = self.template.allowed_special
        self.encoded_texts: list[list[int]] = tokenizer.encode_batch([p + r for p, r in pairs], specials)
        prompt_ids = tokenizer.encode_batch([p for p, _ in pairs], specials)
        # The prompt's tokens are normally a prefix of the full text's; where a BPE merge crosses
        # the boundary, the common prefix is the part that is certainly prompt.
        self.prompt_lengths = [_common_prefix(p, full) for p, full in zip(prompt_ids, self.encoded_texts)]

    def __getitem__(self, index: int) -> list[int]:
        return self.encoded_texts[index]

    def __len__(self) -> int:
        return len(self.data)


def _common_prefix(a: list[int], b: list[int]) -> int:
    if b[: len(a)] == a:
        return len(a)
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def custom_collate_fn(
    batch: Sequence[Sequence[int]],
    pad_token_id: int = 50256,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    device: str | torch.device = "cpu",
    prompt_lengths: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The book's `custom_collate_fn`: (inputs, targets), both (batch, longest example).

    Each example gets the end-of-text token (`pad_token_id`, which also pads) appended; inputs are
    the example padded, targets the example shifted left by one, so the last real target is the
    end-of-text token and every target after it is `ignore_index`. Both are cut to
    `allowed_max_length`. With `prompt_lengths`, the targets that are prompt tokens become
    `ignore_index` too, so only the response (and its end-of-text) is learned.
    """
    width = max(len(item) for item in batch)
    inputs = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(batch), width), ignore_index, dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item)
        ids = torch.as_tensor(item, dtype=torch.long)
        inputs[row, :n] = ids
        targets[row, : n - 1] = ids[1:]
        targets[row, n - 1] = pad_token_id  # predict end-of-text after the response: learn to stop
        if prompt_lengths is not None:
            targets[row, : max(prompt_lengths[row] - 1, 0)] = ignore_index
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs.to(device), targets.to(device)


# ----------------------------------------------------------------------------------------------
# the task


class InstructionTask(Task):
    """Instruction finetuning for the trainer: epochs over the training examples in a seeded
    order (micro-batch `index` -> epoch and position, so batches are a pure function of `index`),
    the loss on target tokens, and validation loss over the validation examples in file order."""

    best_metric = "val_loss"
    best_lower_is_better = True

    def __init__(
        self,
        train: InstructionDataset,
        val: InstructionDataset,
        *,
        batch_size: int,
        eot_id: int,
        seed: int = 123,
        epochs: float = 2.0,
        context_length: int | None = None,
        mask_prompt: bool = False,
        eval_batches: int = 0,
        tokenizer: Tokenizer | None = None,
        sample_count: int = 3,
        sample_tokens: int = 64,
    ):
        self.train, self.val = train, val
        self.batch_size = batch_size
        self.eot_id = eot_id
        self.seed = seed
        self.epochs = epochs
        self.context_length = context_length
        self.mask_prompt = mask_prompt
        self.eval_batches = eval_batches
        self.tokenizer = tokenizer
        self.sample_count = sample_count
        self.sample_tokens = sample_tokens
        # as the book's DataLoader(drop_last=True): whole batches only (one short batch for tiny sets)
        self.batches_per_epoch = max(1, len(train) // batch_size)
        self._perm: tuple[int, list[int]] | None = None

    def collate(
        self, dataset: InstructionDataset, indices: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = [dataset.prompt_lengths[i] for i in indices] if self.mask_prompt else None
        batch = [dataset[i] for i in indices]
        return custom_collate_fn(
            batch, self.eot_id, IGNORE_INDEX, self.context_length, prompt_lengths=lengths
        )

    def epoch_order(self, epoch: int) -> list[int]:
        """The training examples' order in `epoch` (a fresh seeded permutation per epoch)."""
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (
                epoch,
                np.random.default_rng([self.seed, epoch]).permutation(len(self.train)).tolist(),
            )
        return self._perm[1]

    def train_batch(
        self, index: int, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position = divmod(index * world_size + rank, self.batches_per_epoch)
        start = position * self.batch_size
        return self.collate(self.train, self.epoch_order(epoch)[start : start + self.batch_size])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return next_token_loss(model, *batch, ignore_index=IGNORE_INDEX)

    def default_steps(self, cfg: TrainerConfig, world_size: int) -> int:
        return max(1, math.ceil(self.epochs * self.batches_per_epoch / (cfg.grad_accum * world_size)))

    def evaluate(
        self, model: nn.Module, amp: Callable[[], contextlib.AbstractContextManager]
    ) -> dict[str, float]:
        """Loss per target token on the validation examples (the first `eval_batches` batches; 0: all),
        and on as many training examples (in file order) for comparison."""
        n = (
            len(self.val)
            if not self.eval_batches
            else min(len(self.val), self.eval_batches * self.batch_size)
        )
        val = self.dataset_loss(model, self.val, n, amp)
        train = self.dataset_loss(model, self.train, min(n, len(self.train)), amp)
        return {"train_loss": train, "val_loss": val}

    @torch.no_grad()
    def dataset_loss(
        self,
        model: nn.Module,
        dataset: InstructionDataset,
        n: int,
        amp: Callable[[], contextlib.AbstractContextManager],
    ) -> float:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for start in range(0, n, self.batch_size):
            inputs, targets = self.collate(dataset, range(start, min(start + self.batch_size, n)))
            inputs, targets = inputs.to(device), targets.to(device)
            with amp():
                logits = model(inputs)
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total += float(loss)
            count += int((targets != IGNORE_INDEX).sum())
        return total / max(count, 1)

    def samples(self, model: nn.Module) -> list[str]:
        """The model's answers to the first few validation instructions."""
        if not (self.sample_count and self.sample_tokens and self.tokenizer is not None):
            return []
        entries = self.val.data[: self.sample_count]
        template = self.val.template
        prompts = [template.format_example(e)[0] for e in entries]
        gen = GenerationConfig(max_new_tokens=self.sample_tokens, stop=template.stop_strings)
        # no prepacked copy of the weights: they change between evaluations
        engine = Engine(model, self.tokenizer, allowed_special=template.allowed_special, prepack=False)
        outs = engine.generate(prompts, gen)
        return [
            f"{e['instruction'][:60]} -> {template.extract_response(o.text)}" for e, o in zip(entries, outs)
        ]


# ----------------------------------------------------------------------------------------------
# wiring: `scratchllm finetune instruct`


@dataclass
class InstructConfig(LoRASettings, TrainerConfig):
    """Everything `scratchllm finetune instruct` needs; TOML sections [data], [model], [lora], [train],
    [eval], [system], [run]. Training defaults follow the book's chapter 7 (AdamW, lr 5e-5, batch 8,
    2 epochs)."""

    data: str = setting(
        "", "instruction data: a JSON list or JSONL file of {instruction, input, output}", "data", path=True
    )
    val_data: str | None = setting(
        None, "validation records in their own file (then --data is all training)", "data", path=True
    )
    test_data: str | None = setting(
        None, "test records in their own file (copied to OUT/data/test.json)", "data", path=True
    )
    val_fraction: float = setting(0.05, "share of --data held out for validation (no --val-data)", "data")
    test_fraction: float = setting(0.1, "share of --data held out for testing (no --val-data)", "data")
    split_seed: int | None = setting(
        123, "seed of the shuffled split; none: file order (the book's split)", "data"
    )
    template: str = setting(
        AUTO_TEMPLATE,
        "prompt template: auto (the model's own chat template when its tokenizer has one, else alpaca), "
        "model, alpaca or phi3",
        "data",
    )
    mask_prompt: bool = setting(
        False, "learn only the response: prompt tokens are left out of the loss", "data"
    )
    model: str = setting(
        "gpt2-medium",
        "the model to finetune: a model directory or gpt2, gpt2-medium, ...",
        "model",
        path="dir",
    )
    context_length: int | None = setting(
        None, "truncate examples to this many tokens (default: the model's)", "model"
    )
    drop_rate: float | None = setting(None, "override the model's dropout rate", "model")
    epochs: float = setting(2.0, "passes over the training examples (used when max_steps = 0)", "train")
    batch_size: int = setting(8, "examples per micro-batch and process", "train")
    max_steps: int = setting(0, "optimizer steps (0: from --epochs)", "train")
    lr: float = setting(5e-5, "peak learning rate", "train")
    min_lr: float = setting(5e-6, "learning rate at the end of the decay", "train")
    warmup_steps: int = setting(10, "steps of linear warmup from 0 to lr", "train")
    beta2: float = setting(0.999, "AdamW beta2", "train")
    eval_every: int = setting(50, "evaluate every N steps (0: only at the end)", "eval")
    eval_batches: int = setting(
        0, "validation batches per evaluation (0: the whole validation split)", "eval"
    )
    sample_count: int = setting(3, "validation instructions answered at each evaluation", "eval")
    sample_tokens: int = setting(64, "tokens generated per sample answer (0: no samples)", "eval")
    out_dir: str = setting(
        "runs/instruct", "directory for checkpoints, metrics, the data split and the model", "run", path=True
    )

    def validate(self) -> None:
        super().validate()

        def bad(msg: str) -> ScratchLLMError:
            return ScratchLLMError(f"finetune settings: {msg}")

        if not self.data:
            raise bad(
                "no instruction data; give --data FILE (a JSON list or JSONL of {instruction, input, output})"
            )
        if not (
            0 <= self.val_fraction < 1
            and 0 <= self.test_fraction < 1
            and self.val_fraction + self.test_fraction < 1
        ):
            raise bad(
                f"need 0 <= val_fraction, test_fraction and their sum < 1, got {self.val_fraction}, "
                f"{self.test_fraction}"
            )
        if self.epochs <= 0:
            raise bad(f"epochs must be > 0, got {self.epochs}")
        self.check_lora("finetune settings")
        if self.context_length is not None and self.context_length < 2:
            raise bad(f"context_length must be >= 2, got {self.context_length}")
        if self.template not in template_names():
            raise bad(
                f"unknown prompt template {self.template!r}; choose one of: {', '.join(template_names())}"
            )
        check_model_spec(self.model)  # before the data is read (or downloaded)

    def check_flags(self, flags: dict[str, Any]) -> None:
        super().check_flags(flags)
        if not self.lora:
            reject_unused_flags(flags, "lora_", "--lora true")


@dataclass
class InstructData:
    train: list[Entry]
    val: list[Entry]
    test: list[Entry]


def resolve_splits(
    cfg: InstructConfig, load: Callable[[str], list[Entry]] = load_instruction_data
) -> InstructData:
    """The train/val/test records (read by `load`): separate files, or a split of `data`."""
    records = load(cfg.data)
    test = load(cfg.test_data) if cfg.test_data else []
    if cfg.val_data:
        return InstructData(records, load(cfg.val_data), test)
    test_fraction = 0.0 if cfg.test_data else cfg.test_fraction
    train, val, split_test = split_data(records, cfg.val_fraction, test_fraction, cfg.split_seed)
    return InstructData(train, val, test or split_test)


def _prepare_model(cfg: InstructConfig) -> LoadedModel:
    """`cfg.model` set up to learn (all its weights, or LoRA adapters), with a tokenizer that can end
    responses."""
    loaded = setup_model(
        cfg.model, drop_rate=cfg.drop_rate, lora=cfg.lora_spec(), context_length=cfg.context_length
    )
    if loaded.tokenizer.eot_id is None:
        raise ScratchLLMError(
            f"the tokenizer of {cfg.model} has no end-of-text token (<|endoftext|>, or its eos_token) to end "
            "responses with"
        )
    return loaded


def finetune_instruct(
    cfg: InstructConfig, resume: str | None = None, run_config_toml: str | None = None
) -> TrainResult:
    """Finetune `cfg.model` on instruction data (see the module docstring); returns the trainer's
    result. The run directory gets `model/` and `best/` (model directories with the template in
    `extra`) and `data/{train,val,test}.json` (the split, for `respond` and evaluation)."""
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    # before loading the data and the model
    check_run_start(out_dir, resume, cfg.overwrite, files=[f"data/{n}.json" for n in SPLIT_NAMES])
    dist = init_distributed(cfg.device)
    with run_lock(out_dir, dist.is_main):  # until every output is written
        torch.manual_seed(cfg.seed)
        splits = resolve_splits(cfg)
        loaded = _prepare_model(cfg)
        model, tokenizer = loaded.model, loaded.tokenizer
        template = get_template(cfg.template, tokenizer)
        context = cfg.context_length or model.cfg.context_length
        if dist.is_main:
            for name in SPLIT_NAMES:
                atomic_write_json(out_dir / "data" / f"{name}.json", getattr(splits, name))

        train = _training_examples(splits.train, tokenizer, template, context, cfg.mask_prompt, dist.is_main)
        val = InstructionDataset(splits.val, tokenizer, template)
        task = InstructionTask(
            train,
            val,
            batch_size=cfg.batch_size,
            eot_id=tokenizer.eot_id,
            seed=cfg.seed,
            epochs=cfg.epochs,
            context_length=context,
            mask_prompt=cfg.mask_prompt,
            eval_batches=cfg.eval_batches,
            tokenizer=tokenizer,
            sample_count=cfg.sample_count,
            sample_tokens=cfg.sample_tokens,
        )
        if dist.is_main:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            too_long = sum(len(t) > context for t in train.encoded_texts)
            print(
                f"model {cfg.model}: {count_parameters(model) / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M "
                f"trained{' (LoRA)' if cfg.lora else ''}; data: {len(train)} train / {len(val)} val / "
                f"{len(splits.test)} test examples, template {template.name}, context {context}"
                + (f" ({too_long} training examples truncated)" if too_long else "")
            )
        extra = {**loaded.extra, "trained_by": "scratchllm finetune instruct", TEMPLATE_KEY: template.name}
        toml = run_config_toml or dump_toml(cfg)
        trainer = Trainer(model, task, cfg, tokenizer=tokenizer, extra=extra, dist=dist, run_config_toml=toml)
        result = trainer.fit(resume)
        if cfg.lora and dist.is_main:
            _merge_saved_adapters([out_dir / "model", out_dir / "best"])
        return result


def instruct_finetune(
    cfg: InstructConfig, resume: str | None = None, run_config_toml: str | None = None
) -> TrainResult:
    """Deprecated: `finetune_instruct` (named like `finetune_classify`); this name goes in the next
    release."""
    warnings.warn(
        "instruct_finetune is now finetune_instruct; the old name goes in the next release",
        FutureWarning,
        stacklevel=2,
    )
    return finetune_instruct(cfg, resume, run_config_toml)


def _training_examples(
    records: list[Entry],
    tokenizer: Tokenizer,
    template: PromptTemplate,
    context: int,
    mask_prompt: bool,
    is_main: bool,
) -> InstructionDataset:
    """The training records, tokenized; with `mask_prompt`, only those with a response token in the
    context."""
    train = InstructionDataset(records, tokenizer, template)
    if not mask_prompt:
        return train
    # a prompt that fills the context leaves no response token to learn from
    keep = [e for e, n in zip(train.data, train.prompt_lengths) if n < context]
    if not keep:
        raise ScratchLLMError(
            f"with --mask-prompt no training example has a response token within the context of {context} "
            "tokens; raise --context-length or leave out --mask-prompt"
        )
    if len(keep) == len(train):
        return train
    if is_main:
        print(
            f"skipping {len(train) - len(keep)} training examples whose prompt fills the context ({context})"
        )
    return InstructionDataset(keep, tokenizer, template)


def _merge_saved_adapters(directories: Sequence[Path]) -> None:
    """Rewrite LoRA model directories as plain ones (adapters folded into the weights), so the
    assistant loads and runs like any model; resumable checkpoints keep their adapters."""
    for directory in directories:
        if directory.is_dir():
            loaded = load_model(directory)
            merge_lora(loaded.model)
            save_model(directory, loaded.model, loaded.tokenizer, loaded.extra)


def summarize(result: TrainResult) -> str:
    """The run's numbers, where the assistant went, and the command that tries it."""
    m = result.metrics
    out = result.out_dir
    tok_s = result.tokens / max(result.seconds, 1e-9)
    nan = float("nan")
    best = result.best if result.best is not None else nan
    respond = (
        f"respond --model {quote(out / 'model')} --data {quote(out / 'data' / 'test.json')} "
        f"--out {quote(out / 'test-responses.json')}"
    )
    lines = [
        f"{result.stopped}: {result.steps:,} steps, {result.tokens:,} tokens in {result.seconds:.0f} s "
        f"({tok_s:,.0f} tokens/s)",
        f"validation loss {m.get('val_loss', nan):.3f} (train loss {m.get('train_loss', nan):.3f}; "
        f"best validation loss {best:.3f})",
        f"assistant: {out / 'model'}   best: {out / 'best'}   loss plot: {out / 'loss.png'}   split: "
        f"{out / 'data'}",
        next_hint(respond),
    ]
    return "\n".join(lines)


def finetune_instruct_command(
    config: str | None, overrides: dict[str, Any], resume: str | None = None
) -> TrainResult:
    """`scratchllm finetune instruct`: resolve the settings, train, print the summary."""
    config, _, overrides = settings_to_resume(InstructConfig, config, overrides, resume)
    cfg = load_config(InstructConfig, config, overrides)
    cfg.check_flags(overrides)
    result = finetune_instruct(cfg, resume)
    if init_distributed(cfg.device).is_main:
        print(summarize(result))
    return result
