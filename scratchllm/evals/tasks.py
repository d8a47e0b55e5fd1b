"""Task files: JSON Lines, one item per line, in one of three formats.

- HellaSwag's: `{"ctx": ..., "endings": [...], "label": 2}` (an `activity_label`, when present, is
  put before the context, and the `[title]`/`[header]` markup of its WikiHow items is cleaned up,
  as lm-evaluation-harness does, so scores compare with the numbers it reports);
- generic multiple choice: `{"context": ..., "choices": [...], "answer": 1}` (`answer` is the index
  of the right choice, or its text: a string that equals a choice is that choice);
- generation: `{"prompt": ..., "answer": "..."}` (`answer` may be a list of accepted answers).

The format is read from the first record's fields (or given); every line must then carry that
format's fields. A malformed line is a `ScratchLLMError` naming the file, the line and the field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ScratchLLMError
from ..fileio import read_json_records

FORMATS = {
    "hellaswag": ("ctx", "endings", "label"),
    "choice": ("context", "choices", "answer"),
    "generation": ("prompt", "answer"),
}
FORMAT_NAMES = {"hellaswag": "HellaSwag", "choice": "multiple choice", "generation": "generation"}


@dataclass(frozen=True)
class MultipleChoiceItem:
    """A context and its choices; `label` is the index of the right one. `line`: 1-based, in its file."""

    context: str
    choices: tuple[str, ...]
    label: int
    line: int = 0

    @property
    def target(self) -> str:
        """The text that completes the context in a few-shot example: the right choice."""
        return self.choices[self.label]


@dataclass(frozen=True)
class GenerationItem:
    """A prompt and the answers that count as right (compared after `normalize_answer`)."""

    context: str
    answers: tuple[str, ...]
    line: int = 0

    @property
    def target(self) -> str:
        return self.answers[0]


Item = MultipleChoiceItem | GenerationItem


@dataclass
class TaskFile:
    """The items of one task file and its format (`hellaswag`, `choice` or `generation`)."""

    path: str
    format: str
    items: list[Item]

    @property
    def kind(self) -> str:
        """`multiple_choice` or `generation`: how the items are scored."""
        return "generation" if self.format == "generation" else "multiple_choice"


def read_task(path: str | os.PathLike, format: str = "auto") -> TaskFile:
    """Read and check a task file (see the module docstring for the formats)."""
    path = Path(path).expanduser()
    if format != "auto" and format not in FORMATS:
        raise ScratchLLMError(f"unknown task format {format!r}; use auto, {', '.join(FORMATS)}")
    items: list[Item] = []
    for where, n, record in read_json_records(path, "task file", "one item per line"):
        if format == "auto":
            format = detect_format(record, where)
        items.append(parse_record(record, format, where, n))
    return TaskFile(str(path), format, items)


def detect_format(record: dict[str, Any], where: str = "record") -> str:
    """The format whose distinctive field the record has (a prompt without choices is a generation
    item, whatever other fields it carries, such as a `context` of its own)."""
    if "endings" in record or "ctx" in record:
        return "hellaswag"
    if "prompt" in record and "choices" not in record:
        return "generation"
    if "choices" in record or "context" in record:
        return "choice"
    if "prompt" in record:
        return "generation"
    expected = "; ".join(f"{FORMAT_NAMES[f]} ({', '.join(fields)})" for f, fields in FORMATS.items())
    raise ScratchLLMError(
        f"{where}: cannot tell the task format from the fields {sorted(record)}; expected {expected}"
    )


def parse_record(record: dict[str, Any], format: str, where: str = "record", line: int = 0) -> Item:
    """One item from one JSON object of a task file of `format`."""
    for name in FORMATS[format]:
        if name not in record:
            raise ScratchLLMError(
                f"{where}: missing field {name!r} ({FORMAT_NAMES[format]} items need "
                f"{', '.join(FORMATS[format])})"
            )
    if format == "generation":
        prompt = _string(record, "prompt", where)
        answer = record["answer"]
        answers = [answer] if isinstance(answer, str) else answer
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ScratchLLMError(
                f"{where}: field 'answer' must be a string or a list of strings, got {answer!r}"
            )
        if not all(a.strip() for a in answers):  # every output would contain it: a free point
            raise ScratchLLMError(f"{where}: field 'answer' has an empty answer; give the expected text")
        return GenerationItem(prompt, tuple(answers), line)
    if format == "hellaswag":
        context = _string(record, "ctx", where)
        label_field, choices_field = "label", "endings"
        activity = record.get("activity_label")
        if isinstance(activity, str) and activity:
            context = f"{activity}: {context}"
        context = clean_hellaswag(context)
    else:
        context = _string(record, "context", where)
        label_field, choices_field = "answer", "choices"
    choices = record[choices_field]
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c.strip() for c in choices)
    ):
        raise ScratchLLMError(
            f"{where}: field {choices_field!r} must be a list of at least 2 non-empty strings"
        )
    if format == "hellaswag":
        choices = [clean_hellaswag(c) for c in choices]
    label = _label(record[label_field], choices, label_field, where)
    return MultipleChoiceItem(context, tuple(choices), label, line)


def clean_hellaswag(text: str) -> str:
    """lm-evaluation-harness's HellaSwag clean-up: WikiHow's `[title]` ends a sentence, other
    `[markup]` goes, double spaces become single; then (unlike the harness, which can leave a space
    in front of an ending that began with markup) the ends are stripped."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def _string(record: dict[str, Any], name: str, where: str) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise ScratchLLMError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _label(value: Any, choices: Sequence[str], name: str, where: str) -> int:
    if isinstance(value, str):
        if name == "answer" and value in choices:
            return list(choices).index(value)
        if not value.strip().isdigit():
            raise ScratchLLMError(f"{where}: field {name!r} is {value!r}, which is not one of the choices")
        value = int(value)  # HellaSwag's files store the label as a string
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(choices):
        raise ScratchLLMError(
            f"{where}: field {name!r} must be a choice index 0..{len(choices) - 1} (or the choice's text), "
            f"got {value!r}"
        )
    return value
