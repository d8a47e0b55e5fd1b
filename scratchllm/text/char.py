"""A character-level tokenizer: one id per distinct character of the training text (plus <|endoftext|>).

The smallest possible vocabulary (Tiny Shakespeare has 65 characters) makes it the classic first
pretraining experiment: tiny models learn to spell before they learn words. Characters unseen in training
map to `<|unk|>`, so unlike byte-level BPE it is not lossless on new text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ScratchLLMError
from .tokenizer import EOT, AllowedSpecial, Tokenizer

UNK = "<|unk|>"


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: Iterable[str], name: str = "char"):
        self.name = name
        self.chars = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise ScratchLLMError("char tokenizer: every vocabulary entry must be a single character")
        self.char_to_id = {c: i for i, c in enumerate(self.chars)}
        n = len(self.chars)
        self.special_tokens = {EOT: n, UNK: n + 1}
        self._id_to_text = [*self.chars, EOT, UNK]

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
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unk = self.special_tokens[UNK]
        ids: list[int] = []
        i = 0
        while i < len(text):
            special = next((s for s in allowed if text.startswith(s, i)), None)
            if special is not None:
                ids.append(self.special_tokens[special])
                i += len(special)
            else:
                ids.append(self.char_to_id.get(text[i], unk))
                i += 1
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        """The characters of `ids` (specials as their strings); an id outside the vocabulary is an error."""
        try:
            return "".join(self._id_to_text[i] if i >= 0 else "\ufffd" for i in ids)
        except IndexError as e:
            raise ScratchLLMError(f"char tokenizer: token id out of range 0..{self.vocab_size - 1}") from e

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
