"""OpenAI's GPT-2 tokenizer (and any tiktoken encoding) as a `BPETokenizer`.

GPT-2's vocabulary is 50,256 learned byte-level BPE tokens plus `<|endoftext|>` (id 50256). It is
found, in this order:
1. `$SCRATCHLLM_GPT2_TOKENIZER`: a directory with `encoder.json` + `vocab.bpe` or a `.tiktoken`
   file, or the `.tiktoken` file itself;
2. `~/.cache/scratchllm/gpt2-tokenizer/` (same layout; filled after the first download);
3. tiktoken's `gpt2` encoding (downloads once, then tiktoken's own cache).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import tiktoken

from ..errors import ScratchLLMError
from ..fileio import atomic_write_bytes
from .bpe import (
    ENCODER_FILE,
    MERGES_FILE,
    BPETokenizer,
    dump_tiktoken_ranks,
    read_encoder_files,
    read_tiktoken_file,
)
from .tokenizer import EOT

ENV_VAR = "SCRATCHLLM_GPT2_TOKENIZER"
GPT2_TIKTOKEN_FILE = "gpt2.tiktoken"


def gpt2_cache_dir() -> Path:
    """Where a downloaded GPT-2 vocabulary is kept for offline use."""
    return Path.home() / ".cache" / "scratchllm" / "gpt2-tokenizer"


def load_gpt2_files(path: str | os.PathLike) -> BPETokenizer:
    """GPT-2 from local files: a directory with `encoder.json` + `vocab.bpe` (OpenAI's release; it
    lists `<|endoftext|>` itself), a directory with one `.tiktoken` file, or a `.tiktoken` ranks
    file (which has no `<|endoftext|>`: it gets the id after the last learned token, 50256)."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / ENCODER_FILE).exists() and (path / MERGES_FILE).exists():
            ranks, specials, merges = read_encoder_files(path / ENCODER_FILE, path / MERGES_FILE)
            return BPETokenizer(ranks, pattern="gpt2", special_tokens=specials, name="gpt2", merges=merges)
        ranks_files = sorted(path.glob("*.tiktoken"))
        if len(ranks_files) != 1:
            raise ScratchLLMError(
                f"{path}: expected GPT-2 tokenizer files, {ENCODER_FILE} + {MERGES_FILE} or one .tiktoken "
                f"file (found {len(ranks_files)} .tiktoken files)"
            )
        path = ranks_files[0]
    if not path.is_file():
        raise ScratchLLMError(f"GPT-2 tokenizer files not found at {path}")
    if path.stat().st_size == 0:
        raise ScratchLLMError(
            f"{path} is an empty file, not a tokenizer: give a tokenizer or model directory, `gpt2`, "
            "or a .tiktoken ranks file"
        )
    ranks = read_tiktoken_file(path)
    return BPETokenizer(ranks, pattern="gpt2", special_tokens=(EOT,), name="gpt2")


def load_tiktoken_encoding(name: str) -> BPETokenizer:
    """Any encoding tiktoken knows (`gpt2`, `cl100k_base`, `o200k_base`, ...); the first use needs
    a network, later ones tiktoken's cache."""
    known = tiktoken.list_encoding_names()  # offline: the names its plugins define
    if name not in known:
        raise ScratchLLMError(f"tiktoken has no encoding {name!r}; it knows {', '.join(known)}")
    try:
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # no network, a proxy, a corrupt download: all mean "cannot get it now"
        raise ScratchLLMError(f"cannot load tiktoken encoding {name!r}: {type(e).__name__}: {e}") from e
    return BPETokenizer.from_tiktoken(enc, name=name)


def load_gpt2_tokenizer() -> BPETokenizer:
    """GPT-2's tokenizer from local files if there are any, else through tiktoken (see the module
    docstring for the order); a clear error saying how to work offline when all fail."""
    env = os.environ.get(ENV_VAR)
    if env:
        # set on purpose: a wrong path is an error, not a reason to go online
        return load_gpt2_files(env)
    cache = gpt2_cache_dir()
    if cache.is_dir() and any(cache.iterdir()):
        return load_gpt2_files(cache)
    try:
        tok = load_tiktoken_encoding("gpt2")
    except ScratchLLMError as e:
        raise ScratchLLMError(
            f"GPT-2's tokenizer is not available offline and the download failed ({e}). Put OpenAI's "
            f"encoder.json + vocab.bpe (or gpt2.tiktoken) into {cache} or point ${ENV_VAR} at them"
        ) from e
    _fill_cache(tok, cache)
    return tok


def _fill_cache(tok: BPETokenizer, cache: Path) -> None:
    """Keep a copy of a downloaded GPT-2 vocabulary, so later runs work offline."""
    with contextlib.suppress(OSError):  # a read-only home is no reason to fail; tiktoken keeps its own cache
        atomic_write_bytes(cache / GPT2_TIKTOKEN_FILE, dump_tiktoken_ranks(tok.mergeable_ranks))
