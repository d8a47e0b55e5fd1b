"""`BPETokenizer`: the pre-tokenization patterns, the merge rule in plain Python, and encoding
through a `tiktoken.Encoding` built from the ranks (Rust, fast). `reference_encode` is the same
algorithm in a few lines of Python, to read and to test the fast path against.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import regex
import tiktoken

from ...errors import ScratchLLMError
from ..tokenizer import EOT, AllowedSpecial, Tokenizer, check_not_text
from .files import (
    ENCODER_FILE,
    MERGES_FILE,
    TIKTOKEN_FILE,
    dump_tiktoken_ranks,
    read_encoder_files,
    read_merges_file,
    read_tiktoken_file,
    token_to_unicode,
)

# GPT-2's pre-tokenizer as tiktoken writes it (possessive quantifiers, same pieces as OpenAI's
# original `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, faster).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# GPT-4's (cl100k_base): case-insensitive contractions, numbers in groups of at most 3 digits,
# a word may start with one non-letter such as `_` or `$`, newlines kept apart from other space.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

# encode_batch: threads, and the total length below which one thread is faster
BATCH_THREADS = min(8, os.cpu_count() or 1)
BATCH_MIN_CHARS = 100_000


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
    try:
        tiktoken.Encoding(
            "check", pat_str=pieces_pattern(pat_str), mergeable_ranks=_BYTE_RANKS, special_tokens={}
        )
    except ValueError as e:  # it compiles in Python's `regex` but not in tiktoken's engine (fancy-regex)
        raise ScratchLLMError(
            f"pre-tokenization pattern {pattern!r}: tiktoken cannot use it ({e}); write it without that "
            "construct"
        ) from e
    return pat_str


_BYTE_RANKS = {bytes([b]): b for b in range(256)}
_PROBE = "The cat's 12 (x) \u00e9\u4e2d\U0001f600!\n\t  end."  # letters, digits, marks, spaces, symbols


def pattern_name(pat_str: str) -> str:
    """The preset name of a pattern, or the pattern itself."""
    return next((name for name, p in PATTERNS.items() if p == pat_str), pat_str)


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
        self.name = name
        self.pattern = resolve_pattern(pattern)
        self.mergeable_ranks = dict(mergeable_ranks)
        missing = [b for b in range(256) if bytes([b]) not in self.mergeable_ranks]
        if missing:
            raise ScratchLLMError(
                f"BPE tokenizer {name!r}: {len(missing)} single bytes (e.g. 0x{missing[0]:02x}) are not "
                "tokens; byte-level BPE needs all 256 to spell any text"
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
        text = replace_lone_surrogates(text)
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


def replace_lone_surrogates(text: str) -> str:
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
