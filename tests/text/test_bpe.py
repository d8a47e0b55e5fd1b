"""Byte-level BPE: training (hand-checked, deterministic, equal to a naive trainer), lossless
encoding, the reference encoder against tiktoken's engine, both file formats, errors."""

from __future__ import annotations

import itertools
import json
import shutil
import warnings
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchllm.errors import ScratchLLMError
from scratchllm.text import bpe
from scratchllm.text.bpe import (
    GPT2_PATTERN,
    GPT4_PATTERN,
    BPETokenizer,
    bpe_merge,
    bytes_to_unicode,
    count_pretokens,
    read_tiktoken_file,
    train_bpe,
)
from scratchllm.text.bpe import encode as bpe_encode
from scratchllm.text.bpe import train as bpe_train
from scratchllm.text.gpt2 import load_gpt2_files
from scratchllm.text.registry import load_tokenizer
from scratchllm.text.tokenizer import EOT

# A little of everything a tokenizer meets: prose, code, numbers, accents, CJK, emoji (with ZWJ
# sequences and skin tones), right-to-left text, control characters, CRLF, runs of spaces and
# tabs, and special-token strings.
MIXED_CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024; they'll say we've won't.",
    "def add(a, b):\n    return a + b  # sum\n\n\nclass Foo:\n\tpass\r\n",
    "Prices: $3.50, €4,99 and ¥1200 — 1234567890 12.5% 0x1F 3e-7",
    "naïve café résumé Ångström façade Straße ÆØÅ æøå ĳ ﬁ",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "emoji 😀😃🙈 👩‍👩‍👧‍👦 👍🏽 🇩🇪 ❤️",
    "עברית العربية Ελληνικά русский текст",
    "control \x00\x01\x07\x1b[31m \x7f\x85 zero\u200bwidth \ufeffbom",
    "spaces          then\ttabs\t\t\tand\r\n\r\nCRLF lines\n\n\n   \n",
    "a<|endoftext|>b <|endoftext|> <|endoftext|><|endoftext|> <|endo",
    "'s 'S 'll 'LL don't DON'T ''' \"quoted\" `ticks`",
    "   leading and trailing   ",
]

SPECIAL_PIECES = [EOT, "<|", "|>", "\r\n", " " * 17, "\t\t", "😀", "日本語", "\x00", "'s", "123456", "  x"]


def texts_with_specials(assigned_only: bool = False):
    """Arbitrary Unicode (every code point but surrogates) mixed with pieces that stress tokenizers.

    `assigned_only` leaves out code points unassigned in Python's Unicode tables. The reference
    encoder needs that: its `regex` module and tiktoken's Rust regex know different Unicode
    versions (17 and 16 today), so a code point assigned in between (U+3D000) is a letter to one
    and not the other, and the pre-tokenizers cut differently. Python's tables are older than both.
    """
    chars = (
        st.characters(exclude_categories=("Cs", "Cn"))
        if assigned_only
        else st.characters(exclude_categories=("Cs",))
    )
    pieces = st.one_of(st.text(chars, max_size=30), st.sampled_from(SPECIAL_PIECES))
    return st.lists(pieces, max_size=12).map("".join)


@pytest.fixture(scope="module")
def trained() -> BPETokenizer:
    return train_bpe(MIXED_CORPUS * 3, vocab_size=500, progress=False, name="mixed")


@pytest.fixture(scope="module")
def trained_gpt4() -> BPETokenizer:
    return train_bpe(
        MIXED_CORPUS, vocab_size=600, special_tokens=(EOT, "<|pad|>"), pattern="gpt4", progress=False
    )


# ----------------------------------------------------------------------------------------------
# training


