"""Ollama's request bodies, options and error shape, for the server's /api routes (ollama.py).

A bad request is answered `{"error": "message"}` with a 4xx status (`OllamaError`). The bodies are
pydantic models; unknown fields are ignored, as Ollama's server does. `options` is checked as
Ollama checks it: a known option of the wrong type is an error, an unknown one is ignored (with a
warning in the log). What they ask for becomes `Options`, and with the prompt's length a
`GenerationConfig`; Ollama's defaults (temperature 0.8, top_k 40, top_p 0.9) fill what a request
leaves out, but `repeat_penalty` is off unless sent: this engine's penalty covers the whole text,
not Ollama's window of the last `repeat_last_n` tokens.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, field_validator

from ..errors import ScratchLLMError
from ..generation import GenerationConfig
from .schemas import APIError, max_new_tokens, validation_error

log = logging.getLogger("scratchllm.serve")


class OllamaError(Exception):
    """An error answered as Ollama answers one: `{"error": "message"}` with an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": self.message}, status_code=self.status, headers=headers)


def ollama_error(exc: Exception) -> OllamaError:
    """Any error while answering an /api request as Ollama answers one: body validation and
    OpenAI-shaped errors keep their message and status, a `ScratchLLMError` is a 400."""
    if isinstance(exc, OllamaError):
        return exc
    if isinstance(exc, APIError):
        return OllamaError(exc.status, exc.message)
    if isinstance(exc, RequestValidationError):
        return OllamaError(400, validation_error(exc.errors()).message)
    if isinstance(exc, ScratchLLMError):
        return OllamaError(400, str(exc))
    log.exception("error while answering an /api request")
    return OllamaError(500, f"internal error: {type(exc).__name__}: {exc}")


def bad_option(name: str, rule: str) -> OllamaError:
    return OllamaError(400, f'option "{name}" must be {rule}')


# ----------------------------------------------------------------------------------------------
# Options

INTEGER, NUMBER, BOOLEAN, STRINGS = "integer", "number", "boolean", "array of strings"
# every option Ollama's Options takes, by type; the first group is what this server honours
OPTION_TYPES: Mapping[str, str] = {
    "num_predict": INTEGER,
    "num_ctx": INTEGER,
    "seed": INTEGER,
    "temperature": NUMBER,
    "top_k": INTEGER,
    "top_p": NUMBER,
    "repeat_penalty": NUMBER,
    "presence_penalty": NUMBER,
    "frequency_penalty": NUMBER,
    "stop": STRINGS,
    # samplers this engine lacks: accepted at their neutral values only (NEUTRAL)
    "min_p": NUMBER,
    "typical_p": NUMBER,
    "tfs_z": NUMBER,
    "mirostat": INTEGER,
    # accepted, with no effect here (memory layout, threads, Mirostat's settings, the penalty window)
    **dict.fromkeys(("num_keep", "repeat_last_n", "num_batch", "num_gpu", "main_gpu", "num_thread"), INTEGER),
    **dict.fromkeys(("mirostat_tau", "mirostat_eta"), NUMBER),
    **dict.fromkeys(
        (
            "penalize_newline",
            "numa",
            "low_vram",
            "f16_kv",
            "logits_all",
            "vocab_only",
            "use_mmap",
            "use_mlock",
        ),
        BOOLEAN,
    ),
    "embedding_only": BOOLEAN,
}
NEUTRAL: Mapping[str, float] = {"min_p": 0.0, "typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0}
FILL_CONTEXT = -2  # num_predict: generate until the context window is full


def _typed(name: str, value: Any) -> Any:
    """`value` as the option's type, or a 400 naming it (JSON numbers may be integral floats)."""
    kind = OPTION_TYPES[name]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == INTEGER and number and float(value).is_integer():
        return int(value)
    if kind == NUMBER and number and math.isfinite(value):
        return float(value)
    if kind == BOOLEAN and isinstance(value, bool):
        return value
    if kind == STRINGS and isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise bad_option(name, f"of type {kind}")


def _checked(values: Mapping[str, Any]) -> None:
    """A 400 for a value out of its range, or a sampler this engine lacks set to do something."""
    rules = {
        "temperature": (lambda v: v >= 0, ">= 0 (0: greedy)"),
        "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1: every token)"),
        "repeat_penalty": (lambda v: v > 0, "> 0 (1: no penalty)"),
        "num_ctx": (lambda v: v >= 1, ">= 1"),
        "seed": (lambda v: -(2**63) <= v < 2**64, "from -2**63 to 2**64 - 1 (-1: random)"),
        "stop": (lambda v: all(v), "non-empty strings"),
    }
    for name, value in values.items():
        if name in rules and not rules[name][0](value):
            raise bad_option(name, f"{rules[name][1]}, got {value!r}")
        if name in NEUTRAL and value != NEUTRAL[name]:
            raise OllamaError(
                400,
                f'option "{name}" is not supported by this server; leave it out or send its neutral value '
                f"{NEUTRAL[name]}",
            )


