"""`scratchllm eval-tasks`: a model on a task file, zero-shot or K-shot, with per-item results as JSON."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, cast

from tqdm.auto import tqdm

from ..config import setting
from ..device import autocast, pick_device, resolve_precision
from ..errors import ScratchLLMError
from ..fileio import atomic_write_json, check_output_file
from ..generation import Engine, GenerationConfig
from ..hub import load_model
from ..model.gpt import GPTModel
from ..text.tokenizer import Tokenizer
from .fewshot import FewShot
from .scoring import score_generation, score_multiple_choice
from .tasks import GenerationItem, Item, MultipleChoiceItem, TaskFile, read_task
from .voting import SAMPLED_METRICS


@dataclass
class EvalSettings:
    """How to run a task. `holdout`: the first N items are the few-shot pool and are not scored;
    without it (and without `fewshot_file`) the pool is the task's other items."""

    shots: int = setting(0, "solved examples before each item", "fewshot", metavar="K")
    fewshot_file: str | None = setting(
        None,
        "draw examples from this file (same format) instead of the task's other items",
        "fewshot",
        metavar="FILE.jsonl",
    )
    holdout: int = setting(
        0, "use the task's first N items as the example pool and score the rest", "fewshot", metavar="N"
    )
    seed: int = setting(1234, "seed for drawing the examples", "fewshot")
    separator: str = setting(
        "\n\n",
        "text between examples; \\n and \\t, here, in --target-delimiter and in --stop, are a newline and a "
        "tab",
        "fewshot",
    )
    target_delimiter: str = setting(" ", "text between a context and its answer", "fewshot")
    limit: int | None = setting(None, "score only the first N items (quick runs)", "task", metavar="N")
    batch_size: int = setting(
        16, "sequences per forward pass (multiple choice) or prompts per batch (generation)", "task"
    )
    max_new_tokens: int = setting(32, "generation: tokens to generate at most", "generation")
    stop: tuple[str, ...] = setting(
        ("\n",), "generation: stop at this text (repeatable)", "generation", repeat=True, metavar="TEXT"
    )
    format: str = setting(
        "auto",
        "the task format (auto: from the first line's fields)",
        "task",
        choices=("auto", "hellaswag", "choice", "generation"),
    )
    samples: int = setting(
        0,
        "generation: also sample N answers per item and report majority vote (self-consistency) and "
        "best-of-N (by the verifier, and by the model's mean log-probability) next to greedy",
        "generation",
        metavar="N",
    )
    sample_temperature: float = setting(0.7, "generation: the samples' temperature", "generation")
    sample_top_k: int | None = setting(40, "generation: the samples' top-k (none: all tokens)", "generation")

    def validate(self) -> None:
        for name in ("shots", "holdout"):
            if getattr(self, name) < 0:
                raise ScratchLLMError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ScratchLLMError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ScratchLLMError("--batch-size and --max-new-tokens must be >= 1")
        if self.holdout and self.fewshot_file:
            raise ScratchLLMError("give either --fewshot-file or --holdout (the pool of examples), not both")
        if self.samples < 0 or (self.samples and self.sample_temperature <= 0):
            raise ScratchLLMError(
                "--samples must be >= 0, and sampling needs --sample-temperature > 0 (at 0 every sample is "
                "the greedy answer)"
            )