def test_hand_checked_training_example():
    # Wikipedia's BPE example as one pre-token. Pair counts: aa 4, ab 2, others 1.
    # 1. aa -> 256:              [aa a b d aa a b a c]   (left to right, no overlap)
    # 2. ties (aa,a)=2, (a,b)=2: the smaller pair (97, 98) wins -> ab = 257
    # 3. (256, 257) = 2 -> aaab = 258: [aaab d aaab a c]
    # 4. all pairs count 1: the smallest is (97, 99) -> ac = 259
    tok = train_bpe(["aaabdaaabac"], vocab_size=256 + 4 + 1, progress=False)
    learned = {t: i for t, i in tok.mergeable_ranks.items() if i >= 256}
    assert learned == {b"aa": 256, b"ab": 257, b"aaab": 258, b"ac": 259}
    assert tok.merges == [(b"a", b"a"), (b"a", b"b"), (b"aa", b"ab"), (b"a", b"c")]
    assert tok.special_tokens == {EOT: 260} and tok.vocab_size == 261
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, 259]
    assert tok.reference_encode("aaabdaaabac") == [258, ord("d"), 258, 259]


def test_ties_go_to_the_smallest_pair_of_ids():
    # "ab" and " cd": (a,b), (' ',c), (c,d) all count 1; (32, 99) is the smallest pair
    tok = train_bpe(["ab cd"], vocab_size=256 + 3, special_tokens=(), progress=False)
    assert [tok.mergeable_ranks[t] for t in (b" c", b"ab", b" cd")] == [256, 257, 258]


def test_pair_counts_are_weighted_by_pretoken_frequency():
    # "xy" is one pre-token seen 3 times; "zw" once: xy is merged first
    tok = train_bpe(["xy xy xy zw"], vocab_size=257, special_tokens=(), progress=False)
    assert tok.mergeable_ranks[b"xy"] == 256


def test_training_is_deterministic():
    a = train_bpe(MIXED_CORPUS, vocab_size=600, progress=False)
    b = train_bpe(iter(MIXED_CORPUS), vocab_size=600, progress=False)
    assert a.mergeable_ranks == b.mergeable_ranks
    assert a.merges == b.merges
    assert a.fingerprint() == b.fingerprint()


def naive_train(texts, n_learned, pattern=GPT2_PATTERN):
    """The textbook trainer: recount every pair of every pre-token before each merge."""
    words = Counter()
    for piece, n in count_pretokens(texts, pattern).items():
        words[tuple(piece.encode())] += n
    vocab = [bytes([b]) for b in range(256)]
    ids = {t: i for i, t in enumerate(vocab)}
    while len(vocab) < n_learned:
        pairs = Counter()
        for w, n in words.items():
            for p in itertools.pairwise(w):
                pairs[p] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        new_bytes = vocab[best[0]] + vocab[best[1]]
        if new_bytes not in ids:
            ids[new_bytes] = len(vocab)
            vocab.append(new_bytes)
        new_id = ids[new_bytes]
        merged = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return {t: i for i, t in enumerate(vocab)}


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.sampled_from("aab bcd\n é😀"), min_size=1, max_size=40),
        min_size=1,
        max_size=6,
    ),
    st.integers(min_value=1, max_value=40),
)
def test_incremental_trainer_equals_naive_trainer(texts, n_merges):
    # runs of one letter exercise overlapping pairs (aaa), é and 😀 multi-byte tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small corpora run out of pairs
        tok = train_bpe(texts, vocab_size=256 + n_merges, special_tokens=(), progress=False)
    assert tok.mergeable_ranks == naive_train(texts, 256 + n_merges)


def test_the_mixed_corpus_trainer_equals_naive_trainer(trained):
    assert trained.mergeable_ranks == naive_train(MIXED_CORPUS * 3, 499)


