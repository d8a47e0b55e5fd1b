"""Ollama's native API for the served model, so that Ollama's clients (the `ollama` package, the
book's chapter 7 judge, which posts to /api/chat) can use `scratchllm serve` in Ollama's place:

    POST /api/chat       a conversation, rendered with the model's prompt template (as /v1/chat/completions)
    POST /api/generate   a prompt: rendered as one user message (after `system`), or as is with `raw`
    GET  /api/tags       the one model served
    POST /api/show       its details, `model_info` ("<family>.context_length", ...), template, stop strings
    GET  /api/ps         the model, loaded (it stays loaded while the server runs; keep_alive is accepted)
    GET  /api/version    this server's version

The model is named by its served id, with or without ":latest". Generation streams unless the
request sends `"stream": false`: one JSON object per line (application/x-ndjson), the last with
`done: true`, `done_reason` ("stop" or "length") and the counts (ollama_format.py). Chat replies,
and generate replies rendered with the template, are stripped of the whitespace around them as
/v1/chat/completions strips them; a raw generate reply is the text as generated. `options` and
Ollama's defaults are ollama_schemas.py's. A request without a prompt (no messages) is answered at
once with `done_reason: "load"`, as Ollama answers a request that only loads a model.

Errors come as Ollama's, `{"error": "..."}`, with a 4xx status: 400 for a bad body or option, 401
without the server's API key (`Authorization: Bearer KEY`; Ollama itself never asks for one), 404
for an unknown model. Generation runs on the app's `Scheduler`, as the OpenAI routes' does.
Ollama's clients send the key as `ollama.Client(host=..., headers={"Authorization": "Bearer KEY"})`
or, without headers, from $OLLAMA_API_KEY.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute

from .. import __version__
from .access import authorize
from .chat import ChatModel
from .ollama_format import Answer, ModelCard, ndjson, tagged
from .ollama_schemas import (
    ChatBody,
    GenerateBody,
    GenerationBody,
    OllamaError,
    Options,
    ShowBody,
    ollama_error,
)
from .scheduler import Scheduler


class OllamaRoute(APIRoute):
    """A route whose every error, the body's validation and authorization included, comes in
    Ollama's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as e:
                return ollama_error(e).response()

        return handle


def check_model(request: Request, name: str | None) -> None:
    """A 400 without a model name, a 404 unless it names the served model (":latest" or not)."""
    if not name:
        raise OllamaError(400, "model is required")
    model_id = request.app.state.settings.model_id
    if tagged(name) != tagged(model_id):
        raise OllamaError(404, f'model "{name}" not found; this server serves "{tagged(model_id)}"')


def model_card(request: Request) -> ModelCard:
    """The served model's card, worked out on first use."""
    state = request.app.state
    if getattr(state, "ollama_card", None) is None:
        state.ollama_card = ModelCard.of(state.chat, state.settings.model_id, state.settings.created)
    return state.ollama_card


async def reply(
    request: Request,
    body: GenerationBody,
    options: Options,
    ids: list[int],
    stops: tuple[str, ...],
    answer: Answer,
    strip: bool,
) -> dict[str, Any] | StreamingResponse:
    """Generate the reply to the prompt `ids`, streamed unless `body` says not to; `strip`: remove
    the whitespace around it."""
    model: ChatModel = request.app.state.chat
    scheduler: Scheduler = request.app.state.scheduler
    default = request.app.state.settings.default_max_tokens
    max_tokens = options.max_tokens(model.context_length, len(ids), default)
    cfg = options.generation_config(max_tokens, stops)
    if body.streams:
        return ndjson(answer.chunks(scheduler.stream(ids, cfg), strip))
    [c], _ = await scheduler.run([ids], cfg)
    return answer.final(c, c.text.strip() if strip else c.text, None)


def accept(request: Request, body: ChatBody | GenerateBody) -> tuple[int, Options]:
    """The request's start (ns) and its options, once its model name and fields are checked."""
    started = time.perf_counter_ns()
    check_model(request, body.model)
    body.check_unsupported()
    return started, Options.parse(body.options)


# ----------------------------------------------------------------------------------------------
# Routes

# the key is checked before the body: without it, nothing about the request is revealed
router = APIRouter(prefix="/api", route_class=OllamaRoute, dependencies=[Depends(authorize)])


@router.post("/chat", response_model=None)
async def chat(body: ChatBody, request: Request) -> dict[str, Any] | StreamingResponse:
    started, options = accept(request, body)
    answer = Answer(True, body.model, started)
    messages = body.conversation()
    if not messages:
        return answer.loaded()
    model: ChatModel = request.app.state.chat
    ids = model.encode_chat(messages)
    return await reply(request, body, options, ids, model.stop_strings(options.stop), answer, strip=True)


@router.post("/generate", response_model=None)
async def generate(body: GenerateBody, request: Request) -> dict[str, Any] | StreamingResponse:
    started, options = accept(request, body)
    model: ChatModel = request.app.state.chat
    context = body.checked_context(model.vocab_size)
    if not body.prompt and not context:
        return Answer(False, body.model, started).loaded()
    if body.raw:
        ids, stops = context + model.engine.encode(body.prompt or ""), options.stop
    else:
        system = [{"role": "system", "content": body.system}] if body.system else []
        ids = context + model.encode_chat([*system, {"role": "user", "content": body.prompt or ""}])
        stops = model.stop_strings(options.stop)
    answer = Answer(False, body.model, started, context=None if body.raw else ids)
    return await reply(request, body, options, ids, stops, answer, strip=not body.raw)


@router.get("/tags")
async def tags(request: Request) -> dict[str, Any]:
    return {"models": [model_card(request).listing()]}


@router.get("/ps")
async def ps(request: Request) -> dict[str, Any]:
    return {"models": [model_card(request).running()]}


@router.post("/show")
async def show(body: ShowBody, request: Request) -> dict[str, Any]:
    check_model(request, body.model or body.name)
    return model_card(request).show(request.app.state.chat)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


__all__ = ["OllamaRoute", "router"]
