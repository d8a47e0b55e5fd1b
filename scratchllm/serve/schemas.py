"""OpenAI's request bodies and error shape, for the server's routes (app.py).

A bad request is answered `{"error": {"message", "type", "param", "code"}}` with a 4xx status: an
`APIError`. The bodies are pydantic models; unknown fields are ignored, as OpenAI's API does with
optional extras, and None means the default (some clients send nulls). A body's sampling fields
become one `GenerationConfig` (`SamplingRequest.generation_config`) with OpenAI's defaults
(temperature 1, top_p 1) where it gives none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..generation import GenerationConfig

# ----------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class APIError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        """The `{"error": {...}}` object (also sent as an event when a stream fails)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 `invalid_request_error`."""
    return APIError(400, message, param=param, code=code)


def validation_error(errors: Sequence[Any]) -> APIError:
    """pydantic's errors as one 400 naming the first offending field."""
    parts, param = [], None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        if err.get("type") == "json_invalid":
            return bad_request(f"the request body is not valid JSON: {err.get('msg')}")
        if not loc and err.get("type") in ("model_attributes_type", "dict_type"):
            return bad_request(
                "the request body must be a JSON object, sent with Content-Type: application/json"
            )
        if err.get("type") == "missing" and not loc:  # no body at all
            return bad_request(
                "the request has no body; send a JSON object with Content-Type: application/json"
            )
        if err.get("type") == "missing":
            parts.append(f"missing required parameter {where!r}")
        else:
            parts.append(f"{where or 'body'}: {err.get('msg')}")
        param = param or where or None
    return bad_request("invalid request: " + "; ".join(dict.fromkeys(parts)), param=param)


def context_error(ctx: int, prompt_tokens: int, max_tokens: int | None, prompt_param: str) -> APIError:
    """The 400 for a prompt (plus `max_tokens`) that does not fit the context window of `ctx` tokens."""
    if max_tokens is None or prompt_tokens >= ctx:
        message = (
            f"this model's maximum context length is {ctx} tokens, and the prompt takes {prompt_tokens}, "
            "leaving no room for a completion; shorten the prompt"
        )
    else:
        message = (
            f"this model's maximum context length is {ctx} tokens; you requested "
            f"{prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, {max_tokens} in max_tokens); "
            f"lower max_tokens to at most {ctx - prompt_tokens} or shorten the prompt"
        )
    param = "max_tokens" if max_tokens is not None and prompt_tokens < ctx else prompt_param
    return bad_request(message, param=param, code="context_length_exceeded")


def max_new_tokens(
    ctx: int, longest_prompt: int, max_tokens: int | None, default: int | None, prompt_param: str
) -> int:
    """The tokens to generate: `max_tokens` if the longest prompt leaves room for them, else a 400;
    without `max_tokens`, `default` or the rest of the context window, whichever is smaller."""
    room = ctx - longest_prompt
    if max_tokens is None:
        max_tokens = room if default is None else min(default, room)
        if max_tokens < 1:
            raise context_error(ctx, longest_prompt, None, prompt_param)
    elif longest_prompt + max_tokens > ctx:
        raise context_error(ctx, longest_prompt, max_tokens, prompt_param)
    return max_tokens


# ----------------------------------------------------------------------------------------------
# Request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}  # GenerationConfig's own default is greedy
# the fields a request and GenerationConfig share, by the same name and meaning
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


class SamplingRequest(_Body):
    """The settings both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)  # an extension (vLLM, llama.cpp have it too)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)  # an extension (vLLM has it too)
    logit_bias: dict[str, float] | None = None

    def stops(self) -> list[str]:
        """The stop strings, a 400 for an empty one."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise bad_request("stop strings must be non-empty", param="stop")
        return stops

    def check_unsupported(self) -> None:
        """A 400 for an option this server does not implement."""
        if (self.n or 1) != 1:
            raise bad_request("n > 1 is not supported: this server returns one choice per prompt", param="n")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def generation_config(self, max_new_tokens: int, stop: Sequence[str]) -> GenerationConfig:
        """The request's sampling settings; the fields it leaves out keep OpenAI's defaults."""
        given = {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}
        return GenerationConfig(
            **{**OPENAI_DEFAULTS, **given}, max_new_tokens=max_new_tokens, stop=tuple(stop)
        )


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if (self.best_of or 1) != 1:
            raise bad_request("best_of > 1 is not supported", param="best_of")
        if self.suffix:
            raise bad_request("suffix is not supported", param="suffix")


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        """The message's text (its text parts joined); `index` names it in errors."""
        if self.content is None:
            raise bad_request(f"messages[{index}].content is missing", param=f"messages.{index}.content")
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise bad_request(
                    f"messages[{index}]: only text content parts are supported, got {part.type!r}",
                    param=f"messages.{index}.content",
                )
            parts.append(part.text)
        return "".join(parts)


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        if self.tools:
            raise bad_request("tools (function calling) are not supported", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request("only response_format {'type': 'text'} is supported", param="response_format")

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the prompt template takes them (a `developer` message is a system one)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
            for i, m in enumerate(self.messages)
        ]

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_tokens`, or the newer `max_completion_tokens`."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


__all__ = [
    "APIError",
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "SamplingRequest",
    "StreamOptions",
    "bad_request",
    "context_error",
    "max_new_tokens",
    "validation_error",
]
