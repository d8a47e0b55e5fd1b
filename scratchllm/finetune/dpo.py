"""`scratchllm finetune dpo`: Direct Preference Optimization (the book's bonus chapter), on the one trainer.

One preference pair, from file to loss:

    {"instruction", "input", "chosen", "rejected"}    load_preference_data (also {prompt, ...} and chat
                                                      message lists under "messages")
      -> prompt text, and the two responses            the model's prompt template (templates.py)
      -> token ids of prompt + chosen, prompt + rejected, and where each response starts
      -> log p(response | prompt) under the model       sum over the response tokens (or their mean, the
         being trained and under a frozen reference     book's variant: --average-logps)
      -> loss = -log sigmoid(beta * ((pc - rc) - (pr - rr)))   `dpo_loss`

with p = policy, r = reference, c = chosen, r = rejected. The model learns to raise the chosen response's
likelihood relative to the reference more than the rejected one's. The reference is the starting model
(or --ref-model): its log-probabilities never change, so they are computed once, before training, and
cached in the run directory (with LoRA the starting model is the base itself, so no second copy of the
weights is ever held). The "rewards" beta * (log p - log r) of each response, their margin and how often
the chosen one wins (reward accuracy) are reported at each evaluation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..checkpoint import LoadedModel
from ..config import dump_toml, load_config, setting
from ..errors import ScratchLLMError
from ..fileio import atomic_write_json, read_json_records
from ..generation import Engine, GenerationConfig
from ..hub import load_model
from ..text.templates import TEMPLATE_KEY, get_template
from ..text.tokenizer import Tokenizer
from ..train.distributed import init_distributed
from ..train.rundir import check_run_start, run_lock, settings_to_resume
from ..train.task import Task, TrainResult
from ..train.trainer import Trainer
from .instruct import (
    IGNORE_INDEX,
    SPLIT_NAMES,
    InstructConfig,
    InstructionTask,
    _common_prefix,
    _merge_saved_adapters,
    _prepare_model,
    resolve_splits,
)

Pair = dict[str, Any]
REFERENCE_FILE = "reference_logps.safetensors"  # the frozen reference's log-probabilities, per split


# ----------------------------------------------------------------------------------------------
# the loss


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss of a batch of pairs from the responses' log-probabilities (batch,), and the rewards
    beta * (log p - log r) of the chosen and of the rejected responses (detached). `label_smoothing` e
    assumes that share of the labels is flipped (conservative DPO): the loss mixes both directions."""
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


