"""`scratchllm eval`: a model on a task file, zero-shot or K-shot, with per-item results as JSON."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, cast

from ..errors import ScratchLLMError
from ..fileio import check_output_file
from ..model.gpt import GPTModel
from ..text.tokenizer import Tokenizer
from .fewshot import FewShot
from .scoring import score_generation, score_multiple_choice
from .tasks import GenerationItem, Item, MultipleChoiceItem, TaskFile, read_task


@dataclass
class EvalSettings:
    """How to run a task. `holdout`: the first N items are the few-shot pool and are not scored;
    without it (and without `fewshot_file`) the pool is the task's other items."""

    shots: int = 0
    fewshot_file: str | None = None
    holdout: int = 0
    seed: int = 1234
    separator: str = "\n\n"
    target_delimiter: str = " "
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    format: str = "auto"

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
            from ..generation import Engine

            per_item = score_generation(
                Engine(model, tokenizer),
                cast(list[GenerationItem], items),
                fewshot,
                max_new_tokens=settings.max_new_tokens,
                stop=settings.stop,
                batch_size=settings.batch_size,
                progress=bar.update,
                first_index=first,
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
    summary: dict[str, Any] = {
        "task": task.path,
        "format": task.format,
        "n": len(per_item),
        "shots": settings.shots,
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


def eval_command(
    model: str,
    task: str,
    settings: EvalSettings,
    out: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    as_json: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """`scratchllm eval`: load the model, run the task, write the JSON, print the summary."""
    from ..checkpoint import load_model
    from ..device import autocast, pick_device, resolve_precision

    settings.validate()  # bad settings, a malformed file and a bad --out fail before the model loads
    if out is not None:
        check_output_file(out, inputs={"--task": task, "--fewshot-file": settings.fewshot_file})
    task_file = read_task(task, settings.format)
    dev = pick_device(device)
    prec = resolve_precision(precision, dev)
    loaded = load_model(model, device=str(dev), dtype="fp32")  # --precision says how it computes
    if loaded.tokenizer is None:
        raise ScratchLLMError(f"model {model!r} has no tokenizer files; it cannot read a task's text")
    with autocast(dev, prec):
        result = evaluate_task(loaded.model, loaded.tokenizer, task_file, settings, progress)
    result["summary"]["model"] = str(model)
    result["settings"].update(device=str(dev), precision=prec)
    if out:
        from ..fileio import atomic_write_json

        atomic_write_json(out, result)
    if as_json:
        import json

        print(json.dumps(result["summary"], indent=2))
    else:
        print(format_summary(result["summary"]) + (f"; per-item results in {out}" if out else ""))
    return result


def format_summary(s: dict[str, Any]) -> str:
    metrics = [k for k in ("acc", "acc_norm", "exact_match") if k in s]
    scores = ", ".join(f"{m} {s[m]:.4f} ± {s[f'{m}_stderr']:.4f}" for m in metrics)
    cut = f", {s['truncated_items']} truncated" if s.get("truncated_items") else ""
    model = f"{s['model']} on " if "model" in s else ""
    return (
        f"{model}{s['task']}: {scores} (n={s['n']}, {s['shots']}-shot{cut}; {s['items_per_s']:.1f} items/s)"
    )


def _stderr(values: list[float]) -> float:
    """Standard error of the mean (sample standard deviation), as lm-evaluation-harness reports."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _progress_bar(total: int, enabled: bool, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, disable=not enabled, file=sys.stderr, desc="eval", dynamic_ncols=True)
