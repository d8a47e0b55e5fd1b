"""Text as tokens arrive (with a scripted sampler: the model runs, the tokens are chosen): streamed
pieces never split a character, stop strings and end tokens end the text, logprobs follow the pieces."""

from __future__ import annotations

from scratchllm.generation import Engine
from scratchllm.text.bpe import BPETokenizer
from tests.generation.helpers import ByteTokenizer, tiny_model

TEXT = "héllo wörld, ça va? 日本語 🎉 done"


def test_stream_never_splits_characters_and_concatenates_to_the_text(scripted):
    tokens = list(TEXT.encode()) + [256]
    scripted(tokens)
    engine = Engine(tiny_model(ctx=64), ByteTokenizer())
    stream = engine.stream("Hi", max_new_tokens=100)
    pieces = list(stream)
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) == len(TEXT)  # one character per piece: each is handed out once complete
    c = stream.completion
    assert c is not None and c.text == TEXT and c.finish_reason == "stop" and c.stop == 256
    assert c.prompt_tokens == 2 and c.completion_tokens == len(TEXT.encode())
    scripted(tokens)
    [full] = engine.generate("Hi", max_new_tokens=100)
    assert full == c


def test_stream_with_a_real_bpe_tokenizer(scripted):
    tok = BPETokenizer({bytes([b]): b for b in range(256)} | {"é".encode()[1:] + b"l": 256})
    ids = tok.encode(TEXT)
    scripted(ids)
    engine = Engine(tiny_model(ctx=64, vocab=tok.vocab_size), tok)
    stream = engine.stream("Hi", max_new_tokens=len(ids))
    pieces = list(stream)
    assert "".join(pieces) == TEXT and all("\ufffd" not in p for p in pieces)
    assert stream.completion.finish_reason == "length"


def test_stop_strings_end_the_text_and_are_never_streamed(scripted):
    engine = Engine(tiny_model(ctx=64), ByteTokenizer())
    text = "one two ### three"
    scripted(list(text.encode()))
    stream = engine.stream("x", max_new_tokens=50, stop=["###", "zzz"])
    pieces = list(stream)
    assert "".join(pieces) == "one two " and not any("#" in p for p in pieces)
    assert stream.completion.finish_reason == "stop" and stream.completion.stop == "###"
    assert stream.completion.completion_tokens == len("one two ###")
    scripted(list(text.encode()))
    [c] = engine.generate("x", max_new_tokens=50, stop="###")
    assert c.text == "one two " and c.finish_reason == "stop"
    # a partial stop string that never completes is text after all
    scripted(list(b"ab ## cd"))
    stream = engine.stream("x", max_new_tokens=8, stop=["###"])
    assert "".join(stream) == "ab ## cd" and stream.completion.finish_reason == "length"
    # a stop string spanning a multi-byte character, found across tokens
    scripted(list("ab🎉cd".encode()))
    [c] = engine.generate("x", max_new_tokens=20, stop=["b🎉"])
    assert c.text == "a" and c.stop == "b🎉"


def test_eos_ignore_eos_and_extra_stop_tokens(scripted):
    engine = Engine(tiny_model(ctx=64), ByteTokenizer())
    scripted([104, 105, 256, 106])
    [c] = engine.generate("x", max_new_tokens=10)
    assert c.text == "hi" and c.token_ids == [104, 105] and c.finish_reason == "stop"
    scripted([104, 105, 256, 106])
    [c] = engine.generate("x", max_new_tokens=4, ignore_eos=True)
    assert c.token_ids == [104, 105, 256, 106] and c.finish_reason == "length"
    scripted([104, 105, 256, 106])
    [c] = engine.generate("x", max_new_tokens=10, stop_token_ids=[105])
    assert c.text == "h" and c.stop == 105
    [c] = engine.generate("x", max_new_tokens=0)
    assert c.text == "" and c.finish_reason == "length" and c.completion_tokens == 0 and c.prompt_tokens == 1


