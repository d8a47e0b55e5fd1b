"""Score model responses with a judge LLM, the book's way (chapter 7.8).

Each entry of a responses file ({"instruction", "input", "output", "model_response"}, as the
book's `instruction-data-with-response.json`) is sent to a judge model over the OpenAI-compatible
chat API with the book's prompt:

    Given the input `{format_input(entry)}` and correct output `{output}`, score the model
    response `{model_response}` on a scale from 0 to 100, where 100 is the best score.
    Respond with the integer number only.

The judge can be Ollama (`--judge-url http://localhost:11434/v1`, the book's choice), any OpenAI
compatible endpoint, or another model behind `scratchllm serve`. Judges do not always answer with
a bare number, so `parse_score` reads chatty answers ("Score: 85/100", "I'd rate it 85."); when a
reply holds no score the judge is asked once more for the number alone.

Transient failures (connection errors, timeouts, 408/429/5xx answers) are retried with
exponential backoff once the judge has answered; a judge that cannot be reached at all (connection
refused, unknown host, connect timeout before its first answer), a wrong URL, model name or API key
stop the run at once, and so does a judge whose context window is too short for the prompt: the
first entry goes alone, and when it is too long, the shortest; if even that does not fit, no entry can. The result file has, per entry, the entry plus `score`, the judge's raw
`judge_reply`, `attempts` and `error`, and the average over the scored entries; entries that still
fail are listed, never dropped. It is written atomically while the run progresses (and when a run
stops early, with what it scored), and `--resume` skips entries already scored.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ScratchLLMError
from ..fileio import atomic_write_json, check_output_file
from ..finetune.templates import get_template

BOOK_PROMPT = (
    "Given the input `{input}` and correct output `{output}`, score the model response `{response}` "
    "on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
)
FOLLOW_UP = "Respond with the score only: one integer from 0 to 100."
API_KEY_ENV = "SCRATCHLLM_JUDGE_API_KEY"
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


# ----------------------------------------------------------------------------------------------
# The prompt and the parser


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


_NUMBER = r"(?<![\d.\-])(\d{1,3}(?:\.\d+)?)(?![\d])"  # not part of a longer or negative number
_SCALE = r"(?:\s*(?:/|out of)\s*(100|10|5)(?!\.?\d))"  # "/100", "out of 10", "/5"
# in order of trust: a bare number; a number after a score word ("Score: 85", "Overall score: 75/100",
# "I'd give it 7 out of 10"), scaled to 0-100; the reply's only fraction ("8/10"); its only number
_BARE = re.compile(rf"^[^\w-]*{_NUMBER}\W*$")
_AFTER_WORD = re.compile(
    rf"(?:\b(?:score|scored|rating|rated|rate|grade|give it|i'd give|i would give)\b|\boverall(?=\s*:))"
    rf"(?:\s*\([^)\n]*\))?[^\d\n]{{0,25}}?{_NUMBER}{_SCALE}?(?!\s*(?:/|out of)\s*\d)",
    re.IGNORECASE,
)
_SCALED = re.compile(rf"{_NUMBER}{_SCALE}", re.IGNORECASE)
_ANY = re.compile(_NUMBER)


def parse_score(reply: str) -> int | None:
    """The 0-100 score in a judge's reply, or None. A bare number wins, then the first number after
    "score"/"rating"/"overall:" and similar (with its scale: "4/5" is 80), then the reply's only
    fraction ("8/10"), then its only number from 0 to 100. Decimals are rounded. None (so the judge is
    asked again) rather than a guess: "3 of the 4 points, so 75" has no score that can be told apart,
    nor has "accuracy 4/5, clarity 3/5"."""

    def value(number: str, scale: str | None = None) -> int | None:
        score = float(number) * (100 / float(scale) if scale else 1.0)
        if scale and float(number) > float(scale):
            return None
        return int(score + 0.5) if 0 <= score <= 100 else None

    text = reply.strip()
    if not text:
        return None
    if m := _BARE.match(text):
        return value(m.group(1))
    for m in _AFTER_WORD.finditer(text):
        if (score := value(m.group(1), m.group(2))) is not None:
            return score
    for pattern in (_SCALED, _ANY):
        found = {score for m in pattern.finditer(text) if (score := value(*m.groups())) is not None}
        if found:
            return found.pop() if len(found) == 1 else None
    return None


# ----------------------------------------------------------------------------------------------
# The client


class JudgeFatalError(ScratchLLMError):
    """An answer that no retry can fix for any entry (wrong URL, model name or API key)."""


class JudgeItemError(ScratchLLMError):
    """One entry got no answer from the judge (after retries, if the failure was transient)."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts


