"""Evaluation beyond loss: zero-shot and few-shot accuracy on task files (`scratchllm eval`).

GPT-2's paper measured what a language model can do with no task-specific training: solve a task
from its description alone (zero-shot) or from a handful of solved examples in the prompt
(few-shot). This package measures the same on any model directory or GPT-2:

    tasks.py    JSON Lines task files: HellaSwag, generic multiple choice, generation (checked, with
                errors naming the line and the field)
    fewshot.py  K-shot prompts from an example pool, seeded, never showing an item its own answer
    scoring.py  log-likelihood of continuations (batched; the choices of an item share one pass
                over their context), multiple-choice acc / acc_norm, greedy generation with exact
                match through the one engine (generation.py)
    run.py      the command: load, score, summarize, write the per-item JSON

    from scratchllm.checkpoint import load_model
    from scratchllm.evals import EvalSettings, evaluate_task

    loaded = load_model("gpt2")
    result = evaluate_task(loaded.model, loaded.tokenizer, "hellaswag.jsonl", EvalSettings(shots=5, limit=100))
    print(result["summary"]["acc_norm"])

Loss, perplexity and bits per byte on plain text are `scratchllm evaluate` (train/evaluate.py).
"""

from __future__ import annotations

from .fewshot import FewShot
from .run import EvalSettings, eval_command, evaluate_task, format_summary
from .scoring import (
    Score,
    encode_context,
    encode_pair,
    loglikelihoods,
    normalize_answer,
    score_choices,
    score_generation,
    score_multiple_choice,
)
from .tasks import GenerationItem, MultipleChoiceItem, TaskFile, read_task

__all__ = [
    "EvalSettings",
    "FewShot",
    "GenerationItem",
    "MultipleChoiceItem",
    "Score",
    "TaskFile",
    "encode_context",
    "encode_pair",
    "eval_command",
    "evaluate_task",
    "format_summary",
    "loglikelihoods",
    "normalize_answer",
    "read_task",
    "score_choices",
    "score_generation",
    "score_multiple_choice",
]
