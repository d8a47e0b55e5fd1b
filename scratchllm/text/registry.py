"""Tokenizer kinds by name, and `load_tokenizer`, which finds any tokenizer by name or path.

A saved tokenizer's `tokenizer_meta.json` names its kind; `KINDS` maps that name to the class
that reads it back. A new kind is a module in text/ plus an entry here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ScratchLLMError
from .bpe import BPETokenizer
from .char import CharTokenizer
from .gpt2 import load_gpt2_files, load_gpt2_tokenizer, load_tiktoken_encoding
from .hf_tokenizer import TOKENIZER_FILE as HF_TOKENIZER_FILE
from .hf_tokenizer import HFTokenizer
from .simple import SimpleTokenizer
from .tokenizer import META_FILE, Tokenizer

KINDS: dict[str, type[Tokenizer]] = {
    k.kind: k for k in (SimpleTokenizer, BPETokenizer, CharTokenizer, HFTokenizer)
}


def load_tokenizer(spec: str | os.PathLike | Tokenizer) -> Tokenizer:
    """Find a tokenizer by name or path.

    - `gpt2`: OpenAI's GPT-2 BPE (local files first, then tiktoken's download; see text/gpt2.py);
    - `tiktoken:NAME`: any encoding tiktoken knows (e.g. `tiktoken:cl100k_base`; needs a network
      the first time);
    - a directory written by `Tokenizer.save` or a model directory;
    - GPT-2-format files: a directory with `encoder.json` + `vocab.bpe`, or a `.tiktoken` ranks file;
    - a Hugging Face model's tokenizer: a directory with `tokenizer.json` (and its tokenizer_config.json,
      chat_template.jinja, generation_config.json), or the `tokenizer.json` file itself.
    """
    if isinstance(spec, Tokenizer):
        return spec
    s = str(spec)
    if s == "gpt2":
        return load_gpt2_tokenizer()
    if s.startswith("tiktoken:"):
        return load_tiktoken_encoding(s.split(":", 1)[1])
    path = Path(s).expanduser()
    if not path.exists():
        raise ScratchLLMError(
            f"tokenizer {s!r} not found: give `gpt2`, a tokenizer or model directory, an encoder.json + "
            "vocab.bpe directory, a Hugging Face tokenizer.json (or its directory), or a .tiktoken file"
        )
    if path.is_file():
        # a file of a saved tokenizer stands for its directory, whose settings (pattern, special
        # tokens) it lacks; a lone .tiktoken file is GPT-2's ranks
        if path.name in ("encoder.json", "vocab.bpe", META_FILE) or (path.parent / META_FILE).is_file():
            path = path.parent
        elif path.name == HF_TOKENIZER_FILE:
            return HFTokenizer.from_dir(path.parent)
        else:
            return load_gpt2_files(path)
    if (path / META_FILE).exists():
        return _load_saved(path)
    # GPT-2's own files first, as before; Hugging Face's tokenizer.json otherwise
    if (path / HF_TOKENIZER_FILE).is_file() and not (path / "encoder.json").is_file():
        return HFTokenizer.from_dir(path)
    return load_gpt2_files(path)


def _load_saved(path: Path) -> Tokenizer:
    """A tokenizer directory written by `Tokenizer.save`, read back by its kind."""
    meta_path = path / META_FILE
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        kind = meta["kind"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ScratchLLMError(
            f"{meta_path}: not a valid tokenizer description ({type(e).__name__}: {e}); re-save the tokenizer"
        ) from e
    if not isinstance(kind, str) or kind not in KINDS:
        raise ScratchLLMError(
            f"{meta_path}: unknown tokenizer kind {kind!r}; expected one of {sorted(KINDS)}"
        )
    try:
        return KINDS[kind]._load(path, meta)
    except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as e:  # a damaged file
        raise ScratchLLMError(
            f"{path}: the saved {kind} tokenizer is damaged ({type(e).__name__}: {e}); save or train it again"
        ) from e
