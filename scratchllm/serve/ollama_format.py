"""The server's answers in Ollama's shapes: chat and generate answers, their streams (one JSON object
per line), and the model's card for /api/tags, /api/ps and /api/show.

Durations are nanoseconds of wall time measured by the route. In a stream, `prompt_eval_duration`
runs until the first event of the generation (time spent waiting for the model included) and
`eval_duration` from there to the end; an answer not streamed, which may share a batch with
others, has no `prompt_eval_duration` and counts its whole time in `eval_duration`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
from fastapi.responses import StreamingResponse

from .. import __version__
from ..checkpoint import meta_model
from ..generation import Completion
from ..model.gpt import count_parameters
from ..model.quantize import is_quantized
from ..text.templates import ModelTemplate
from .chat import ChatModel, WhitespaceStripper
from .ollama_schemas import ollama_error

LATEST = ":latest"  # the tag of an Ollama name that shows none
DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}  # GGUF's names
FOREVER_NS = 2**63 - 1  # how far off Ollama puts the unloading of a model kept alive for good


def timestamp(seconds: float | None = None) -> str:
    """RFC 3339 in UTC with microseconds, as Ollama writes `created_at` (default: now)."""
    moment = datetime.fromtimestamp(time.time() if seconds is None else seconds, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def tagged(name: str) -> str:
    """A model name as Ollama lists it: with a tag, ":latest" when it has none."""
    return name if ":" in name.rpartition("/")[2] else name + LATEST


# ----------------------------------------------------------------------------------------------
# Chat and generate answers


class Answer:
    """The objects of one /api/chat (`chat`) or /api/generate answer, for the model named `model`,
    whose request came at `started` (`time.perf_counter_ns`). `context`: generate's prompt ids,
    which the last object returns with the reply's (Ollama's `context`); None: none returned."""

    def __init__(self, chat: bool, model: str, started: int, context: list[int] | None = None):
        self.chat, self.model, self.started, self.context = chat, model, started, context

    def part(self, text: str, done: bool = False) -> dict[str, Any]:
        """One piece of the reply's text."""
        body = {"message": {"role": "assistant", "content": text}} if self.chat else {"response": text}
        return {"model": self.model, "created_at": timestamp(), **body, "done": done}

    def final(self, c: Completion, text: str, first: int | None) -> dict[str, Any]:
        """The last object: `text` (empty in a stream), why it ended and the counts; `first`: when
        the stream's first event came (None: not streamed)."""
        now = time.perf_counter_ns()
        out = {**self.part(text, done=True), "done_reason": c.finish_reason}
        if self.context is not None:
            out["context"] = [*self.context, *c.token_ids]
        out.update(total_duration=now - self.started, load_duration=0)  # loaded at the server's start
        if first is not None:
            out["prompt_eval_duration"] = first - self.started
        out.update(
            prompt_eval_count=c.prompt_tokens,
            eval_count=c.completion_tokens,
            eval_duration=now - (self.started if first is None else first),
        )
        return out

    def loaded(self) -> dict[str, Any]:
        """Ollama's answer to a request without a prompt: the model is loaded (it always is here)."""
        return {**self.part("", done=True), "done_reason": "load"}

    async def chunks(self, events: AsyncIterator[tuple[str, Any]], strip: bool) -> AsyncIterator[dict]:
        """The stream's objects from the scheduler's events; `strip`: without the whitespace around
        the reply (as the non-streaming answer), held back until more text follows."""
        stripper = WhitespaceStripper() if strip else None
        first = None
        async for kind, value in events:
            first = first or time.perf_counter_ns()
            if kind == "piece":
                text = stripper.feed(value[0]) if stripper else value[0]
                if text:
                    yield self.part(text)
            elif kind == "done":
                yield self.final(value[0], "", first)


