"""A character-level tokenizer: one id per distinct character of the training text (plus <|endoftext|>).

The smallest possible vocabulary (Tiny Shakespeare has 65 characters) makes it the classic first
pretraining experiment: tiny models learn to spell before they learn words. Characters unseen in training
map to `<|unk|>`, so unlike byte-level BPE it is not lossless on new text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ScratchLLMError
from .tokenizer import EOT, AllowedSpecial, Tokenizer, check_not_text

UNK = "<|unk|>"


class CharTokenizer(Tokenizer):
    """One id per character of a fixed set, then `<|endoftext|>` and `<|unk|>` (for the rest)."""

    kind = "char"

    def __init__(self, chars: Iterable[str], name: str = "char"):
        self.name = name
        self.chars = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise ScratchLLMError("char tokenizer: every vocabulary entry must be a single character")
        if not self.chars:
            raise ScratchLLMError("char tokenizer: the vocabulary is empty")
        self.char_to_id = {c: i for i, c in enumerate(self.chars)}
        n = len(self.chars)
        self.special_tokens = {EOT: n, UNK: n + 1}
        # a dict, not a list: an id outside 0..vocab_size-1 (a negative one too) is a KeyError, not a wrap
        self._id_to_text = dict(enumerate([*self.chars, EOT, UNK]))
        self._points = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_corpus(cls, texts: str | Iterable[str], name: str = "char") -> CharTokenizer:
        """The vocabulary is every character that occurs in the corpus, in code point order."""
        if isinstance(texts, str):
            texts = [texts]
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        if not chars:
            raise ScratchLLMError("char tokenizer: the corpus is empty")
        return cls(chars, name=name)

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_text)

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        self._check_text(text)
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self._encode_plain(text).tolist()
        # the allowed specials split the text; the pieces between them are plain characters
        pattern = "(" + "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")"
        ids: list[int] = []
        for i, piece in enumerate(re.split(pattern, text)):
            if i % 2:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self._encode_plain(piece).tolist())
        return ids

    def _encode_plain(self, text: str) -> np.ndarray:
        """One id per character, `<|unk|>` for characters outside the vocabulary, looked up for the whole
        text at once (a Python loop took 1.9 s for Tiny Shakespeare's 1.1M characters)."""
        # code points as an array; "surrogatepass" keeps lone surrogates (surrogateescape'd bytes) as
        # code points
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        at = np.searchsorted(self._points, points)  # self.chars is in code point order: its index is the id
        at[at == len(self._points)] = 0
        return np.where(self._points[at] == points, at, self.special_tokens[UNK]).astype(np.int64)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        """The characters of `ids` (specials as their strings); an id outside the vocabulary is an error."""
        check_not_text(ids, self.name)
        ids = ids if isinstance(ids, (list, tuple)) else list(ids)
        try:  # one pass: streaming decodes the whole text again for every token
            return "".join(map(self._id_to_text.__getitem__, ids))
        except (KeyError, TypeError):  # an id out of range, or not a Python int (a tensor's element)
            ids = [int(i) for i in ids]
        bad = next((i for i in ids if i not in self._id_to_text), None)
        if bad is not None:
            raise ScratchLLMError(f"char tokenizer: token id {bad} out of range 0..{self.vocab_size - 1}")
        return "".join(map(self._id_to_text.__getitem__, ids))

    def _files(self) -> dict[str, bytes]:
        return {"chars.json": json.dumps(self.chars, ensure_ascii=False).encode("utf-8")}

    def _meta(self) -> dict[str, Any]:
        return {"files": ["chars.json"]}

    @classmethod
    def _load(cls, directory: Path, meta: dict[str, Any]) -> CharTokenizer:
        path = directory / "chars.json"
        try:
            chars = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ScratchLLMError(f"{path}: cannot read the character vocabulary ({e})") from e
        return cls(chars, name=meta.get("name", "char"))
