"""An OpenAI-compatible HTTP API for one model: `scratchllm serve --model DIR`.

    GET  /v1/models             the one model served (its id: see `served_model_name`; its context
                                length in tokens as `max_model_len`, vLLM's field)
    POST /v1/completions        raw text continuation (no template), `prompt` a string, strings or token ids
    POST /v1/chat/completions   a conversation, rendered with the model's prompt template (chat.py)
    GET  /health                liveness, no API key needed

Any OpenAI client works (`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)`), streaming
(`stream: true`, server-sent events ending with `data: [DONE]`) or not. Bad requests get a 4xx
answer in OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`: 400 for an
invalid body (types, ranges, `max_tokens` beyond the context window, unsupported options such as
`n` > 1), 401 for a missing or wrong API key, 404 for an unknown model or path.

Concurrency: one `Scheduler` thread owns the engine, so the model runs one batch at a time and
requests wait in a queue instead of failing. Waiting non-streaming requests with equal sampling
settings (and no seed, unless greedy) are run together as one batch, which the engine's batched
decoding makes several times faster than one by one; streaming and seeded sampling requests run
alone (a seed reproduces a completion only within the same batch).

`presence_penalty` and `frequency_penalty` work as in OpenAI's API; `top_k` and
`repetition_penalty` (Hugging Face's rule) are extensions, as in vLLM. `logprobs` (completions: up
to 5 alternatives; chat: `logprobs: true` and `top_logprobs` up to 20) gives the model's own
log-probability of each generated token (in streams too, with the chunk whose text the token
begins); completions with `echo` and `logprobs`
also score the prompt's tokens (the first gets null), which is how lm-evaluation-harness's
`local-completions` model computes log-likelihoods (`max_tokens` 1, token-id prompts; when the
model ends the text there, the end-of-text token is listed as the generated one).
Defaults follow OpenAI's API: temperature 1 and top_p 1 (send temperature 0 for greedy decoding);
`max_tokens` 16 for completions and, for chat, what is left of the context window. The server
binds 127.0.0.1 unless told otherwise; `--api-key` (or $SCRATCHLLM_API_KEY) requires
`Authorization: Bearer KEY` on every /v1 request.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import ScratchLLMError
from ..generation import Completion, GenerationConfig, TokenLogprob, decode_piece
from .chat import ChatModel, WhitespaceStripper, load_chat_model

try:
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - only without the `serve` extra
    raise ScratchLLMError(
        f"the server needs FastAPI and uvicorn ({e.name} is missing); pip install 'scratchllm[serve]'"
    ) from e

log = logging.getLogger("scratchllm.serve")

API_KEY_ENV = "SCRATCHLLM_API_KEY"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

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

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ----------------------------------------------------------------------------------------------
# Request bodies (unknown fields are ignored, as OpenAI's API does with optional extras)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The settings both endpoints share. None means the default (some clients send nulls)."""

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
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise _bad("stop strings must be non-empty", param="stop")
        return stops

    def check_unsupported(self) -> None:
        if (self.n or 1) != 1:
            raise _bad("n > 1 is not supported: this server returns one choice per prompt", param="n")
        if self.logit_bias:
            raise _bad("logit_bias is not supported", param="logit_bias")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            raise _bad(f"messages[{index}].content is missing", param=f"messages.{index}.content")
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise _bad(
                    f"messages[{index}]: only text content parts are supported, got {part.type!r}",
                    param=f"messages.{index}.content",
                )
            parts.append(part.text)
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


# ----------------------------------------------------------------------------------------------
# The scheduler: one thread runs the engine, requests queue for it