def response_logps(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """log p(response | prompt) of each row: the sum (or with `average` the mean) of the log-probabilities
    of its target tokens that are not `IGNORE_INDEX` (the prompt and the padding are)."""
    logits = model(inputs).float()
    mask = targets != IGNORE_INDEX
    picked = torch.gather(logits.log_softmax(-1), -1, targets.clamp(min=0)[..., None])[..., 0]
    total = (picked * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


# ----------------------------------------------------------------------------------------------
# data


def load_preference_data(path: str | Path) -> list[Pair]:
    """Preference records from a JSON list or JSONL file: `chosen` and `rejected` responses (strings) to
    an `instruction` (with an optional `input`: the book's format), a `prompt`, or a chat `messages` list.
    A malformed record is an error that names the file and the record."""
    records = read_json_records(path, "preference data", "{instruction, input, chosen, rejected} records")
    for where, _, record in records:
        _check_pair(where, record)
    return [r for _, _, r in records]


def _check_pair(where: str, record: Any) -> None:
    if not isinstance(record, dict):
        raise ScratchLLMError(
            f"{where}: expected an object with chosen and rejected, got {type(record).__name__}"
        )
    for key in ("chosen", "rejected"):
        if not isinstance(record.get(key), str):
            got = "missing" if record.get(key) is None else type(record[key]).__name__
            raise ScratchLLMError(
                f'{where}: "{key}" must be a string ({got}): the preferred/dispreferred reply'
            )
    asks = [k for k in ("instruction", "prompt", "messages") if record.get(k)]
    if len(asks) != 1:
        raise ScratchLLMError(
            f"{where}: give exactly one of instruction (with an optional input), prompt or messages; got "
            f"{asks or 'none'}"
        )
    if asks == ["messages"] and not isinstance(record["messages"], list):
        raise ScratchLLMError(f'{where}: "messages" must be a list of {{role, content}} objects')
    if asks != ["messages"] and not isinstance(record[asks[0]], str):
        raise ScratchLLMError(f'{where}: "{asks[0]}" must be a string')


def pair_prompt(template: Any, record: Pair) -> str:
    """The prompt text of a pair, in the template: an instruction (+ input), a plain prompt taken as the
    instruction, or a conversation rendered up to the assistant's turn."""
    if record.get("messages"):
        return template.render_chat(record["messages"], add_generation_prompt=True)
    return template.prompt(record.get("instruction") or record["prompt"], record.get("input") or "")


class PreferenceDataset:
    """Each pair tokenized once: ids of prompt + chosen and of prompt + rejected, and how many of each are
    prompt (the common prefix of the prompt's ids and the full text's, as `InstructionDataset`)."""

    def __init__(self, data: Sequence[Pair], tokenizer: Tokenizer, template: Any):
        self.data = list(data)
        self.template = template
        specials = template.allowed_special
        prompts = [pair_prompt(template, r) for r in self.data]
        prompt_ids = tokenizer.encode_batch(prompts, specials)
        self.chosen = tokenizer.encode_batch([p + r["chosen"] for p, r in zip(prompts, self.data)], specials)
        self.rejected = tokenizer.encode_batch(
            [p + r["rejected"] for p, r in zip(prompts, self.data)], specials
        )
        self.chosen_prompt = [_common_prefix(p, c) for p, c in zip(prompt_ids, self.chosen)]
        self.rejected_prompt = [_common_prefix(p, r) for p, r in zip(prompt_ids, self.rejected)]
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.data)

    def fingerprint(self) -> str:
        """A hash of the token ids: the reference log-probabilities cached for them fit only them."""
        blob = json.dumps([self.chosen, self.rejected, self.chosen_prompt, self.rejected_prompt])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def collate_pairs(
    dataset: PreferenceDataset, indices: Sequence[int], eot_id: int, context_length: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the chosen responses of `indices` then their rejected ones, one batch of
    2 x len(indices) rows: end-of-text appended, padded, targets shifted, the prompt and padding
    `IGNORE_INDEX` (only responses count), cut to `context_length`."""
    rows = [(dataset.chosen[i], dataset.chosen_prompt[i]) for i in indices]
    rows += [(dataset.rejected[i], dataset.rejected_prompt[i]) for i in indices]
    width = max(len(ids) + 1 for ids, _ in rows)
    inputs = torch.full((len(rows), width), eot_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(rows):
        full = torch.as_tensor([*ids, eot_id], dtype=torch.long)
        inputs[row, : len(full)] = full
        targets[row, : len(full) - 1] = full[1:]
        targets[row, : max(prompt_len - 1, 0)] = IGNORE_INDEX
    if context_length is not None:
        inputs, targets = inputs[:, :context_length], targets[:, :context_length]
    return inputs, targets


# ----------------------------------------------------------------------------------------------
# the task


class DPOTask(Task):
    """DPO for the trainer: seeded epochs over the training pairs (a batch is a pure function of its index),
    each step one forward pass over the chosen and rejected responses together, against the reference
    log-probabilities computed before training (`reference`: split -> (chosen, rejected))."""

    best_metric = "val_loss"
    best_lower_is_better = True

    def __init__(
        self,
        train: PreferenceDataset,
        val: PreferenceDataset,
        reference: dict[str, tuple[torch.Tensor, torch.Tensor]],
        *,
        batch_size: int,
        eot_id: int,
        beta: float,
        label_smoothing: float = 0.0,
        average_logps: bool = False,
        seed: int = 123,
        epochs: float = 1.0,
        context_length: int | None = None,
        eval_batches: int = 0,
        tokenizer: Tokenizer | None = None,
        sample_count: int = 2,
        sample_tokens: int = 48,
    ):
        self.train, self.val, self.reference = train, val, reference
        self.batch_size, self.eot_id, self.beta = batch_size, eot_id, beta
        self.label_smoothing, self.average_logps = label_smoothing, average_logps
        self.seed, self.epochs, self.context_length = seed, epochs, context_length
        self.eval_batches, self.tokenizer = eval_batches, tokenizer
        self.sample_count, self.sample_tokens = sample_count, sample_tokens
        self.batches_per_epoch = max(1, len(train) // batch_size)
        self._perm: tuple[int, list[int]] | None = None

    epoch_order = InstructionTask.epoch_order  # one seeded permutation per epoch, computed once

    def train_batch(self, index: int, rank: int = 0, world_size: int = 1) -> tuple[Any, ...]:
        epoch, position = divmod(index * world_size + rank, self.batches_per_epoch)
        order = self.epoch_order(epoch)
        rows = order[position * self.batch_size : (position + 1) * self.batch_size]
        return self._batch(self.train, "train", rows)

    def _batch(self, data: PreferenceDataset, split: str, rows: Sequence[int]) -> tuple[Any, ...]:
        inputs, targets = collate_pairs(data, rows, self.eot_id, self.context_length)
        chosen, rejected = self.reference[split]
        index = torch.as_tensor(rows, dtype=torch.long)
        return inputs, targets, chosen[index], rejected[index]

    def batch_tokens(self, batch: tuple[Any, ...]) -> int:
        return int(batch[0].numel())

    def default_steps(self, cfg: Any, world_size: int) -> int:
        return max(1, math.ceil(self.epochs * self.batches_per_epoch / (cfg.grad_accum * world_size)))

    def _loss_and_rewards(self, model: nn.Module, batch: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        inputs, targets, ref_chosen, ref_rejected = batch
        device = next(model.parameters()).device
        logps = response_logps(model, inputs.to(device), targets.to(device), self.average_logps)
        n = len(ref_chosen)
        return dpo_loss(
            logps[:n],
            logps[n:],
            ref_chosen.to(device),
            ref_rejected.to(device),
            self.beta,
            self.label_smoothing,
        )

    def loss(self, model: nn.Module, batch: tuple[Any, ...]) -> torch.Tensor:
        return self._loss_and_rewards(model, batch)[0]

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, amp: Callable[[], contextlib.AbstractContextManager]
    ) -> dict[str, float]:
        """Loss, rewards, margin and reward accuracy on the validation pairs (the first `eval_batches`
        batches; 0: all), and on as many training pairs (in file order) for comparison."""
        n = (
            len(self.val)
            if not self.eval_batches
            else min(len(self.val), self.eval_batches * self.batch_size)
        )
        metrics = {}
        for split, data in (("train", self.train), ("val", self.val)):
            metrics |= self._metrics(model, data, split, min(n, len(data)), amp)
        return metrics

    def _metrics(
        self, model: nn.Module, data: PreferenceDataset, split: str, n: int, amp: Callable
    ) -> dict[str, float]:
        losses, chosen, rejected = [], [], []
        for start in range(0, n, self.batch_size):
            rows = list(range(start, min(start + self.batch_size, n)))
            with amp():
                loss, c, r = self._loss_and_rewards(model, self._batch(data, split, rows))
            losses.append(float(loss) * len(rows))
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        c, r = torch.cat(chosen), torch.cat(rejected)
        return {
            f"{split}_loss": sum(losses) / n,
            f"{split}_chosen_reward": float(c.mean()),
            f"{split}_rejected_reward": float(r.mean()),
            f"{split}_reward_margin": float((c - r).mean()),
            f"{split}_reward_accuracy": float((c > r).float().mean()),
        }

    def samples(self, model: nn.Module) -> list[str]:
        """The model's answers to the first few validation prompts."""
        if not (self.sample_count and self.sample_tokens and self.tokenizer is not None):
            return []
        data, template = self.val, self.val.template
        prompts = data.prompts[: self.sample_count]
        gen = GenerationConfig(max_new_tokens=self.sample_tokens, stop=template.stop_strings)
        engine = Engine(model, self.tokenizer, allowed_special=template.allowed_special, prepack=False)
        outs = engine.generate(prompts, gen)
        asked = [(r.get("instruction") or r.get("prompt") or "(a conversation)")[:60] for r in data.data]
        return [f"{a} -> {template.extract_response(o.text)}" for a, o in zip(asked, outs)]


@torch.no_grad()
def reference_logps(
    model: nn.Module,
    data: PreferenceDataset,
    batch_size: int,
    eot_id: int,
    context_length: int | None,
    average: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (chosen, rejected) log-probabilities of every pair under `model` (eval mode, fp32, no grad)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(data), batch_size):
        rows = range(start, min(start + batch_size, len(data)))
        inputs, targets = collate_pairs(data, rows, eot_id, context_length)
        logps = response_logps(model, inputs.to(device), targets.to(device), average).cpu()
        chosen.append(logps[: len(rows)])
        rejected.append(logps[len(rows) :])
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


# ----------------------------------------------------------------------------------------------
# wiring: `scratchllm finetune dpo`


@dataclass
class DPOConfig(InstructConfig):
    """Everything `scratchllm finetune dpo` needs: `finetune instruct`'s settings (data split, template,
    LoRA, training) plus the reference and the DPO loss's. Defaults follow the book's DPO notebook (beta
    0.1, lr 5e-6, batch 8, one epoch)."""

    data: str = setting(
        "",
        "preference data: a JSON list or JSONL file of {instruction, input, chosen, rejected} (or prompt or "
        "messages instead of instruction)",
        "data",
        path=True,
    )
    model: str = setting(
        "runs/instruct/model",
        "the model to align (usually an instruction-finetuned one): a model directory or a hub name",
        "model",
        path="dir",
    )
    ref_model: str | None = setting(
        None, "the frozen reference (default: the starting model itself)", "model", path="dir"
    )
    beta: float = setting(0.1, "how far from the reference the model may move (higher: less)", "dpo")
    label_smoothing: float = setting(0.0, "share of pairs assumed mislabelled (conservative DPO)", "dpo")
    average_logps: bool = setting(
        False, "a response's log-probability is its tokens' mean (the book's variant), not their sum", "dpo"
    )
    epochs: float = setting(1.0, "passes over the training pairs (used when max_steps = 0)", "train")
    lr: float = setting(5e-6, "peak learning rate", "train")
    min_lr: float = setting(5e-7, "learning rate at the end of the decay", "train")
    sample_count: int = setting(
        2, "validation prompts answered before training and at each evaluation", "eval"
    )
    sample_tokens: int = setting(48, "tokens generated per sample answer (0: no samples)", "eval")
    out_dir: str = setting(
        "runs/dpo", "directory for checkpoints, metrics, the data split and the model", "run", path=True
    )

    def validate(self) -> None:
        if not self.data:
            raise ScratchLLMError(
                "dpo settings: no preference data; give --data FILE (a JSON list or JSONL of {instruction, "
                "input, chosen, rejected})"
            )
        super().validate()
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5:
            raise ScratchLLMError(
                f"dpo settings: need beta > 0 and 0 <= label_smoothing < 0.5, got {self.beta}, "
                f"{self.label_smoothing}"
            )

    def check_flags(self, flags: dict[str, Any]) -> None:
        super().check_flags(flags)
        if "mask_prompt" in flags:
            raise ScratchLLMError("--mask-prompt: DPO always learns from the responses only; leave it out")


def _reference(
    cfg: DPOConfig,
    policy: LoadedModel,
    data: dict[str, PreferenceDataset],
    context: int | None,
    out_dir: Path,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The reference's log-probabilities of every split's pairs: from the cache in `out_dir` when it was
    made for these pairs and this reference, else computed now, with --ref-model or the policy as it is
    before training (the trainer loads a checkpoint to resume only later), and cached."""
    key = json.dumps(
        {"reference": cfg.ref_model or cfg.model, "average": cfg.average_logps, "context": context}
        | {split: d.fingerprint() for split, d in data.items()},
        sort_keys=True,
    )
    path = out_dir / REFERENCE_FILE
    with contextlib.suppress(Exception), safe_open(str(path), framework="pt") as f:
        # missing, damaged or made for other pairs: computed again
        if (f.metadata() or {}).get("key") == key:
            cached = load_file(path)
            return {s: (cached[f"{s}.chosen"], cached[f"{s}.rejected"]) for s in data}
    ref = load_model(cfg.ref_model, dtype="fp32").model if cfg.ref_model else policy.model
    eot = policy.tokenizer.eot_id
    out = {
        s: reference_logps(ref, d, cfg.batch_size, eot, context, cfg.average_logps) for s, d in data.items()
    }
    tensors = {
        f"{s}.{name}": t.contiguous()
        for s, pair in out.items()
        for name, t in zip(("chosen", "rejected"), pair)
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"key": key})
    tmp.replace(path)
    return out


def _check_responses_fit(data: PreferenceDataset, context: int, say: bool) -> None:
    """Pairs whose prompt fills the context have no response tokens left to learn from: an error when
    that is every pair, else a note."""
    cut = sum(min(c, r) >= context for c, r in zip(data.chosen_prompt, data.rejected_prompt))
    if cut == len(data):
        raise ScratchLLMError(
            f"every training pair's prompt takes the whole context ({context} tokens), leaving no response "
            "to learn from; use shorter prompts, a larger --context-length, or a model with a longer context"
        )
    if cut and say:
        print(f"note: {cut} of {len(data)} training pairs have no response tokens within {context} tokens")


def finetune_dpo(
    cfg: DPOConfig, resume: str | None = None, run_config_toml: str | None = None
) -> TrainResult:
    """Align `cfg.model` with DPO on preference pairs (see the module docstring); returns the trainer's
    result. The run directory gets `model/` and `best/` (with the prompt template in `extra`),
    `data/{train,val,test}.json` (the split) and the reference's log-probabilities."""
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    check_run_start(out_dir, resume, cfg.overwrite, files=[f"data/{n}.json" for n in SPLIT_NAMES])
    dist = init_distributed(cfg.device)
    with run_lock(out_dir, dist.is_main):
        torch.manual_seed(cfg.seed)
        splits = resolve_splits(cfg, load_preference_data)
        loaded = _prepare_model(cfg)
        model, tokenizer = loaded.model, loaded.tokenizer
        template = get_template(cfg.template, tokenizer)
        context = cfg.context_length or model.cfg.context_length
        if dist.is_main:
            for name in SPLIT_NAMES:
                atomic_write_json(out_dir / "data" / f"{name}.json", getattr(splits, name))
        data = {s: PreferenceDataset(getattr(splits, s), tokenizer, template) for s in ("train", "val")}
        _check_responses_fit(data["train"], context, dist.is_main)
        reference = _reference(cfg, loaded, data, context, out_dir)
        task = DPOTask(
            data["train"],
            data["val"],
            reference,
            batch_size=cfg.batch_size,
            eot_id=tokenizer.eot_id,
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            average_logps=cfg.average_logps,
            seed=cfg.seed,
            epochs=cfg.epochs,
            context_length=context,
            eval_batches=cfg.eval_batches,
            tokenizer=tokenizer,
            sample_count=cfg.sample_count,
            sample_tokens=cfg.sample_tokens,
        )
        if dist.is_main:
            print(
                f"model {cfg.model}: {len(data['train'])} train / {len(data['val'])} val pairs, template "
                f"{template.name}, beta {cfg.beta}, reference {cfg.ref_model or 'the starting model'}"
            )
            if resume is None:
                for line in task.samples(model):
                    print(f"before | {line}")
        extra = {**loaded.extra, "trained_by": "scratchllm finetune dpo", TEMPLATE_KEY: template.name}
        toml = run_config_toml or dump_toml(cfg)
        trainer = Trainer(model, task, cfg, tokenizer=tokenizer, extra=extra, dist=dist, run_config_toml=toml)
        result = trainer.fit(resume)
        if cfg.lora and dist.is_main:
            _merge_saved_adapters([out_dir / "model", out_dir / "best"])
        return result


def summarize(result: TrainResult) -> str:
    """The run's numbers and where the aligned model went."""
    m, out = result.metrics, result.out_dir
    nan = float("nan")
    return "\n".join(
        [
            f"{result.stopped}: {result.steps:,} steps in {result.seconds:.0f} s",
            f"validation loss {m.get('val_loss', nan):.3f}, reward accuracy "
            f"{m.get('val_reward_accuracy', nan):.0%}, reward margin {m.get('val_reward_margin', nan):.3f} "
            f"(train: {m.get('train_reward_accuracy', nan):.0%})",
            f"model: {out / 'model'}   best: {out / 'best'}   metrics: {out / 'metrics.jsonl'}",
        ]
    )


def finetune_dpo_command(
    config: str | None, overrides: dict[str, Any], resume: str | None = None
) -> TrainResult:
    """`scratchllm finetune dpo`: resolve the settings, train, print the summary."""
    config, _, overrides = settings_to_resume(DPOConfig, config, overrides, resume)
    cfg = load_config(DPOConfig, config, overrides)
    cfg.check_flags(overrides)
    result = finetune_dpo(cfg, resume)
    if init_distributed(cfg.device).is_main:
        print(summarize(result))
    return result
