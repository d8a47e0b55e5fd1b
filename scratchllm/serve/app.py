"""The FastAPI app of `scratchllm serve`: OpenAI's API for one model.

    GET  /v1/models             the one model served (its id, and its context length in tokens as
                                `max_model_len`, vLLM's field)
    POST /v1/completions        raw text continuation (no template), `prompt` a string, strings or token ids
    POST /v1/chat/completions   a conversation, rendered with the model's prompt template (chat.py)
    GET  /health                liveness, no API key needed
    GET  /                      the web chat page (page.py; the page itself needs no API key)
    GET  /tokenizer_info, POST /tokenize, POST /detokenize: the tokenizer, in vLLM's shape (tokenize.py)
    POST /api/chat, /api/generate, /api/show; GET /api/tags, /api/ps, /api/version: Ollama's API (ollama.py)

Any OpenAI client works (`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)`), streaming
(`stream: true`) or not. Bad requests get a 4xx answer in OpenAI's error shape (schemas.py): 400
for an invalid body (types, ranges, `max_tokens` beyond the context window, unsupported options such
as `n` > 1), 401 for a missing or wrong API key, 404 for an unknown model or path. Every generation
runs on the app's `Scheduler` (scheduler.py).

`presence_penalty` and `frequency_penalty` work as in OpenAI's API; `top_k` and
`repetition_penalty` (Hugging Face's rule) are extensions, as in vLLM. `logprobs` (completions: up
to 5 alternatives; chat: `logprobs: true` and `top_logprobs` up to 20) gives the model's own
log-probability of each generated token (in streams too, with the chunk whose text the token
begins); completions with `echo` and `logprobs` also score the prompt's tokens (the first gets
null), which is how lm-evaluation-harness's `local-completions` model computes log-likelihoods
(`max_tokens` 1, token-id prompts; when the model ends the text there, the end-of-text token is
listed as the generated one). Defaults follow OpenAI's API: temperature 1 and top_p 1 (send
temperature 0 for greedy decoding); `max_tokens` 16 for completions and, for chat, what is left of
the context window (at most `default_max_tokens`).

The routes are plain functions of the request; what they serve lives on `app.state`: `chat` (the
`ChatModel`), `scheduler` and `settings` (`ServerSettings`).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ScratchLLMError
from . import ollama, page, tokenize
from .access import authorize, check_model
from .chat import ChatModel
from .openai_format import (
    ChatTokens,
    TextOffsets,
    chat_chunks,
    chat_response,
    completion_chunks,
    completion_response,
    sse,
)
from .scheduler import Scheduler, make_scheduler
from .schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    bad_request,
    max_new_tokens,
    validation_error,
)

log = logging.getLogger("scratchllm.serve")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class ServerSettings:
    """What the routes need besides the model and the scheduler."""

    model_id: str
    api_key: str | None = None
    default_max_tokens: int | None = None  # cap for chat replies without max_tokens
    created: int = field(default_factory=lambda: int(time.time()))


def check_default_max_tokens(value: int | None) -> None:
    """`--default-max-tokens` is None (the rest of the context) or >= 1."""
    if value is not None and value < 1:
        raise ScratchLLMError(
            f"--default-max-tokens must be >= 1 (or left out: the rest of the context), got {value}"
        )


def create_app(
    model: ChatModel,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_batch_size: int = 8,
    default_max_tokens: int | None = None,
    scheduler: str = "continuous",
    prefill_chunk: int = 256,
) -> FastAPI:
    """The FastAPI app serving `model` (see the module docstring) under `model_name` (default: its
    name), requiring `api_key` if given. `default_max_tokens` caps the chat default (the rest of the
    context window). `scheduler`: "continuous" or "static" batching (scheduler.py); `prefill_chunk`:
    the prompt tokens a continuous batch reads per step at most."""
    check_default_max_tokens(default_max_tokens)
    app = FastAPI(title="scratchllm", version="1", lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.chat = model
    app.state.scheduler = make_scheduler(model, scheduler, max_batch_size, prefill_chunk)
    app.state.settings = ServerSettings(model_name or model.name, api_key, default_max_tokens)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ScratchLLMError, _user_error)
    app.add_exception_handler(Exception, _internal)
    app.include_router(router)
    app.include_router(tokenize.router)
    app.include_router(page.router)
    app.include_router(ollama.router)
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.scheduler.start()
    yield
    app.state.scheduler.close()


# ----------------------------------------------------------------------------------------------
# Errors


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(exc.errors()).response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    if exc.status_code == 404:
        message += (
            "; the API is under /v1 (/v1/models, /v1/completions, /v1/chat/completions), Ollama's under /api "
            "(/api/chat, /api/generate, /api/tags, /api/show)"
        )
    return APIError(exc.status_code, message, code=code).response()


async def _user_error(request: Request, exc: ScratchLLMError) -> JSONResponse:
    return bad_request(str(exc)).response()


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    log.exception("error while answering %s %s", request.method, request.url.path)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()


# ----------------------------------------------------------------------------------------------
# Checks


def completion_prompts(prompt: Any, model: ChatModel) -> list[list[int]]:
    """The prompts of a completions request as token ids (one string, strings, ids, lists of ids)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt is empty", param="prompt")
    vocab = model.vocab_size
    out = []
    for i, p in enumerate(prompt):
        ids = model.engine.encode(p) if isinstance(p, str) and p else list(p)
        if not ids:
            raise bad_request(f"prompt {i} is empty; give at least one token of text", param="prompt")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(
                f"prompt {i} has token id {bad}, outside the vocabulary 0..{vocab - 1}", param="prompt"
            )
        out.append(ids)
    return out