def test_each_file_of_a_saved_tokenizer_names_the_whole_tokenizer(trained_gpt4, tmp_path):
    """Its own tokenizer.tiktoken (or any of its files) loads the directory's tokenizer, with its
    pattern and special tokens, not GPT-2's settings around its ranks."""
    trained_gpt4.save(tmp_path / "tok")
    text = "x <|endoftext|> y<|pad|>"
    for name in ("tokenizer.tiktoken", "encoder.json", "vocab.bpe", "tokenizer_meta.json"):
        tok = load_tokenizer(tmp_path / "tok" / name)
        assert (tok.pattern, tok.special_tokens) == (GPT4_PATTERN, trained_gpt4.special_tokens), name
        assert tok.encode(text, "all") == trained_gpt4.encode(text, "all")
    shutil.copy(tmp_path / "tok" / "tokenizer.tiktoken", tmp_path / "ranks.tiktoken")
    assert load_tokenizer(tmp_path / "ranks.tiktoken").pattern != GPT4_PATTERN  # alone: GPT-2's settings


def test_specials_come_after_the_learned_tokens(trained_gpt4):
    assert trained_gpt4.special_tokens == {EOT: 598, "<|pad|>": 599}
    assert trained_gpt4.vocab_size == 600
    assert max(trained_gpt4.mergeable_ranks.values()) == 597
    assert trained_gpt4.eot_id == 598
    assert trained_gpt4.pattern == GPT4_PATTERN


def test_running_out_of_pairs_stops_early_with_a_warning():
    with pytest.warns(UserWarning, match="no more pairs"):
        tok = train_bpe(["abc abc"], vocab_size=1000, progress=False)
    # " abc" fully merged: ab, abc, " a", " ab", " abc" (one order or another) -> 5 merges at most
    assert tok.vocab_size < 300
    assert tok.special_tokens == {EOT: tok.vocab_size - 1}
    assert tok.decode(tok.encode("abc abc")) == "abc abc"


def test_training_errors():
    with pytest.raises(ScratchLLMError, match="too small"):
        train_bpe(["abc"], vocab_size=256, progress=False)  # 256 bytes + 1 special does not fit
    with pytest.raises(ScratchLLMError, match="distinct"):
        train_bpe(["abc"], vocab_size=300, special_tokens=(EOT, EOT), progress=False)
    with pytest.raises(ScratchLLMError, match="not a valid regex"):
        train_bpe(["abc"], vocab_size=300, pattern="(unclosed", progress=False)
    with pytest.raises(ScratchLLMError, match="skips some characters"):
        train_bpe(["abc def"], vocab_size=300, pattern=r"\w+", progress=False)
    train_bpe(["abc"], vocab_size=257, progress=False)  # the smallest legal size: bytes + <|endoftext|>
    with pytest.raises(ScratchLLMError, match="not one string"):
        train_bpe("abc def", vocab_size=300, progress=False)
    with pytest.raises(ScratchLLMError, match="text 1 is a bytes, not a str"):
        train_bpe(["abc", b"def"], vocab_size=300, progress=False)
    with pytest.raises(ScratchLLMError, match="the texts are empty"):
        train_bpe(["", ""], vocab_size=300, progress=False)


def test_patterns_and_specials_that_cannot_work_are_refused_before_training(monkeypatch):
    monkeypatch.setattr(bpe_train, "count_pretokens", lambda *a: pytest.fail("trained before checking"))
    with pytest.raises(ScratchLLMError, match=r"tiktoken cannot use it \(.*\\X"):
        train_bpe(["abc"], vocab_size=300, pattern=r" ?\p{L}+|\X", progress=False)  # Python's regex can
    with pytest.raises(ScratchLLMError, match="must be gpt2, gpt4 or a regex string, not None"):
        bpe.resolve_pattern(None)
    with pytest.raises(ScratchLLMError, match=r"can match the empty string"):
        train_bpe(
            ["abc"], vocab_size=300, pattern=r"\w*|\W", progress=False
        )  # tiktoken would drop the spaces
    with pytest.raises(ScratchLLMError, match=r"'<\|a\|>b' begins with special token '<\|a\|>'"):
        train_bpe(["abc"], vocab_size=300, special_tokens=("<|a|>", "<|c|>", "<|a|>b"), progress=False)
    monkeypatch.undo()
    train_bpe(["abc"], vocab_size=300, special_tokens=("<|a|>", "<|b|>", "<|ab|>"), progress=False)
    ranks = {bytes([b]): b for b in range(256)}  # one saved before the check still loads
    assert BPETokenizer(ranks, special_tokens=("<|a|>", "<|a|>b")).vocab_size == 258