@dataclass(eq=False)
class _Job:
    """One request's generation: token-id prompts and settings, and where its results go."""

    prompts: list[list[int]]
    cfg: GenerationConfig
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    score: int | None = None  # echo with logprobs: score the prompts too, with this many alternatives
    scores: list[list[TokenLogprob | None]] | None = None  # set by the worker before the result
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: asyncio.Future | None = None  # non-streaming: the list of Completions
    # streaming: ("scores", the prompt's token logprobs), ("piece", (text, its tokens' logprobs)),
    # ("done", (Completion, the logprobs no piece carried)), ("error", exc)
    events: asyncio.Queue | None = None

    def __post_init__(self) -> None:
        if self.stream:
            self.events = asyncio.Queue()
        else:
            self.future = self.loop.create_future()

    def can_join(self, other: _Job, rows: int, max_rows: int) -> bool:
        return (
            not self.stream
            and not other.stream
            # equal settings but for the seed, which matters only when sampling (lm-eval's greedy
            # requests carry one)
            and self.cfg.replace(seed=None) == other.cfg.replace(seed=None)
            and (self.cfg.temperature == 0 or self.cfg.seed is other.cfg.seed is None)
            and self.score == other.score
            and rows + len(other.prompts) <= max_rows
        )

    def resolve(self, completions: list[Completion]) -> None:
        self.loop.call_soon_threadsafe(_set_result, self.future, completions)

    def fail(self, error: BaseException) -> None:
        if self.stream:
            self.post("error", error)
        else:
            self.loop.call_soon_threadsafe(_set_exception, self.future, error)

    def post(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))  # type: ignore[union-attr]


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():  # the client may have gone away
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class Scheduler:
    """Runs every generation of one `ChatModel` on a single worker thread, in arrival order.

    The engine is not thread-safe and one forward pass already uses every core, so requests
    wait in a FIFO queue. When the worker takes a non-streaming job it also takes the waiting jobs
    with equal settings (up to `max_batch_size` prompts in all) and decodes them as one batch.
    """

    def __init__(self, model: ChatModel, max_batch_size: int = 8):
        if max_batch_size < 1:
            raise ScratchLLMError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.max_batch_size = max_batch_size
        self._jobs: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches_run = 0  # how many engine calls ran (for tests and logs)

    def start(self) -> None:
        with self._cv:
            if self._thread is None:
                self._closed = False
                self._thread = threading.Thread(target=self._work, name="scratchllm-engine", daemon=True)
                self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=30)

    def submit(self, job: _Job) -> None:
        self.start()
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()

    @property
    def waiting(self) -> int:
        return len(self._jobs)

    def _take(self) -> list[_Job]:
        with self._cv:
            while True:
                while not self._jobs and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for job in self._jobs:
                        job.fail(APIError(503, "the server is shutting down", type="server_error"))
                    self._jobs.clear()
                    return []
                first = self._jobs.popleft()
                if not first.cancelled.is_set():
                    break
            batch, rows, rest = [first], len(first.prompts), deque()
            while self._jobs:
                job = self._jobs.popleft()
                if job.cancelled.is_set():
                    continue
                if first.can_join(job, rows, self.max_batch_size):
                    batch.append(job)
                    rows += len(job.prompts)
                else:
                    rest.append(job)
            self._jobs = rest
            return batch

    def _work(self) -> None:
        while batch := self._take():
            try:
                if batch[0].stream:
                    self._run_stream(batch[0])
                else:
                    self._run_batch(batch)
            except Exception as e:  # the job's handler answers it; the worker keeps serving
                for job in batch:
                    job.fail(e)

    def _run_batch(self, batch: list[_Job]) -> None:
        scored = [job for job in batch if job.score is not None]  # joined jobs share `score`
        if scored:
            engine = self.model.engine
            try:  # every prompt of the batch in as few forward passes as fit
                scores = engine.score_prompts([p for job in scored for p in job.prompts], scored[0].score)
                start = 0
                for job in scored:
                    job.scores, start = scores[start : start + len(job.prompts)], start + len(job.prompts)
            except Exception:
                for job in scored:  # find whose request broke it: each alone
                    try:
                        job.scores = engine.score_prompts(job.prompts, job.score)
                    except Exception as e:  # this request alone fails
                        job.fail(e)
                        batch.remove(job)
        if not batch:
            return
        prompts = [p for job in batch for p in job.prompts]
        try:
            completions = self.model.engine.generate(prompts, batch[0].cfg)
            self.batches_run += 1
        except Exception:
            if len(batch) == 1:
                raise
            for job in batch:  # find whose request broke the batch: each alone
                try:
                    job.resolve(self.model.engine.generate(job.prompts, job.cfg))
                except Exception as e:
                    job.fail(e)
            return
        start = 0
        for job in batch:
            job.resolve(completions[start : start + len(job.prompts)])
            start += len(job.prompts)

    def _run_stream(self, job: _Job) -> None:
        if job.score is not None:
            job.post("scores", self.model.engine.prompt_logprobs(job.prompts[0], job.score))
        stream = self.model.engine.stream(job.prompts[0], job.cfg)
        try:
            for piece in stream:
                if job.cancelled.is_set():  # the client went away
                    return
                job.post("piece", (piece, stream.piece_logprobs))
            job.post("done", (stream.completion, stream.rest_logprobs))
            self.batches_run += 1
        finally:
            stream.close()


