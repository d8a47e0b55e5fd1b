"""`pretrain --model auto`: a model sized to the time budget, from a throughput probe and the corpus size.

The rule (docs/auto-size.md derives it from measurements in benchmarks/RESULTS.md): a budget of `seconds`
lets a candidate shape train D = tokens/s x seconds tokens in D / (batch x context) optimizer steps. Repeated
tokens are worth less than new ones (Muennighoff et al., "Scaling Data-Constrained Language Models", 2023):
over a corpus of N unique tokens, D is worth D' = N (1 + R (1 - exp(-(D/N - 1) / R))) once it passes one
epoch, which levels off at N (1 + R). The rule takes the largest candidate that gets at least `MIN_STEPS`
steps and `TOKENS_PER_PARAM` effective tokens per parameter, or the smallest when none does.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..device import autocast, pick_device, resolve_precision
from ..errors import ScratchLLMError
from ..model import registry
from ..model.gpt import count_parameters
from ..model.registry import SIZE_NAMES
from .evaluate import next_token_loss
from .optim import make_optimizer

if TYPE_CHECKING:
    from .pretrain import PretrainConfig

AUTO = "auto"
MIN_STEPS = 150  # optimizer steps a size needs in the budget to beat the smaller sizes
TOKENS_PER_PARAM = 0.02  # effective training tokens per parameter below which a larger size stops paying
REPEAT_EPOCHS = 4.0  # R: how fast repeated epochs lose their worth (Muennighoff et al. fit 15 at scale)
PROBE_STEPS = 1  # timed steps per probed shape, after one untimed step
PROBE_SHARE = 0.05  # of the time budget, for the probe at most (and PROBE_MAX_S)
PROBE_MAX_S = 20.0


@dataclass(frozen=True)
class Candidate:
    """One shape auto may choose: a size of the family at a context length, with its measured speed."""

    size: str
    context_length: int
    batch_size: int
    params: int
    tokens_per_s: float
    probed: bool = True

    def steps(self, seconds: float) -> float:
        """The optimizer steps it trains in `seconds`."""
        return self.tokens_per_s * seconds / (self.batch_size * self.context_length)


@dataclass(frozen=True)
class Choice:
    """The chosen candidate and what the rule expects of it."""

    candidate: Candidate
    seconds: float
    corpus_tokens: int

    @property
    def tokens(self) -> float:
        return self.candidate.tokens_per_s * self.seconds

    @property
    def epochs(self) -> float:
        return self.tokens / max(self.corpus_tokens, 1)

    @property
    def steps(self) -> float:
        return self.candidate.steps(self.seconds)

    @property
    def tokens_per_param(self) -> float:
        return effective_tokens(self.tokens, self.corpus_tokens) / self.candidate.params


def effective_tokens(tokens: float, corpus_tokens: int, repeat_epochs: float = REPEAT_EPOCHS) -> float:
    """What `tokens` of training over `corpus_tokens` unique tokens are worth in new tokens: all of them in
    the first epoch, then less with every repetition, never more than corpus_tokens x (1 + repeat_epochs)."""
    if tokens <= corpus_tokens:
        return tokens
    repeats = tokens / corpus_tokens - 1
    return corpus_tokens * (1 + repeat_epochs * (1 - math.exp(-repeats / repeat_epochs)))


def choose(
    candidates: Sequence[Candidate],
    seconds: float,
    corpus_tokens: int,
    min_steps: float = MIN_STEPS,
    tokens_per_param: float = TOKENS_PER_PARAM,
) -> Choice:
    """The rule: the largest candidate that trains at least `min_steps` steps in `seconds` and gets at
    least `tokens_per_param` effective tokens per parameter (the smallest if none does)."""
    if not candidates:
        raise ValueError("no candidate shapes to choose from")
    ordered = sorted(candidates, key=lambda c: (c.params, -c.tokens_per_s))
    fits = [c for c in ordered if fits_budget(c, seconds, corpus_tokens, min_steps, tokens_per_param)]
    return Choice(fits[-1] if fits else ordered[0], seconds, corpus_tokens)


def fits_budget(
    c: Candidate,
    seconds: float,
    corpus_tokens: int,
    min_steps: float = MIN_STEPS,
    tokens_per_param: float = TOKENS_PER_PARAM,
) -> bool:
    """Whether `c` gets enough steps, and enough effective tokens per parameter, in `seconds`."""
    tokens = c.tokens_per_s * seconds
    return (
        c.steps(seconds) >= min_steps
        and effective_tokens(tokens, corpus_tokens) >= tokens_per_param * c.params
    )


# ----------------------------------------------------------------------------------------------
# the candidates and the probe


def candidate_configs(cfg: PretrainConfig, vocab_size: int) -> list[tuple[str, int, Any]]:
    """(size, context, model config) for each of the family's small sizes, at its own context (or the
    one given), with the overrides given."""
    out = []
    for size in SIZE_NAMES:
        model_cfg = dataclasses.replace(cfg, model=size).model_config(vocab_size=vocab_size)
        out.append((size, model_cfg.context_length, model_cfg))
    return out


def probe(
    configs: Sequence[tuple[str, int, Any]], tokens: np.ndarray, cfg: PretrainConfig, max_seconds: float
) -> list[Candidate]:
    """Training tokens/s of each shape: real steps (AdamW, the run's precision and batch) on the corpus,
    smallest first, while they fit in `max_seconds`; the shapes after that are estimated from their FLOPs
    per token (`estimate_speed`; the smallest shape is always measured)."""
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    out: list[Candidate] = []
    measured: list[tuple[float, float]] = []  # (FLOPs per token, tokens/s) of the shapes timed
    t0 = time.perf_counter()
    for size, ctx, model_cfg in sorted(configs, key=lambda c: registry.flops_per_token(c[2], c[1])):
        flops = registry.flops_per_token(model_cfg, ctx)
        if measured:
            estimate = estimate_speed(measured, flops)
            step_s = cfg.batch_size * ctx / estimate
            if time.perf_counter() - t0 + (PROBE_STEPS + 1) * step_s > max_seconds:
                with torch.device("meta"):  # shapes only: the parameters are counted, never allocated
                    params = count_parameters(registry.build_model(model_cfg))
                out.append(Candidate(size, ctx, cfg.batch_size, params, estimate, probed=False))
                continue
        tok_s, params = _time_steps(model_cfg, ctx, cfg.batch_size, tokens, cfg, device, precision)
        out.append(Candidate(size, ctx, cfg.batch_size, params, tok_s))
        measured.append((flops, tok_s))
    return out


def estimate_speed(measured: Sequence[tuple[float, float]], flops: float) -> float:
    """Tokens/s of a shape of `flops` per token, from (FLOPs per token, tokens/s) measured: seconds per
    token as a line in FLOPs through the last two (a fixed cost per token and a cost per FLOP), or
    proportional to FLOPs from one."""
    f1, s1 = measured[-1]
    if len(measured) >= 2:
        f0, s0 = measured[-2]
        slope = (1 / s1 - 1 / s0) / (f1 - f0) if f1 != f0 else 0.0
        if slope > 0:
            return 1 / (1 / s1 + slope * (flops - f1))
    return s1 * f1 / flops


def _time_steps(
    model_cfg: Any,
    ctx: int,
    batch: int,
    tokens: np.ndarray,
    cfg: PretrainConfig,
    device: torch.device,
    precision: str,
) -> tuple[float, int]:
    """(tokens/s, parameters) of full training steps of a fresh model of `model_cfg`."""
    model = registry.build_model(model_cfg).to(device)
    model.train()
    optimizer = make_optimizer(model, cfg, device, precision)
    rng = np.random.default_rng(cfg.seed)
    n = len(tokens) - ctx - 1
    if n < 1:
        raise ScratchLLMError(
            f"--model auto: the corpus has {len(tokens)} tokens, fewer than a window of {ctx}"
        )
    elapsed = 0.0
    for step in range(PROBE_STEPS + 1):
        starts = rng.integers(0, n, batch)
        rows = torch.from_numpy(np.stack([tokens[s : s + ctx + 1].astype(np.int64) for s in starts]))
        rows = rows.to(device)
        t0 = time.perf_counter()
        with autocast(device, precision):
            loss = next_token_loss(model, rows[:, :-1], rows[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:  # the first step allocates
            elapsed += time.perf_counter() - t0
    return PROBE_STEPS * batch * ctx / max(elapsed, 1e-9), count_parameters(model)


# ----------------------------------------------------------------------------------------------
# wiring into `scratchllm pretrain`


def check_auto(cfg: PretrainConfig) -> None:
    """What `--model auto` needs, checked before any data work: a time budget, no starting weights."""
    if cfg.model != AUTO:
        return
    if not cfg.max_minutes:
        raise ScratchLLMError(
            "--model auto sizes the model to a time budget: give --max-minutes N (or pick a preset: "
            f"--model {' / '.join(SIZE_NAMES)})"
        )
    if cfg.init_from:
        raise ScratchLLMError(f"--model auto and --init-from {cfg.init_from}: leave out --model")


def resolve_auto(
    cfg: PretrainConfig, train_tokens: Any, vocab_size: int, world_size: int = 1, resuming: bool = False
) -> PretrainConfig:
    """`cfg` with the shape auto chose (a size, its context and batch, enough steps for the clock to end
    the run, the budget less the probe's time); prints the choice and why."""
    if resuming:
        raise ScratchLLMError(
            "--model auto with --resume: the run keeps the shape it chose (in its config.toml); leave out "
            "--model"
        )
    if world_size > 1:
        raise ScratchLLMError("--model auto probes one process's speed; pick a preset under torchrun")
    make_optimizer(torch.nn.Linear(1, 1), cfg, pick_device(cfg.device))  # imports: not the probe's time
    t0 = time.perf_counter()
    tokens = np.asarray(train_tokens)
    configs = candidate_configs(cfg, vocab_size)
    with torch.random.fork_rng(devices=[]):  # the run's model starts as a preset's of the same seed would
        candidates = probe(configs, tokens, cfg, min(PROBE_SHARE * cfg.max_minutes * 60, PROBE_MAX_S))
    probe_s = time.perf_counter() - t0
    seconds = max(cfg.max_minutes * 60 - probe_s, 1.0)
    choice = choose(candidates, seconds, len(tokens))
    c = choice.candidate
    batch = cfg.batch_size
    steps = math.ceil(choice.tokens / (batch * c.context_length))
    print(
        f"auto: {c.size} ({c.params / 1e6:.2f}M parameters, context {c.context_length}, batch {batch}): "
        f"{c.tokens_per_s:,.0f} tokens/s x {seconds:.0f} s ~ {choice.tokens / 1e6:.2f}M tokens, "
        f"{choice.epochs:.1f} epochs of {len(tokens):,}"
    )
    print(f"auto: why: {_why(choice, candidates)} (probe: {probe_s:.1f} s of the budget)")
    return dataclasses.replace(
        cfg,
        model=c.size,
        context_length=c.context_length,
        max_minutes=round(seconds / 60, 4),
        max_steps=max(cfg.max_steps, 4 * steps),  # the clock ends the run, not the step count
    )


def _why(choice: Choice, candidates: Sequence[Candidate]) -> str:
    c = choice.candidate
    got = f"{choice.steps:,.0f} steps, {choice.tokens_per_param:.3f} effective tokens per parameter"
    wants = f"the rule wants >= {MIN_STEPS} steps and >= {TOKENS_PER_PARAM:g} tokens per parameter"
    bigger = [o for o in candidates if o.params > c.params]
    if not bigger:
        return f"the largest size; it gets {got} ({wants})"
    nxt = min(bigger, key=lambda o: o.params)
    nxt_got = Choice(nxt, choice.seconds, choice.corpus_tokens)
    return (
        f"it gets {got}; {nxt.size} would get {nxt_got.steps:,.0f} steps, "
        f"{nxt_got.tokens_per_param:.3f} tokens per parameter ({wants})"
    )


__all__ = [
    "AUTO",
    "Candidate",
    "Choice",
    "check_auto",
    "choose",
    "effective_tokens",
    "estimate_speed",
    "fits_budget",
    "probe",
    "resolve_auto",
]
