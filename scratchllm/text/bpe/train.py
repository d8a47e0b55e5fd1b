"""Training a byte-level BPE vocabulary from scratch (pure Python, incremental; see `train_bpe`)."""

from __future__ import annotations

import heapq
import itertools
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence

import regex
from tqdm.auto import tqdm

from ...errors import ScratchLLMError
from ..tokenizer import EOT
from .encode import BPETokenizer, resolve_pattern


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
                f"pre-tokenization pattern {pattern!r} skips some characters of the corpus, so encoding "
                "would lose text; make it match everything (the gpt2 and gpt4 presets do)"
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

    pairs = _PairCounts(counts)
    vocab: list[bytes] = [bytes([b]) for b in range(256)]
    ids: dict[bytes, int] = {tok: i for i, tok in enumerate(vocab)}
    merges: list[tuple[bytes, bytes]] = []
    bar = tqdm(total=n_learned - 256, desc="BPE merges", unit="merge", disable=not progress, leave=False)
    while len(vocab) < n_learned:
        pair = pairs.most_frequent()
        if pair is None:
            warnings.warn(
                f"BPE training stopped at {len(vocab)} learned tokens (asked for {n_learned}): the corpus "
                "has no more pairs to merge; use a larger corpus or a smaller vocab_size",
                stacklevel=2,
            )
            break
        a, b = pair
        new_bytes = vocab[a] + vocab[b]
        new_id = ids.get(new_bytes)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(new_bytes)
            ids[new_bytes] = new_id
            merges.append((vocab[a], vocab[b]))
            bar.update()
        pairs.merge(pair, new_id)
    bar.close()

    ranks = {tok: i for i, tok in enumerate(vocab)}
    return BPETokenizer(ranks, pattern=pat_str, special_tokens=specials, name=name, merges=merges)


class _PairCounts:
    """The distinct pre-tokens as lists of token ids, each weighted by its count; how often each
    adjacent pair occurs and in which pre-tokens; and a lazy max-heap of the pair counts."""

    def __init__(self, counts: Counter[str]):
        self.words: list[list[int]] = []
        self.freqs: list[int] = []
        for piece, freq in counts.items():
            data = piece.encode("utf-8", "surrogatepass")
            if len(data) > 1:  # a single byte has no pair
                self.words.append(list(data))
                self.freqs.append(freq)
        self.counts: dict[tuple[int, int], int] = {}
        self.where: dict[tuple[int, int], set[int]] = {}
        for wi, (word, freq) in enumerate(zip(self.words, self.freqs)):
            for pair in itertools.pairwise(word):
                self.counts[pair] = self.counts.get(pair, 0) + freq
                self.where.setdefault(pair, set()).add(wi)
        self.heap = [(-count, pair) for pair, count in self.counts.items()]
        heapq.heapify(self.heap)

    def most_frequent(self) -> tuple[int, int] | None:
        """The pair with the highest count (ties: the smallest ids), or None when none is left."""
        while self.heap:
            neg_count, pair = heapq.heappop(self.heap)
            count = self.counts.get(pair, 0)
            if count <= 0:
                continue
            if count != -neg_count:  # out of date: put it back with its current count
                heapq.heappush(self.heap, (-count, pair))
                continue
            return pair
        return None

    def merge(self, pair: tuple[int, int], new_id: int) -> None:
        """Replace `pair` by `new_id` in every pre-token holding it, updating the counts."""
        a, b = pair
        risen: set[tuple[int, int]] = set()
        for wi in self.where.pop(pair):
            word = self.words[wi]
            merged = _merge_word(word, a, b, new_id)
            if merged is None:  # the index is lazy too: this word lost the pair earlier
                continue
            freq = self.freqs[wi]
            for p in itertools.pairwise(word):
                self.counts[p] -= freq
            for p in itertools.pairwise(merged):
                self.counts[p] = self.counts.get(p, 0) + freq
                if new_id in p:
                    risen.add(p)
                    self.where.setdefault(p, set()).add(wi)
            self.words[wi] = merged
        del self.counts[pair]
        for p in risen:
            heapq.heappush(self.heap, (-self.counts[p], p))


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