def test_a_verbose_pattern_with_a_comment_loses_no_text():
    pattern = "(?x) \\p{L}+ | \\s+   # words and spaces; digits are left out"
    tok = train_bpe(["ab cd ef"] * 3, vocab_size=260, pattern=pattern, progress=False)
    assert tok.decode(tok.encode("ab 12 cd")) == "ab 12 cd" == tok.decode(tok.reference_encode("ab 12 cd"))


def test_a_custom_regex_pattern_is_used():
    tok = train_bpe(["ab ab ab"], vocab_size=257, special_tokens=(), pattern=r"\S+|\s+", progress=False)
    assert tok.pattern == r"\S+|\s+"
    assert b" ab" not in tok.mergeable_ranks and b"ab" in tok.mergeable_ranks


def test_a_custom_pattern_loses_no_text_its_corpus_did_not_have(tmp_path):
    """Training refuses a pattern that skips characters of the corpus; other text may still hold some
    it skips (a combining accent, a zero-width space): they are encoded as pieces of their own, not
    dropped as tiktoken would, and the saved tokenizer does the same."""
    pattern = r"\p{L}+|\p{N}+|\p{P}+|\s+|\p{S}+"
    tok = train_bpe(["plain words, 12 numbers."] * 3, vocab_size=300, pattern=pattern, progress=False)
    text = "e\u0301 zero\u200bwidth\u0000 plain words"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and ids == tok.reference_encode(text)
    assert tok.encode("plain words, 12") == tok.reference_encode("plain words, 12")
    tok.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert (
        loaded.pattern == pattern and loaded.encode(text) == ids and loaded.fingerprint() == tok.fingerprint()
    )


# ----------------------------------------------------------------------------------------------
# encoding


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts_with_specials())
def test_trained_tokenizer_is_lossless(trained, text):
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert trained.decode_bytes(ids) == text.encode("utf-8")
    assert trained.eot_id not in ids  # special strings that are not allowed are plain text


@settings(max_examples=150, deadline=None)
@given(texts_with_specials(assigned_only=True), st.sampled_from([frozenset(), frozenset({EOT}), "all"]))
def test_reference_encoder_equals_tiktoken_path(trained, text, allowed):
    assert trained.reference_encode(text, allowed) == trained.encode(text, allowed)


@settings(max_examples=80, deadline=None)
@given(texts_with_specials(assigned_only=True), st.sampled_from([frozenset(), frozenset({"<|pad|>"}), "all"]))
def test_reference_encoder_equals_tiktoken_path_gpt4_pattern(trained_gpt4, text, allowed):
    assert trained_gpt4.reference_encode(text, allowed) == trained_gpt4.encode(text, allowed)
    assert trained_gpt4.decode(trained_gpt4.encode(text)) == text


@pytest.mark.parametrize("text", MIXED_CORPUS)
def test_reference_encoder_on_the_mixed_corpus(trained, trained_gpt4, text):
    for tok in (trained, trained_gpt4):
        assert tok.reference_encode(text) == tok.encode(text)
        assert tok.reference_encode(text, "all") == tok.encode(text, "all")


def test_special_tokens_only_when_allowed(trained):
    text = "a<|endoftext|>b"
    plain = trained.encode(text)
    special = trained.encode(text, allowed_special={EOT})
    assert trained.eot_id not in plain
    assert special == [*trained.encode("a"), trained.eot_id, *trained.encode("b")]
    assert trained.encode(text, "all") == special
    assert trained.decode(special) == text
    with pytest.raises(ScratchLLMError, match="unknown special"):
        trained.encode(text, allowed_special={"<|nope|>"})