# ----------------------------------------------------------------------------------------------
# The app


@dataclass
class _Prepared:
    """A validated request: token-id prompts, the texts to echo, generation settings."""

    prompts: list[list[int]]
    cfg: GenerationConfig
    stream: bool
    include_usage: bool


def create_app(
    model: ChatModel,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_batch_size: int = 8,
    default_max_tokens: int | None = None,
) -> FastAPI:
    """The FastAPI app serving `model` (see the module docstring). `default_max_tokens` caps the
    chat default (the rest of the context window)."""
    _check_default_max_tokens(default_max_tokens)
    model_id = model_name or model.name
    scheduler = Scheduler(model, max_batch_size=max_batch_size)
    ctx = model.context_length
    vocab = model.engine.model.cfg.vocab_size
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.close()

    app = FastAPI(title="scratchllm", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler = scheduler
    app.state.model_id = model_id

    # -- errors ---------------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message += "; the API is under /v1 (/v1/models, /v1/completions, /v1/chat/completions)"
        return APIError(exc.status_code, message, code=code).response()

    @app.exception_handler(ScratchLLMError)
    async def _user_error(request: Request, exc: ScratchLLMError) -> JSONResponse:
        return _bad(str(exc)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error while answering %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    # -- checks ---------------------------------------------------------------------------------

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "missing or incorrect API key: send the header `Authorization: Bearer KEY` "
                "(the key the server was started with)",
                code="invalid_api_key",
            )

    # a dependency runs before the body is validated: without the key, nothing about the request is revealed
    keyed = [Depends(authorize)]

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {model_id!r}",
                param="model",
                code="model_not_found",
            )

    def settings(body: _Sampling, prompts: list[list[int]], max_tokens: int | None, default: int | None,
                 stops: Sequence[str], prompt_param: str) -> GenerationConfig:  # fmt: skip
        longest = max(len(p) for p in prompts)
        room = ctx - longest
        if max_tokens is None:
            max_tokens = room if default is None else min(default, room)
            if max_tokens < 1:
                raise _context_error(ctx, longest, None, prompt_param)
        elif longest + max_tokens > ctx:
            raise _context_error(ctx, longest, max_tokens, prompt_param)
        return GenerationConfig(
            max_new_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=tuple(stops),
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
        )

    async def run(prepared: _Prepared, score: int | None = None) -> tuple[list[Completion], list | None]:
        """The completions, and with `score` the prompts' token logprobs (see `Engine.prompt_logprobs`)."""
        job = _Job(prepared.prompts, prepared.cfg, asyncio.get_running_loop(), score=score)
        scheduler.submit(job)
        try:
            return await job.future, job.scores  # type: ignore[return-value]
        except asyncio.CancelledError:
            job.cancelled.set()
            raise

    async def stream_events(prepared: _Prepared, score: int | None = None) -> AsyncIterator[tuple[str, Any]]:
        job = _Job(prepared.prompts, prepared.cfg, asyncio.get_running_loop(), stream=True, score=score)
        scheduler.submit(job)
        try:
            while True:
                kind, value = await job.events.get()  # type: ignore[union-attr]
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "done":
                    return
        finally:  # done, failed, or the client disconnected
            job.cancelled.set()

    # -- routes ---------------------------------------------------------------------------------

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "scratchllm",
                "max_model_len": ctx}  # fmt: skip

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "waiting": scheduler.waiting}

    @app.get("/v1/models", dependencies=keyed)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=keyed)
    async def get_model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(body: CompletionRequest):
        check_model(body.model)
        body.check_unsupported()
        if (body.best_of or 1) != 1:
            raise _bad("best_of > 1 is not supported", param="best_of")
        if body.suffix:
            raise _bad("suffix is not supported", param="suffix")
        prompts = _completion_prompts(body.prompt, model, vocab)
        cfg = settings(body, prompts, body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, body.stops(), "prompt")
        cfg = cfg.replace(logprobs=body.logprobs)
        prepared = _Prepared(
            prompts, cfg, bool(body.stream), bool(body.stream_options and body.stream_options.include_usage)
        )
        echoes = [model.engine.tokenizer.decode(p) for p in prompts] if body.echo else [""] * len(prompts)  # type: ignore[union-attr]
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}  # fmt: skip
        scored = body.logprobs is not None and bool(body.echo)
        score = body.logprobs if scored else None
        if prepared.stream:
            if len(prompts) > 1:
                raise _bad(
                    "stream with several prompts is not supported; send them one by one", param="stream"
                )
            offsets = _TextOffsets(model.engine.tokenizer) if body.logprobs is not None else None
            events = stream_events(prepared, score)
            return _sse(
                _completion_chunks(
                    head,
                    events,
                    echoes[0] if body.echo else None,
                    prompts[0],
                    offsets,
                    prepared.include_usage,
                )
            )
        results, scores = await run(prepared, score)
        choices = []
        for i, (echo, c) in enumerate(zip(echoes, results)):
            logprobs = None
            if body.logprobs is not None:
                offsets = _TextOffsets(model.engine.tokenizer)
                prompt_part = offsets.prompt(prompts[i], scores[i]) if scores else None
                logprobs = _merge_logprobs(prompt_part, offsets.add(c.logprobs, c.stop_logprob))
            choices.append(
                {"index": i, "text": echo + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}
            )
        return {**head, "choices": choices, "usage": _usage(results)}

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(body: ChatRequest):
        check_model(body.model)
        body.check_unsupported()
        if body.top_logprobs is not None and not body.logprobs:
            raise _bad("top_logprobs needs logprobs: true", param="top_logprobs")
        if body.tools:
            raise _bad("tools (function calling) are not supported", param="tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise _bad("only response_format {'type': 'text'} is supported", param="response_format")
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
            for i, m in enumerate(body.messages)
        ]
        try:
            ids = model.encode_chat(messages)
        except ScratchLLMError as e:
            raise _bad(str(e), param="messages") from None
        max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        cfg = settings(
            body, [ids], max_tokens, default_max_tokens, model.stop_strings(body.stops()), "messages"
        )
        if body.logprobs:
            cfg = cfg.replace(logprobs=body.top_logprobs or 0)
        prepared = _Prepared(
            [ids], cfg, bool(body.stream), bool(body.stream_options and body.stream_options.include_usage)
        )
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
                "model": model_id}  # fmt: skip
        if prepared.stream:
            tokens = _ChatTokens(model.engine.tokenizer) if body.logprobs else None
            return _sse(_chat_chunks(head, stream_events(prepared), tokens, prepared.include_usage))
        [c], _ = await run(prepared)
        message = {"role": "assistant", "content": c.text.strip()}
        logprobs = _chat_logprobs(model.engine.tokenizer, c.logprobs) if body.logprobs else None
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": c.finish_reason}
        return {**head, "choices": [choice], "usage": _usage([c])}

    return app