class JudgeContextError(JudgeItemError):
    """The judge refused a prompt as too long for its context window (`param`: the request field it
    blamed, "max_tokens" when the prompt alone fits)."""

    def __init__(self, message: str, attempts: int, detail: str, param: str | None = None):
        super().__init__(message, attempts)
        self.detail, self.param = detail, param


class _Transient(Exception):
    """A failure worth retrying."""


def chat_url(url: str) -> str:
    """The chat completions endpoint for a base URL: `.../v1` or a bare host get
    `/chat/completions` (and `/v1`) appended; a full `.../chat/completions` URL stays."""
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://", url):
        raise ScratchLLMError(
            f"judge URL {url!r} must start with http:// or https:// (e.g. http://localhost:11434/v1)"
        )
    import httpx

    try:
        httpx.URL(url)
    except httpx.InvalidURL as e:
        raise ScratchLLMError(f"judge URL {url!r} is not a valid URL ({e})") from None
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


@dataclass
class JudgeClient:
    """Sends chat requests to an OpenAI-compatible judge, with timeouts and retries.

    `ask(prompt)` returns (score, raw reply, attempts). Transient failures are retried up to
    `retries` times, waiting `backoff * 2**k` seconds (with jitter, at most `max_wait`, or what
    a Retry-After header asks). A reply without a score gets one follow-up turn asking for the number.
    """

    url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    retries: int = 4
    backoff: float = 1.0
    max_wait: float = 30.0
    max_tokens: int | None = 256
    temperature: float = 0.0
    seed: int | None = 123  # the book's Ollama options: seed 123, temperature 0

    def __post_init__(self) -> None:
        import httpx

        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ScratchLLMError(f"judge: --timeout must be a number of seconds > 0, got {self.timeout}")
        if self.retries < 0:
            raise ScratchLLMError(f"judge: --retries must be >= 0, got {self.retries}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ScratchLLMError(f"judge: --max-tokens must be >= 1, got {self.max_tokens}")
        self.endpoint = chat_url(self.url)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(timeout=httpx.Timeout(self.timeout), headers=headers)
        self._answered = False  # set by the judge's first answer: until then, no connection is fatal

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ask(self, prompt: str) -> tuple[int | None, str, int]:
        """Score one prompt: (score or None, the judge's last reply, requests made)."""
        messages = [{"role": "user", "content": prompt}]
        reply, attempts = self._complete(messages, 0)
        score = parse_score(reply)
        if score is None:  # a chatty judge: ask once more, in the same conversation
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": FOLLOW_UP}]
            second, attempts = self._complete(messages, attempts)
            score = parse_score(second)
            reply = f"{reply}\n[follow-up] {second}"
        return score, reply, attempts

    def _complete(self, messages: list[dict[str, str]], attempts: int) -> tuple[str, int]:
        import httpx

        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.seed is not None:
            body["seed"] = self.seed
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        failures = 0
        while True:
            attempts += 1
            wait_s = None
            try:
                response = self._http.post(self.endpoint, json=body)
                self._answered = True
                if response.status_code in RETRY_STATUS:
                    wait_s = _retry_after(response)
                    raise _Transient(f"HTTP {response.status_code}: {_error_message(response)}")
                if response.status_code in (401, 403):
                    raise JudgeFatalError(
                        f"judge at {self.endpoint} refused the API key (HTTP {response.status_code}: "
                        f"{_error_message(response)}); pass --api-key or set ${API_KEY_ENV}"
                    )
                if response.status_code == 404:
                    raise JudgeFatalError(
                        f"judge at {self.endpoint} answered 404 ({_error_message(response)}); check --judge-url "
                        f"(e.g. http://localhost:11434/v1) and --judge-model {self.model!r}"
                    )
                if response.status_code >= 400 and _is_context_error(response):
                    detail = _error_message(response)
                    raise JudgeContextError(
                        f"judge rejected the request: HTTP {response.status_code}: {detail}",
                        attempts,
                        detail,
                        _error_field(response, "param"),
                    )
                if response.status_code >= 400:
                    raise JudgeItemError(
                        f"judge rejected the request: HTTP {response.status_code}: {_error_message(response)}",
                        attempts,
                    )
                return _reply_text(response), attempts
            except (httpx.TransportError, _Transient) as e:
                if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)) and not self._answered:
                    raise JudgeFatalError(
                        f"cannot reach the judge at {self.endpoint} ({self._connect_reason(e)}); is the "
                        "server running? (start one with `ollama serve` or `scratchllm serve`, or check --judge-url)"
                    ) from None
                failures += 1
                if failures > self.retries:
                    raise JudgeItemError(
                        f"judge failed {failures} times; last error: {_describe(e)}", attempts
                    ) from None
                delay = min(self.max_wait, self.backoff * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
                time.sleep(min(self.max_wait, wait_s) if wait_s is not None else delay)

    def _connect_reason(self, error: Exception) -> str:
        import httpx

        text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(error)).strip()
        if isinstance(error, httpx.ConnectTimeout):
            return f"no connection within {self.timeout:g} s" + (f": {text}" if text else "")
        return text or type(error).__name__