@pytest.mark.parametrize("threads", [1, 3])
def test_encode_batch_matches_encode(trained, monkeypatch, threads):
    monkeypatch.setattr(bpe_encode, "BATCH_THREADS", threads)
    monkeypatch.setattr(bpe_encode, "BATCH_MIN_CHARS", 0)  # take the threaded path even for this little text
    texts = [*MIXED_CORPUS, "", *MIXED_CORPUS[:5]]
    assert trained.encode_batch(texts) == [trained.encode(t) for t in texts]
    assert trained.encode_batch(texts, "all") == [trained.encode(t, "all") for t in texts]
    assert trained.encode_batch([]) == []


def test_split_evenly_keeps_order_and_balances():
    texts = ["a" * n for n in (5, 1, 1, 1, 1, 1, 5, 5)]
    runs = bpe_encode._split_evenly(texts, 3)
    assert [t for run in runs for t in run] == texts
    assert len(runs) == 3 and [sum(map(len, r)) for r in runs] == [7, 8, 5]
    assert bpe_encode._split_evenly(["x"], 4) == [["x"]]


def test_whole_piece_shortcut_matters():
    # "abc" is a token but no merge reaches it (no "ab" nor "bc"): tiktoken returns it whole
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"abc"] = 256
    tok = BPETokenizer(ranks, pattern=r"\S+|\s+", special_tokens=())
    assert bpe_merge(ranks, b"abc") == [b"a", b"b", b"c"]
    assert tok.encode("abc abcd") == [256, 32, 97, 98, 99, 100]
    assert tok.reference_encode("abc abcd") == tok.encode("abc abcd")


def test_a_token_that_is_no_pair_is_saved_in_tiktoken_format_only(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"abc"] = 256  # neither "ab" nor "bc" is a token
    tok = BPETokenizer(ranks, special_tokens=())
    assert tok.merges is None
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.tiktoken", "tokenizer_meta.json"]
    assert load_tokenizer(tmp_path).mergeable_ranks == ranks
    # with "bc" ranked after "abc", merging cannot reach "abc", but vocab.bpe can still list it
    ranks[b"bc"] = 257
    assert BPETokenizer(ranks, special_tokens=()).merges == [(b"a", b"bc"), (b"b", b"c")]


def test_lone_surrogates_become_replacement_characters(trained):
    # not encodable as UTF-8: both paths replace them, as tiktoken does
    assert trained.decode(trained.encode("a\ud800b")) == "a\ufffdb"
    assert trained.reference_encode("a\ud800b") == trained.encode("a\ud800b")


def test_decode_errors(trained):
    with pytest.raises(ScratchLLMError, match="not in the vocabulary"):
        trained.decode([trained.vocab_size])
    with pytest.raises(ScratchLLMError, match="not in the vocabulary"):
        trained.decode([-1])
    assert trained.decode_bytes([0xE6]) == b"\xe6"  # a prefix of a character: bytes are exact
    assert trained.decode([0xE6]) == "\ufffd"


# ----------------------------------------------------------------------------------------------
# files


