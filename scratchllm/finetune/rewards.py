"""Verifiable rewards for `finetune grpo`: a function (prompt, completion, answer) -> float per completion.

- `exact`: 1 when the completion (up to its first line break, whitespace and case aside) is the answer.
- `numeric`: 1 when the completion's final number equals the answer's, however formatted: `1,000` and
  `1000`, `3.50` and `3.5`; the number in a final `\\boxed{...}` or on an `Answer:` line wins if present.
- `regex:PATTERN`: 1 when the pattern matches the completion (the answer is not used).
- `python:MODULE:FUNCTION` (or `python:path/to/file.py:FUNCTION`): the user's own function, called as
  `function(prompt, completion, answer)`, returning a number.

`combine` adds weighted rewards, e.g. the answer's plus 0.1 for the right format.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import ScratchLLMError

Reward = Callable[[str, str, str], float]
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def exact_reward(prompt: str, completion: str, answer: str) -> float:
    """1.0 when the completion's first line is the answer (case and whitespace aside), else 0.0."""
    first = completion.strip().split("\n", 1)[0] if completion.strip() else ""
    return float(" ".join(first.lower().split()) == " ".join(answer.lower().split()))


def final_number(text: str) -> float | None:
    """The number a completion answers with: inside a final `\\boxed{}`, else on an `Answer:` line, else
    the last number in the text; commas between digits are thousands separators. None: no number."""
    for pattern in (r"\\boxed\{([^{}]*)\}", r"(?im)^\s*answer\s*[:=]\s*(.*)$"):
        found = re.findall(pattern, text)
        if found and NUMBER.search(found[-1]):
            text = found[-1]
            break
    numbers = NUMBER.findall(text)
    if not numbers:
        return None
    try:
        return float(numbers[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_reward(prompt: str, completion: str, answer: str) -> float:
    """1.0 when the completion's final number equals the answer's (within 1e-9 relative), else 0.0."""
    got, want = final_number(completion), final_number(answer)
    if got is None or want is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12))


def regex_reward(pattern: str) -> Reward:
    """1.0 when `pattern` matches somewhere in the completion."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ScratchLLMError(f"reward regex {pattern!r} does not compile ({e})") from e
    return lambda prompt, completion, answer: float(compiled.search(completion) is not None)


def python_reward(spec: str) -> Reward:
    """The function named by `MODULE:FUNCTION` or `path/to/file.py:FUNCTION`."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ScratchLLMError(f"python reward {spec!r}: give MODULE:FUNCTION or path/to/file.py:FUNCTION")
    try:
        if where.endswith(".py"):
            loader = importlib.util.spec_from_file_location(Path(where).stem, where)
            if loader is None or loader.loader is None:
                raise ImportError(f"cannot load {where}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        function = getattr(module, name)
    except (ImportError, AttributeError, FileNotFoundError, SyntaxError) as e:
        raise ScratchLLMError(f"python reward {spec!r}: {type(e).__name__}: {e}") from e
    if not callable(function):
        raise ScratchLLMError(f"python reward {spec!r} is not a function")
    return function


def make_reward(spec: str) -> Reward:
    """A reward from its name: exact, numeric, regex:PATTERN or python:MODULE:FUNCTION."""
    kind, _, rest = spec.partition(":")
    if kind == "exact" and not rest:
        return exact_reward
    if kind == "numeric" and not rest:
        return numeric_reward
    if kind == "regex" and rest:
        return regex_reward(rest)
    if kind == "python" and rest:
        return python_reward(rest)
    raise ScratchLLMError(
        f"unknown reward {spec!r}; use exact, numeric, regex:PATTERN or python:MODULE:FUNCTION"
    )


def combine(rewards: Sequence[tuple[Reward, float]]) -> Reward:
    """The weighted sum of `rewards` ((reward, weight) pairs); a reward that is not a finite number is an
    error naming it."""

    def total(prompt: str, completion: str, answer: str) -> float:
        value = 0.0
        for reward, weight in rewards:
            r = reward(prompt, completion, answer)
            if not isinstance(r, (int, float)) or not math.isfinite(r):
                raise ScratchLLMError(f"the reward {getattr(reward, '__name__', reward)!r} returned {r!r}")
            value += weight * float(r)
        return value

    return total


__all__ = [
    "combine",
    "exact_reward",
    "final_number",
    "make_reward",
    "numeric_reward",
    "python_reward",
    "regex_reward",
]
