"""The text side of generating: how each row's tokens become text as they arrive, and the results.

A row's text grows one token at a time through an incremental UTF-8 decoder, so streamed pieces never
split a character; it ends at the first stop string, and an ending that may still grow into one is
held back. Each token's log-probability goes out with the piece its text begins in.
"""

from __future__ import annotations

import bisect
import codecs
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..text.tokenizer import Tokenizer
from .sampling import TokenLogprob

FinishReason = Literal["stop", "length"]


@dataclass
class Completion:
    """One prompt's result. `finish_reason` is "stop" (end-of-sequence token or stop string) or
    "length" (max_new_tokens reached). `token_ids` are the generated tokens, without the
    end-of-sequence token; the text stops before a stop string."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    stop: str | int | None = None  # what stopped it: the stop string, or the end token's id
    # with `logprobs`: one per token of `token_ids` that the text covers (the tokens of a stop string
    # after the text's end are left out); the end-of-sequence token's, when one ended the text, apart
    logprobs: list[TokenLogprob] | None = None
    stop_logprob: TokenLogprob | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RowText:
    """One sequence's state while generating: its tokens, its text, what was handed out, why it ended."""

    prompt_tokens: int
    stops: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (only kept up to date when streaming or watching stop strings)
    emitted: int = 0  # characters of `text` already handed out
    nbytes: int = 0  # bytes of the generated tokens already fed to the UTF-8 decoder
    utf8: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    finish_reason: FinishReason | None = None
    stop: str | int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stop_logprob: TokenLogprob | None = None
    starts: list[int] = field(default_factory=list)  # where each token's text begins in `text`
    sent: int = 0  # logprobs already handed out with streamed pieces

    def add(
        self,
        token: int,
        logprob: TokenLogprob | None,
        stop_ids: set[int],
        max_new_tokens: int,
        tokenizer: Tokenizer | None,
    ) -> list[tuple[str, list[TokenLogprob]]]:
        """Take a generated token: a stop id ends the row; any other joins it (decoded into text when
        a `tokenizer` is given: streaming or stop strings), and the length limit may end it. Returns the
        text pieces now safe to show, with the logprobs of the tokens that begin in them."""
        pieces = []
        if token in stop_ids:
            self.finish_reason, self.stop = "stop", token
            if logprob is not None:
                self.stop_logprob = logprob
        else:
            self.token_ids.append(token)
            if logprob is not None:
                self.logprobs.append(logprob)
            if tokenizer is not None and (piece := self.advance(tokenizer)):
                pieces.append((piece, self.piece_logprobs()))
            if self.finish_reason is None and len(self.token_ids) >= max_new_tokens:
                self.finish_reason = "length"
        if self.finish_reason is not None and tokenizer is not None and (piece := self.flush()):
            pieces.append((piece, self.piece_logprobs()))
        return pieces

    def advance(self, tokenizer: Tokenizer) -> str:
        """Decode the newest token into `text`, end it at a stop string, and return the text that is
        now safe to show."""
        data = tokenizer.decode_bytes(self.token_ids)
        new = data[self.nbytes :]
        self.nbytes = len(data)
        before = len(self.text)
        piece, earlier = decode_piece(self.utf8, new)
        self.starts.append(before + earlier)
        self.text += piece
        end = len(self.text)
        if self.stops:
            longest = max(len(s) for s in self.stops)
            # a stop string may begin in text decoded earlier (up to longest - 1 characters back)
            start = max(0, before - longest + 1)
            hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                i, s = min(hits)
                self.text = self.text[:i]
                self.finish_reason, self.stop = "stop", s
                return ""  # flush() hands out the rest
            end -= _partial_stop(self.text, self.stops, longest)  # it could still grow into a stop string
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

    def flush(self) -> str:
        """The remaining text once the row has finished (a dangling partial character becomes U+FFFD)."""
        if self.stop is None or isinstance(self.stop, int):
            self.text += self.utf8.decode(b"", final=True)
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece

    def piece_logprobs(self) -> list[TokenLogprob]:
        """The logprobs not yet handed out of the tokens whose text begins in the text handed out."""
        end = bisect.bisect_left(self.starts, self.emitted, lo=self.sent)
        new, self.sent = self.logprobs[self.sent : end], max(self.sent, end)
        return new

    def completion(self, text: str, with_logprobs: bool) -> Completion:
        """The finished row's result, with `text` (decoded here unless it was kept up to date)."""
        logprobs = None
        if with_logprobs:
            # a stop string cut the text: keep the tokens that begin before the cut
            kept = bisect.bisect_left(self.starts, len(self.text)) if isinstance(self.stop, str) else None
            logprobs = self.logprobs[:kept]
        return Completion(
            text,
            self.token_ids,
            self.finish_reason or "length",  # none yet: max_new_tokens == 0
            self.prompt_tokens,
            self.stop,
            logprobs=logprobs,
            stop_logprob=self.stop_logprob,
        )


def decode_piece(utf8: codecs.IncrementalDecoder, raw: bytes) -> tuple[str, int]:
    """Feed a token's bytes to an incremental UTF-8 decoder ("replace" errors); return the text it
    releases and how many of its first characters stand for earlier bytes: a character begun by
    earlier tokens that this one broke (its U+FFFD comes first). A token that completes such a
    character releases it whole, counted as this token's (it begins where the character does)."""
    held = utf8.getstate()[0]
    piece = utf8.decode(raw)
    if not held:
        return piece, 0
    broken = held.decode("utf-8", "replace")
    alone = codecs.getincrementaldecoder("utf-8")("replace").decode(raw)
    return piece, len(broken) if piece == broken + alone else 0


def _partial_stop(text: str, stops: Sequence[str], longest_stop: int) -> int:
    """Length of the longest ending of `text` that is a proper beginning of a stop string."""
    for k in range(min(longest_stop - 1, len(text)), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


class TextStream(Iterator[str]):
    """The text pieces of one streamed completion; `completion` is set once the stream ends.

    With `logprobs` set, `piece_logprobs` holds, after each piece, the logprobs of the tokens whose
    text begins in it; once the stream ends, `rest_logprobs` holds those of the completion's tokens not
    yet handed out (a token whose text is empty). Together they are `completion.logprobs`, in order."""

    def __init__(self, events: Iterator[tuple[int, str, list[TokenLogprob]]], result: list[Completion]):
        self._events = events
        self._result = result
        self._sent = 0
        self.completion: Completion | None = None
        self.piece_logprobs: list[TokenLogprob] = []

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            _, piece, self.piece_logprobs = next(self._events)
        except StopIteration:
            self.piece_logprobs = []
            self.completion = self._result[0] if self._result else None
            raise
        self._sent += len(self.piece_logprobs)
        return piece

    @property
    def rest_logprobs(self) -> list[TokenLogprob]:
        """Once the stream has ended: the completion's logprobs that no piece carried."""
        if self.completion is None or self.completion.logprobs is None:
            return []
        return self.completion.logprobs[self._sent :]

    def close(self) -> None:
        """Stop generating early (the model is released; `completion` stays None)."""
        close = getattr(self._events, "close", None)
        if close is not None:
            close()