def test_bytes_to_unicode_is_gpt2s_table():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_save_writes_both_formats(trained, tmp_path):
    trained.save(tmp_path)
    meta = json.loads((tmp_path / "tokenizer_meta.json").read_text())
    assert meta["kind"] == "bpe" and meta["pattern"] == GPT2_PATTERN and meta["special_tokens"] == {EOT: 499}
    lines = (tmp_path / "tokenizer.tiktoken").read_text().splitlines()
    assert len(lines) == 499 and lines[ord("a")] == "YQ== 97"
    encoder = json.loads((tmp_path / "encoder.json").read_text(encoding="utf-8"))
    assert encoder[EOT] == 499 and encoder["Ġ"] == 32 and len(encoder) == 500
    merges = (tmp_path / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    # the merges in id order: line k builds token 256 + k - 1
    table = bytes_to_unicode()
    for k, line in enumerate(merges[1:]):
        left, right = line.split(" ")
        token = bytes(b for c in left + right for b, ch in table.items() if ch == c)
        assert trained.mergeable_ranks[token] == 256 + k


def test_load_from_either_format_gives_identical_ids(trained, tmp_path):
    trained.save(tmp_path / "both")
    from_tiktoken = load_tokenizer(tmp_path / "both")
    # the OpenAI layout alone (meta + encoder.json + vocab.bpe)
    shutil.copytree(tmp_path / "both", tmp_path / "openai")
    (tmp_path / "openai" / "tokenizer.tiktoken").unlink()
    from_openai = load_tokenizer(tmp_path / "openai")
    # and the GPT-2-style loader, which needs no tokenizer_meta.json
    from_files = load_gpt2_files(tmp_path / "openai")
    for tok in (from_tiktoken, from_openai, from_files):
        assert isinstance(tok, BPETokenizer)
        assert tok.mergeable_ranks == trained.mergeable_ranks
        assert tok.special_tokens == trained.special_tokens
        for text in MIXED_CORPUS:
            assert tok.encode(text, "all") == trained.encode(text, "all")
    for tok in (from_tiktoken, from_openai):
        assert tok.name == "mixed"
        assert tok.merges == trained.merges
        assert tok.fingerprint() == trained.fingerprint()


def test_retrained_tokenizer_saved_to_the_same_path_loads_fresh(tmp_path):
    # no cache keyed on the path (tiktoken.load's helpers have one)
    first = train_bpe(MIXED_CORPUS[:3], vocab_size=300, progress=False)
    first.save(tmp_path)
    assert load_tokenizer(tmp_path).mergeable_ranks == first.mergeable_ranks
    second = train_bpe(MIXED_CORPUS[3:], vocab_size=320, progress=False)
    second.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.mergeable_ranks == second.mergeable_ranks != first.mergeable_ranks
    assert read_tiktoken_file(tmp_path / "tokenizer.tiktoken") == second.mergeable_ranks


def test_fingerprint_follows_what_decides_ids(trained):
    same = BPETokenizer(
        trained.mergeable_ranks, pattern="gpt2", special_tokens=trained.special_tokens, name="other"
    )
    assert same.fingerprint() == trained.fingerprint()
    other_pattern = BPETokenizer(
        trained.mergeable_ranks, pattern="gpt4", special_tokens=trained.special_tokens
    )
    other_specials = BPETokenizer(trained.mergeable_ranks, pattern="gpt2", special_tokens=(EOT, "<|x|>"))
    assert len({trained.fingerprint(), other_pattern.fingerprint(), other_specials.fingerprint()}) == 3


def test_bad_files_and_constructor_errors(trained, tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("YQ== 0\nnot base64!! 1\n")
    with pytest.raises(ScratchLLMError, match="line 2"):
        read_tiktoken_file(bad)
    missing = {bytes([b]): b for b in range(255)}
    with pytest.raises(ScratchLLMError, match="single bytes"):
        BPETokenizer(missing)
    with pytest.raises(ScratchLLMError, match="already used"):
        BPETokenizer(trained.mergeable_ranks, special_tokens={EOT: 5})
    with pytest.raises(ScratchLLMError, match="not a valid regex"):
        BPETokenizer(trained.mergeable_ranks, pattern="[a-")
    trained.save(tmp_path / "tok")
    meta_path = tmp_path / "tok" / "tokenizer_meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["pattern"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ScratchLLMError, match="pattern"):
        load_tokenizer(tmp_path / "tok")
    for name in ("tokenizer.tiktoken", "encoder.json"):
        (tmp_path / "tok" / name).unlink()
    with pytest.raises(ScratchLLMError):
        load_tokenizer(tmp_path / "tok")