def _reply_text(response: Any) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Transient(
            f"malformed answer (not an OpenAI chat completion): {response.text[:200]!r}"
        ) from None
    return content if isinstance(content, str) else ""


def _error_message(response: Any) -> str:
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return str(message or response.text[:200] or response.reason_phrase)


def _error_field(response: Any, key: str) -> str | None:
    try:
        error = response.json().get("error")
        value = error.get(key) if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


# how OpenAI, vLLM, llama.cpp and scratchllm serve word a prompt too long for the context
_CONTEXT_WORDS = re.compile(
    r"context[ _](?:length|window|size)|maximum context|exceeds? the available context|too many tokens|"
    r"prompt is too long",
    re.IGNORECASE,
)
_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error"})


def _is_context_error(response: Any) -> bool:
    if response.status_code not in (400, 413, 422):
        return False
    if {_error_field(response, "code"), _error_field(response, "type")} & _CONTEXT_CODES:
        return True
    return bool(_CONTEXT_WORDS.search(_error_message(response)))


def _retry_after(response: Any) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if isinstance(error, _Transient) else f"{type(error).__name__}: {text}"


# ----------------------------------------------------------------------------------------------
# Scoring a file


def read_responses(path: str | os.PathLike, response_key: str = "model_response") -> list[dict[str, Any]]:
    """The entries of a .json (a list) or .jsonl responses file, checked for the needed keys; a judge
    result file (its entries under "items") is read as its entries, to score them again."""
    from ..fileio import read_json_records

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
                        "stopped instead of failing the rest the same way: check the judge and --judge-model, "
                        "then run again (with --resume to keep any scores)"
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
        f"the judge model {client.model!r} at {client.endpoint} has too short a context for the judge prompt, "
        f"even with the shortest response ({' '.join(error.detail.split())}); {fix}"
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


def judge_command(
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
    """`scratchllm judge`: score a responses file, write the result JSON, print the average.
    Returns the exit code: 0 when every entry got a score, 1 when some failed."""
    get_template(template)
    if workers < 1:
        raise ScratchLLMError(f"judge: --workers must be >= 1, got {workers}")
    out_path = Path(out) if out else Path(responses).with_name(Path(responses).stem + "-judged.json")
    check_output_file(out_path, inputs={"--responses": responses})
    entries = read_responses(responses, response_key)
    done: dict[str, Mapping[str, Any]] = {}
    if resume and out_path.is_file():
        try:
            done = {
                _entry_key(it): it for it in json.loads(out_path.read_text(encoding="utf-8")).get("items", [])
            }
        except (json.JSONDecodeError, AttributeError):
            raise ScratchLLMError(
                f"--resume: {out_path} is not a judge result file; remove it or pick --out"
            ) from None
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    header = {"judge": {"url": chat_url(judge_url), "model": judge_model, "prompt": BOOK_PROMPT},
              "responses": str(responses), "response_key": response_key, "template": template}  # fmt: skip

    def write(items: Sequence[Mapping[str, Any]], complete: bool = False) -> None:
        # a run stopped early leaves a file with "complete": false and the items done so far
        atomic_write_json(
            out_path, {**header, "complete": complete, **summarize(items), "items": list(items)}
        )

    bar = None
    if progress:
        from tqdm.auto import tqdm

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

    client = JudgeClient(judge_url, judge_model, api_key=api_key, timeout=timeout, retries=retries,
                         max_tokens=max_tokens)  # fmt: skip
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
    summary = summarize(items)
    average = "n/a" if summary["average"] is None else f"{summary['average']:.2f}"
    print(f"judge {judge_model}: average score {average} over {summary['scored']}/{summary['count']} responses; "
          f"results in {out_path}")  # fmt: skip
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
    "JudgeClient",
    "JudgeContextError",
    "JudgeFatalError",
    "JudgeItemError",
    "chat_url",
    "judge_command",
    "judge_entries",
    "judge_prompt",
    "parse_score",
    "read_responses",
    "summarize",
]