def test_partial_character_at_the_length_limit_becomes_a_replacement_character(scripted):
    engine = Engine(tiny_model(ctx=64), ByteTokenizer())
    scripted(list("a🎉".encode())[:3])
    stream = engine.stream("x", max_new_tokens=3)
    assert "".join(stream) == "a\ufffd" == stream.completion.text


def test_logprobs_stop_where_the_text_stops(scripted):
    """With a stop string the logprobs cover the tokens that begin before the text's end; an end token
    that ends the text is kept apart (`stop_logprob`)."""
    engine = Engine(tiny_model(ctx=64), ByteTokenizer())
    scripted(list(b"hi##x"))
    [c] = engine.generate("x", max_new_tokens=10, stop="##", logprobs=1)
    assert c.text == "hi" and len(c.token_ids) == 4 and [lp.token_id for lp in c.logprobs] == list(b"hi")
    assert c.stop_logprob is None
    scripted(list(b"ab#") + list(b"#"))
    [c] = engine.generate("x", max_new_tokens=10, stop="b#", logprobs=0)
    assert c.text == "a" and [lp.token_id for lp in c.logprobs] == [ord("a")]
    scripted([ord("x"), 0xE6, ord("#")])  # a character broken by the stop string: its U+FFFD is kept
    [c] = engine.generate("x", max_new_tokens=10, stop="#", logprobs=0)
    assert c.text == "x\ufffd" and [lp.token_id for lp in c.logprobs] == [ord("x"), 0xE6]
    scripted([104, 105, 256])
    [c] = engine.generate("x", max_new_tokens=10, logprobs=2)
    assert c.text == "hi" and [lp.token_id for lp in c.logprobs] == [104, 105]
    assert c.stop_logprob is not None and c.stop_logprob.token_id == 256 and len(c.stop_logprob.top) == 2


def test_streamed_logprobs_come_with_the_piece_their_token_begins_in(scripted):
    """`piece_logprobs` lists the tokens whose text begins in the piece just handed out (a character's
    bytes with the piece that shows it; tokens held back by a partial stop string wait); with
    `rest_logprobs` at the end they are the completion's logprobs in order, stop strings included."""
    engine = Engine(tiny_model(ctx=64), ByteTokenizer())
    cases = [
        (list("a🎉 b".encode()) + [256], {}),  # 4 bytes, one piece; the end token is not listed
        (list(b"one #two ##x"), dict(stop="##")),  # "#" held back, then text; "##" cut
        (list("xé".encode())[:2], {}),  # a broken character at the length limit: U+FFFD at the end
        (list(b"ab") + [0xE6, ord("#")], dict(stop="#")),  # a character broken by the stop string
    ]
    for tokens, extra in cases:
        scripted(tokens)
        stream = engine.stream("x", max_new_tokens=len(tokens), logprobs=1, **extra)
        seen, text = [], ""
        for piece in stream:
            seen += stream.piece_logprobs
            text += piece  # the tokens listed so far are exactly those that spell the text so far
            assert engine.tokenizer.decode([lp.token_id for lp in seen]) == text
        assert stream.piece_logprobs == []
        seen += stream.rest_logprobs
        c = stream.completion
        assert c.logprobs and seen == c.logprobs and text == c.text
        scripted(tokens)
        assert engine.generate("x", max_new_tokens=len(tokens), logprobs=1, **extra)[0].logprobs == seen
    scripted(list("a🎉".encode()))
    stream = engine.stream("x", max_new_tokens=5, logprobs=0)
    assert [(p, [lp.token_id for lp in stream.piece_logprobs]) for p in stream] == [
        ("a", [97]),
        ("🎉", list("🎉".encode())),
    ]
    scripted(list(b"ab##"))
    stream = engine.stream("x", max_new_tokens=5, stop="##")  # no logprobs asked for: none listed
    assert list(stream) == ["a", "b"] and stream.piece_logprobs == stream.rest_logprobs == []