def _validation_error(errors: Sequence[Any]) -> APIError:
    """pydantic's errors as one 400 naming the first offending field."""
    parts, param = [], None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        if err.get("type") == "json_invalid":
            return _bad(f"the request body is not valid JSON: {err.get('msg')}")
        if not loc and err.get("type") in ("model_attributes_type", "dict_type"):
            return _bad("the request body must be a JSON object, sent with Content-Type: application/json")
        if err.get("type") == "missing" and not loc:  # no body at all
            return _bad("the request has no body; send a JSON object with Content-Type: application/json")
        if err.get("type") == "missing":
            parts.append(f"missing required parameter {where!r}")
        else:
            parts.append(f"{where or 'body'}: {err.get('msg')}")
        param = param or where or None
    return _bad("invalid request: " + "; ".join(dict.fromkeys(parts)), param=param)


def _context_error(ctx: int, prompt_tokens: int, max_tokens: int | None, prompt_param: str) -> APIError:
    if max_tokens is None or prompt_tokens >= ctx:
        message = (
            f"this model's maximum context length is {ctx} tokens, and the prompt takes {prompt_tokens}, "
            "leaving no room for a completion; shorten the prompt"
        )
    else:
        message = (
            f"this model's maximum context length is {ctx} tokens; you requested {prompt_tokens + max_tokens} "
            f"({prompt_tokens} in the prompt, {max_tokens} in max_tokens); lower max_tokens to at most "
            f"{ctx - prompt_tokens} or shorten the prompt"
        )
    param = "max_tokens" if max_tokens is not None and prompt_tokens < ctx else prompt_param
    return _bad(message, param=param, code="context_length_exceeded")


