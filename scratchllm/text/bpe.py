"""Byte-level BPE: trained from scratch here, encoded through tiktoken's engine.

A byte-level BPE tokenizer is three things:
- a pre-tokenization regex that cuts text into pieces (words with their leading space, numbers,
  punctuation runs, whitespace); tokens never cross a piece boundary;
- `mergeable_ranks`: byte string -> id. Every single byte is a token, so any text can be spelled;
  the other tokens were learned by merging frequent adjacent pairs, and a lower id means learned
  earlier;
- special tokens (`<|endoftext|>`) with ids after the learned ones; they never come out of text
  unless the caller allows them, so `decode(encode(s)) == s` for every string (that is valid
  Unicode: lone surrogates cannot be UTF-8 and become U+FFFD, as in tiktoken).

`train_bpe` learns the ranks from a corpus (pure Python, incremental; see its docstring).
`BPETokenizer.encode` runs on a `tiktoken.Encoding` built from the ranks (Rust, fast);
`BPETokenizer.reference_encode` is the same algorithm in a few lines of Python, to read and to
test the fast path against.

On disk: `tokenizer.tiktoken` (tiktoken's format: base64 of the token's bytes, a space, the id),
plus OpenAI's GPT-2 layout `encoder.json` (token string -> id) and `vocab.bpe` (the merges), with
bytes shown through GPT-2's `bytes_to_unicode` table. Either format loads.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import itertools
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import regex

from ..errors import ScratchLLMError
from .tokenizer import EOT, AllowedSpecial, Tokenizer, check_not_text

# GPT-2's pre-tokenizer as tiktoken writes it (possessive quantifiers, same pieces as OpenAI's
# original `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, faster).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-4's (cl100k_base): case-insensitive contractions, numbers in groups of at most 3 digits,
# a word may start with one non-letter such as `_` or `$`, newlines kept apart from other space.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

# encode_batch: threads, and the total length below which one thread is faster
BATCH_THREADS = min(8, os.cpu_count() or 1)
BATCH_MIN_CHARS = 100_000

TIKTOKEN_FILE = "tokenizer.tiktoken"
ENCODER_FILE = "encoder.json"
MERGES_FILE = "vocab.bpe"


def pieces_pattern(pat_str: str) -> str:
    """The regex that cuts text into pieces for encoding: a preset as it is (it matches everything);
    a pattern of the user's own with one more alternative that takes any one character it leaves out.
    Training refuses a pattern that skips characters of its corpus, but other text can hold what the
    corpus did not (a zero-width space, a combining accent), and tiktoken would drop it silently."""
    if pat_str in PATTERNS.values():
        return pat_str
    # a verbose pattern's trailing comment would swallow what follows it on the same line
    end = "\n" if regex.compile(pat_str).flags & regex.VERBOSE else ""
    return f"(?:{pat_str}{end})|[\\s\\S]"


def resolve_pattern(pattern: str) -> str:
    """A preset name (`gpt2`, `gpt4`) or a regex string -> the regex string, checked to compile in
    Python's `regex` (the reference encoder) and in tiktoken's engine (the fast one), so that a
    pattern that cannot be used is refused before any training."""
    if not isinstance(pattern, str):
        raise ScratchLLMError(
            f"pre-tokenization pattern must be gpt2, gpt4 or a regex string, not {pattern!r}"
        )
    pat_str = PATTERNS.get(pattern, pattern)
    if pat_str in PATTERNS.values():
        return pat_str
    try:
        regex.compile(pat_str)
    except regex.error as e:
        raise ScratchLLMError(
            f"pre-tokenization pattern {pattern!r} is not a valid regex ({e}); use gpt2, gpt4 or a regex "
            "for Python's `regex` module"
        ) from e
    if any(not m.group() for m in regex.finditer(pat_str, _PROBE)):
        raise ScratchLLMError(
            f"pre-tokenization pattern {pattern!r} can match the empty string, and tiktoken then drops the "
            "character there; make every alternative match at least one character (+ instead of *)"
        )
    import tiktoken

    try:
        tiktoken.Encoding(
            "check", pat_str=pieces_pattern(pat_str), mergeable_ranks=_BYTE_RANKS, special_tokens={}
        )
    except ValueError as e:  # it compiles in Python's `regex` but not in tiktoken's engine (fancy-regex)
        raise ScratchLLMError(
            f"pre-tokenization pattern {pattern!r}: tiktoken cannot use it ({e}); write it without that construct"
        ) from e
    return pat_str


_BYTE_RANKS = {bytes([b]): b for b in range(256)}
_PROBE = "The cat's 12 (x) \u00e9\u4e2d\U0001f600!\n\t  end."  # letters, digits, marks, spaces, symbols


def pattern_name(pat_str: str) -> str:
    """The preset name of a pattern, or the pattern itself."""
    return next((name for name, p in PATTERNS.items() if p == pat_str), pat_str)


# ----------------------------------------------------------------------------------------------
# GPT-2's printable view of bytes (used by encoder.json and vocab.bpe)


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
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_unicode(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def unicode_to_token(text: str) -> bytes | None:
    """Inverse of `token_to_unicode`; None if `text` has a character outside GPT-2's table."""
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in text)
    except KeyError:
        return None


