"""The two file formats of a byte-level BPE vocabulary, and GPT-2's printable view of bytes.

- `tokenizer.tiktoken` (tiktoken's format): one `base64(token) rank` line per token.
- OpenAI's GPT-2 layout: `encoder.json` (token string -> id) and `vocab.bpe` (the merges, one
  `left right` pair per line), with bytes shown through GPT-2's `bytes_to_unicode` table.

tiktoken.load has readers too, but they cache by a hash of the path in a temp dir: a tokenizer
retrained and saved to the same path would load stale ranks.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from ...errors import ScratchLLMError

TIKTOKEN_FILE = "tokenizer.tiktoken"
ENCODER_FILE = "encoder.json"
MERGES_FILE = "vocab.bpe"


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table byte -> one printable character: printable Latin-1 bytes stand for
    themselves, the rest (controls, space, ...) are moved to chr(256 + n). With it, any token's
    bytes become a string without whitespace or control characters, so merges fit `left right`."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


@cache
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of `bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_unicode(token: bytes) -> str:
    """A token's bytes in GPT-2's printable view."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def unicode_to_token(text: str) -> bytes | None:
    """Inverse of `token_to_unicode`; None if `text` has a character outside GPT-2's table."""
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in text)
    except KeyError:
        return None


def dump_tiktoken_ranks(ranks: Mapping[bytes, int]) -> bytes:
    """{token: rank} -> the .tiktoken format, one `base64(token) rank` line per token by rank."""
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    return b"".join(base64.b64encode(tok) + b" %d\n" % rank for tok, rank in by_rank)


def read_tiktoken_file(path: Path) -> dict[bytes, int]:
    """`base64(token) rank` per line -> {token: rank}."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise ScratchLLMError(f"cannot read {path}: {e.strerror or e}") from e
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            if not 0 <= int(rank) < 2**32:  # tiktoken's ranks are 32-bit unsigned
                raise ValueError("rank out of range")
        except (ValueError, binascii.Error) as e:
            raise ScratchLLMError(
                f"{path}, line {lineno}: expected `base64-token rank`, got {line[:60]!r}; is it a .tiktoken "
                "file?"
            ) from e
    if len(ranks) != sum(1 for line in lines if line.strip()):
        raise ScratchLLMError(f"{path}: a token is listed twice; the file is corrupt")
    return ranks


def read_merges_file(path: Path) -> list[tuple[bytes, bytes]]:
    """vocab.bpe: an optional `#version` line, then `left right` per line in GPT-2's byte view."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ScratchLLMError(f"cannot read {path} ({e})") from e
    merges = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line or (lineno == 1 and line.startswith("#")):
            continue
        parts = line.split(" ")
        pair = [unicode_to_token(p) for p in parts]
        if len(parts) != 2 or None in pair or not all(pair):
            raise ScratchLLMError(f"{path}, line {lineno}: expected a merge `left right`, got {line[:60]!r}")
        merges.append((pair[0], pair[1]))
    return merges


def read_encoder_files(
    encoder_path: Path, merges_path: Path
) -> tuple[dict[bytes, int], dict[str, int], list]:
    """OpenAI's encoder.json + vocab.bpe -> (ranks, special tokens, merges).

    The learned tokens are the 256 bytes and the result of each merge; every other entry of
    encoder.json (GPT-2's `<|endoftext|>`) is a special token. The ids come from encoder.json.
    """
    try:
        encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScratchLLMError(f"cannot read {encoder_path} as JSON ({e})") from e
    if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
        raise ScratchLLMError(f"{encoder_path}: expected a JSON object token -> id")
    merges = read_merges_file(merges_path)
    learned = {bytes([b]) for b in range(256)} | {a + b for a, b in merges}
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for text, i in encoder.items():
        token = unicode_to_token(text)
        if token is not None and token in learned:
            ranks[token] = i
        else:
            specials[text] = i
    missing = learned - ranks.keys()
    if missing:
        example = token_to_unicode(min(missing))
        raise ScratchLLMError(
            f"{encoder_path}: {len(missing)} tokens made by {merges_path.name} (e.g. {example!r}) have no "
            "id; the two files do not belong together"
        )
    return ranks, specials, merges
