"""The book's first tokenizer: split text into words and punctuation with a regex, number the
distinct pieces of a corpus, and map anything unseen to `<|unk|>`.

It is not lossless (whitespace is dropped and rebuilt on decode) and cannot spell unseen words;
those two limits are why GPT models use byte-level BPE (text/bpe/).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ScratchLLMError
from .tokenizer import EOT, AllowedSpecial, Tokenizer, check_not_text

UNK = "<|unk|>"
SPLIT_PATTERN = re.compile(r'([,.:;?_!"()\']|--|\s)')
# decode joins pieces with spaces, then removes the space before punctuation
_JOIN_FIX = re.compile(r'\s+([,.:;?!"()\'])')


def split_words(text: str) -> list[str]:
    """The book's pre-processing: words and punctuation, whitespace dropped."""
    return [piece.strip() for piece in SPLIT_PATTERN.split(text) if piece.strip()]


class SimpleTokenizer(Tokenizer):
    """Word-level tokenizer with `<|endoftext|>` and `<|unk|>` (the book's `SimpleTokenizerV2`, except
    that, like every tokenizer here, special strings in text are plain text unless `allowed_special`)."""

    kind = "simple"

    def __init__(self, vocab: list[str], name: str = "simple"):
        specials = (EOT, UNK)
        words = [w for w in vocab if w not in specials]
        self.name = name
        self.id_to_token = [*words, *specials]
        self.token_to_id = {tok: i for i, tok in enumerate(self.id_to_token)}
        if len(self.token_to_id) != len(self.id_to_token):
            raise ScratchLLMError("simple tokenizer: the vocabulary has duplicate entries")
        self.special_tokens = {s: self.token_to_id[s] for s in specials}

    @classmethod
    def from_corpus(cls, texts: str | Iterable[str], name: str = "simple") -> SimpleTokenizer:
        """Vocabulary = the sorted distinct words and punctuation marks of the corpus, then the specials."""
        if isinstance(texts, str):
            texts = [texts]
        words: set[str] = set()
        for text in texts:
            words.update(split_words(text))
        if not words:
            raise ScratchLLMError("simple tokenizer: the corpus has no words to build a vocabulary from")
        return cls(sorted(words), name=name)

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        self._check_text(text)
        allowed = self._allowed(allowed_special)
        parts = [text]
        if allowed:
            parts = re.split("(" + "|".join(re.escape(s) for s in sorted(allowed)) + ")", text)
        unk = self.special_tokens[UNK]
        ids: list[int] = []
        for part in parts:
            if part in allowed:
                ids.append(self.special_tokens[part])
                continue
            for word in split_words(part):
                tid = self.token_to_id.get(word, unk)
                # a special token's text that is not allowed is ordinary (unknown) text
                ids.append(unk if self.id_to_token[tid] in self.special_tokens else tid)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        """The words of `ids` joined by spaces, with the space before punctuation removed (the book's
        `decode`); an id outside the vocabulary is an error."""
        check_not_text(ids, self.name)
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:  # checked, not caught: a negative index would silently read from the end
            raise ScratchLLMError(f"simple tokenizer: token id {bad} out of range 0..{self.vocab_size - 1}")
        return _JOIN_FIX.sub(r"\1", " ".join(self.id_to_token[i] for i in ids))

    def _files(self) -> dict[str, bytes]:
        return {"vocab.json": json.dumps(self.id_to_token, ensure_ascii=False, indent=0).encode("utf-8")}

    def _meta(self) -> dict[str, Any]:
        return {"files": ["vocab.json"]}

    @classmethod
    def _load(cls, directory: Path, meta: dict[str, Any]) -> SimpleTokenizer:
        path = directory / "vocab.json"
        try:
            vocab = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ScratchLLMError(f"{path}: cannot read the simple tokenizer's vocabulary ({e})") from e
        return cls(vocab, name=meta.get("name", "simple"))


class SimpleTokenizerV2(SimpleTokenizer):
    """The book's class: `<|endoftext|>` in text is the special token by default, as in chapter 2.
    Only that default differs: saved and loaded again it is a `SimpleTokenizer` (same vocabulary and
    fingerprint), which needs `allowed_special` for it."""

    def encode(self, text: str, allowed_special: AllowedSpecial = "all") -> list[int]:
        return super().encode(text, allowed_special)

    def encode_batch(self, texts: Sequence[str], allowed_special: AllowedSpecial = "all") -> list[list[int]]:
        return super().encode_batch(texts, allowed_special)