def _completion_prompts(prompt: Any, model: ChatModel, vocab: int) -> list[list[int]]:
    """The prompts of a completions request as token ids (one string, strings, ids, lists of ids)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise _bad("prompt is empty", param="prompt")
    out = []
    for i, p in enumerate(prompt):
        ids = model.engine.encode(p) if isinstance(p, str) and p else list(p)
        if not ids:
            raise _bad(f"prompt {i} is empty; give at least one token of text", param="prompt")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise _bad(
                f"prompt {i} has token id {bad}, outside the vocabulary 0..{vocab - 1}", param="prompt"
            )
        out.append(ids)
    return out


def _token_text(raw: bytes) -> str:
    """A token's string: its text, or (a piece of a multi-byte character) its bytes spelled out as
    OpenAI does, "bytes:\\xe6\\x97", so that different fragments never look alike."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class _TextOffsets:
    """Builds the completions API's `logprobs` objects, for one text in one or more parts (a stream's
    chunks): token strings, their logprobs, the top alternatives and the chosen token as {token
    string: logprob}, and where each token's text begins in the decoded text (a token inside a
    multi-byte character: where that character begins), counted from the first part on."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.offset = 0

    def prompt(self, ids: Sequence[int], scores: Sequence[TokenLogprob | None]) -> dict[str, list]:
        """The echoed prompt's tokens with their scores (the first has none). Its text is decoded on
        its own, so a character cut between prompt and completion is a U+FFFD on each side."""
        out = self._entries(list(zip(ids, scores)))
        self.offset += len(self.utf8.decode(b"", final=True))
        self.utf8.reset()
        return out

    def add(
        self, logprobs: Sequence[TokenLogprob] | None, stop: TokenLogprob | None = None
    ) -> dict[str, list]:
        """Generated tokens, and an end-of-text token that ended the text (listed, as vLLM does)."""
        tokens = [(t.token_id, t) for t in logprobs or ()]
        if stop is not None:
            tokens.append((stop.token_id, stop))
        return self._entries(tokens)

    def _entries(self, tokens: Sequence[tuple[int, TokenLogprob | None]]) -> dict[str, list]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, lp in tokens:
            raw = self.tokenizer.decode_bytes([token_id])
            out["tokens"].append(_token_text(raw))
            piece, earlier = decode_piece(self.utf8, raw)
            out["text_offset"].append(self.offset + earlier)
            self.offset += len(piece)
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            # the `logprobs` most likely tokens, and the chosen one (OpenAI: "up to logprobs+1")
            top = None
            if lp is not None:
                top = {_token_text(self.tokenizer.decode_bytes([i])): v for i, v in lp.top}
                top.setdefault(out["tokens"][-1], lp.logprob)
            out["top_logprobs"].append(top)
        return out


def _merge_logprobs(*parts: dict[str, list] | None) -> dict[str, list]:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key, values in (part or {}).items():
            out[key].extend(values)
    return out


class _ChatTokens:
    """The chat API's `logprobs.content` entries for a reply that arrives in parts: per token its
    string, logprob, UTF-8 bytes and the top alternatives in the same shape. The reply is stripped of
    surrounding whitespace, so tokens that spell whitespace alone are left out at either end (held
    back until a token with more than whitespace follows); a token with a letter too stays whole.
    Tokens that are pieces of one character (byte tokens) are judged together, by that character."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.started = False
        self.held: list[TokenLogprob] = []
        self.partial: list[TokenLogprob] = []  # the tokens of a character not complete yet
        self.partial_bytes = b""

    def feed(self, logprobs: Sequence[TokenLogprob], final: bool = False) -> list[dict[str, Any]]:
        """The entries that are now sure to be in the reply (`final`: the reply ends here)."""
        out = []
        for lp in logprobs:
            raw = self.tokenizer.decode_bytes([lp.token_id])
            self.partial.append(lp)
            self.partial_bytes += raw
            state = _utf8_state(self.partial_bytes)
            if state == "broken" and len(self.partial) > 1:
                # the held character broke off before this token: judge it (a U+FFFD, so it stays),
                # then this token on its own, which may begin a character of its own
                self.partial.pop()
                out += self._judge(self.partial_bytes[: -len(raw)].decode("utf-8", "replace"))
                self.partial, self.partial_bytes = [lp], raw
                state = _utf8_state(raw)
            if state != "unfinished":
                out += self._judge(self.partial_bytes.decode("utf-8", "replace"))
        if final and self.partial:  # a character the reply broke off: U+FFFD in the text
            out += self._judge(self.partial_bytes.decode("utf-8", "replace"))
        return out

    def _judge(self, text: str) -> list[dict[str, Any]]:
        group, self.partial, self.partial_bytes = self.partial, [], b""
        if not text.strip():
            if self.started:
                self.held += group
            return []
        self.started = True
        group, self.held = [*self.held, *group], []
        return [self._entry(t) for t in group]

    def _entry(self, lp: TokenLogprob) -> dict[str, Any]:
        def one(token_id: int, logprob: float) -> dict[str, Any]:
            raw = self.tokenizer.decode_bytes([token_id])
            return {"token": _token_text(raw), "logprob": logprob, "bytes": list(raw)}

        return {**one(lp.token_id, lp.logprob), "top_logprobs": [one(i, v) for i, v in lp.top]}