def _head(request: Request, prefix: str, kind: str) -> dict[str, Any]:
    """The fields every answer and chunk starts with."""
    model_id = request.app.state.settings.model_id
    return {
        "id": f"{prefix}-{secrets.token_hex(12)}",
        "object": kind,
        "created": int(time.time()),
        "model": model_id,
    }


# ----------------------------------------------------------------------------------------------
# Routes


router = APIRouter()
# a dependency runs before the body is validated: without the key, nothing about the request is revealed
v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])


def _model_card(request: Request) -> dict[str, Any]:
    state = request.app.state
    return {
        "id": state.settings.model_id,
        "object": "model",
        "created": state.settings.created,
        "owned_by": "scratchllm",
        "max_model_len": state.chat.context_length,
    }


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    state = request.app.state
    return {"status": "ok", "model": state.settings.model_id, "waiting": state.scheduler.waiting}


@v1.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(request)]}


@v1.get("/models/{name:path}")
async def get_model(name: str, request: Request) -> dict[str, Any]:
    check_model(request, name)
    return _model_card(request)


@v1.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> dict[str, Any] | StreamingResponse:
    check_model(request, body.model)
    body.check_unsupported()
    model: ChatModel = request.app.state.chat
    scheduler: Scheduler = request.app.state.scheduler
    prompts = completion_prompts(body.prompt, model)
    stops = body.stops()
    longest = max(len(p) for p in prompts)
    max_tokens = max_new_tokens(
        model.context_length, longest, body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt"
    )
    cfg = body.generation_config(max_tokens, stops).replace(logprobs=body.logprobs)
    head = _head(request, "cmpl", "text_completion")
    score = body.logprobs if body.logprobs is not None and body.echo else None
    if body.stream:
        if len(prompts) > 1:
            raise bad_request(
                "stream with several prompts is not supported; send them one by one", param="stream"
            )
        echo = model.tokenizer.decode(prompts[0]) if body.echo else None
        offsets = TextOffsets(model.tokenizer) if body.logprobs is not None else None
        events = scheduler.stream(prompts[0], cfg, score)
        return sse(completion_chunks(head, events, echo, prompts[0], offsets, body.include_usage))
    results, scores = await scheduler.run(prompts, cfg, score)
    return completion_response(
        head, model.tokenizer, prompts, results, bool(body.echo), body.logprobs, scores
    )


@v1.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatRequest, request: Request) -> dict[str, Any] | StreamingResponse:
    check_model(request, body.model)
    body.check_unsupported()
    model: ChatModel = request.app.state.chat
    scheduler: Scheduler = request.app.state.scheduler
    messages = body.conversation()
    try:
        ids = model.encode_chat(messages)
    except ScratchLLMError as e:
        raise bad_request(str(e), param="messages") from None
    stops = model.stop_strings(body.stops())
    default = request.app.state.settings.default_max_tokens
    max_tokens = max_new_tokens(
        model.context_length, len(ids), body.requested_max_tokens, default, "messages"
    )
    cfg = body.generation_config(max_tokens, stops)
    if body.logprobs:
        cfg = cfg.replace(logprobs=body.top_logprobs or 0)
    head = _head(request, "chatcmpl", "chat.completion")
    if body.stream:
        tokens = ChatTokens(model.tokenizer) if body.logprobs else None
        return sse(chat_chunks(head, scheduler.stream(ids, cfg), tokens, body.include_usage))
    [c], _ = await scheduler.run([ids], cfg)
    return chat_response(head, model.tokenizer, c, bool(body.logprobs))


router.include_router(v1)


__all__ = ["COMPLETIONS_DEFAULT_MAX_TOKENS", "ServerSettings", "check_default_max_tokens", "create_app"]
