"""What every tokenizer kind does with inputs of the wrong kind: one clear error, never a silent
misreading (a string of digits read as ids, a negative id read from the end of the vocabulary)."""

from __future__ import annotations

import pytest

from scratchllm.errors import ScratchLLMError
from scratchllm.text.bpe import train_bpe
from scratchllm.text.char import CharTokenizer
from scratchllm.text.simple import SimpleTokenizer
from scratchllm.text.tokenizer import EOT

TEXT = "the cat sat on the mat. the dog ran."

KINDS = {
    "char": lambda: CharTokenizer.from_corpus(TEXT),
    "simple": lambda: SimpleTokenizer.from_corpus(TEXT),
    "bpe": lambda: train_bpe([TEXT * 5], vocab_size=270, progress=False),
}


@pytest.fixture(params=sorted(KINDS))
def tok(request):
    return KINDS[request.param]()


def test_a_special_named_by_a_string_is_that_special(tok):
    assert tok.encode(f"the{EOT}cat", allowed_special=EOT) == tok.encode(
        f"the{EOT}cat", allowed_special={EOT}
    )
    assert tok.special_tokens[EOT] in tok.encode(f"the{EOT}cat", allowed_special=EOT)
    with pytest.raises(ScratchLLMError, match=r"unknown special tokens \['<\|nope\|>'\]"):
        tok.encode("the", allowed_special="<|nope|>")


@pytest.mark.parametrize("text", [None, b"the cat", 42, ["the"]])
def test_encode_takes_a_string(tok, text):
    with pytest.raises(ScratchLLMError, match=f"encode takes a str, got {type(text).__name__}"):
        tok.encode(text)
    with pytest.raises(ScratchLLMError, match="encode takes a str"):
        tok.encode_batch(["the", text])


def test_encode_batch_takes_a_list_of_texts(tok):
    assert tok.encode_batch(["the cat", "a dog"]) == [tok.encode("the cat"), tok.encode("a dog")]
    with pytest.raises(ScratchLLMError, match="encode_batch takes a list of texts, got one str"):
        tok.encode_batch("the cat")


def test_decode_takes_ids_in_the_vocabulary(tok):
    ids = tok.encode("the cat")
    assert tok.decode([int(i) for i in ids]) == tok.decode(tuple(ids))
    for text in ("12", b"12", bytearray(b"12")):
        with pytest.raises(ScratchLLMError, match="decode takes token ids"):
            tok.decode(text)
    for bad in (-1, tok.vocab_size):
        with pytest.raises(ScratchLLMError, match=f"{bad}"):
            tok.decode([ids[0], bad])
