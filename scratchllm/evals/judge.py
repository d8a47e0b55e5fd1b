"""Score model responses with a judge LLM, the book's way (chapter 7.8).

Each entry of a responses file ({"instruction", "input", "output", "model_response"}, as the
book's `instruction-data-with-response.json`) is sent to a judge model over the OpenAI-compatible
chat API with the book's prompt:

    Given the input `{format_input(entry)}` and correct output `{output}`, score the model
    response `{model_response}` on a scale from 0 to 100, where 100 is the best score.
    Respond with the integer number only.

The judge can be Ollama (`--judge-url http://localhost:11434/v1`, the book's choice), any OpenAI
compatible endpoint, or another model behind `scratchllm serve`; judge_client.py talks to it
(parsing chatty replies, retrying transient failures). A judge that cannot be reached, a wrong URL,
model name or API key stop the run at once, and so does a judge whose context window is too short
for the prompt: the first entry goes alone, and when it is too long, the shortest; if even that
does not fit, no entry can. The result file has, per entry, the entry plus `score`, the judge's raw
`judge_reply`, `attempts` and `error`, and the average over the scored entries; entries that still
fail are listed, never dropped. It is written atomically while the run progresses (and when a run
stops early, with what it scored), and `--resume` skips entries already scored.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import setting
from ..errors import ScratchLLMError
from ..fileio import atomic_write_json, check_output_file, read_json_records
from ..text.templates import get_template, template_names
from .judge_client import (
    API_KEY_ENV,
    JudgeClient,
    JudgeContextError,
    JudgeFatalError,
    JudgeItemError,
    chat_url,
)
from .preferences import OPPOSITE, make_preferences

BOOK_PROMPT = (
    "Given the input `{input}` and correct output `{output}`, score the model response `{response}` "
    "on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
)


# ----------------------------------------------------------------------------------------------
# The prompt


def judge_prompt(
    entry: Mapping[str, Any], response_key: str = "model_response", template: str = "alpaca"
) -> str:
    """The book's judge prompt for one entry; the input is rendered with the template's
    `format_input` (for "alpaca", the book's `format_input`)."""
    return BOOK_PROMPT.format(
        input=get_template(template).format_input(entry),
        output=entry["output"],
        response=entry[response_key],
    )


# ----------------------------------------------------------------------------------------------
# Scoring a file


def read_responses(path: str | os.PathLike, response_key: str = "model_response") -> list[dict[str, Any]]:
    """The entries of a .json (a list) or .jsonl responses file, checked for the needed keys; a judge
    result file (its entries under "items") is read as its entries, to score them again."""
    records = read_json_records(path, "responses file", "one entry per line", unwrap="items")
    for where, _, entry in records:
        for key in ("instruction", "output", response_key):
            if not isinstance(entry.get(key), str):
                raise ScratchLLMError(
                    f"{where}: no string {key!r} (it has {sorted(entry)}); "
                    + (
                        "pick the response field with --response-key"
                        if key == response_key
                        else "fix the file"
                    )
                )
    return [entry for _, _, entry in records]


_RESULT_KEYS = ("score", "judge_reply", "attempts", "error")


def _entry_key(entry: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in entry.items() if k not in _RESULT_KEYS}, sort_keys=True)


SAME_FAILURES_FATAL = 5  # the first entries all failing with one error: the judge, not the entries