# ----------------------------------------------------------------------------------------------
# The merge rule, in plain Python


def bpe_merge(ranks: Mapping[bytes, int], piece: bytes, max_rank: int | None = None) -> list[bytes]:
    """Split one pre-token into tokens: start from single bytes and repeatedly merge the adjacent
    pair whose concatenation has the lowest rank (the leftmost one on ties), until no adjacent
    pair concatenates to a token (with `max_rank`: to a token ranked below it).

    The rule looks up the *concatenated bytes*, not the pair in a merge list. That is tiktoken's
    rule, and the reason it can work from `bytes -> rank` alone: a token has exactly one rank
    however its bytes are split. The classic rule of OpenAI's encoder.py (apply merge `a b` only
    where the current split is exactly `a|b`, in merge-list order) needs the list; on GPT-2's
    files both give the same ids, which is why tiktoken could replace encoder.py. Since the fast
    path runs the rank rule, the reference follows it too, so the two give identical ids for
    any vocabulary, including one whose token could be built from more than one pair.
    """
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if (
                rank is not None
                and (max_rank is None or rank < max_rank)
                and (best_rank is None or rank < best_rank)
            ):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


# ----------------------------------------------------------------------------------------------
# The tokenizer


class BPETokenizer(Tokenizer):
    """Byte-level BPE with tiktoken as the encoding engine (see the module docstring)."""

    kind = "bpe"

    def __init__(
        self,
        mergeable_ranks: Mapping[bytes, int],
        pattern: str = "gpt2",
        special_tokens: Mapping[str, int] | Sequence[str] = (EOT,),
        name: str = "bpe",
        merges: Sequence[tuple[bytes, bytes]] | None = None,
        _encoding: Any = None,
    ):
        """`mergeable_ranks`: token bytes -> id, all 256 single bytes included. `special_tokens`:
        a mapping string -> id, or a sequence of strings numbered after the last learned id.
        `merges`: the pairs that built the multi-byte tokens, in id order (written as vocab.bpe;
        derived from the ranks when not given)."""
        import tiktoken

        self.name = name
        self.pattern = resolve_pattern(pattern)
        self.mergeable_ranks = dict(mergeable_ranks)
        missing = [b for b in range(256) if bytes([b]) not in self.mergeable_ranks]
        if missing:
            raise ScratchLLMError(
                f"BPE tokenizer {name!r}: {len(missing)} single bytes (e.g. 0x{missing[0]:02x}) are not tokens; "
                "byte-level BPE needs all 256 to spell any text"
            )
        if len(set(self.mergeable_ranks.values())) != len(self.mergeable_ranks):
            raise ScratchLLMError(
                f"BPE tokenizer {name!r}: two tokens share an id; the vocabulary file is corrupt"
            )
        n_learned = max(self.mergeable_ranks.values()) + 1
        if isinstance(special_tokens, Mapping):
            self.special_tokens = dict(special_tokens)
        else:
            if len(set(special_tokens)) != len(special_tokens):
                raise ScratchLLMError(f"BPE tokenizer {name!r}: special tokens {list(special_tokens)} repeat")
            self.special_tokens = {s: n_learned + i for i, s in enumerate(special_tokens)}
        clash = set(self.special_tokens.values()) & set(self.mergeable_ranks.values())
        if clash or len(set(self.special_tokens.values())) != len(self.special_tokens):
            raise ScratchLLMError(
                f"BPE tokenizer {name!r}: special token ids {sorted(clash)} are already used"
            )
        if any(not s for s in self.special_tokens):
            raise ScratchLLMError(f"BPE tokenizer {name!r}: a special token is the empty string")
        self._merges = list(merges) if merges is not None else None
        self._vocab_size = max([n_learned, *(i + 1 for i in self.special_tokens.values())])
        if _encoding is None:
            try:
                _encoding = tiktoken.Encoding(
                    name,
                    pat_str=pieces_pattern(self.pattern),
                    mergeable_ranks=self.mergeable_ranks,
                    special_tokens=self.special_tokens,
                )
            except ValueError as e:
                raise ScratchLLMError(f"BPE tokenizer {name!r}: tiktoken cannot use it ({e})") from e
        self._enc = _encoding
        self._pat = regex.compile(_encoding._pat_str)  # the same pieces for `reference_encode`
        self._fingerprint: str | None = None

    @classmethod
    def from_tiktoken(cls, encoding: Any, name: str | None = None) -> BPETokenizer:
        """Wrap an existing `tiktoken.Encoding` (e.g. `tiktoken.get_encoding("cl100k_base")`)."""
        return cls(
            encoding._mergeable_ranks,
            pattern=encoding._pat_str,
            special_tokens=encoding._special_tokens,
            name=name or encoding.name,
            _encoding=encoding,
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def encoding(self) -> Any:
        """The `tiktoken.Encoding` doing the work."""
        return self._enc

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        self._check_text(text)
        if not allowed_special:
            return self._enc.encode_ordinary(text)
        # disallowed_special=(): special strings that are not allowed are plain text, never an error
        return self._enc.encode(text, allowed_special=self._allowed(allowed_special), disallowed_special=())

    def encode_batch(
        self, texts: Sequence[str], allowed_special: AllowedSpecial = frozenset()
    ) -> list[list[int]]:
        """Many texts at once, on threads: tiktoken's Rust code releases the GIL.

        Each thread encodes one contiguous share of the texts. (tiktoken's own `encode_batch`
        submits one task per text, whose overhead costs more than encoding a short document.)
        """
        self._check_texts(texts)
        texts = list(texts)
        for text in texts:
            self._check_text(text)
        if allowed_special:
            allowed = self._allowed(allowed_special)

            def encode(text: str) -> list[int]:
                return self._enc.encode(text, allowed_special=allowed, disallowed_special=())
        else:
            encode = self._enc.encode_ordinary
        n_threads = min(BATCH_THREADS, len(texts))
        if n_threads < 2 or sum(map(len, texts)) < BATCH_MIN_CHARS:
            return [encode(t) for t in texts]
        with ThreadPoolExecutor(n_threads) as pool:
            shares = pool.map(lambda share: [encode(t) for t in share], _split_evenly(texts, n_threads))
            return [ids for share in shares for ids in share]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        check_not_text(ids, self.name)
        ids = [int(i) for i in ids]
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError) as e:
            known = set(self.mergeable_ranks.values()) | set(self.special_tokens.values())
            bad = next((i for i in ids if i not in known), None)  # out of range, or a gap in the ranks
            raise ScratchLLMError(
                f"tokenizer {self.name!r}: token id {bad if bad is not None else e} is not in the vocabulary "
                f"(ids 0..{self.vocab_size - 1}{'' if len(known) == self.vocab_size else ', with gaps'})"
            ) from e

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token's text for a special id)."""
        return self.decode_bytes([token_id])

    def reference_encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """`encode` in plain Python, written to be read; gives the same ids as the tiktoken path.

        1. Cut the text at the allowed special tokens; each one becomes its id.
        2. Cut each stretch between them into pieces with the pre-tokenization regex.
        3. A piece that is itself a token becomes that id directly (tiktoken's shortcut; it
           matters where a token could not be reached by merging).
        4. Otherwise split the piece's bytes with `bpe_merge`: lowest-ranked adjacent pair first.

        One caveat, outside our control: the `regex` module and tiktoken's Rust regex may know
        different Unicode versions, so a code point assigned in between (a letter to one,
        unassigned to the other) can be pre-tokenized differently. Assigned text agrees.
        """
        allowed = self._allowed(allowed_special)
        text = _replace_lone_surrogates(text)
        ids: list[int] = []
        for stretch, special in _split_at_specials(text, allowed):
            for piece in self._pat.findall(stretch):
                data = piece.encode("utf-8")
                if data in self.mergeable_ranks:
                    ids.append(self.mergeable_ranks[data])
                else:
                    ids.extend(self.mergeable_ranks[part] for part in bpe_merge(self.mergeable_ranks, data))
            if special is not None:
                ids.append(self.special_tokens[special])
        return ids

    # -- files ---------------------------------------------------------------------------------

    @property
    def merges(self) -> list[tuple[bytes, bytes]] | None:
        """The pair that builds each multi-byte token, in id order (the content of vocab.bpe).

        Kept from training or from a vocab.bpe; otherwise derived: a token is split the way
        `bpe_merge` splits its bytes using only earlier tokens (as GPT-2's own files are).
        None if some token is no pair of two other tokens: OpenAI's format cannot hold it.
        """
        if self._merges is None:
            merges = []
            for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
                if len(token) < 2:
                    continue
                parts = bpe_merge(self.mergeable_ranks, token, max_rank=rank)
                if len(parts) != 2:  # not reachable by merging (rare in foreign vocabularies): any 2-split
                    splits = (
                        i
                        for i in range(1, len(token))
                        if {token[:i], token[i:]} <= self.mergeable_ranks.keys()
                    )
                    i = next(splits, None)
                    if i is None:
                        return None
                    parts = [token[:i], token[i:]]
                merges.append((parts[0], parts[1]))
            self._merges = merges
        return self._merges

    def _files(self) -> dict[str, bytes]:
        files = {TIKTOKEN_FILE: dump_tiktoken_ranks(self.mergeable_ranks)}
        if self.merges is not None:
            by_rank = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
            encoder = {token_to_unicode(tok): rank for tok, rank in by_rank}
            encoder.update(self.special_tokens)
            merges = "".join(f"{token_to_unicode(a)} {token_to_unicode(b)}\n" for a, b in self.merges)
            files[ENCODER_FILE] = json.dumps(encoder, ensure_ascii=False).encode("utf-8")
            files[MERGES_FILE] = ("#version: 0.2\n" + merges).encode("utf-8")
        return files

    def _meta(self) -> dict[str, Any]:
        files = [TIKTOKEN_FILE] if self.merges is None else [TIKTOKEN_FILE, ENCODER_FILE, MERGES_FILE]
        return {"pattern": self.pattern, "files": files}

    def fingerprint(self) -> str:
        """Hash of what decides the ids (pattern, specials, ranks), not of how they are stored: a
        GPT-2 read from encoder.json + vocab.bpe and one read from a .tiktoken file agree."""
        if self._fingerprint is None:
            import hashlib

            h = hashlib.sha256()
            head = {"kind": self.kind, "pattern": self.pattern, "special_tokens": self.special_tokens}
            h.update(json.dumps(head, sort_keys=True).encode())
            for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
                h.update(b"%d %d " % (rank, len(tok)) + tok)
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @classmethod
    def _load(cls, directory: Path, meta: dict[str, Any]) -> BPETokenizer:
        name = meta.get("name", "bpe")
        try:
            pattern = meta["pattern"]
            specials = {str(k): int(v) for k, v in meta["special_tokens"].items()}
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            raise ScratchLLMError(
                f"{directory}: tokenizer_meta.json needs a 'pattern' and a 'special_tokens' object of "
                f"token -> id ({type(e).__name__}: {e}); save the tokenizer again"
            ) from e
        merges = None
        if (directory / TIKTOKEN_FILE).exists():
            ranks = read_tiktoken_file(directory / TIKTOKEN_FILE)
            if (directory / MERGES_FILE).exists():
                merges = read_merges_file(directory / MERGES_FILE)
                if {a + b for a, b in merges} != {t for t in ranks if len(t) > 1}:
                    merges = None  # vocab.bpe does not belong to these ranks: derive it instead
        elif (directory / ENCODER_FILE).exists() and (directory / MERGES_FILE).exists():
            ranks, _, merges = read_encoder_files(directory / ENCODER_FILE, directory / MERGES_FILE)
        else:
            raise ScratchLLMError(
                f"{directory}: the BPE tokenizer needs {TIKTOKEN_FILE}, or {ENCODER_FILE} and {MERGES_FILE}; "
                "re-save the tokenizer"
            )
        try:
            return cls(ranks, pattern=pattern, special_tokens=specials, name=name, merges=merges)
        except ScratchLLMError as e:  # a damaged setting: say which directory holds it
            raise ScratchLLMError(f"{directory}: {e}") from e


