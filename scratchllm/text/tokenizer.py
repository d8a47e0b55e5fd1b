"""The one tokenizer interface; `load_tokenizer` (text/registry.py) finds any tokenizer by name or path.

The kinds that implement it:
- `SimpleTokenizer` (text/simple.py): the book's first step, a regex word vocabulary;
- `CharTokenizer` (text/char.py): one id per character;
- `BPETokenizer` (text/bpe/): byte-level BPE, trained from scratch here or loaded from GPT-2's
  files, encoding through tiktoken's engine;
- GPT-2's tokenizer is a `BPETokenizer` with OpenAI's ranks (text/gpt2.py).

On disk a tokenizer is a directory with `tokenizer_meta.json` (which kind, pattern, special
tokens) plus the kind's own files; model directories embed one the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence, Set
from pathlib import Path
from typing import Any, ClassVar, Literal

from ..errors import ScratchLLMError
from ..fileio import TOKENIZER_META_FILE as META_FILE
from ..fileio import atomic_write_bytes, atomic_write_json

EOT = "<|endoftext|>"
AllowedSpecial = Literal["all"] | str | Set[str]  # "all", one special, or a collection


class Tokenizer(ABC):
    """Text <-> token ids. Special-token strings in text are plain text unless `allowed_special`."""

    kind: ClassVar[str]
    name: str
    special_tokens: dict[str, int]

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, specials included (the model's embedding rows)."""

    @abstractmethod
    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """Token ids of `text`. Special-token strings become their special id only when listed in
        `allowed_special` (or it is "all"); otherwise they are encoded as ordinary text."""

    def encode_batch(
        self, texts: Sequence[str], allowed_special: AllowedSpecial = frozenset()
    ) -> list[list[int]]:
        """`encode` of each text (kinds with a faster batch path override this)."""
        self._check_texts(texts)
        return [self.encode(t, allowed_special) for t in texts]

    @abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw UTF-8 bytes of `ids` (a prefix may end inside a multi-byte character)."""

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; bytes that do not form valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _check_texts(self, texts: object) -> None:
        if isinstance(texts, (str, bytes, bytearray)):
            raise ScratchLLMError(
                f"tokenizer {self.name!r}: encode_batch takes a list of texts, got one {type(texts).__name__}"
            )

    def _check_text(self, text: object) -> None:
        if not isinstance(text, str):
            raise ScratchLLMError(f"tokenizer {self.name!r}: encode takes a str, got {type(text).__name__}")

    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset[str]:
        """The special strings that `encode` treats as specials: "all" of them, the one a string
        names, or those of a collection (an unknown one is an error)."""
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        allowed = frozenset([allowed_special] if isinstance(allowed_special, str) else allowed_special)
        unknown = allowed - self.special_tokens.keys()
        if unknown:
            raise ScratchLLMError(
                f"tokenizer {self.name!r}: unknown special tokens {sorted(unknown)}; it has "
                f"{sorted(self.special_tokens)}"
            )
        return allowed

    @abstractmethod
    def _files(self) -> dict[str, bytes]:
        """The kind's own files: name -> content."""

    @abstractmethod
    def _meta(self) -> dict[str, Any]:
        """Kind-specific settings stored in tokenizer_meta.json."""

    @classmethod
    @abstractmethod
    def _load(cls, directory: Path, meta: dict[str, Any]) -> Tokenizer:
        """Rebuild from a directory written by `save`."""

    @property
    def eot_id(self) -> int | None:
        """Id of `<|endoftext|>`, the document separator and default end-of-sequence token."""
        return self.special_tokens.get(EOT)

    def meta(self) -> dict[str, Any]:
        """What tokenizer_meta.json holds: kind, name, vocab size, special tokens, kind-specific settings."""
        return {
            "kind": self.kind,
            "name": self.name,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
            **self._meta(),
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer files into `directory` (created if needed; each file atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for fname, data in self._files().items():
            atomic_write_bytes(directory / fname, data)
        atomic_write_json(directory / META_FILE, self.meta())
        return directory

    def fingerprint(self) -> str:
        """A hash of everything that decides the ids: two tokenizers with equal fingerprints encode
        every text identically (given the same `allowed_special`)."""
        h = hashlib.sha256()
        meta = {k: v for k, v in self.meta().items() if k != "name"}
        h.update(json.dumps(meta, sort_keys=True).encode())
        for fname, data in sorted(self._files().items()):
            h.update(fname.encode())
            h.update(hashlib.sha256(data).digest())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def check_not_text(ids: object, name: str) -> None:
    """Decoding takes token ids; a string would otherwise be read digit by digit as ids."""
    if isinstance(ids, (str, bytes, bytearray)):
        raise ScratchLLMError(
            f"tokenizer {name!r}: decode takes token ids (a list of ints), got a {type(ids).__name__}"
        )
