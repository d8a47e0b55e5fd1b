"""What every tokenizer kind does with inputs of the wrong kind: one clear error, never a silent
misreading (a string of digits read as ids, a negative id read from the end of the vocabulary)."""

from __future__ import annotations

import pytest

from scratchllm.cli import main
from scratchllm.errors import ScratchLLMError
from scratchllm.text.bpe import train_bpe
from scratchllm.text.char import CharTokenizer
from scratchllm.text.registry import load_tokenizer
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


def _damage(tok, tmp_path, file, content):
    tok.save(tmp_path / "tok")
    (tmp_path / "tok" / file).write_bytes(content)
    return tmp_path / "tok"


@pytest.mark.parametrize(
    "kind, file, content, message",
    [
        ("bpe", "tokenizer_meta.json", b"[1, 2]", "not a valid tokenizer description"),
        ("bpe", "tokenizer_meta.json", b'{"kind": "bpe", "pattern": null, "special_tokens": {}}', "not None"),
        (
            "bpe",
            "tokenizer_meta.json",
            b'{"kind": "bpe", "pattern": "gpt2", "special_tokens": ["x"]}',
            "needs a 'pattern' and a 'special_tokens' object",
        ),
        ("bpe", "tokenizer.tiktoken", b"IGJl -7\n", r"line 1: expected `base64-token rank`"),
        ("char", "chars.json", b"5", "the saved char tokenizer is damaged"),
        ("char", "chars.json", b"\xff", "the saved char tokenizer is damaged .UnicodeDecodeError"),
        ("simple", "vocab.json", b"\xff", "the saved simple tokenizer is damaged .UnicodeDecodeError"),
    ],
)
def test_a_damaged_saved_tokenizer_is_a_one_line_error(tmp_path, kind, file, content, message, capsys):
    directory = _damage(KINDS[kind](), tmp_path, file, content)
    with pytest.raises(ScratchLLMError, match=message):
        load_tokenizer(directory)
    assert main(["tokenizer", "info", "--tokenizer", str(directory)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_gap_in_the_ranks_is_named_when_decoding(tmp_path):
    tok = KINDS["bpe"]()
    tok.save(tmp_path / "tok")
    lines = (tmp_path / "tok" / "tokenizer.tiktoken").read_bytes().splitlines()
    lines[-1] = lines[-1].split()[0] + b" 300"  # the last learned token moves to 300: 268 is a gap
    (tmp_path / "gap").mkdir()
    (tmp_path / "gap" / "tokenizer.tiktoken").write_bytes(b"\n".join(lines) + b"\n")
    gap = load_tokenizer(tmp_path / "gap" / "tokenizer.tiktoken")
    with pytest.raises(
        ScratchLLMError, match=r"token id 268 is not in the vocabulary \(ids 0..301, with gaps\)"
    ):
        gap.decode([1, 268])
