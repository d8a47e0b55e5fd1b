"""The server's answers in OpenAI's shapes: completion and chat responses, their streamed chunks
(server-sent events ending with `data: [DONE]`), token logprobs and usage.

Completions' `logprobs` list token strings, their logprobs, the top alternatives as {token string:
logprob} and each token's `text_offset` (`TextOffsets`); chat's `logprobs.content` lists per token
its string, logprob, UTF-8 bytes and top alternatives (`ChatTokens`). A token that is a piece of a
multi-byte character is named by its bytes, "bytes:\\xe6\\x97", as OpenAI does. In streams each
chunk carries the logprobs of the tokens that begin in its text.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi.responses import StreamingResponse

from ..errors import ScratchLLMError
from ..generation import Completion, TokenLogprob, decode_piece
from .chat import WhitespaceStripper
from .schemas import APIError

log = logging.getLogger("scratchllm.serve")


def token_text(raw: bytes) -> str:
    """A token's string: its text, or (a piece of a multi-byte character) its bytes spelled out as
    OpenAI does, "bytes:\\xe6\\x97", so that different fragments never look alike."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def usage(completions: Sequence[Completion]) -> dict[str, int]:
    """The `usage` object: prompt, completion and total tokens."""
    prompt = sum(c.prompt_tokens for c in completions)
    completion = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ----------------------------------------------------------------------------------------------
# Logprobs


class TextOffsets:
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
            out["tokens"].append(token_text(raw))
            piece, earlier = decode_piece(self.utf8, raw)
            out["text_offset"].append(self.offset + earlier)
            self.offset += len(piece)
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            # the `logprobs` most likely tokens, and the chosen one (OpenAI: "up to logprobs+1")
            top = None
            if lp is not None:
                top = {token_text(self.tokenizer.decode_bytes([i])): v for i, v in lp.top}
                top.setdefault(out["tokens"][-1], lp.logprob)
            out["top_logprobs"].append(top)
        return out


def merge_logprobs(*parts: dict[str, list] | None) -> dict[str, list]:
    """One completions `logprobs` object from several (the echoed prompt's, the completion's)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key, values in (part or {}).items():
            out[key].extend(values)
    return out


class ChatTokens:
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
            return {"token": token_text(raw), "logprob": logprob, "bytes": list(raw)}

        return {**one(lp.token_id, lp.logprob), "top_logprobs": [one(i, v) for i, v in lp.top]}


def _utf8_state(data: bytes) -> str:
    """ "complete" (valid UTF-8), "unfinished" (valid but for a character that goes on) or "broken"."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return "unfinished" if e.reason == "unexpected end of data" else "broken"
    return "complete"


def chat_logprobs(tokenizer: Any, logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any]:
    """The chat API's `logprobs` object for a whole reply (see `ChatTokens`)."""
    return {"content": ChatTokens(tokenizer).feed(logprobs or [], final=True), "refusal": None}


# ----------------------------------------------------------------------------------------------
# Whole answers


def completion_response(
    head: dict[str, Any],
    tokenizer: Any,
    prompts: Sequence[list[int]],
    results: Sequence[Completion],
    echo: bool,
    logprobs: int | None,
    scores: Sequence[Sequence[TokenLogprob | None]] | None,
) -> dict[str, Any]:
    """A `text_completion`: one choice per prompt, the prompt's text first with `echo`; with
    `logprobs`, the tokens' logprobs (the echoed prompt's from `scores`)."""
    choices = []
    for i, (prompt, c) in enumerate(zip(prompts, results)):
        lp = None
        if logprobs is not None:
            offsets = TextOffsets(tokenizer)
            prompt_part = offsets.prompt(prompt, scores[i]) if scores else None
            lp = merge_logprobs(prompt_part, offsets.add(c.logprobs, c.stop_logprob))
        text = tokenizer.decode(prompt) + c.text if echo else c.text
        choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
    return {**head, "choices": choices, "usage": usage(results)}


def chat_response(head: dict[str, Any], tokenizer: Any, c: Completion, logprobs: bool) -> dict[str, Any]:
    """A `chat.completion`: the reply stripped of surrounding whitespace, as the stream shows it."""
    message = {"role": "assistant", "content": c.text.strip()}
    lp = chat_logprobs(tokenizer, c.logprobs) if logprobs else None
    choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": c.finish_reason}
    return {**head, "choices": [choice], "usage": usage([c])}


# ----------------------------------------------------------------------------------------------
# Streams


def sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events, one `data: {json}` per event, then `data: [DONE]`."""

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
        yield e.body()
    except ScratchLLMError as e:
        yield APIError(400, str(e)).body()
    except Exception as e:
        log.exception("error while streaming")
        yield APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body()


def completion_chunks(
    head: dict[str, Any],
    events: AsyncIterator[tuple[str, Any]],
    echo: str | None,
    prompt: list[int],
    offsets: TextOffsets | None,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """`echo`: the prompt's text to send first (None: no echo). With `offsets` (logprobs asked for)
    every chunk carries the logprobs of the tokens that begin in its text (the echo: the prompt's
    scores); the last chunk those no text carried (and the end-of-text token that ended the text)."""

    def chunk(text: str, finish: str | None, logprobs: dict | None = None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {**head, "choices": [choice]}

    async def chunks() -> AsyncIterator[dict[str, Any]]:
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
                logprobs = offsets.add(rest, completion.stop_logprob) if offsets else None
                yield chunk("", completion.finish_reason, logprobs)
                if include_usage:
                    yield {**head, "choices": [], "usage": usage([completion])}

    return _guard(chunks())


def chat_chunks(
    head: dict[str, Any],
    events: AsyncIterator[tuple[str, Any]],
    tokens: ChatTokens | None,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """With `tokens` (logprobs asked for) a content chunk carries the logprobs of the tokens that
    begin in its text; tokens whose text was held back come with the next chunk that has text."""
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None, content: list | None = None) -> dict[str, Any]:
        logprobs = None if content is None else {"content": content, "refusal": None}
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**head, "choices": [choice]}

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
                    yield {**head, "choices": [], "usage": usage([completion])}

    return _guard(chunks())


__all__ = [
    "ChatTokens",
    "TextOffsets",
    "chat_chunks",
    "chat_logprobs",
    "chat_response",
    "completion_chunks",
    "completion_response",
    "merge_logprobs",
    "sse",
    "token_text",
    "usage",
]
