"""A client for a judge LLM behind OpenAI's chat API: send a prompt, read a 0-100 score, retry.

Judges do not always answer with a bare number, so `parse_score` reads chatty answers ("Score:
85/100", "I'd rate it 85."); when a reply holds no score the judge is asked once more for the number
alone. Transient failures (connection errors, timeouts, 408/429/5xx answers) are retried with
exponential backoff once the judge has answered; a judge that cannot be reached at all (connection
refused, unknown host, connect timeout before its first answer), a wrong URL, model name or API key
raise `JudgeFatalError`; a prompt too long for the judge's context raises `JudgeContextError`.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass
from typing import Any

from ..errors import ScratchLLMError

try:  # the `serve` extra
    import httpx
except ModuleNotFoundError as e:  # pragma: no cover - only without the `serve` extra
    raise ScratchLLMError("the judge needs httpx; pip install 'scratchllm[serve]'") from e


FOLLOW_UP = "Respond with the score only: one integer from 0 to 100."
API_KEY_ENV = "SCRATCHLLM_JUDGE_API_KEY"
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


# ----------------------------------------------------------------------------------------------
# The parser


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

    def chat(self, prompt: str) -> tuple[str, int]:
        """The judge's reply to one user message, and the requests made (retries included)."""
        return self._complete([{"role": "user", "content": prompt}], 0)

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
                        f"judge at {self.endpoint} answered 404 ({_error_message(response)}); check "
                        f"--judge-url (e.g. http://localhost:11434/v1) and --judge-model {self.model!r}"
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
                        f"judge rejected the request: HTTP {response.status_code}: "
                        f"{_error_message(response)}",
                        attempts,
                    )
                return _reply_text(response), attempts
            except (httpx.TransportError, _Transient) as e:
                if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)) and not self._answered:
                    raise JudgeFatalError(
                        f"cannot reach the judge at {self.endpoint} ({self._connect_reason(e)}); is the "
                        "server running? (start one with `ollama serve` or `scratchllm serve`, or check "
                        "--judge-url)"
                    ) from None
                failures += 1
                if failures > self.retries:
                    raise JudgeItemError(
                        f"judge failed {failures} times; last error: {_describe(e)}", attempts
                    ) from None
                delay = min(self.max_wait, self.backoff * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
                time.sleep(min(self.max_wait, wait_s) if wait_s is not None else delay)

    def _connect_reason(self, error: Exception) -> str:
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


__all__ = [
    "API_KEY_ENV",
    "FOLLOW_UP",
    "JudgeClient",
    "JudgeContextError",
    "JudgeFatalError",
    "JudgeItemError",
    "chat_url",
    "parse_score",
]
