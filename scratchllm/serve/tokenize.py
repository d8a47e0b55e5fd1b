"""The served model's tokenizer over HTTP, in vLLM's shape:

    GET  /tokenizer_info   its special tokens and chat template
    POST /tokenize         {"prompt": text} or {"messages": [...]} -> {"tokens": [...], "count", ...}
    POST /detokenize       {"tokens": [...]} -> {"prompt": text}

lm-evaluation-harness looks for these three routes: when they answer, its `local-completions` model
tokenizes through the server (its "remote" tokenizer), so the harness needs no copy of the tokenizer.
Special-token strings in a prompt become their ids here, as Hugging Face tokenizers do, so the
harness finds the end-of-text id by tokenizing its string. They need the API key, like /v1.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from ..errors import ScratchLLMError
from .access import authorize, check_model
from .chat import ChatModel
from .schemas import ChatMessage, _Body, bad_request


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # a tokenizer that starts prompts with BOS (Llama's) adds it
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


router = APIRouter(dependencies=[Depends(authorize)])


def _served(request: Request, model: str | None) -> ChatModel:
    if model is not None:
        check_model(request, model)
    return request.app.state.chat


def _token_string(chat: ChatModel, token_id: int | None) -> str | None:
    return None if token_id is None else chat.tokenizer.decode([token_id])


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    chat: ChatModel = request.app.state.chat
    tok = chat.tokenizer
    return {
        "tokenizer_class": type(tok).__name__,
        "vocab_size": tok.vocab_size,
        "model_max_length": chat.context_length,
        "eos_token": _token_string(chat, tok.eot_id),
        "bos_token": _token_string(chat, getattr(tok, "bos_id", None)),
        "pad_token": _token_string(chat, getattr(tok, "pad_id", None)),
        "add_bos_token": bool(getattr(tok, "add_bos", False)),
        "chat_template": getattr(tok, "chat_template", None),
    }


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    chat = _served(request, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("send either `prompt` (a text) or `messages` (a conversation)", param="prompt")
    if body.messages is not None:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
            for i, m in enumerate(body.messages)
        ]
        try:
            ids = chat.encode_chat(messages)
        except ScratchLLMError as e:
            raise bad_request(str(e), param="messages") from None
    elif body.add_special_tokens:
        ids = chat.engine.encode(body.prompt, allowed_special="all")
    else:
        ids = chat.tokenizer.encode(body.prompt, allowed_special="all")
    answer: dict[str, Any] = {"count": len(ids), "max_model_len": chat.context_length, "tokens": ids}
    if body.return_token_strs:
        answer["token_strs"] = [chat.tokenizer.decode([t]) for t in ids]
    return answer


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    chat = _served(request, body.model)
    vocab = chat.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary 0..{vocab - 1}", param="tokens")
    return {"prompt": chat.tokenizer.decode(body.tokens)}


__all__ = ["router"]
