"""`scratchllm data arithmetic`: a synthetic task a CPU-sized model can learn, for the RL stage.

Additions and subtractions of `digits`-digit numbers with a fixed answer format, `12+34=46`, written as:

    corpus.txt     one solved problem per line, to pretrain (or finetune) a model on the task's format
    train.jsonl    {"prompt": "12+34=", "answer": "46"}: prompts for `finetune grpo`
    test.jsonl     held-out problems in the same format: `eval-tasks --task test.jsonl` scores them
                   (exact match), and `finetune grpo --val-data` reports accuracy on them

Test problems never appear in the corpus or in train.jsonl (the split is by problem).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..config import setting
from ..errors import ScratchLLMError
from ..fileio import atomic_write_text


def problems(digits: int, count: int, seed: int, operations: str = "+-") -> list[tuple[str, str]]:
    """`count` distinct (prompt, answer) problems, e.g. ("12+34=", "46"), drawn with `seed`."""
    rng = random.Random(seed)
    top = 10**digits
    space = top * top * len(operations)
    if count > space:
        raise ScratchLLMError(f"only {space} distinct {digits}-digit problems exist; ask for fewer")
    seen: set[tuple[int, int, str]] = set()
    out = []
    while len(out) < count:
        a, b, op = rng.randrange(top), rng.randrange(top), rng.choice(operations)
        if (a, b, op) in seen:
            continue
        seen.add((a, b, op))
        out.append((f"{a}{op}{b}=", str(a + b if op == "+" else a - b)))
    return out


FILES = ("corpus.txt", "train.jsonl", "test.jsonl")


@dataclass
class ArithmeticSettings:
    """`scratchllm data arithmetic`: write the synthetic arithmetic task (see the module docstring)."""

    out: str = setting("runs/arithmetic", "directory to write corpus.txt, train.jsonl and test.jsonl", "data")
    digits: int = setting(2, "digits per operand", "data")
    train: int = setting(5000, "training problems (the corpus and train.jsonl)", "data")
    test: int = setting(200, "held-out problems (test.jsonl)", "data")
    operations: str = setting("+-", "the operations drawn from: + and/or -", "data")
    seed: int = setting(0, "seed of the draw", "data")


def arithmetic_command(settings: ArithmeticSettings) -> None:
    """Write the task files and say where."""
    if settings.digits < 1 or settings.train < 1 or settings.test < 1:
        raise ScratchLLMError("--digits, --train and --test must be >= 1")
    if not settings.operations or set(settings.operations) - set("+-"):
        raise ScratchLLMError(f"--operations takes + and/or -, got {settings.operations!r}")
    drawn = problems(settings.digits, settings.train + settings.test, settings.seed, settings.operations)
    train, test = drawn[: settings.train], drawn[settings.train :]
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "corpus.txt", "".join(f"{p}{a}\n" for p, a in train))
    for name, rows in (("train", train), ("test", test)):
        lines = "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows)
        atomic_write_text(out / f"{name}.jsonl", lines)
    print(f"wrote {len(train)} training and {len(test)} held-out problems to {out}: {', '.join(FILES)}")


__all__ = ["ArithmeticSettings", "arithmetic_command", "problems"]
