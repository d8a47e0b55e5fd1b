"""`scratchllm finetune grpo`: reinforcement learning with verifiable rewards (GRPO), on the one trainer.

One step, from prompts to loss:

    {"prompt", "answer"} records                         load_prompts (JSON list or JSONL)
      -> P prompts, each sampled G times                  the one generation engine (KV cache, batched),
                                                          seeded by the rollout's number
      -> a reward per completion                          a verifier (rewards.py): exact, numeric, regex,
                                                          or the user's function; weighted format rewards
      -> advantage = (reward - group mean) / group std    no value network: the group is the baseline
      -> loss per completion token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * KL,
         ratio = p_now / p_at_rollout; averaged over each completion's tokens, then over completions

A rollout of batch_size x grad_accum completions serves `ppo_epochs` optimizer steps (each over its
grad_accum micro-batches of batch_size rows), so memory stays bounded by the micro-batch. The rollout
is saved in the run directory when it is made, and a resume reads it back: resuming is exact. The
reference for the KL penalty (kl_coef > 0) is the starting model, kept as a frozen copy.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import dump_toml, load_config, reject_unused_flags, setting
from ..errors import ScratchLLMError
from ..fileio import atomic_write_json, read_json_records
from ..generation import Engine, GenerationConfig
from ..hub import check_model_spec
from ..text.templates import TEMPLATE_KEY, get_template, template_names
from ..text.tokenizer import Tokenizer
from ..train.distributed import init_distributed
from ..train.rundir import check_run_start, run_lock, settings_to_resume
from ..train.setup import LoRASettings, setup_model
from ..train.task import Task, TrainResult
from ..train.trainer import Trainer
from ..train.trainer_config import TrainerConfig
from .instruct import IGNORE_INDEX, _merge_saved_adapters
from .rewards import Reward, combine, make_reward

ROLLOUT_FILE = "rollout.safetensors"  # the rollout the current optimizer steps learn from
NO_TEMPLATE = "none"


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """{prompt, answer} records (strings; other fields kept) from a JSON list or JSONL file."""
    records = read_json_records(path, "prompt data", "{prompt, answer} records")
    for where, _, record in records:
        for key in ("prompt", "answer"):
            if not isinstance(record.get(key), str) or (key == "prompt" and not record[key]):
                raise ScratchLLMError(
                    f'{where}: "{key}" must be a {"non-empty " if key == "prompt" else ""}string'
                )
    return [r for _, _, r in records]


# ----------------------------------------------------------------------------------------------
# the objective


def token_logps(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the log-probability of its target token (0 where the target is `IGNORE_INDEX`), and
    the entropy of the model's next-token distribution there."""
    logp = model(inputs).float().log_softmax(-1)
    mask = targets != IGNORE_INDEX
    picked = torch.gather(logp, -1, targets.clamp(min=0)[..., None])[..., 0] * mask
    entropy = -(logp.exp() * logp).sum(-1) * mask
    return picked, entropy


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's clipped objective (and the KL estimate to the reference, k3: exp(r - p) - (r - p) - 1), per
    completion the mean over its `mask`ed tokens, then the mean over completions. Returns (loss, kl)."""
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    kl = torch.zeros_like(logps)
    if ref_logps is not None:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
    per_token = -(surrogate - kl_coef * kl) * mask
    tokens = mask.sum(-1).clamp(min=1)
    loss = (per_token.sum(-1) / tokens).mean()
    return loss, ((kl * mask).sum(-1) / tokens).mean().detach()


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(reward - its group's mean) / (the group's standard deviation + eps); groups are consecutive."""
    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(-1, keepdim=True)
    return (centered / (groups.std(-1, unbiased=False, keepdim=True) + eps)).flatten()


# ----------------------------------------------------------------------------------------------
# rollouts


@dataclass
class Rollout:
    """G completions of P prompts: the sequences, which tokens count, the rewards, the advantages, and the
    log-probabilities when sampled (and the reference's)."""

    number: int
    inputs: torch.Tensor  # (P * G, T): prompt + completion, padded
    targets: torch.Tensor  # next tokens of the completion; IGNORE_INDEX elsewhere
    rewards: torch.Tensor
    advantages: torch.Tensor
    old_logps: torch.Tensor
    ref_logps: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("inputs", "targets", "rewards", "advantages", "old_logps", "ref_logps")
        return {n: getattr(self, n).contiguous() for n in names if getattr(self, n) is not None}


