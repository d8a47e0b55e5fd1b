"""The book's first tokenizer (chapter 2), checked against the ids the book prints."""

from __future__ import annotations

import pytest

from scratchllm.errors import ScratchLLMError
from scratchllm.text.registry import load_tokenizer
from scratchllm.text.simple import UNK, SimpleTokenizer, SimpleTokenizerV2, split_words
from scratchllm.text.tokenizer import EOT
from tests.conftest import shared_file

BOOK_TEXT = '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
BOOK_IDS = [1, 56, 2, 850, 988, 602, 533, 746, 5, 1126, 596, 5, 1, 67, 7, 38, 851, 1108, 754, 793, 7]
TEA = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace."


@pytest.fixture(scope="module")
def verdict_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer.from_corpus(shared_file("the-verdict.txt").read_text(encoding="utf-8"))


def test_split_words_keeps_punctuation_and_drops_whitespace():
    words = ["Hello", ",", "world", ".", "Is", "this", "--", "a", "test", "?"]
    assert split_words("Hello, world. Is this-- a test?") == words


def test_vocabulary_of_the_verdict_has_the_books_size(verdict_tokenizer):
    # 1,130 distinct words and punctuation marks, then <|endoftext|> and <|unk|>
    assert verdict_tokenizer.vocab_size == 1132
    assert verdict_tokenizer.special_tokens == {EOT: 1130, UNK: 1131}
    assert verdict_tokenizer.eot_id == 1130


def test_books_round_trip(verdict_tokenizer):
    ids = verdict_tokenizer.encode(BOOK_TEXT)
    assert ids == BOOK_IDS
    # whitespace is rebuilt, not kept: the book shows this exact (not quite original) text
    assert (
        verdict_tokenizer.decode(ids)
        == '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    )


def test_unknown_words_become_unk_and_allowed_endoftext_is_special(verdict_tokenizer):
    ids = verdict_tokenizer.encode(TEA, allowed_special={EOT})
    assert ids == [1131, 5, 355, 1126, 628, 975, 10, 1130, 55, 988, 956, 984, 722, 988, 1131, 7]
    assert (
        verdict_tokenizer.decode(ids)
        == "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."
    )
    assert verdict_tokenizer.encode(TEA, allowed_special="all") == ids


def test_the_books_class_name_encodes_endoftext_as_the_book_does(tmp_path):
    plain = SimpleTokenizer.from_corpus("Hello, do you like tea? In the sunlit terraces of the palace.")
    book = SimpleTokenizerV2(plain.id_to_token)  # the book builds it from its vocabulary
    eot = plain.special_tokens[EOT]
    assert book.encode(TEA) == plain.encode(TEA, allowed_special={EOT}) and eot in book.encode(TEA)
    assert book.encode_batch([TEA, "tea"]) == [book.encode(TEA), book.encode("tea")]
    assert book.encode(TEA, allowed_special=()) == plain.encode(TEA) and eot not in plain.encode(TEA)
    # only the default differs: saved, it loads as the plain kind, with the same fingerprint
    loaded = load_tokenizer(book.save(tmp_path / "tok"))
    assert type(loaded) is SimpleTokenizer and loaded.fingerprint() == book.fingerprint()
    assert loaded.encode(TEA, allowed_special="all") == book.encode(TEA)


def test_endoftext_not_allowed_is_ordinary_unknown_text(verdict_tokenizer):
    ids = verdict_tokenizer.encode(TEA)
    assert 1130 not in ids
    assert ids[7] == 1131
    assert verdict_tokenizer.encode("<|unk|>") == [1131]


def test_save_load_round_trip(verdict_tokenizer, tmp_path):
    verdict_tokenizer.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, SimpleTokenizer)
    assert loaded.id_to_token == verdict_tokenizer.id_to_token
    assert loaded.encode(TEA, allowed_special={EOT}) == verdict_tokenizer.encode(TEA, allowed_special={EOT})
    assert loaded.fingerprint() == verdict_tokenizer.fingerprint()


def test_errors():
    with pytest.raises(ScratchLLMError, match="no words"):
        SimpleTokenizer.from_corpus(["  \n "])
    tok = SimpleTokenizer.from_corpus("a b c")
    with pytest.raises(ScratchLLMError, match="unknown special"):
        tok.encode("a", allowed_special={"<|nope|>"})
    with pytest.raises(ScratchLLMError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ScratchLLMError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(ScratchLLMError, match="duplicate"):
        SimpleTokenizer(["a", "a"])