def _utf8_state(data: bytes) -> str:
    """ "complete" (valid UTF-8), "unfinished" (valid but for a character that goes on) or "broken"."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return "unfinished" if e.reason == "unexpected end of data" else "broken"
    return "complete"


def _chat_logprobs(tokenizer: Any, logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any]:
    """The chat API's `logprobs` object for a whole reply (see `_ChatTokens`)."""
    return {"content": _ChatTokens(tokenizer).feed(logprobs or [], final=True), "refusal": None}


def _usage(completions: Sequence[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    completion = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def _guard(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Turn an error in the middle of a stream into an error event (the status is already sent)."""
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    except ScratchLLMError as e:
        yield {"error": {"message": str(e), "type": "invalid_request_error", "param": None, "code": None}}
    except Exception as e:
        log.exception("error while streaming")
        yield {"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error",
                         "param": None, "code": None}}  # fmt: skip


def _completion_chunks(
    head: dict[str, Any],
    events: AsyncIterator[tuple[str, Any]],
    echo: str | None,
    prompt: list[int],
    offsets: _TextOffsets | None,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """`echo`: the prompt's text to send first (None: no echo). With `offsets` (logprobs asked for)
    every chunk carries the logprobs of the tokens that begin in its text (the echo: the prompt's
    scores); the last chunk those no text carried (and the end-of-text token that ended the text)."""

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        def chunk(text: str, finish: str | None, logprobs: dict | None = None) -> dict[str, Any]:
            return {
                **head,
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
            }

        if echo is not None:
            scores = None
            if offsets is not None:  # echo with logprobs: the prompt's scores come first
                _, value = await anext(events)
                scores = offsets.prompt(prompt, value)
            yield chunk(echo, None, scores)
        async for kind, value in events:
            if kind == "piece":
                text, logprobs = value
                yield chunk(text, None, offsets.add(logprobs) if offsets else None)
            elif kind == "done":
                completion, rest = value
                yield chunk(
                    "",
                    completion.finish_reason,
                    offsets.add(rest, completion.stop_logprob) if offsets else None,
                )
                if include_usage:
                    yield {**head, "choices": [], "usage": _usage([completion])}

    return _guard(chunks())


def _chat_chunks(
    head: dict[str, Any],
    events: AsyncIterator[tuple[str, Any]],
    tokens: _ChatTokens | None,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """With `tokens` (logprobs asked for) a content chunk carries the logprobs of the tokens that
    begin in its text; tokens whose text was held back come with the next chunk that has text."""
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None, content: list | None = None) -> dict[str, Any]:
        logprobs = None if content is None else {"content": content, "refusal": None}
        return {
            **head,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        yield chunk({"role": "assistant", "content": ""}, None, [] if tokens else None)
        stripper = WhitespaceStripper()  # the same stripping as the non-streaming answer
        ready: list[dict[str, Any]] = []
        async for kind, value in events:
            if kind == "piece":
                piece, logprobs = value
                if tokens:
                    ready += tokens.feed(logprobs)
                if text := stripper.feed(piece):
                    yield chunk({"content": text}, None, ready if tokens else None)
                    ready = []
            else:
                completion, rest = value
                if tokens:
                    ready += tokens.feed(rest, final=True)
                    if ready:  # tokens whose text came with an earlier chunk or none
                        yield chunk({"content": ""}, None, ready)
                yield chunk({}, completion.finish_reason)
                if include_usage:
                    yield {**head, "choices": [], "usage": _usage([completion])}

    return _guard(chunks())


# ----------------------------------------------------------------------------------------------
# Running it


class BackgroundServer:
    """A uvicorn server for `app` on a thread, for tests and notebooks:

        with BackgroundServer(app) as server:
            client = OpenAI(base_url=server.url + "/v1", api_key="none")

    `port=0` picks a free port; `url` is set once the server accepts connections.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.socket = _bind(host, port)
        self.host, self.port = self.socket.getsockname()[:2]
        self.url = f"http://{_url_host(self.host)}:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    def start(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise ScratchLLMError(f"--port {port} is out of range; give 0-65535 (0: any free port)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # listening from now on (the model loads next): a client that connects early, e.g. as soon as
        # "serving ... at URL" is printed, waits in the backlog for the server instead of being refused
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ScratchLLMError(
            f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host"
        ) from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_default_max_tokens(value: int | None) -> None:
    if value is not None and value < 1:
        raise ScratchLLMError(
            f"--default-max-tokens must be >= 1 (or left out: the rest of the context), got {value}"
        )


GENERIC_DIR_NAMES = ("model", "best")  # the model directories every training run writes


def served_model_name(spec: str) -> str:
    """The id a model is served under by default: a hub name as given (`gpt2`); a directory's own
    name, or its run's for a run's `model/` or `best/` (`runs/assistant/model` -> `assistant`)."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        return str(spec)
    path = path.resolve()
    if path.name in GENERIC_DIR_NAMES and path.parent.name:
        return path.parent.name
    return path.name or str(spec)


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    template: str | None = None,
    max_batch_size: int = 8,
    default_max_tokens: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    log_level: str = "info",
    compile: bool = False,
    quantize: str | None = None,
) -> None:
    """`scratchllm serve`: load the model and answer requests until Ctrl-C."""
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    _check_default_max_tokens(default_max_tokens)
    if max_batch_size < 1:
        raise ScratchLLMError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    sock = _bind(host, port)  # fail fast, before the model loads, when the port is taken
    try:
        chat = load_chat_model(
            model, device=device, dtype=dtype, template=template, compile=compile, quantize=quantize
        )
        if compile:  # compile here; the engine thread then records its own CUDA graphs (per thread, quick)
            t = time.perf_counter()
            sizes = chat.engine.warm_up(max_batch_size)
            print(f"compiled the decode step for batches of {', '.join(map(str, sizes))} in "
                  f"{time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip
        app = create_app(chat, model_name=model_name or served_model_name(model), api_key=api_key,
                         max_batch_size=max_batch_size, default_max_tokens=default_max_tokens)  # fmt: skip
        base = f"http://{_url_host(host)}:{sock.getsockname()[1]}/v1"
        print(f"serving {app.state.model_id!r} ({chat.describe_template()}) at {base}", flush=True)
        if api_key is None and not _is_loopback(host):
            print(
                f"warning: listening on {host} without an API key: anyone who can reach it can use the "
                f"model; set --api-key or ${API_KEY_ENV}",
                flush=True,
            )
        uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on")).run(sockets=[sock])
    finally:
        sock.close()


__all__ = [
    "API_KEY_ENV",
    "APIError",
    "BackgroundServer",
    "Scheduler",
    "create_app",
    "serve",
    "served_model_name",
]
