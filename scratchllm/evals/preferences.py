"""Preference pairs from a judge LLM (`scratchllm judge --make-preferences`), for `finetune dpo`.

Two ways, over any OpenAI-compatible server (Ollama, or `scratchllm serve`):

- rewrite (the book's bonus notebook): for each {instruction, input, output} record the judge rewrites the
  output, minimally, in a style (`polite`), or in its opposite (`impolite`), one of the two drawn per
  record with a seed. The polite text is `chosen`, the other one `rejected`: the rewrite and the original
  output, in the order the style says.
- pick: each record holds two candidate responses (e.g. two `respond` runs with sampling); the judge says
  which answers the instruction better, A or B, and that one is `chosen`.

Records keep their fields and gain `chosen`, `rejected`, the judge's raw `judge_reply`, `attempts` and
`error`. The output is written atomically as the run goes; with --resume, records that already have a
pair are kept. A record the judge fails (after the client's retries) keeps its `error` and no pair.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import ScratchLLMError
from ..fileio import atomic_write_json, check_output_file, read_json_records
from ..text.templates import get_template
from .judge_client import JudgeClient, JudgeItemError

OPPOSITE = {"polite": "impolite", "impolite": "polite", "concise": "verbose", "verbose": "concise"}
REWRITE_PROMPT = (
    "Given the input `{input}` and correct output `{output}`, slightly rewrite the output to be more "
    "{style}. Keep the modification minimal. Only return the generated response and nothing else."
)
PICK_PROMPT = (
    "Given the input `{input}`, which response is better?\n\nResponse A: `{a}`\n\nResponse B: `{b}`\n\n"
    "Answer with the letter A or B only."
)


def rewrite_pair(
    entry: Mapping[str, Any], client: JudgeClient, style: str, rng: random.Random
) -> dict[str, Any]:
    """The book's pair: the output rewritten in `style` (chosen) or its opposite (rejected), drawn by
    `rng`; the original output is the other side."""
    if style not in OPPOSITE:
        raise ScratchLLMError(f"--style must be one of {', '.join(OPPOSITE)}, got {style!r}")
    asked = style if rng.random() < 0.5 else OPPOSITE[style]
    prompt = REWRITE_PROMPT.format(input=_format_input(entry), output=entry["output"], style=asked)
    reply, attempts = client.chat(prompt)
    text = reply.strip()
    if not text:
        return {"judge_reply": reply, "attempts": attempts, "error": "the judge's rewrite is empty"}
    chosen, rejected = (text, entry["output"]) if asked == style else (entry["output"], text)
    pair = {"chosen": chosen, "rejected": rejected, "rewritten_as": asked}
    return {**pair, "judge_reply": reply, "attempts": attempts, "error": None}


def pick_pair(entry: Mapping[str, Any], client: JudgeClient, fields: Sequence[str]) -> dict[str, Any]:
    """The judge's pick between the two candidate responses `fields` (A, B): it is chosen."""
    a, b = (entry[f] for f in fields)
    reply, attempts = client.chat(PICK_PROMPT.format(input=_format_input(entry), a=a, b=b))
    letter = re.search(r"\b([AB])\b", reply.strip().upper())
    if letter is None:
        return {
            "judge_reply": reply,
            "attempts": attempts,
            "error": "the judge's reply names neither A nor B",
        }
    chosen, rejected = (a, b) if letter.group(1) == "A" else (b, a)
    return {"chosen": chosen, "rejected": rejected, "judge_reply": reply, "attempts": attempts, "error": None}


def _format_input(entry: Mapping[str, Any]) -> str:
    """The instruction (and input) as the book shows it to the judge (its `format_input`)."""
    return get_template("alpaca").format_input(entry)


def make_preferences(
    records: str | Path,
    client: JudgeClient,
    out: str | Path,
    style: str = "polite",
    pick: Sequence[str] = (),
    seed: int = 123,
    resume: bool = False,
    progress: bool = True,
) -> int:
    """Write `out` (a JSON list in `finetune dpo`'s format) from instruction `records`: rewrites in
    `style`, or with `pick` (two field names) the judge's pick between them. Returns the exit code: 0
    when every record got a pair, 1 when some failed (they are counted and the first error shown)."""
    out = Path(out)
    check_output_file(out, inputs={"--responses": records})
    entries = [
        r for _, _, r in read_json_records(records, "instruction records", "{instruction, input, output}")
    ]
    needed = list(pick) if pick else ["instruction", "output"]
    for i, entry in enumerate(entries):
        missing = [f for f in needed if not isinstance(entry.get(f), str)]
        if missing:
            raise ScratchLLMError(f"{records}, record [{i}]: needs string fields {missing} to make a pair")
    done = _earlier(out) if resume else {}
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(entries), desc="pairs", unit="record", file=sys.stderr, disable=not progress)
    try:
        for i, entry in enumerate(entries):
            earlier = done.get(_key(entry))
            if earlier is not None and earlier.get("chosen") is not None:
                results.append(earlier)
            else:
                results.append({**entry, **_pair(entry, client, style, pick, random.Random(f"{seed}:{i}"))})
                atomic_write_json(out, results)
            bar.update(1)
    finally:
        bar.close()
        if results:
            atomic_write_json(out, results)
    failed = [r for r in results if r.get("chosen") is None]
    print(f"{len(results) - len(failed)} preference pairs from {len(results)} records in {out}")
    if failed:
        print(f"{len(failed)} records got no pair; first error: {failed[0]['error']}", file=sys.stderr)
        return 1
    return 0


def _pair(
    entry: Mapping[str, Any], client: JudgeClient, style: str, pick: Sequence[str], rng: random.Random
) -> dict[str, Any]:
    try:
        return pick_pair(entry, client, pick) if pick else rewrite_pair(entry, client, style, rng)
    except JudgeItemError as e:  # this record's own failure, after the client's retries
        return {"judge_reply": "", "attempts": e.attempts, "error": str(e)}


def _key(entry: Mapping[str, Any]) -> str:
    return json.dumps([entry.get("instruction"), entry.get("input"), entry.get("output")])


def _earlier(out: Path) -> dict[str, Mapping[str, Any]]:
    """--resume: the records of an earlier output, by instruction, input and output."""
    if not out.is_file():
        return {}
    try:
        return {_key(r): r for r in json.loads(out.read_text(encoding="utf-8"))}
    except (json.JSONDecodeError, TypeError, AttributeError):
        raise ScratchLLMError(
            f"--resume: {out} is not a preference file made here; remove it or pick --out"
        ) from None


__all__ = ["OPPOSITE", "PICK_PROMPT", "REWRITE_PROMPT", "make_preferences", "pick_pair", "rewrite_pair"]