def evaluate_task(
    model: GPTModel,
    tokenizer: Tokenizer,
    task: TaskFile | str | os.PathLike,
    settings: EvalSettings | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score `model` on a task; returns {"summary": {...}, "items": [...], "settings": {...}}."""
    settings = settings or EvalSettings()
    settings.validate()
    if getattr(model.cfg, "n_classes", 0):
        raise ScratchLLMError(
            "this model has a classifier head; zero/few-shot evaluation needs a language model"
        )
    task = task if isinstance(task, TaskFile) else read_task(task, settings.format)
    items, pool, pool_name = split_pool(task, settings)
    first = settings.holdout
    if settings.limit is not None:
        items = items[: settings.limit]
    fewshot = FewShot(pool, settings.shots, settings.seed, settings.separator, settings.target_delimiter)

    generation = task.kind == "generation"
    total = len(items) if generation else sum(len(cast(MultipleChoiceItem, it).choices) for it in items)
    bar = _progress_bar(total, progress, "item" if generation else "choice")
    start = time.perf_counter()
    try:
        if generation:
            per_item = score_generation(
                Engine(model, tokenizer),
                cast(list[GenerationItem], items),
                fewshot,
                max_new_tokens=settings.max_new_tokens,
                stop=settings.stop,
                batch_size=settings.batch_size,
                progress=bar.update,
                first_index=first,
                samples=settings.samples,
                sample_config=GenerationConfig(
                    temperature=settings.sample_temperature, top_k=settings.sample_top_k, seed=settings.seed
                ),
            )
        else:
            per_item = score_multiple_choice(
                model,
                tokenizer,
                cast(list[MultipleChoiceItem], items),
                fewshot,
                batch_size=settings.batch_size,
                progress=bar.update,
                first_index=first,
            )
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    metrics = ("exact_match",) if generation else ("acc", "acc_norm")
    if generation and settings.samples:
        metrics += SAMPLED_METRICS
    summary: dict[str, Any] = {
        "task": task.path,
        "format": task.format,
        "n": len(per_item),
        "shots": settings.shots,
        **({"samples": settings.samples} if generation and settings.samples else {}),
    }
    for m in metrics:
        values = [r[m] for r in per_item]
        summary[m] = sum(values) / len(values)
        summary[f"{m}_stderr"] = _stderr(values)
    summary["truncated_items"] = sum(1 for r in per_item if r["truncated"])
    summary["seconds"] = seconds
    summary["items_per_s"] = len(per_item) / max(seconds, 1e-9)
    return {
        "summary": summary,
        "settings": {
            **vars(settings),
            "stop": list(settings.stop),
            "fewshot_pool": pool_name,
            "context_length": model.cfg.context_length,
        },
        "items": per_item,
    }


def split_pool(task: TaskFile, settings: EvalSettings) -> tuple[list[Item], list[Item], str]:
    """(items to score, few-shot pool, a description of the pool)."""
    items = list(task.items)
    if settings.holdout:
        if settings.holdout >= len(items):
            raise ScratchLLMError(
                f"--holdout {settings.holdout} leaves nothing to score: {task.path} has {len(items)} items"
            )
        pool, items = items[: settings.holdout], items[settings.holdout :]
        return items, pool, f"the first {settings.holdout} items of {task.path}"
    if settings.fewshot_file:
        pool_task = read_task(settings.fewshot_file, task.format)
        return items, list(pool_task.items), pool_task.path
    return items, items, f"the other items of {task.path}" if settings.shots else "none"


@dataclass
class EvalTasksSettings:
    """Score a model on a JSON Lines task file, zero-shot or with K solved examples in the prompt.
    Multiple choice (HellaSwag's ctx/endings/label, or context/choices/answer): the choice with the
    highest log-likelihood wins (acc), or per byte of the choice (acc_norm). Generation (prompt/answer):
    greedy output up to a stop string, exact match after normalising case and whitespace. For loss and
    perplexity on plain text see `scratchllm perplexity`."""

    model: str = setting(
        "", "a model directory, or gpt2, gpt2-medium, gpt2-large, gpt2-xl", "model", required=True
    )
    task: str = setting(
        "", "the task file, one JSON object per line", "task", required=True, metavar="FILE.jsonl"
    )
    eval: EvalSettings = setting(EvalSettings(), "how the task is run")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps", "model")
    precision: str = setting("fp32", "fp32 (exact), bf16, fp16 or auto", "model")
    out: str | None = setting(
        None, "write the summary and per-item scores as JSON", "output", metavar="FILE.json"
    )
    json: bool = setting(False, "print the summary as JSON", "output")
    quiet: bool = setting(False, "no progress bar", "output")


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def eval_tasks_command(settings: EvalTasksSettings) -> None:
    """Load the model, run the task, write the JSON, print the summary. `\\n` and `\\t` in the
    separator, the target delimiter and the stop strings are a newline and a tab (`--separator '\\n\\n'`)."""

    if not settings.model or not settings.task:  # a TOML file can leave them out, which the flags cannot
        raise ScratchLLMError("give a model and a task file: --model MODEL --task FILE.jsonl")
    run = replace(
        settings.eval,
        separator=_unescape(settings.eval.separator),
        target_delimiter=_unescape(settings.eval.target_delimiter),
        stop=tuple(_unescape(s) for s in settings.eval.stop),
    )
    run.validate()  # bad settings, a malformed file and a bad --out fail before the model loads
    out, task = settings.out, settings.task
    if out is not None:
        check_output_file(out, inputs={"--task": task, "--fewshot-file": run.fewshot_file})
    task_file = read_task(task, run.format)
    dev = pick_device(settings.device)
    prec = resolve_precision(settings.precision, dev)
    loaded = load_model(settings.model, device=str(dev), dtype="fp32")  # --precision says how it computes
    if loaded.tokenizer is None:
        raise ScratchLLMError(
            f"model {settings.model!r} has no tokenizer files; it cannot read a task's text"
        )
    with autocast(dev, prec):
        result = evaluate_task(loaded.model, loaded.tokenizer, task_file, run, not settings.quiet)
    result["summary"]["model"] = str(settings.model)
    result["settings"].update(device=str(dev), precision=prec)
    if out:
        atomic_write_json(out, result)
    if settings.json:
        print(json.dumps(result["summary"], indent=2))
    else:
        print(format_summary(result["summary"]) + (f"; per-item results in {out}" if out else ""))


def format_summary(s: dict[str, Any]) -> str:
    metrics = [k for k in ("acc", "acc_norm", "exact_match", *SAMPLED_METRICS) if k in s]
    scores = ", ".join(f"{m} {s[m]:.4f} ± {s[f'{m}_stderr']:.4f}" for m in metrics)
    cut = f", {s['truncated_items']} truncated" if s.get("truncated_items") else ""
    model = f"{s['model']} on " if "model" in s else ""
    sampled = f", {s['samples']} samples per item" if s.get("samples") else ""
    return (
        f"{model}{s['task']}: {scores} (n={s['n']}, {s['shots']}-shot{cut}{sampled}; "
        f"{s['items_per_s']:.1f} items/s)"
    )


def _stderr(values: list[float]) -> float:
    """Standard error of the mean (sample standard deviation), as lm-evaluation-harness reports."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _progress_bar(total: int, enabled: bool, unit: str):

    return tqdm(total=total, unit=unit, disable=not enabled, file=sys.stderr, desc="eval", dynamic_ncols=True)
