"""`scratchllm serve --model DIR`: load a model and answer OpenAI's and Ollama's APIs (and a web chat
page) on a port until Ctrl-C.

The app and its routes are app.py. This module binds the socket (before the model loads, so a
taken port fails fast and an early client waits in the backlog), names the served model
(`served_model_name`) and runs uvicorn. The server binds 127.0.0.1 unless told otherwise;
`--api-key` (or $SCRATCHLLM_API_KEY) requires `Authorization: Bearer KEY` on every API request
(/v1, /api, the tokenizer routes; the chat page asks for the key), and listening beyond this machine
without one prints a warning. `ServeSettings` are the command's settings and `serve_command` runs it
through `serve`, which Python callers use with keywords.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import setting
from ..errors import ScratchLLMError
from ..generation import RuntimeSettings
from ..generation.config import DRAFT_CONFIDENCE, DRAFT_SCHEDULE, DRAFT_TOKENS
from ..text.templates import template_names
from .chat import MODEL_HELP, TEMPLATE_HELP, load_chat_model

API_KEY_ENV = "SCRATCHLLM_API_KEY"
GENERIC_DIR_NAMES = ("model", "best")  # the model directories every training run writes
SCHEDULERS = ("continuous", "static")  # scheduler.py's, named here so that --help imports no FastAPI


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (0: any free port), or a `ScratchLLMError` saying why not."""
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


def url_host(host: str) -> str:
    """The host as a URL writes it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    draft_model: str | None = None,
    draft_tokens: int = DRAFT_TOKENS,
    draft_confidence: float = DRAFT_CONFIDENCE,
    draft_schedule: str = DRAFT_SCHEDULE,
    scheduler: str = "continuous",
    prefill_chunk: int = 256,
) -> None:
    """`scratchllm serve`: load the model and answer requests until Ctrl-C. `draft_model`: a draft for
    speculative decoding, which runs one request at a time."""
    try:  # the `serve` extra, imported here so that `scratchllm serve --help` needs none of it
        import uvicorn

        from .app import check_default_max_tokens, create_app
    except ModuleNotFoundError as e:  # pragma: no cover - only without the `serve` extra
        if e.name not in ("fastapi", "pydantic", "starlette", "uvicorn"):
            raise
        raise ScratchLLMError(
            f"the server needs FastAPI and uvicorn ({e.name} is missing); pip install 'scratchllm[serve]'"
        ) from e
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    check_default_max_tokens(default_max_tokens)
    if max_batch_size < 1:
        raise ScratchLLMError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    if scheduler not in SCHEDULERS:
        raise ScratchLLMError(f"--scheduler {scheduler!r} is unknown; use {' or '.join(SCHEDULERS)}")
    if prefill_chunk < 1:
        raise ScratchLLMError(f"--prefill-chunk must be >= 1, got {prefill_chunk}")
    sock = bind_socket(host, port)  # fail fast, before the model loads, when the port is taken
    try:
        chat = load_chat_model(
            model,
            device=device,
            dtype=dtype,
            template=template,
            compile=compile,
            quantize=quantize,
            draft_model=draft_model,
            draft_tokens=draft_tokens,
            draft_confidence=draft_confidence,
            draft_schedule=draft_schedule,
        )
        if compile:  # compile here; the engine thread then records its own CUDA graphs (per thread, quick)
            t = time.perf_counter()
            sizes = chat.engine.warm_up(max_batch_size)
            print(
                f"compiled the decode step for batches of {', '.join(map(str, sizes))} in "
                f"{time.perf_counter() - t:.0f} s",
                flush=True,
            )
        speculative = chat.engine.draft is not None  # a batch-1 tool: requests run one at a time
        app = create_app(
            chat,
            model_name=model_name or served_model_name(model),
            api_key=api_key,
            max_batch_size=1 if speculative else max_batch_size,
            scheduler=scheduler,
            prefill_chunk=prefill_chunk,
            default_max_tokens=default_max_tokens,
        )
        base = f"http://{url_host(host)}:{sock.getsockname()[1]}/v1"
        print(f"serving {app.state.settings.model_id!r} ({chat.describe_template()}) at {base}", flush=True)
        if speculative:
            print(f"speculative decoding with the draft {draft_model}: one request at a time", flush=True)
        if api_key is None and not _is_loopback(host):
            print(
                f"warning: listening on {host} without an API key: anyone who can reach it can use the "
                f"model; set --api-key or ${API_KEY_ENV}",
                flush=True,
            )
        uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on")).run(sockets=[sock])
    finally:
        sock.close()


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass
class ServeSettings:
    """`scratchllm serve`: serve a model over OpenAI's API: GET /v1/models, POST /v1/completions (raw
    text), POST /v1/chat/completions (rendered with the prompt template), streaming as server-sent
    events. Any OpenAI client works with base_url http://HOST:PORT/v1. Requests queue for the model;
    requests join the running batch as its rows finish (continuous batching; --scheduler static: waiting
    ones with equal settings run as one batch)."""

    model: str = setting("", MODEL_HELP, "model", required=True)
    template: str | None = setting(None, TEMPLATE_HELP, "model", choices=tuple(template_names()))
    runtime: RuntimeSettings = setting(RuntimeSettings(), "where and how the model runs")
    host: str = setting("127.0.0.1", "address to listen on (127.0.0.1: this machine only)", "server")
    port: int = setting(8000, "port", "server")
    api_key: str = setting(
        "", f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV}, else no key)", "server"
    )
    model_name: str = setting(
        "",
        "the model id clients send (default: the directory's name, or its run's for a run's model/ or "
        "best/: runs/assistant/model is assistant)",
        "server",
    )
    max_batch_size: int = setting(8, "requests decoded together at most", "server")
    scheduler: str = setting(
        "continuous",
        "continuous: requests join and leave the running batch at every token; static: one batch at a "
        "time, of the waiting requests with equal settings (--compile and a draft model always run static)",
        "server",
        choices=SCHEDULERS,
    )
    prefill_chunk: int = setting(
        256,
        "continuous: prompt tokens read per step at most, between the running requests' tokens",
        "server",
    )
    default_max_tokens: int | None = setting(
        None, "cap for chat replies without max_tokens (default: the rest of the context window)", "server"
    )
    log_level: str = setting(
        "info", "uvicorn's log level (info: one line per request)", "server", choices=LOG_LEVELS
    )


def serve_command(settings: ServeSettings) -> None:
    """`scratchllm serve`: `serve` with the command's settings."""
    runtime = settings.runtime
    serve(
        settings.model,
        host=settings.host,
        port=settings.port,
        api_key=settings.api_key or None,
        model_name=settings.model_name or None,
        template=settings.template,
        max_batch_size=settings.max_batch_size,
        scheduler=settings.scheduler,
        prefill_chunk=settings.prefill_chunk,
        default_max_tokens=settings.default_max_tokens,
        device=runtime.device,
        dtype=runtime.dtype,
        log_level=settings.log_level,
        compile=runtime.compile,
        quantize=runtime.quantize,
        draft_model=runtime.draft_model,
        draft_tokens=runtime.draft_tokens,
        draft_confidence=runtime.draft_confidence,
        draft_schedule=runtime.draft_schedule,
    )


__all__ = [
    "API_KEY_ENV",
    "ServeSettings",
    "bind_socket",
    "serve",
    "serve_command",
    "served_model_name",
    "url_host",
]