def judge_entries(
    entries: Sequence[Mapping[str, Any]],
    client: JudgeClient,
    response_key: str = "model_response",
    template: str = "alpaca",
    workers: int = 1,
    done: Mapping[str, Mapping[str, Any]] | None = None,
    on_item: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Score every entry; returns the entries with `score`, `judge_reply`, `attempts`, `error`.
    An entry's failure is its own (`error`), unless the first `SAME_FAILURES_FATAL` all fail with one
    error before any gets a score: that is the judge's (JudgeFatalError).
    `done` maps `_entry_key`s to earlier results to reuse; after each new result `on_item` gets
    the results so far (in entry order)."""
    items: list[dict[str, Any] | None] = [None] * len(entries)
    todo = []
    for i, entry in enumerate(entries):
        earlier = (done or {}).get(_entry_key(entry))
        if earlier is not None and earlier.get("score") is not None:
            items[i] = dict(earlier)
        else:
            todo.append(i)

    def prompt(i: int) -> str:
        return judge_prompt(
            {k: v for k, v in entries[i].items() if k not in _RESULT_KEYS}, response_key, template
        )

    def score(i: int) -> tuple[dict[str, Any], JudgeItemError | None]:
        entry = {k: v for k, v in entries[i].items() if k not in _RESULT_KEYS}
        failure = None
        try:
            value, reply, attempts = client.ask(prompt(i))
            error = None if value is not None else "the judge's reply holds no score from 0 to 100"
        except JudgeItemError as e:
            value, reply, attempts, error, failure = None, "", e.attempts, str(e), e
        return {**entry, "score": value, "judge_reply": reply, "attempts": attempts, "error": error}, failure

    lock = threading.Lock()
    stop = threading.Event()  # set by a fatal error: entries not yet started are skipped
    # a score seen, a reused one included (the entries left on a resume are the failed ones, which may
    # fail alike for reasons of their own), and the errors of the entries done before any score
    scored = any(it is not None for it in items)
    early_errors: list[str] = []

    def run(i: int) -> JudgeItemError | None:
        nonlocal scored
        if stop.is_set():
            return None
        try:
            item, failure = score(i)
        except BaseException:
            stop.set()
            raise
        with lock:
            items[i] = item
            if on_item is not None:
                on_item([it for it in items if it is not None])
            if item["score"] is not None:
                scored = True  # later failures are the entries' own
            elif not scored:
                early_errors.append(item["error"])
                if len(early_errors) >= SAME_FAILURES_FATAL and len(set(early_errors)) == 1:
                    stop.set()
                    raise JudgeFatalError(
                        f"the judge failed the first {len(early_errors)} responses alike ({item['error']}); "
                        "stopped instead of failing the rest the same way: check the judge and "
                        "--judge-model, then run again (with --resume to keep any scores)"
                    )
        return failure

    # the judge's context is checked on one entry before the rest are sent: the first, and when that is
    # too long, the shortest; when even that cannot fit, no entry can
    todo = list(todo)
    if todo and not scored:
        first = todo.pop(0)
        failure = run(first)
        if isinstance(failure, JudgeContextError) and todo:
            shortest = min(todo, key=lambda i: len(prompt(i)))
            if len(prompt(shortest)) < len(prompt(first)):
                todo.remove(shortest)
                failure = run(shortest)
        if isinstance(failure, JudgeContextError):
            raise _context_too_short(client, failure)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(run, i) for i in todo]
        wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                for g in futures:
                    g.cancel()
                raise f.exception()  # type: ignore[misc]
    return [item for item in items if item is not None]


def _context_too_short(client: JudgeClient, error: JudgeContextError) -> JudgeFatalError:
    """The one-line error for a judge whose context cannot take even the shortest judge prompt."""
    if error.param == "max_tokens":
        fix = (
            f"lower --max-tokens (now {client.max_tokens}; the judge answers with a number, 16 is plenty) "
            "or use a judge model with a longer context"
        )
    elif error.param in ("messages", "prompt"):
        fix = "use a judge model with a longer context (--judge-model, --judge-url)"
    else:
        fix = "use a judge model with a longer context (or a lower --max-tokens, if the prompt alone fits)"
    return JudgeFatalError(
        f"the judge model {client.model!r} at {client.endpoint} has too short a context for the judge "
        f"prompt, even with the shortest response ({' '.join(error.detail.split())}); {fix}"
    )


def summarize(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts, the average score over the scored items, and the indices of the failed ones."""
    scores = [it["score"] for it in items if it.get("score") is not None]
    failed = [i for i, it in enumerate(items) if it.get("score") is None]
    return {
        "count": len(items),
        "scored": len(scores),
        "failed": len(failed),
        "average": round(sum(scores) / len(scores), 2) if scores else None,
        "failed_items": failed,
    }


@dataclass
class JudgeSettings:
    """`scratchllm judge`: score each response of --responses (records with instruction, input, output
    and model_response, as written by `scratchllm respond`) against the reference output with a judge
    model, using the book's prompt. Writes per-item JSON plus the average; exits 1 if some items got no
    score (they are listed in the output)."""

    responses: str = setting(
        "",
        "records to score (.json, .jsonl); with --make-preferences the instruction records to make pairs of",
        "judge",
        path=True,
        required=True,
        metavar="FILE",
    )
    judge_url: str = setting(
        "",
        "the judge's OpenAI-compatible base URL, e.g. http://localhost:11434/v1 (Ollama) or "
        "http://127.0.0.1:8000/v1 (scratchllm serve)",
        "judge",
        required=True,
        metavar="URL",
    )
    judge_model: str = setting(
        "", "the judge model's name, e.g. llama3", "judge", required=True, metavar="NAME"
    )
    out: str = setting("", "result JSON (default: FILE-judged.json)", "judge", path=True, metavar="FILE")
    response_key: str = setting("model_response", "the field holding the response", "judge")
    template: str = setting(
        "alpaca",
        "how the input is shown to the judge (alpaca: the book's format_input)",
        "judge",
        choices=tuple(template_names()),
    )
    api_key: str = setting("", f"the judge's API key (default: ${API_KEY_ENV})", "request")
    timeout: float = setting(120.0, "seconds per request", "request")
    retries: int = setting(4, "retries of a failed request", "request")
    max_tokens: int = setting(256, "reply length cap sent to the judge (0: none)", "request")
    workers: int = setting(1, "requests in flight at once", "request")
    resume: bool = setting(False, "keep the scores already in --out, judge the rest", "judge")
    quiet: bool = setting(False, "no progress bar", "judge")
    make_preferences: bool = setting(
        False,
        "write {instruction, input, chosen, rejected} pairs for finetune dpo instead of scores: the judge "
        "rewrites each output in --style or its opposite (the book's way), or picks between --pick's two",
        "preferences",
    )
    style: str = setting(
        "polite", "the preferred style of the rewrites (its opposite is rejected)", "preferences"
    )
    pick: list[str] = setting(
        [],
        "two fields holding candidate responses: the judge picks the better one",
        "preferences",
        metavar="FIELD",
    )
    seed: int = setting(123, "seed drawing which style each record is rewritten in", "preferences")


def judge_command(settings: JudgeSettings) -> int:
    """`scratchllm judge`: `judge_file` with the command's settings (`--max-tokens 0`: no cap), or with
    --make-preferences `preferences.make_preferences`."""
    if settings.make_preferences:
        return _preferences_command(settings)
    if settings.pick:
        raise ScratchLLMError("--pick needs --make-preferences")
    return judge_file(
        settings.responses,
        settings.judge_url,
        settings.judge_model,
        out=settings.out or None,
        response_key=settings.response_key,
        template=settings.template,
        api_key=settings.api_key or None,
        timeout=settings.timeout,
        retries=settings.retries,
        max_tokens=settings.max_tokens or None,
        workers=settings.workers,
        resume=settings.resume,
        progress=not settings.quiet,
    )


def _preferences_command(settings: JudgeSettings) -> int:
    if settings.pick and len(settings.pick) != 2:
        raise ScratchLLMError(f"--pick takes two fields (the candidate responses), got {settings.pick}")
    if settings.style not in OPPOSITE:
        raise ScratchLLMError(f"--style must be one of {', '.join(OPPOSITE)}, got {settings.style!r}")
    out = settings.out or str(
        Path(settings.responses).with_name(Path(settings.responses).stem + "-preferences.json")
    )
    api_key = settings.api_key or os.environ.get(API_KEY_ENV) or None
    client = JudgeClient(
        settings.judge_url,
        settings.judge_model,
        api_key=api_key,
        timeout=settings.timeout,
        retries=settings.retries,
        max_tokens=settings.max_tokens or None,
    )
    with client:
        return make_preferences(
            settings.responses,
            client,
            out,
            style=settings.style,
            pick=settings.pick,
            seed=settings.seed,
            resume=settings.resume,
            progress=not settings.quiet,
        )


def judge_file(
    responses: str,
    judge_url: str,
    judge_model: str,
    out: str | None = None,
    response_key: str = "model_response",
    template: str = "alpaca",
    api_key: str | None = None,
    timeout: float = 120.0,
    retries: int = 4,
    max_tokens: int | None = 256,
    workers: int = 1,
    resume: bool = False,
    progress: bool = True,
) -> int:
    """Score a responses file, write the result JSON, print the average.
    Returns the exit code: 0 when every entry got a score, 1 when some failed."""
    get_template(template)
    if workers < 1:
        raise ScratchLLMError(f"judge: --workers must be >= 1, got {workers}")
    out_path = Path(out) if out else Path(responses).with_name(Path(responses).stem + "-judged.json")
    check_output_file(out_path, inputs={"--responses": responses})
    entries = read_responses(responses, response_key)
    done = _earlier_results(out_path) if resume else {}
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    header = {
        "judge": {"url": chat_url(judge_url), "model": judge_model, "prompt": BOOK_PROMPT},
        "responses": str(responses),
        "response_key": response_key,
        "template": template,
    }

    def write(items: Sequence[Mapping[str, Any]], complete: bool = False) -> None:
        # a run stopped early leaves a file with "complete": false and the items done so far
        atomic_write_json(
            out_path, {**header, "complete": complete, **summarize(items), "items": list(items)}
        )

    bar = None
    if progress:
        bar = tqdm(total=len(entries), desc="judge", unit="item", file=sys.stderr)
        bar.update(
            sum(1 for e in entries if _entry_key(e) in done and done[_entry_key(e)].get("score") is not None)
        )
    last_write = time.monotonic()
    latest: list[dict[str, Any]] | None = None  # the results so far, once there are new ones

    def on_item(items: list[dict[str, Any]]) -> None:
        nonlocal last_write, latest
        latest = items
        if bar is not None:
            bar.update(1)
        if time.monotonic() - last_write > 5:  # keep what is done safe on disk, without rewriting it per item
            write(items)
            last_write = time.monotonic()

    client = JudgeClient(
        judge_url, judge_model, api_key=api_key, timeout=timeout, retries=retries, max_tokens=max_tokens
    )
    try:
        items = judge_entries(entries, client, response_key, template, workers, done, on_item)
    except BaseException:
        if latest is not None:  # a run stopped early keeps what it scored
            write(latest)
        raise
    finally:
        client.close()
        if bar is not None:
            bar.close()
    write(items, complete=True)
    return _report(judge_model, items, out_path)


def _earlier_results(out_path: Path) -> dict[str, Mapping[str, Any]]:
    """`--resume`: the items of an earlier result file, by `_entry_key` (none if there is no file)."""
    if not out_path.is_file():
        return {}
    try:
        items = json.loads(out_path.read_text(encoding="utf-8")).get("items", [])
        return {_entry_key(it): it for it in items}
    except (json.JSONDecodeError, AttributeError):
        raise ScratchLLMError(
            f"--resume: {out_path} is not a judge result file; remove it or pick --out"
        ) from None


def _report(judge_model: str, items: Sequence[Mapping[str, Any]], out_path: Path) -> int:
    """Print the average (and the failed items to stderr); the exit code: 1 if some failed."""
    summary = summarize(items)
    average = "n/a" if summary["average"] is None else f"{summary['average']:.2f}"
    print(
        f"judge {judge_model}: average score {average} over {summary['scored']}/{summary['count']} "
        f"responses; results in {out_path}"
    )
    if summary["failed"]:
        shown = ", ".join(str(i) for i in summary["failed_items"][:10])
        more = "" if summary["failed"] <= 10 else f" and {summary['failed'] - 10} more"
        first = items[summary["failed_items"][0]]["error"]
        print(
            f"{summary['failed']} responses got no score (items {shown}{more}); first error: {first}",
            file=sys.stderr,
        )
        return 1
    return 0


__all__ = [
    "BOOK_PROMPT",
    "SAME_FAILURES_FATAL",
    "JudgeSettings",
    "judge_command",
    "judge_entries",
    "judge_file",
    "judge_prompt",
    "read_responses",
    "summarize",
]
