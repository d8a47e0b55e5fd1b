"""The character tokenizer: ids, unknown characters, special tokens, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from scratchllm.errors import ScratchLLMError
from scratchllm.text.char import UNK, CharTokenizer
from scratchllm.text.registry import load_tokenizer
from scratchllm.text.tokenizer import EOT

TOK = CharTokenizer.from_corpus("hello world, ça va? 🙂\n")


def reference_encode(tok: CharTokenizer, text: str, allowed: set[str]) -> list[int]:
    """Left to right, a special token where one starts (longest first), else the character's id."""
    ids, i = [], 0
    while i < len(text):
        special = next((s for s in sorted(allowed, key=len, reverse=True) if text.startswith(s, i)), None)
        if special:
            ids.append(tok.special_tokens[special])
            i += len(special)
        else:
            ids.append(tok.char_to_id.get(text[i], tok.special_tokens[UNK]))
            i += 1
    return ids


def test_ids_are_positions_in_code_point_order():
    tok = CharTokenizer.from_corpus(["ba", "c\n"])
    assert tok.chars == ["\n", "a", "b", "c"]
    assert tok.encode("abc\n") == [1, 2, 3, 0]
    assert tok.vocab_size == 6 and tok.special_tokens == {EOT: 4, UNK: 5}
    assert tok.decode([3, 2, 1]) == "cba"


def test_unknown_characters_and_specials():
    unk, eot = TOK.special_tokens[UNK], TOK.special_tokens[EOT]
    assert TOK.encode("hé!") == [TOK.char_to_id["h"], unk, unk]
    # a character above every vocabulary code point, and one below
    assert TOK.encode("\U0010ffff\x00") == [unk, unk]
    # a special token's text is plain characters unless allowed (of "<|endoftext|>" only e, d, o, e are known)
    assert TOK.encode(EOT) == [TOK.char_to_id.get(c, unk) for c in EOT] and TOK.encode(EOT).count(unk) == 9
    assert TOK.encode(f"hi{EOT}ça", allowed_special={EOT}) == [*TOK.encode("hi"), eot, *TOK.encode("ça")]
    assert TOK.encode(f"{EOT}{EOT}", allowed_special="all") == [eot, eot]
    assert TOK.encode("") == [] and TOK.encode("", allowed_special="all") == []
    with pytest.raises(ScratchLLMError, match="unknown special tokens"):
        TOK.encode("x", allowed_special={"<|nope|>"})


def test_lone_surrogates_are_unknown_characters_not_an_error():
    text = b"ok\xff".decode("utf-8", "surrogateescape")
    assert TOK.encode(text) == [
        TOK.char_to_id["o"],
        TOK.special_tokens[UNK],
        TOK.special_tokens[UNK],
    ]  # no "k"


@given(
    st.lists(st.sampled_from([*"helo wrd,çav?🙂\nxZ\x00", EOT, UNK, "<|", "|>"]), max_size=40).map("".join)
)
def test_encode_matches_the_character_loop(text):
    for allowed in (set(), {EOT}, {EOT, UNK}):
        assert TOK.encode(text, allowed_special=allowed) == reference_encode(TOK, text, allowed)


@given(st.text(alphabet=st.sampled_from(TOK.chars), max_size=80))
def test_round_trip_on_known_characters(text):
    assert TOK.decode(TOK.encode(text)) == text


def test_decode_takes_ids_of_any_integer_kind_and_any_iterable():
    ids = TOK.encode("hi there")
    want = TOK.decode(ids)
    assert TOK.decode(tuple(ids)) == TOK.decode(iter(ids)) == want
    assert TOK.decode(np.array(ids)) == TOK.decode(torch.tensor(ids)) == want  # not Python ints: converted
    with pytest.raises(ScratchLLMError, match="token id -1 out of range"):
        TOK.decode(torch.tensor([ids[0], -1]))


def test_empty_vocabulary_is_refused(tmp_path):
    with pytest.raises(ScratchLLMError, match="vocabulary is empty"):
        CharTokenizer([])
    with pytest.raises(ScratchLLMError, match="corpus is empty"):
        CharTokenizer.from_corpus("")
    TOK.save(tmp_path / "tok")
    (tmp_path / "tok" / "chars.json").write_text("[]")
    with pytest.raises(ScratchLLMError, match="vocabulary is empty"):
        load_tokenizer(str(tmp_path / "tok"))


def test_save_load(tmp_path):
    TOK.save(tmp_path / "tok")
    back = load_tokenizer(str(tmp_path / "tok"))
    assert isinstance(back, CharTokenizer) and back.chars == TOK.chars
    text = "hello 🙂, ça va?"
    assert back.encode(text) == TOK.encode(text)