@dataclass(frozen=True)
class Options:
    """A request's `options`, checked, with Ollama's defaults where it gives none."""

    temperature: float = 0.8
    top_k: int | None = 40  # None: no limit (Ollama: top_k <= 0)
    top_p: float = 0.9
    seed: int | None = None  # None: a random one (Ollama: -1)
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    num_predict: int | None = None  # None: the server's default; FILL_CONTEXT: the rest of the context
    num_ctx: int | None = None  # the context window, at most the model's

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> Options:
        values = {}
        for name, value in (options or {}).items():
            if name not in OPTION_TYPES:
                log.warning("ignoring unknown option %r", name)
            elif value is not None:
                values[name] = _typed(name, value)
        _checked(values)
        if values.get("top_k", 1) <= 0:
            values["top_k"] = None
        if values.get("seed") == -1:
            values["seed"] = None
        if values.get("num_predict", 0) < 0 and values["num_predict"] != FILL_CONTEXT:
            values["num_predict"] = None  # Ollama: -1 (or below) generates without a limit
        fields = set(cls.__dataclass_fields__)
        return cls(**{name: value for name, value in values.items() if name in fields})

    def max_tokens(self, ctx: int, prompt_tokens: int, default: int | None) -> int:
        """The tokens to generate: `num_predict` (cut at the end of the context window, as Ollama
        stops there), or `default` and the rest of the window; a 400 for a prompt that fills it."""
        window = min(ctx, self.num_ctx or ctx)
        if self.num_predict is None or self.num_predict == FILL_CONTEXT:
            asked = None
            default = None if self.num_predict == FILL_CONTEXT else default
        else:
            asked = min(self.num_predict, max(window - prompt_tokens, 0))
        try:
            return max_new_tokens(window, prompt_tokens, asked, default, "prompt")
        except APIError as e:
            if window < ctx:
                raise OllamaError(400, f"{e.message} (options.num_ctx is {window})") from None
            raise OllamaError(e.status, e.message) from None

    def generation_config(self, max_tokens: int, stop: Sequence[str]) -> GenerationConfig:
        """The settings of one generation of `max_tokens` tokens at most, ending before `stop`."""
        return GenerationConfig(
            max_new_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            repetition_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=tuple(stop),
        )


# ----------------------------------------------------------------------------------------------
# Request bodies

# keep_alive: Go's durations ("5m", "1h30m", "-1s"), or seconds
_DURATION = re.compile(r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h)?)+")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Message(_Body):
    role: str
    content: str | None = None
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None

    def as_dict(self, index: int) -> dict[str, str]:
        """The message as the prompt template takes it; a 400 for what this server cannot show it."""
        if self.role == "tool" or self.tool_calls:
            raise OllamaError(400, f"messages[{index}]: tool calls and tool messages are not supported")
        if self.role not in ("system", "user", "assistant"):
            raise OllamaError(
                400, f"messages[{index}]: role must be system, user or assistant, got {self.role!r}"
            )
        if self.images:
            raise OllamaError(400, f"messages[{index}]: images are not supported: this model reads text")
        return {"role": self.role, "content": self.content or ""}


class GenerationBody(_Body):
    """What /api/chat and /api/generate share."""

    model: str = ""
    stream: bool | None = True  # Ollama streams unless told not to
    options: dict[str, Any] | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: float | str | None = None  # accepted: the model stays loaded while the server runs
    think: bool | str | None = None  # ignored: no thinking models here
    logprobs: bool | None = None

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, str) and not _DURATION.fullmatch(value.strip()):
            raise ValueError(f"invalid duration {value!r}; give seconds or a duration such as '5m'")
        return value

    @property
    def streams(self) -> bool:
        return self.stream is not False

    def check_unsupported(self) -> None:
        """A 400 for what this server does not do."""
        if self.format not in (None, ""):
            raise OllamaError(
                400, "format (JSON output) is not supported: this server cannot constrain its output"
            )
        if self.logprobs:
            raise OllamaError(400, "logprobs are not supported on /api; use /v1/chat/completions")


class ChatBody(GenerationBody):
    messages: list[Message] | None = None
    tools: list[Any] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools:
            raise OllamaError(400, "tools (function calling) are not supported")

    def conversation(self) -> list[dict[str, str]]:
        return [m.as_dict(i) for i, m in enumerate(self.messages or [])]


class GenerateBody(GenerationBody):
    prompt: str | None = None
    system: str | None = None
    raw: bool | None = False
    context: list[int] | None = None
    template: str | None = None
    suffix: str | None = None
    images: list[Any] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        for name, message in (
            ("template", "template is not supported: the model's own is used (or send raw: true)"),
            ("suffix", "suffix (fill-in-the-middle) is not supported"),
            ("images", "images are not supported: this model reads text"),
        ):
            if getattr(self, name):
                raise OllamaError(400, message)

    def checked_context(self, vocab_size: int) -> list[int]:
        """`context` (an earlier answer's token ids), a 400 for an id outside the vocabulary."""
        context = list(self.context or [])
        bad = next((t for t in context if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise OllamaError(
                400, f"context holds token id {bad}, outside the vocabulary 0..{vocab_size - 1}"
            )
        return context


class ShowBody(_Body):
    model: str | None = None
    name: str | None = None  # the older name of `model`
    verbose: bool | None = None


__all__ = [
    "ChatBody",
    "GenerateBody",
    "GenerationBody",
    "Message",
    "OllamaError",
    "Options",
    "ShowBody",
    "ollama_error",
]
