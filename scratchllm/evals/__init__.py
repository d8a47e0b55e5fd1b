"""Evaluation beyond loss: zero-shot and few-shot accuracy on task files (`scratchllm eval-tasks`), and
an LLM judge of free-form answers (`scratchllm judge`).

GPT-2's paper measured what a language model can do with no task-specific training: solve a task
from its description alone (zero-shot) or from a handful of solved examples in the prompt
(few-shot). This package measures the same on any model directory or GPT-2:

    tasks.py         JSON Lines task files: HellaSwag, generic multiple choice, generation (checked, with
                     errors naming the line and the field)
    fewshot.py       K-shot prompts from an example pool, seeded, never showing an item its own answer
    scoring.py       log-likelihood of continuations (batched; the choices of an item share one pass
                     over their context), multiple-choice acc / acc_norm, greedy generation with exact
                     match through the one engine (generation/)
    run.py           the command: load, score, summarize, write the per-item JSON
    judge.py         score responses 0-100 with a judge LLM
    judge_client.py  the judge's client of any OpenAI-compatible server

    from scratchllm.hub import load_model
    from scratchllm.evals import EvalSettings, evaluate_task

    loaded = load_model("gpt2")
    result = evaluate_task(
        loaded.model, loaded.tokenizer, "hellaswag.jsonl", EvalSettings(shots=5, limit=100)
    )
    print(result["summary"]["acc_norm"])

Loss, perplexity and bits per byte on plain text are `scratchllm perplexity` (train/evaluate.py).
Names are imported on first use, so the judge (an HTTP client) does not load PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FewShot": "fewshot",
    "EvalSettings": "run",
    "EvalTasksSettings": "run",
    "eval_tasks_command": "run",
    "evaluate_task": "run",
    "format_summary": "run",
    "Score": "scoring",
    "encode_context": "scoring",
    "encode_pair": "scoring",
    "loglikelihoods": "scoring",
    "normalize_answer": "voting",
    "majority_vote": "voting",
    "score_choices": "scoring",
    "score_generation": "scoring",
    "score_multiple_choice": "scoring",
    "GenerationItem": "tasks",
    "MultipleChoiceItem": "tasks",
    "TaskFile": "tasks",
    "read_task": "tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