def ndjson(objects: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """One JSON object per line; an error in the middle (the status is sent) as an `{"error"}` line,
    which Ollama's clients raise."""

    async def body() -> AsyncIterator[str]:
        try:
            async for obj in objects:
                yield json.dumps(obj, ensure_ascii=False) + "\n"
        except Exception as e:
            yield json.dumps({"error": ollama_error(e).message}, ensure_ascii=False) + "\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="application/x-ndjson", headers=headers)


# ----------------------------------------------------------------------------------------------
# The model's card


@dataclass(frozen=True)
class ModelCard:
    """What Ollama's listing routes tell about the served model."""

    name: str
    digest: str
    size: int  # bytes of its tensors as loaded
    size_vram: int
    parameters: int
    details: dict[str, Any]
    modified_at: str
    context_length: int

    @classmethod
    def of(cls, chat: ChatModel, model_id: str, created: float) -> ModelCard:
        """The card of `chat` served as `model_id` since `created` (seconds since the epoch)."""
        net = chat.engine.model
        cfg = net.cfg
        parameters = count_parameters(meta_model(cfg))  # int4 layers keep their weights as buffers
        storages, size = set(), 0
        for tensor in net.state_dict().values():
            if tensor.untyped_storage().data_ptr() not in storages:  # a tied head counts once
                storages.add(tensor.untyped_storage().data_ptr())
                size += tensor.numel() * tensor.element_size()
        weight = net.tok_emb.weight
        config = json.dumps(cfg.to_dict(), sort_keys=True)
        details = {
            "parent_model": "",
            "format": "safetensors",
            "family": cfg.architecture,
            "families": [cfg.architecture],
            "parameter_size": human_number(parameters),
            "quantization_level": "INT4" if is_quantized(net) else DTYPE_NAMES.get(weight.dtype, "?"),
        }
        return cls(
            name=tagged(model_id),
            # names the model's id, shape and size, not its weights (hashing those would take long)
            digest=hashlib.sha256(f"{model_id}\n{config}\n{size}".encode()).hexdigest(),
            size=size,
            size_vram=size if weight.device.type == "cuda" else 0,
            parameters=parameters,
            details=details,
            modified_at=timestamp(created),
            context_length=chat.context_length,
        )

    def listing(self) -> dict[str, Any]:
        """The model's entry in /api/tags."""
        keys = ("name", "modified_at", "size", "digest", "details")
        return {"model": self.name, **{key: getattr(self, key) for key in keys}}

    def running(self) -> dict[str, Any]:
        """The model's entry in /api/ps: loaded until the server stops."""
        keys = ("name", "size", "digest", "details", "size_vram", "context_length")
        expires = timestamp(time.time() + FOREVER_NS / 1e9)
        return {"model": self.name, **{key: getattr(self, key) for key in keys}, "expires_at": expires}

    def show(self, chat: ChatModel) -> dict[str, Any]:
        """/api/show: details, `model_info`, the prompt template, its stop strings as parameters."""
        template = template_text(chat)
        system = getattr(chat.template, "default_system", "")
        parameters = "\n".join(f"stop {json.dumps(s)}" for s in chat.stop_strings())
        modelfile = [
            f"# served by scratchllm {__version__}",
            f"FROM {self.name}",
            f'TEMPLATE """{template}"""',
        ]
        modelfile += [f'SYSTEM """{system}"""'] if system else []
        modelfile += [f"PARAMETER {line}" for line in parameters.splitlines()]
        return {
            "license": "",
            "modelfile": "\n".join(modelfile),
            "parameters": parameters,
            "template": template,
            **({"system": system} if system else {}),
            "details": self.details,
            "model_info": model_info(chat, self.parameters),
            "capabilities": ["completion"],
            "modified_at": self.modified_at,
        }


def human_number(n: int) -> str:
    """A parameter count as Ollama shows one: 8.0B, 494.03M, 137M, 12K."""
    for unit, scale, digits in (("B", 10**9, 1), ("M", 10**6, 2)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value.is_integer() else f"{value:.{digits}f}{unit}"
    return f"{n / 1000:.0f}K" if n >= 1000 else str(n)


def model_info(chat: ChatModel, parameters: int) -> dict[str, Any]:
    """/api/show's `model_info`: GGUF's key names, under the model's family."""
    cfg = chat.engine.model.cfg
    arch = cfg.architecture
    info = {
        "general.architecture": arch,
        "general.parameter_count": parameters,
        f"{arch}.context_length": cfg.context_length,
        f"{arch}.embedding_length": cfg.emb_dim,
        f"{arch}.block_count": cfg.n_layers,
        f"{arch}.attention.head_count": cfg.n_heads,
        f"{arch}.attention.head_count_kv": getattr(cfg, "n_kv_groups", cfg.n_heads),
        f"{arch}.attention.key_length": cfg.head_dim,
        f"{arch}.attention.value_length": cfg.head_dim,
        f"{arch}.feed_forward_length": getattr(cfg, "hidden_dim", 4 * cfg.emb_dim),
        f"{arch}.vocab_size": cfg.vocab_size,
    }
    if hasattr(cfg, "rope_base"):
        info[f"{arch}.rope.freq_base"] = cfg.rope_base
    return info


def template_text(chat: ChatModel) -> str:
    """The prompt template: a model's own (Jinja) as stored, else its layout with Ollama's
    placeholders for the system message and the prompt."""
    if isinstance(chat.template, ModelTemplate):
        return chat.template.tokenizer.chat_template
    placeholders = [
        {"role": "system", "content": "{{ .System }}"},
        {"role": "user", "content": "{{ .Prompt }}"},
    ]
    return chat.template.render_chat(placeholders)


__all__ = [
    "Answer",
    "ModelCard",
    "human_number",
    "model_info",
    "ndjson",
    "tagged",
    "template_text",
    "timestamp",
]