def _split_evenly(texts: list[str], n: int) -> list[list[str]]:
    """`texts` cut into at most `n` contiguous runs of about equal total length."""
    target = sum(map(len, texts)) / n
    runs: list[list[str]] = [[]]
    size = 0
    for text in texts:
        if size >= target * len(runs) and len(runs) < n:
            runs.append([])
        runs[-1].append(text)
        size += len(text)
    return runs


def _replace_lone_surrogates(text: str) -> str:
    """What tiktoken does with text that cannot be UTF-8 (lone surrogates become U+FFFD)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _split_at_specials(text: str, allowed: frozenset[str]) -> Iterable[tuple[str, str | None]]:
    """(stretch of ordinary text, the allowed special token after it or None at the end)."""
    if not allowed:
        yield text, None
        return
    # longest first, so of two specials starting at the same place the longer wins
    pattern = regex.compile("|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True)))
    start = 0
    for m in pattern.finditer(text):
        yield text[start : m.start()], m.group()
        start = m.end()
    yield text[start:], None


# ----------------------------------------------------------------------------------------------
# Reading the two file formats. tiktoken.load has readers too, but they cache by a hash of the
# path in a temp dir: a tokenizer retrained and saved to the same path would load stale ranks.


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
                f"{path}, line {lineno}: expected `base64-token rank`, got {line[:60]!r}; is it a .tiktoken file?"
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
            f"{encoder_path}: {len(missing)} tokens made by {merges_path.name} (e.g. {example!r}) have no id; "
            "the two files do not belong together"
        )
    return ranks, specials, merges


# ----------------------------------------------------------------------------------------------
# Training


def count_pretokens(texts: Iterable[str], pattern: str) -> Counter[str]:
    """How often each distinct pre-token occurs in the corpus (the trainer's only pass over text)."""
    pat = regex.compile(resolve_pattern(pattern))
    counts: Counter[str] = Counter()
    if isinstance(texts, (str, bytes)):  # one string would be read character by character
        raise ScratchLLMError("BPE training takes a list of texts, not one string; wrap it: [text]")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ScratchLLMError(f"BPE training: text {i} is a {type(text).__name__}, not a str")
        pieces = pat.findall(text)
        if sum(map(len, pieces)) != len(text):
            raise ScratchLLMError(
                f"pre-tokenization pattern {pattern!r} skips some characters of the corpus, so encoding would "
                "lose text; make it match everything (the gpt2 and gpt4 presets do)"
            )
        counts.update(pieces)
    return counts


def check_training_args(vocab_size: int, special_tokens: Sequence[str]) -> None:
    """The checks `train_bpe` makes before reading any text (callers can make them even earlier)."""
    specials = list(special_tokens)
    if len(set(specials)) != len(specials) or not all(specials):
        raise ScratchLLMError(f"special tokens {specials} must be distinct, non-empty strings")
    for short, long in itertools.pairwise(sorted(specials)):  # a string's extensions sort right after it
        if long.startswith(short):
            raise ScratchLLMError(
                f"special token {long!r} begins with special token {short!r}, so text holding it could be "
                "read as either (tiktoken picks one arbitrarily); rename one"
            )
    if vocab_size - len(specials) < 256:
        raise ScratchLLMError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs 256 byte tokens + {len(specials)} "
            f"special tokens = {256 + len(specials)} at least"
        )


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = (EOT,),
    pattern: str = "gpt2",
    progress: bool = True,
    name: str = "bpe",
) -> BPETokenizer:
    """Learn a byte-level BPE vocabulary of `vocab_size` ids (special tokens included).

    Ids 0..255 are the single bytes (id = byte value), then one id per learned token, then the
    special tokens. Each step merges the most frequent adjacent pair of tokens inside pre-tokens;
    ties go to the smallest (left id, right id), so training is deterministic.

    Cost: the text is pre-tokenized and counted once; the merges then work on the distinct
    pre-tokens, each weighted by its count (Shakespeare: 300k pieces, 15k distinct). Pair counts
    are kept up to date incrementally, an index pair -> pre-tokens holding it limits each merge to
    the pre-tokens it changes, and a max-heap finds the next pair. The heap is lazy: entries are
    never removed, and an entry whose count is out of date is re-pushed with its current count
    when it reaches the top. That is correct because an entry is never below its pair's true
    count: counts of existing pairs only fall, and every pair whose count rises (those with the
    new token) is pushed again.

    Should a merge produce bytes that are already a token (`a`+`bc` after `ab`+`c`), it reuses
    that token's id instead of adding a duplicate, since tiktoken maps bytes to one id. With
    left-to-right merging applied to every pre-token alike this is rare (it never happened on
    Shakespeare or Python's docs up to their last possible merge), but it keeps the ranks valid.
    """
    specials = list(special_tokens)
    check_training_args(vocab_size, specials)
    n_learned = vocab_size - len(specials)
    pat_str = resolve_pattern(pattern)
    counts = count_pretokens(texts, pat_str)
    if not counts:
        raise ScratchLLMError("BPE training: the texts are empty; give some text to learn from")

    # the distinct pre-tokens as lists of token ids; single bytes have no pair and are left out
    words: list[list[int]] = []
    freqs: list[int] = []
    for piece, freq in counts.items():
        data = piece.encode("utf-8", "surrogatepass")
        if len(data) > 1:
            words.append(list(data))
            freqs.append(freq)

    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for wi, (word, freq) in enumerate(zip(words, freqs)):
        for pair in itertools.pairwise(word):
            pair_counts[pair] = pair_counts.get(pair, 0) + freq
            where.setdefault(pair, set()).add(wi)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    vocab: list[bytes] = [bytes([b]) for b in range(256)]
    ids: dict[bytes, int] = {tok: i for i, tok in enumerate(vocab)}
    merges: list[tuple[bytes, bytes]] = []

    from tqdm.auto import tqdm

    bar = tqdm(total=n_learned - 256, desc="BPE merges", unit="merge", disable=not progress, leave=False)
    while len(vocab) < n_learned:
        if not heap:
            warnings.warn(
                f"BPE training stopped at {len(vocab)} learned tokens (asked for {n_learned}): the corpus has no "
                "more pairs to merge; use a larger corpus or a smaller vocab_size",
                stacklevel=2,
            )
            break
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count <= 0:
            continue
        if count != -neg_count:  # out of date: put it back with its current count
            heapq.heappush(heap, (-count, pair))
            continue

        a, b = pair
        new_bytes = vocab[a] + vocab[b]
        new_id = ids.get(new_bytes)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(new_bytes)
            ids[new_bytes] = new_id
            merges.append((vocab[a], vocab[b]))
            bar.update()
        risen: set[tuple[int, int]] = set()
        for wi in where.pop(pair):
            word = words[wi]
            merged = _merge_word(word, a, b, new_id)
            if merged is None:  # the index is lazy too: this word lost the pair earlier
                continue
            freq = freqs[wi]
            for p in itertools.pairwise(word):
                pair_counts[p] -= freq
            for p in itertools.pairwise(merged):
                pair_counts[p] = pair_counts.get(p, 0) + freq
                if new_id in p:
                    risen.add(p)
                    where.setdefault(p, set()).add(wi)
            words[wi] = merged
        del pair_counts[pair]
        for p in risen:
            heapq.heappush(heap, (-pair_counts[p], p))
    bar.close()

    ranks = {tok: i for i, tok in enumerate(vocab)}
    return BPETokenizer(ranks, pattern=pat_str, special_tokens=specials, name=name, merges=merges)


def _merge_word(word: list[int], a: int, b: int, new_id: int) -> list[int] | None:
    """`word` with every non-overlapping `a b` (left to right) replaced by `new_id`; None if none."""
    out: list[int] = []
    i, n = 0, len(word)
    found = False
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
            found = True
        else:
            out.append(word[i])
            i += 1
    return out if found else None