class GRPOTask(Task):
    """GRPO for the trainer. `policy` is the model being trained (rollouts are sampled from it before the
    step that first learns from them); micro-batch `index` -> optimizer step -> rollout number (one per
    `ppo_epochs` steps) -> its rows."""

    best_metric = "val_reward"
    best_lower_is_better = False

    def __init__(
        self,
        policy: nn.Module,
        tokenizer: Tokenizer,
        prompts: Sequence[dict[str, Any]],
        val: Sequence[dict[str, Any]],
        reward: Reward,
        *,
        render: Callable[[str], str],
        allowed_special: Any,
        group_size: int,
        batch_size: int,
        grad_accum: int,
        ppo_epochs: int,
        generation: GenerationConfig,
        clip_eps: float,
        kl_coef: float,
        reference: nn.Module | None,
        seed: int,
        out_dir: Path,
        eval_limit: int = 0,
        log: Callable[[str], None] = print,
    ):
        self.policy, self.tokenizer, self.reward = policy, tokenizer, reward
        self.prompts, self.val = list(prompts), list(val)
        self.render, self.allowed_special = render, allowed_special
        self.group_size, self.batch_size, self.grad_accum = group_size, batch_size, grad_accum
        self.ppo_epochs, self.generation = ppo_epochs, generation
        self.clip_eps, self.kl_coef, self.reference = clip_eps, kl_coef, reference
        self.seed, self.out_dir, self.eval_limit, self.log = seed, out_dir, eval_limit, log
        self.prompts_per_rollout = batch_size * grad_accum // group_size
        self._rollout: Rollout | None = None
        self._stats: dict[str, float] = {}

    # -- rollouts --------------------------------------------------------------------------------

    def _encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(self.render(prompt), self.allowed_special)

    def rollout(self, number: int, first_step: bool = True) -> Rollout:
        """Rollout `number`: from memory, from the run directory (a resume), or sampled now (`first_step`:
        by the first step that learns from it, as an uninterrupted run does)."""
        if self._rollout is not None and self._rollout.number == number:
            return self._rollout
        saved = self._load(number)
        if saved is None:
            if not first_step:
                self.log(
                    f"note: rollout {number} is not in {self.out_dir / ROLLOUT_FILE} (a resume from an older "
                    "checkpoint): sampled again from the weights now, so the run will not match an "
                    "uninterrupted one exactly"
                )
            saved = self._sample(number)
            self._save(saved)
        self._rollout = saved
        return saved

    def _sample(self, number: int) -> Rollout:
        rng = np.random.default_rng([self.seed, number])
        picked = rng.choice(
            len(self.prompts), self.prompts_per_rollout, replace=len(self.prompts) < self.prompts_per_rollout
        )
        records = [self.prompts[i] for i in picked]
        ids = [self._encode(r["prompt"]) for r in records for _ in range(self.group_size)]
        was_training = self.policy.training
        self.policy.eval()
        engine = Engine(self.policy, self.tokenizer, prepack=False)
        with torch.no_grad():
            completions = engine.generate(ids, self.generation.replace(seed=self.seed * 1_000_003 + number))
        rewards, rows = [], []
        for k, c in enumerate(completions):
            record = records[k // self.group_size]
            rewards.append(self.reward(record["prompt"], c.text, record["answer"]))
            ended = [c.stop] if isinstance(c.stop, int) else []  # the end token it chose is learned too
            rows.append((ids[k], [*c.token_ids, *ended]))
        inputs, targets = _pad(rows, self.tokenizer.eot_id or 0)
        device = next(self.policy.parameters()).device
        with torch.no_grad():
            old, _ = token_logps(self.policy, inputs.to(device), targets.to(device))
            ref = None
            if self.reference is not None:
                ref = token_logps(self.reference, inputs.to(device), targets.to(device))[0].cpu()
        self.policy.train(was_training)
        rewards_t = torch.tensor(rewards, dtype=torch.float32)
        advantages = group_advantages(rewards_t, self.group_size)
        return Rollout(number, inputs, targets, rewards_t, advantages, old.cpu(), ref)

    def _save(self, rollout: Rollout) -> None:
        path = self.out_dir / ROLLOUT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(rollout.tensors(), str(tmp), metadata={"number": str(rollout.number)})
        tmp.replace(path)

    def _load(self, number: int) -> Rollout | None:
        with contextlib.suppress(Exception), safe_open(str(self.out_dir / ROLLOUT_FILE), framework="pt") as f:
            if (f.metadata() or {}).get("number") == str(number):
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
                fields = ("inputs", "targets", "rewards", "advantages", "old_logps")
                return Rollout(number, *(t[k] for k in fields), t.get("ref_logps"))
        return None

    # -- the trainer's interface ----------------------------------------------------------------------

    def train_batch(self, index: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, ...]:
        step, micro = divmod(index, self.grad_accum)
        r = self.rollout(step // self.ppo_epochs, first_step=step % self.ppo_epochs == 0 and micro == 0)
        rows = slice(micro * self.batch_size, (micro + 1) * self.batch_size)
        ref = r.ref_logps[rows] if r.ref_logps is not None else torch.zeros(0)
        self._stats = {
            "rollout_reward_mean": float(r.rewards.mean()),
            "rollout_reward_std": float(r.rewards.std(unbiased=False)),
            "rollout_completion_tokens": float((r.targets != IGNORE_INDEX).sum(-1).float().mean()),
        }
        return r.inputs[rows], r.targets[rows], r.advantages[rows], r.old_logps[rows], ref

    def batch_tokens(self, batch: tuple[torch.Tensor, ...]) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        inputs, targets, advantages, old, ref = batch
        logps, entropy = token_logps(model, inputs, targets)
        mask = (targets != IGNORE_INDEX).float()
        loss, kl = grpo_loss(
            logps, old, advantages, mask, self.clip_eps, ref if ref.numel() else None, self.kl_coef
        )
        self._stats["kl"] = float(kl)
        self._stats["entropy"] = float((entropy.sum() / mask.sum().clamp(min=1)).detach())
        return loss

    def default_steps(self, cfg: Any, world_size: int) -> int:
        return max(1, math.ceil(len(self.prompts) / self.prompts_per_rollout) * self.ppo_epochs)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, amp: Callable[[], contextlib.AbstractContextManager]
    ) -> dict[str, float]:
        """Greedy answers to the held-out prompts: their mean reward (for exact or numeric: accuracy) and
        length; and the last rollout's reward, completion length, KL and entropy."""
        val = self.val[: self.eval_limit] if self.eval_limit else self.val
        config = self.generation.replace(temperature=0.0, seed=None)
        outs = Engine(model, self.tokenizer, prepack=False).generate(
            [self._encode(r["prompt"]) for r in val], config
        )
        rewards = [self.reward(r["prompt"], o.text, r["answer"]) for r, o in zip(val, outs)]
        return {
            "val_reward": sum(rewards) / max(len(rewards), 1),
            "val_completion_tokens": sum(o.completion_tokens for o in outs) / max(len(outs), 1),
            **self._stats,
        }

    def samples(self, model: nn.Module) -> list[str]:
        return []


def _pad(rows: Sequence[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of prompt + completion rows, right-padded: targets are the completion's tokens
    at the positions that predict them, `IGNORE_INDEX` elsewhere."""
    width = max(len(p) + len(c) for p, c in rows)
    inputs = torch.full((len(rows), width), pad, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        seq = [*prompt, *completion]
        inputs[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        if completion:
            targets[i, len(prompt) - 1 : len(seq) - 1] = torch.tensor(completion, dtype=torch.long)
    return inputs, targets


# ----------------------------------------------------------------------------------------------
# wiring: `scratchllm finetune grpo`


@dataclass
class GRPOConfig(LoRASettings, TrainerConfig):
    """Everything `scratchllm finetune grpo` needs; TOML sections [data], [model], [lora], [grpo], [train],
    [eval], [system], [run]. A rollout is batch_size x grad_accum completions: group_size per prompt."""

    data: str = setting("", "prompts: a JSON list or JSONL file of {prompt, answer}", "data", path=True)
    val_data: str | None = setting(
        None, "held-out {prompt, answer} records, answered greedily at each evaluation", "data", path=True
    )
    val_fraction: float = setting(0.1, "share of --data held out when there is no --val-data", "data")
    template: str = setting(
        NO_TEMPLATE,
        "how a prompt is shown: none (as it is), or a prompt template: auto, model, alpaca, phi3",
        "data",
    )
    model: str = setting("", "the model to train: a model directory or a hub name", "model", path="dir")
    reward: list[str] = setting(
        ["numeric"],
        "the answer's reward: exact, numeric, regex:PATTERN or python:MODULE:FUNCTION (several: summed)",
        "grpo",
        repeat=True,
    )
    format_reward: str | None = setting(
        None, "a regex the completion should match, rewarded with --format-weight", "grpo"
    )
    format_weight: float = setting(0.1, "the weight of --format-reward", "grpo")
    group_size: int = setting(8, "completions sampled per prompt (the group the advantages compare)", "grpo")
    ppo_epochs: int = setting(1, "optimizer steps per rollout (1: on-policy)", "grpo")
    clip_eps: float = setting(0.2, "the ratio's clip range: [1 - eps, 1 + eps]", "grpo")
    kl_coef: float = setting(0.0, "weight of the KL penalty to the starting model (0: none)", "grpo")
    temperature: float = setting(1.0, "sampling temperature of the rollouts", "grpo")
    top_k: int | None = setting(None, "sample among the k most likely tokens (none: all)", "grpo")
    max_new_tokens: int = setting(16, "completion length cap", "grpo")
    stop: list[str] = setting(
        ["\n"], "a completion ends at this text (repeatable; \\n: a newline)", "grpo", repeat=True
    )
    eval_limit: int = setting(200, "held-out prompts answered per evaluation (0: all)", "eval")
    batch_size: int = setting(16, "completions per micro-batch", "train")
    grad_accum: int = setting(
        2, "micro-batches per optimizer step (a rollout: batch_size x grad_accum)", "train"
    )
    max_steps: int = setting(50, "optimizer steps (0: one pass over the prompts x ppo_epochs)", "train")
    lr: float = setting(1e-5, "peak learning rate", "train")
    min_lr: float = setting(1e-5, "learning rate at the end of the decay", "train")
    warmup_steps: int = setting(0, "steps of linear warmup from 0 to lr", "train")
    eval_every: int = setting(10, "evaluate every N steps (0: only at the end)", "eval")
    drop_rate: float = setting(
        0.0, "dropout while training (0: the rollouts' and the step's model agree)", "model"
    )
    out_dir: str = setting("runs/grpo", "directory for checkpoints, metrics and the model", "run", path=True)

    def validate(self) -> None:
        super().validate()

        def bad(msg: str) -> ScratchLLMError:
            return ScratchLLMError(f"grpo settings: {msg}")

        if not self.data:
            raise bad("no prompts; give --data FILE (a JSON list or JSONL of {prompt, answer})")
        if not self.model:
            raise bad("no model; give --model DIR (a model that already knows the task's format)")
        if self.group_size < 2 or (self.batch_size * self.grad_accum) % self.group_size:
            raise bad(
                f"group_size must be >= 2 and divide batch_size x grad_accum ({self.batch_size} x "
                f"{self.grad_accum}), got {self.group_size}"
            )
        if self.ppo_epochs < 1 or self.clip_eps <= 0 or self.kl_coef < 0 or self.temperature <= 0:
            raise bad("need ppo_epochs >= 1, clip_eps > 0, kl_coef >= 0 and temperature > 0")
        if self.template not in (NO_TEMPLATE, *template_names()):
            raise bad(
                f"unknown template {self.template!r}; choose none or one of {', '.join(template_names())}"
            )
        if not 0 < self.val_fraction < 1:
            raise bad(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        self.rewards()  # an unknown reward or a bad regex fails now
        check_model_spec(self.model)

    def check_flags(self, flags: dict[str, Any]) -> None:
        super().check_flags(flags)
        if not self.lora:
            reject_unused_flags(flags, "lora_", "--lora true")

    def rewards(self) -> Reward:
        """The reward of a completion: the answer's rewards, plus the format's."""
        parts = [(make_reward(spec), 1.0) for spec in self.reward]
        if self.format_reward:
            parts.append((make_reward(f"regex:{self.format_reward}"), self.format_weight))
        return combine(parts)


def finetune_grpo(
    cfg: GRPOConfig, resume: str | None = None, run_config_toml: str | None = None
) -> TrainResult:
    """Train `cfg.model` with GRPO on `cfg.data` (see the module docstring); returns the trainer's result."""
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    check_run_start(out_dir, resume, cfg.overwrite)
    dist = init_distributed(cfg.device)
    if dist.world_size > 1:
        raise ScratchLLMError("finetune grpo runs in one process (its rollouts are not sharded yet)")
    with run_lock(out_dir, dist.is_main):
        torch.manual_seed(cfg.seed)
        prompts = load_prompts(cfg.data)
        if cfg.val_data:
            val = load_prompts(cfg.val_data)
        else:
            order = np.random.default_rng(cfg.seed).permutation(len(prompts)).tolist()
            n_val = max(1, int(len(prompts) * cfg.val_fraction))
            val, prompts = [prompts[i] for i in order[:n_val]], [prompts[i] for i in order[n_val:]]
            atomic_write_json(out_dir / "data" / "val.json", val)
        loaded = setup_model(cfg.model, drop_rate=cfg.drop_rate, lora=cfg.lora_spec())
        model, tokenizer = loaded.model, loaded.tokenizer
        if cfg.template == NO_TEMPLATE:
            render, allowed, template_name = (lambda p: p), frozenset(), None
        else:
            template = get_template(cfg.template, tokenizer)
            render, allowed, template_name = template.prompt, template.allowed_special, template.name
        reference = None
        if (
            cfg.kl_coef > 0
        ):  # the starting model, frozen (the trainer loads a checkpoint to resume only later)
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        generation = GenerationConfig(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            stop=tuple(s.replace("\\n", "\n") for s in cfg.stop),
        )
        task = GRPOTask(
            model,
            tokenizer,
            prompts,
            val,
            cfg.rewards(),
            render=render,
            allowed_special=allowed,
            group_size=cfg.group_size,
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            ppo_epochs=cfg.ppo_epochs,
            generation=generation,
            clip_eps=cfg.clip_eps,
            kl_coef=cfg.kl_coef,
            reference=reference,
            seed=cfg.seed,
            out_dir=out_dir,
            eval_limit=cfg.eval_limit,
        )
        print(
            f"model {cfg.model}: {len(prompts)} prompts, {len(val)} held out; {task.prompts_per_rollout} "
            f"prompts x {cfg.group_size} completions per rollout, {cfg.ppo_epochs} step(s) each; rewards "
            f"{', '.join(cfg.reward)}" + (f" + {cfg.format_weight} x format" if cfg.format_reward else "")
        )
        extra = {**loaded.extra, "trained_by": "scratchllm finetune grpo"}
        if template_name:
            extra[TEMPLATE_KEY] = template_name
        toml = run_config_toml or dump_toml(cfg)
        trainer = Trainer(model, task, cfg, tokenizer=tokenizer, extra=extra, dist=dist, run_config_toml=toml)
        result = trainer.fit(resume)
        if cfg.lora:
            _merge_saved_adapters([out_dir / "model", out_dir / "best"])
        return result


def summarize(result: TrainResult) -> str:
    """The run's numbers and where the model went."""
    m, out, nan = result.metrics, result.out_dir, float("nan")
    return "\n".join(
        [
            f"{result.stopped}: {result.steps:,} steps in {result.seconds:.0f} s",
            f"held-out reward (greedy) {m.get('val_reward', nan):.3f}; last rollout's mean reward "
            f"{m.get('rollout_reward_mean', nan):.3f}",
            f"model: {out / 'model'}   best: {out / 'best'}   metrics: {out / 'metrics.jsonl'}",
        ]
    )


def finetune_grpo_command(
    config: str | None, overrides: dict[str, Any], resume: str | None = None
) -> TrainResult:
    """`scratchllm finetune grpo`: resolve the settings, train, print the summary."""
    config, _, overrides = settings_to_resume(GRPOConfig, config, overrides, resume)
    cfg = load_config(GRPOConfig, config, overrides)
    cfg.check_flags(overrides)
    result = finetune_grpo(cfg, resume)
    print(summarize(result))
    return result
