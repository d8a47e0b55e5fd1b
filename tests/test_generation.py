"""The generation engine: the book's functions, cached == uncached == the book's loop (batches,
padding, past the context window), sampling controls, seeds, stops, streaming, validation, CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import scratchllm.generation as gen
from scratchllm.errors import ScratchLLMError
from scratchllm.generation import (
    Decoder,
    Engine,
    GenerationConfig,
    apply_penalties,
    generate,
    generate_text_simple,
    sample_next_token,
)
from scratchllm.model.gpt import GPTConfig, GPTModel
from scratchllm.text.tokenizer import EOT, Tokenizer

CTX = 24


class ByteTokenizer(Tokenizer):
    """Ids 0-255 are single bytes (so one character may take several tokens), 256 is <|endoftext|>."""

    kind = "test-bytes"

    def __init__(self) -> None:
        self.name = "bytes"
        self.special_tokens = {EOT: 256}

    @property
    def vocab_size(self) -> int:
        return 257

    def encode(self, text: str, allowed_special: Any = frozenset()) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(EOT.encode() if i == 256 else bytes([i]) for i in ids)

    def _files(self) -> dict[str, bytes]:
        return {}

    def _meta(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _load(cls, directory: Path, meta: dict[str, Any]) -> ByteTokenizer:
        return cls()


def tiny_model(seed: int = 0, ctx: int = CTX, vocab: int = 257, layers: int = 2) -> GPTModel:
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=vocab, context_length=ctx, emb_dim=32, n_heads=4, n_layers=layers, drop_rate=0.0
    )
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # sharper next-token distributions than GPT-2's tiny initial weights give
        model.tok_emb.weight.mul_(10)
    return model


def book_greedy(model: GPTModel, prompt: list[int], n: int) -> list[int]:
    out = generate_text_simple(model, torch.tensor([prompt]), n, model.cfg.context_length)
    return out[0, len(prompt) :].tolist()


def decode_all(model: GPTModel, prompts: list[list[int]], n: int, **kw) -> list[list[int]]:
    dec = Decoder(model, prompts, max_new_tokens=n, **kw)
    out: list[list[int]] = [[] for _ in prompts]
    while dec.active and dec.steps < n:
        for r, t in zip(dec.active, dec.step()):
            out[r].append(t)
    return out


def prompts_of(lengths: list[int], seed: int = 0, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------------------------------
# The book's functions


def test_teaching_functions_equal_the_books():
    book4 = pytest.importorskip("llms_from_scratch.ch04")
    book5 = pytest.importorskip("llms_from_scratch.ch05")
    model = tiny_model()
    idx = torch.tensor(prompts_of([5, 5]))
    torch.testing.assert_close(
        generate_text_simple(model, idx, 30, CTX), book4.generate_text_simple(model, idx, 30, CTX)
    )
    for kw in (dict(temperature=0.0), dict(temperature=1.3, top_k=5), dict(temperature=0.7)):
        torch.manual_seed(3)
        ours = generate(model, idx[:1], 30, CTX, **kw)
        torch.manual_seed(3)
        theirs = book5.generate(model, idx[:1], 30, CTX, **kw)
        torch.testing.assert_close(ours, theirs)
    # eos stops before appending it (one row, as in the book)
    out = generate(model, idx[:1], 30, CTX)
    eos = out[0, 8].item()
    first = out[0, 5:].tolist().index(eos)
    assert generate(model, idx[:1], 30, CTX, eos_id=eos).shape[1] == 5 + first


# ---------------------------------------------------------------------------------------------
# Cached == uncached == the book, for batches and past the context window


@pytest.mark.parametrize(
    "lengths,n",
    [
        ([5], 10),  # short
        ([3], 40),  # runs past the context window (24)
        ([24], 5),  # starts with a full window
        ([4, 4, 4], 12),  # equal lengths, no padding
        ([2, 9, 17], 15),  # different lengths: left padding, rows leave the window at different steps
        ([1, 20], 30),
    ],
)
def test_cached_and_uncached_greedy_equal_the_book_per_prompt(lengths, n):
    model = tiny_model()
    prompts = prompts_of(lengths, seed=len(lengths) + n)
    expected = [book_greedy(model, p, n) for p in prompts]
    assert decode_all(model, prompts, n, use_cache=True) == expected
    assert decode_all(model, prompts, n, use_cache=False) == expected


def test_engine_batch_equals_each_prompt_alone_with_rows_finishing_early():
    model, tok = tiny_model(seed=1), ByteTokenizer()
    prompts = prompts_of([3, 11, 6, 19], seed=5)
    alone = [book_greedy(model, p, 35) for p in prompts]
    # make row 1 stop early: its 7th token becomes the end-of-sequence token
    eos = alone[1][6]
    engine = Engine(model, tok)
    for use_cache in (True, False):
        outs = engine.generate(prompts, max_new_tokens=35, eos_id=eos, use_cache=use_cache)
        for out, ref in zip(outs, alone):
            if eos in ref:
                assert (
                    out.token_ids == ref[: ref.index(eos)] and out.finish_reason == "stop" and out.stop == eos
                )
            else:
                assert out.token_ids == ref and out.finish_reason == "length"


def test_long_prompts_are_cropped_from_the_left_with_a_warning():
    model = tiny_model()
    [prompt] = prompts_of([40])
    with pytest.warns(UserWarning, match="last 24 tokens"):
        out = decode_all(model, [prompt], 8)
    assert out[0] == book_greedy(model, prompt, 8)
    with pytest.warns(UserWarning):
        [c] = Engine(model, ByteTokenizer()).generate([prompt], max_new_tokens=3, ignore_eos=True)
    assert c.prompt_tokens == 40 and c.completion_tokens == 3


# ---------------------------------------------------------------------------------------------
# Sampling controls


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny_model(seed=2)
    prompts = prompts_of([4, 7], seed=2)
    greedy = decode_all(model, prompts, 20)
    assert decode_all(model, prompts, 20, temperature=1.5, top_k=1, seed=1) == greedy
    assert decode_all(model, prompts, 20, temperature=1.5, top_p=1e-6, seed=1) == greedy


def test_seed_reproduces_samples_and_different_seeds_differ():
    model = tiny_model(seed=3)
    prompts = prompts_of([4, 7], seed=3)
    a = decode_all(model, prompts, 25, temperature=1.0, seed=11)
    b = decode_all(model, prompts, 25, temperature=1.0, seed=11)
    c = decode_all(model, prompts, 25, temperature=1.0, seed=12)
    assert a == b and a != c
    # the seed also holds through the engine, with top-k and top-p together
    engine = Engine(model, ByteTokenizer())
    cfg = GenerationConfig(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=4, ignore_eos=True)
    assert engine.generate(prompts, cfg) == engine.generate(prompts, cfg)


def test_sampling_leaves_the_global_random_state_alone():
    model = tiny_model(seed=4)
    state = torch.get_rng_state()
    decode_all(model, prompts_of([5]), 10, temperature=1.0, seed=1)
    decode_all(model, prompts_of([5]), 10, temperature=1.0)  # unseeded too
    assert torch.equal(state, torch.get_rng_state())


def test_sample_next_token_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next_token(logits).item() == 1
    draws = {sample_next_token(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    # top_p: the two best carry about 0.66 of the mass, the third brings it to 0.9
    draws = {sample_next_token(logits, 1.0, top_p=0.6, generator=g).item() for _ in range(300)}
    assert draws == {1, 2}
    draws = {sample_next_token(logits, 1.0, top_p=0.95, generator=g).item() for _ in range(300)}
    assert draws == {1, 2, 4}


def penalized_greedy(model: GPTModel, prompt: list[int], n: int, repetition: float = 1.0,
                     presence: float = 0.0, frequency: float = 0.0) -> list[int]:  # fmt: skip
    """The penalties written out on the book's uncached loop: Hugging Face's rule over every token so
    far (prompt included), OpenAI's formula over the generated tokens."""
    ctx = model.cfg.context_length
    ids, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids[-ctx:]]))[0, -1].float()
        for t in set(ids):
            logits[t] = logits[t] * repetition if logits[t] < 0 else logits[t] / repetition
        for t in set(out):
            logits[t] -= frequency * out.count(t) + presence
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


@pytest.mark.parametrize(
    "penalties",
    [
        dict(repetition=3.0),  # strong: this model's best logit leads the next by ~3.5
        dict(presence=4.0),
        dict(frequency=0.5),
        dict(repetition=1.5, presence=1.0, frequency=0.3),
    ],
)
def test_penalties_equal_their_rules_written_out(penalties):
    model = tiny_model(seed=5)
    prompts = prompts_of([3, 8, 5], seed=5)  # a batch with left padding; 30 tokens pass the 24-token window
    expected = [penalized_greedy(model, p, 30, **penalties) for p in prompts]
    assert expected != [book_greedy(model, p, 30) for p in prompts]  # the penalties change the tokens
    names = dict(repetition="repetition_penalty", presence="presence_penalty", frequency="frequency_penalty")
    settings = {names[k]: v for k, v in penalties.items()}
    assert decode_all(model, prompts, 30, **settings) == expected
    assert decode_all(model, prompts, 30, use_cache=False, **settings) == expected
    cfg = GenerationConfig(max_new_tokens=30, ignore_eos=True, **settings)
    assert [c.token_ids for c in Engine(model, ByteTokenizer()).generate(prompts, cfg)] == expected
    assert [c.token_ids for c in static_engine(model).generate(prompts, cfg)] == expected  # fixed shapes


def test_apply_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    counts = torch.tensor([[0.0, 0.0, 3.0, 1.0]])
    assert apply_penalties(logits, seen, counts).equal(logits)  # penalties 1 and 0: unchanged
    out = apply_penalties(
        logits, seen, counts, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25
    )
    assert out.tolist() == [[1.0, -4.0, 1.0 - 0.75 - 0.5, 0.5 - 0.25 - 0.5]]
    # negative OpenAI penalties favour repetition
    assert apply_penalties(logits, None, counts, presence_penalty=-1.0).tolist() == [[2.0, -2.0, 2.0, 1.5]]


def test_penalized_sampling_is_reproducible_and_the_settings_are_checked():
    model = tiny_model(seed=6)
    prompts = prompts_of([4, 9], seed=6)
    cfg = GenerationConfig(max_new_tokens=25, temperature=0.9, seed=7, ignore_eos=True, repetition_penalty=1.2,
                           frequency_penalty=0.3)  # fmt: skip
    engine = Engine(model, ByteTokenizer())
    assert engine.generate(prompts, cfg) == engine.generate(prompts, cfg)
    assert engine.generate(prompts, cfg) == static_engine(model).generate(prompts, cfg)
    for bad, match in [(dict(repetition_penalty=0), "repetition_penalty must be a number > 0"),
                       (dict(presence_penalty=float("inf")), "presence_penalty must be a finite number"),
                       (dict(frequency_penalty="x"), "frequency_penalty must be a finite number")]:  # fmt: skip
        with pytest.raises(ScratchLLMError, match=match):
            engine.generate("abc", **bad)


def test_penalties_follow_each_row_when_rows_finish_early():
    """A row that ends early (a stop token) leaves the batch; the others keep their own penalty tables:
    every row equals its prompt decoded alone, on the default and the fixed-shape paths."""
    model = tiny_model(seed=5)
    prompts = prompts_of([3, 8, 5], seed=5)
    engine = Engine(model, ByteTokenizer())
    settings = dict(max_new_tokens=30, ignore_eos=True, repetition_penalty=3.0, presence_penalty=1.0)
    first = engine.generate([prompts[0]], **settings)[0].token_ids
    cfg = GenerationConfig(stop_token_ids=[first[4]], **settings)  # the first row stops at its 5th token
    alone = [engine.generate([p], cfg)[0] for p in prompts]
    assert alone[0].finish_reason == "stop" and len(alone[0].token_ids) < 30
    assert engine.generate(prompts, cfg) == alone
    assert static_engine(model).generate(prompts, cfg) == alone


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


def test_logprobs_are_the_models_own_at_each_step():
    """Each generated token's log-probability and its top alternatives are the log-softmax of the book's
    uncached loop's logits at that step (batched with padding, past the context window), before any
    penalty or temperature; a full forward pass over prompt + text (`prompt_logprobs`) agrees."""
    model = tiny_model(seed=7)
    prompts = prompts_of([3, 9], seed=7)
    engine = Engine(model, ByteTokenizer())
    for extra in ({}, dict(temperature=1.3, seed=2, presence_penalty=2.0, top_k=5)):
        cfg = GenerationConfig(max_new_tokens=30, ignore_eos=True, logprobs=3, **extra)
        for prompt, c in zip(prompts, engine.generate(prompts, cfg)):
            assert len(c.logprobs) == len(c.token_ids) == 30
            ids = list(prompt)
            for t, lp in zip(c.token_ids, c.logprobs):
                with torch.no_grad():
                    ref = torch.log_softmax(model(torch.tensor([ids[-CTX:]]))[0, -1], -1)
                top = ref.topk(3)
                assert lp.token_id == t and lp.logprob == pytest.approx(ref[t].item(), abs=1e-5)
                assert [i for i, _ in lp.top] == top.indices.tolist()
                assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-5)
                ids.append(t)
    [c] = engine.generate(prompts[1], max_new_tokens=10, ignore_eos=True, logprobs=0)
    assert all(lp.top == () for lp in c.logprobs)
    [greedy] = engine.generate(prompts[1], max_new_tokens=10, ignore_eos=True, logprobs=1)
    assert greedy.token_ids == c.token_ids and all(lp.token_id == lp.top[0][0] for lp in greedy.logprobs)
    scored = engine.prompt_logprobs(prompts[1] + c.token_ids, top=2)
    assert scored[0] is None and len(scored) == 9 + 10
    assert [s.logprob for s in scored[9:]] == pytest.approx([lp.logprob for lp in c.logprobs], abs=1e-5)
    assert [s.token_id for s in scored[1:]] == (prompts[1] + c.token_ids)[1:]
    assert engine.generate(prompts, max_new_tokens=3)[0].logprobs is None  # not asked for
    small = Engine(tiny_model(vocab=10))  # more alternatives asked for than the vocabulary has
    [c] = small.generate([[1, 2]], max_new_tokens=2, logprobs=15, ignore_eos=True)
    assert len(c.logprobs[0].top) == 10 and len(small.prompt_logprobs([1, 2, 3], 15)[1].top) == 10
    with pytest.raises(ScratchLLMError, match="logprobs must be None or an integer from 0 to 20"):
        engine.generate(prompts, logprobs=21)
    with pytest.raises(ScratchLLMError, match="one context window"):
        engine.prompt_logprobs(list(range(CTX + 1)))


# ---------------------------------------------------------------------------------------------
# Stops, streaming, counts (with a scripted sampler: the model runs, the tokens are chosen)


@pytest.fixture
def scripted(monkeypatch):
    """Make every row of the decoder emit the given token sequence."""

    def install(tokens: list[int]):
        counter = {"i": 0}

        def fake(logits, *args, **kwargs):
            i = counter["i"]
            counter["i"] += 1
            t = tokens[i] if i < len(tokens) else ord(".")
            return torch.full((logits.shape[0],), t, dtype=torch.long)

        monkeypatch.setattr(gen, "sample_next_token", fake)

    return install


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
    bpe = pytest.importorskip("scratchllm.text.bpe")
    tok = bpe.BPETokenizer({bytes([b]): b for b in range(256)} | {"é".encode()[1:] + b"l": 256})
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


def test_scoring_prompts_in_batches_equals_scoring_each_alone():
    """`score_prompts` pads prompts of different lengths into shared forward passes (several when
    `max_tokens` is small): every prompt's scores equal its own forward pass's, in the given order."""
    engine = Engine(tiny_model(seed=3), ByteTokenizer())
    prompts = prompts_of([7, 1, 12, 3, 12, 5], seed=3)
    alone = [engine.prompt_logprobs(p, top=2) for p in prompts]
    for max_tokens in (2048, 24, 1):  # one pass, a few, one prompt per pass
        together = engine.score_prompts(prompts, top=2, max_tokens=max_tokens)
        assert [len(s) for s in together] == [len(p) for p in prompts]
        for a, b in zip(alone, together):
            assert a[0] is None and b[0] is None
            assert [x.token_id for x in a[1:]] == [x.token_id for x in b[1:]]
            assert [x.logprob for x in b[1:]] == pytest.approx([x.logprob for x in a[1:]], abs=1e-5)
            assert [[i for i, _ in x.top] for x in b[1:]] == [[i for i, _ in x.top] for x in a[1:]]
    with torch.no_grad():  # and the scores are the model's own: log-softmax of a plain forward pass
        ref = torch.log_softmax(engine.model(torch.tensor([prompts[2]]))[0, :-1], -1)
    expected = ref.gather(-1, torch.tensor(prompts[2][1:])[:, None]).squeeze(-1).tolist()
    assert [x.logprob for x in alone[2][1:]] == pytest.approx(expected, abs=1e-5)


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


def test_stream_can_be_closed_early_and_restores_training_mode():
    model = tiny_model()
    model.train()
    engine = Engine(model, ByteTokenizer())
    stream = engine.stream("abc", max_new_tokens=20, ignore_eos=True)
    next(stream)
    assert not model.training  # generation runs in eval mode
    stream.close()
    assert model.training and stream.completion is None
    engine.generate("abc", max_new_tokens=3)
    assert model.training


def test_token_id_prompts_and_text_prompts_agree():
    engine = Engine(tiny_model(), ByteTokenizer())
    a = engine.generate("hello", max_new_tokens=6, ignore_eos=True)
    b = engine.generate(list(b"hello"), max_new_tokens=6, ignore_eos=True)
    c = engine.generate([list(b"hello")], max_new_tokens=6, ignore_eos=True)
    assert a == b == c


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "settings,match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(stop=[""]), "stop"),
        (dict(stop=5), "stop must be a string or a list"),
        (dict(temperature="hot"), "temperature must be a number"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p="x"), "top_p must be a number"),
        (dict(top_k=2.5), "top_k"),
        (dict(seed=2**64), "seed must be an integer from"),
        (dict(seed="1"), "seed"),
        (dict(stop_token_ids=5), "stop_token_ids must be a list of token ids, got 5"),
        (dict(stop_token_ids=["a"]), r"stop_token_ids must be token ids \(integers >= 0\), got \('a',\)"),
        (dict(stop_token_ids=[-1]), "stop_token_ids must be token ids"),
        (dict(eos_id="x"), "eos_id must be token ids"),
        (dict(eos_id=-5), "eos_id must be token ids"),
    ],
)
def test_out_of_range_settings_are_errors(settings, match):
    with pytest.raises(ScratchLLMError, match=match):
        GenerationConfig(**settings)
    engine = Engine(tiny_model(), ByteTokenizer())
    with pytest.raises(ScratchLLMError, match=match):
        engine.generate("abc", **settings)


def test_none_for_stop_lists_means_none_and_numpy_ids_are_ids():
    cfg = GenerationConfig(stop=None, stop_token_ids=None)
    assert cfg.stop == () and cfg.stop_token_ids == ()
    assert GenerationConfig(stop_token_ids=np.array([3, 4])).stop_token_ids == (3, 4)


def test_a_tiny_temperature_samples_the_most_likely_token_instead_of_failing():
    """logits / 1e-45 overflowed to inf, and the softmax to NaN: torch.multinomial raised."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [-5.0, -7.0, -6.0]])
    for temperature in (1e-45, 1e-30, 1e-3):
        generator = torch.Generator().manual_seed(0)
        assert sample_next_token(logits, temperature, generator=generator).tolist() == [1, 0]
    engine = Engine(tiny_model(), ByteTokenizer())
    greedy = engine.generate([[1, 2]], max_new_tokens=4, ignore_eos=True)
    assert engine.generate([[1, 2]], max_new_tokens=4, ignore_eos=True, temperature=1e-45, seed=0) == greedy


def test_empty_prompts_and_bad_ids_are_errors():
    engine = Engine(tiny_model(), ByteTokenizer())
    with pytest.raises(ScratchLLMError, match="empty"):
        engine.generate("")
    with pytest.raises(ScratchLLMError, match="empty"):
        engine.generate(["ok", ""])
    with pytest.raises(ScratchLLMError, match="vocabulary"):
        engine.generate([[1, 2, 999]])
    with pytest.raises(ScratchLLMError, match="unknown"):
        engine.generate("abc", max_tokens=3)
    with pytest.raises(ScratchLLMError, match="empty"):
        Decoder(tiny_model(), [[]], max_new_tokens=3)
    with pytest.raises(ScratchLLMError, match="list of prompts is empty"):
        engine.generate([])
    for bad in (None, 5):
        with pytest.raises(ScratchLLMError, match="give a prompt"):
            engine.generate(bad)
    with pytest.raises(ScratchLLMError, match="text or a list of token ids"):
        engine.generate(["The", 3])
    with pytest.raises(ScratchLLMError, match="text or a list of token ids"):
        engine.stream(None)
    # numpy numbers are numbers
    import numpy as np

    assert GenerationConfig(temperature=np.float32(0.7), top_p=np.float64(0.9)).temperature == pytest.approx(
        0.7
    )
    # the largest seed torch takes works
    assert (
        len(
            engine.generate("a", max_new_tokens=2, temperature=1.0, seed=2**64 - 1, ignore_eos=True)[
                0
            ].token_ids
        )
        == 2
    )


def test_a_batch_of_long_prompts_gives_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode_all(tiny_model(), prompts_of([40, 30, 5]), 2)
    assert [str(w.message) for w in caught] == [
        "2 of 3 prompts have more tokens than the context window of 24 (the longest 40); "
        "using the last 24 tokens of each"
    ]


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_generate_with_a_model_directory(tmp_path, capsys):
    checkpoint = pytest.importorskip("scratchllm.checkpoint")
    bpe = pytest.importorskip("scratchllm.text.bpe")
    from scratchllm.cli import main

    tok = bpe.BPETokenizer({bytes([b]): b for b in range(256)})
    model = tiny_model(vocab=tok.vocab_size)
    checkpoint.save_model(tmp_path / "m", model, tok)
    expected = Engine(model, tok).generate("Hello", max_new_tokens=12)[0].text

    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "12", "--dtype", "fp32",
                 "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    assert capsys.readouterr().out == expected + "\n"
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "12", "--dtype", "fp32",
                 "--stream", "--echo", "--device", "cpu"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert captured.out == "Hello" + expected + "\n"
    assert "tokens" in captured.err
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    # a warning is one line of its own, not Python's file name and source line (a subprocess: pytest
    # records the warnings raised in its own process)
    run = subprocess.run([sys.executable, "-m", "scratchllm", "generate", "--model", str(tmp_path / "m"), "--prompt",
                          "x" * 30, "--max-new-tokens", "2", "--device", "cpu", "--quiet"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0
    expected = f"prompt 0 has 30 tokens, more than the context window of {CTX}; using its last {CTX} tokens"
    assert run.stderr == f"scratchllm: warning: {expected}\n"
    with pytest.warns(UserWarning, match="more than the context window"):  # and recorders still see them
        assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x" * 30, "--max-new-tokens", "2",
                     "--device", "cpu", "--quiet"]) == 0  # fmt: skip


def test_cli_penalty_flags_reach_generate_chat_and_respond(tmp_path, capsys, monkeypatch):
    checkpoint = pytest.importorskip("scratchllm.checkpoint")
    bpe = pytest.importorskip("scratchllm.text.bpe")
    import scratchllm.finetune.instruct as instruct
    from scratchllm.cli import _sampling_config, build_parser, main

    tok = bpe.BPETokenizer({bytes([b]): b for b in range(256)})
    model = tiny_model(vocab=tok.vocab_size)
    checkpoint.save_model(tmp_path / "m", model, tok)
    settings = dict(repetition_penalty=3.0, presence_penalty=4.0, frequency_penalty=0.5)
    expected = Engine(model, tok).generate("Hello", max_new_tokens=12, **settings)[0].text
    assert expected != Engine(model, tok).generate("Hello", max_new_tokens=12)[0].text
    flags = ["--repetition-penalty", "3", "--presence-penalty", "4", "--frequency-penalty", "0.5"]
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "12",
                 "--dtype", "fp32", "--device", "cpu", "--quiet", *flags]) == 0  # fmt: skip
    assert capsys.readouterr().out == expected + "\n"
    assert (
        main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--repetition-penalty", "0"])
        == 2
    )
    assert "repetition_penalty must be a number > 0" in capsys.readouterr().err

    cfg = _sampling_config(build_parser().parse_args(["chat", "--model", "m", *flags]))
    assert (cfg.repetition_penalty, cfg.presence_penalty, cfg.frequency_penalty) == (3.0, 4.0, 0.5)
    with pytest.raises(ScratchLLMError, match="repetition_penalty"):  # checked before the model loads
        instruct.respond("no/such/model", [{"instruction": "x", "input": ""}], repetition_penalty=0)
    seen = {}
    monkeypatch.setattr(instruct, "respond", lambda *a, **kw: seen.update(kw))
    assert main(["respond", "--model", "m", "--data", "d.json", "--out", "o.json", *flags]) == 0
    assert {k: seen[k] for k in settings} == settings


def test_default_cache_equals_no_cache_on_a_gpt2_shaped_model():
    # a deeper model, several heads, bias terms: the production decode path against the uncached one
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=300, context_length=40, emb_dim=64, n_heads=8, n_layers=4, drop_rate=0.0)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(10)
    prompts = prompts_of([7, 30, 12], seed=9, vocab=300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached = decode_all(model, prompts, 45)
    assert cached == decode_all(model, prompts, 45, use_cache=False)
    assert cached == [book_greedy(model, p, 45) for p in prompts]


# ---------------------------------------------------------------------------------------------
# The CPU decode kernels (prepacked weights)


def test_the_weight_probe_reads_inside_big_weights():
    """Float32 positions rounded past the end of a weight above 2**24 values (GPT-2's 38.6M-value
    head): every generation with prepacked weights on the 124M model raised IndexError."""
    weight = torch.zeros(768 * 50257, dtype=torch.uint8)
    weight[-1] = 9
    probe = gen._probe(weight)
    assert len(probe) == 8 and probe[-1] == 9  # the last value, not one past it


def test_prepacked_kernels_give_the_same_tokens_and_follow_weight_changes():
    if not gen.PackedLinears.supported(tiny_model()):
        pytest.skip("oneDNN's prepacked linear is not available here")
    model = tiny_model(seed=5)
    packed, plain = Engine(model, ByteTokenizer()), Engine(model, ByteTokenizer(), prepack=False)
    assert packed.kernels is not None and plain.kernels is None
    prompts = prompts_of([3, 12], seed=6)
    cfg = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    assert [c.token_ids for c in packed.generate(prompts, cfg)] == [
        c.token_ids for c in plain.generate(prompts, cfg)
    ]
    assert all("forward" not in m.__dict__ for m in model.modules())  # the layers are restored afterwards
    with torch.no_grad():  # training between generations: the packed copies must follow
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert [c.token_ids for c in packed.generate(prompts, cfg)] == [
        c.token_ids for c in plain.generate(prompts, cfg)
    ]
    # weights copied in through .data (no version bump) or loaded under inference mode (no counter)
    for other_seed in (7, 8):
        other = tiny_model(seed=other_seed)
        if other_seed == 7:
            for p, q in zip(model.parameters(), other.parameters()):
                p.data.copy_(q.data)
        else:
            with torch.inference_mode():
                model.load_state_dict(other.state_dict())
        assert [c.token_ids for c in packed.generate(prompts, cfg)] == [
            c.token_ids for c in Engine(other, ByteTokenizer(), prepack=False).generate(prompts, cfg)
        ]


def test_linear_subclasses_keep_their_own_forward():
    if not gen.PackedLinears.supported(tiny_model()):
        pytest.skip("oneDNN's prepacked linear is not available here")

    class Shifted(torch.nn.Linear):  # like a LoRA layer: an nn.Linear with extra work in forward
        def forward(self, x):
            return super().forward(x) + 0.5

    model = tiny_model(seed=7)
    old = model.trf_blocks[0].ff.layers[0]
    new = Shifted(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    model.trf_blocks[0].ff.layers[0] = new
    prompts = prompts_of([5], seed=8)
    cfg = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    a = Engine(model, ByteTokenizer()).generate(prompts, cfg)
    assert a == Engine(model, ByteTokenizer(), prepack=False).generate(prompts, cfg)
    assert [c.token_ids for c in a] == [book_greedy(model, p, 20) for p in prompts]


def test_bf16_weights_generate():
    model = tiny_model(seed=8).to(torch.bfloat16)
    [c] = Engine(model, ByteTokenizer()).generate([[1, 2, 3]], max_new_tokens=10, ignore_eos=True)
    assert len(c.token_ids) == 10
    assert gen.resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert gen.resolve_dtype("auto", torch.device("cpu")) in (torch.float32, torch.bfloat16)
    with pytest.raises(ScratchLLMError, match="fp16"):
        gen.resolve_dtype("fp16", torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# Fixed-shape decoding (CompiledDecoding: torch.compile, CUDA graphs on GPUs)


def static_engine(model: GPTModel, compile: bool = False) -> Engine:
    """An engine whose one-token steps run over a static-mode cache, eagerly unless `compile`."""
    engine = Engine(model, ByteTokenizer(), compile=True)
    engine.compiled = gen.CompiledDecoding(model, compile=compile)
    return engine


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_new_tokens=40),  # past the 24-token window: the cache restarts from the last window
        dict(max_new_tokens=30, temperature=1.0, seed=3),
        dict(max_new_tokens=30, temperature=0.8, top_k=20, top_p=0.9, seed=4),
    ],
)
def test_fixed_shape_steps_equal_the_default_decoding(settings):
    model = tiny_model(seed=2)
    prompts = prompts_of([5, 9, 2, 17], seed=3)  # left padding in the batch
    cfg = GenerationConfig(ignore_eos=True, **settings)
    expected = Engine(model, ByteTokenizer(), prepack=False).generate(prompts, cfg)
    engine = static_engine(model)
    assert engine.kernels is None
    assert engine.generate(prompts, cfg) == expected
    assert engine.generate(prompts, cfg) == expected  # the kept cache is reset between generations
    [alone] = engine.generate(prompts[:1], cfg)  # another batch size: its own cache
    assert alone == Engine(model, ByteTokenizer(), prepack=False).generate(prompts[:1], cfg)[0]
    assert set(engine.compiled._caches) == {(4, None), (1, None)}
    three = engine.generate(prompts[:3], cfg)  # padded to a cache of 4 rows: the same shape as 4
    assert three == Engine(model, ByteTokenizer(), prepack=False).generate(prompts[:3], cfg)
    assert set(engine.compiled._caches) == {(4, None), (1, None)}
    assert [gen.CompiledDecoding.batch_rows(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


def test_fixed_shape_steps_keep_finished_rows_and_drop_their_tokens():
    model, tok = tiny_model(seed=1), ByteTokenizer()
    prompts = prompts_of([3, 11, 6, 19], seed=5)
    alone = [book_greedy(model, p, 35) for p in prompts]
    eos = alone[1][6]
    cfg = GenerationConfig(max_new_tokens=35, eos_id=eos)
    outs = static_engine(model).generate(prompts, cfg)
    assert outs == Engine(model, tok).generate(prompts, cfg)
    for out, ref in zip(outs, alone):
        assert out.token_ids == (ref[: ref.index(eos)] if eos in ref else ref)
    assert len({len(out.token_ids) for out in outs}) > 1  # rows finished at different steps
    # seeded sampling draws for the active rows only, as the default decoding does
    cfg = GenerationConfig(max_new_tokens=35, eos_id=eos, temperature=1.5, seed=11)
    assert static_engine(model).generate(prompts, cfg) == Engine(model, tok).generate(prompts, cfg)
    # 3 prompts fill a 4-row cache: the padding row is computed and never returned
    assert static_engine(model).generate(prompts[1:], cfg) == Engine(model, tok).generate(prompts[1:], cfg)


def test_warm_up_builds_every_cache_shape_a_server_batch_uses():
    model = tiny_model(seed=3)
    engine = static_engine(model)
    assert engine.warm_up(5) == [1, 2, 4, 8]
    assert set(engine.compiled._caches) == {(1, None), (2, None), (4, None), (8, None)}
    assert Engine(model, ByteTokenizer()).warm_up(8) == []


def test_static_cache_state_and_errors():
    model = tiny_model()
    cache = model.new_kv_cache(2, max_len=10)
    pad = torch.tensor([[False, False, True, True, True], [True] * 5])
    with torch.no_grad():
        model(torch.ones(2, 5, dtype=torch.long), kv_cache=cache, padding_mask=pad)
    cache.freeze(pad)
    assert cache.static and int(cache.slot) == 5 and cache.positions.flatten().tolist() == [3, 5]
    assert cache.valid.tolist() == [[False, False, True, True, True] + [False] * 5, [True] * 5 + [False] * 5]
    with torch.no_grad():
        logits = model(torch.ones(2, 1, dtype=torch.long), kv_cache=cache)
    assert (
        logits.shape == (2, 1, 257) and int(cache.slot) == 6 and cache.positions.flatten().tolist() == [4, 6]
    )
    assert cache.valid[:, 5].all() and not cache.valid[:, 6:].any()
    with pytest.raises(ValueError, match="one token"):
        model(torch.ones(2, 2, dtype=torch.long), kv_cache=cache)
    with pytest.raises(RuntimeError, match="keeps its batch size"):
        cache.select(torch.tensor([0]))
    cache.reset()
    assert not cache.static and cache.pos == 0


def test_bf16_weights_with_fixed_shapes_keep_an_fp32_cache():
    model = tiny_model(seed=8).to(torch.bfloat16)
    prompts = prompts_of([4, 7], seed=2)
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    engine = static_engine(model)
    assert engine.generate(prompts, cfg) == Engine(model, ByteTokenizer()).generate(prompts, cfg)
    assert set(engine.compiled._caches) == {(2, torch.float32)}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_compiled_decoding_equals_eager_and_the_cli_takes_compile(tmp_path, capsys):
    checkpoint = pytest.importorskip("scratchllm.checkpoint")
    bpe = pytest.importorskip("scratchllm.text.bpe")
    from scratchllm.cli import main

    tok = bpe.BPETokenizer({bytes([b]): b for b in range(256)})
    model = tiny_model(seed=4, vocab=tok.vocab_size)
    prompts = ["Hello", "A longer prompt"]
    cfg = GenerationConfig(max_new_tokens=30, ignore_eos=True)  # past the 24-token window
    expected = Engine(model, tok).generate(prompts, cfg)
    engine = Engine(model, tok, compile=True)
    assert [c.token_ids for c in engine.generate(prompts, cfg)] == [c.token_ids for c in expected]
    checkpoint.save_model(tmp_path / "m", model, tok)
    argv = ["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "12",
            "--dtype", "fp32", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main([*argv, "--compile"]) == 0
    assert capsys.readouterr().out == Engine(model, tok).generate("Hello", max_new_tokens=12)[0].text + "\n"


def test_compile_without_a_compiler_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from scratchllm.cli import main

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ScratchLLMError, match="needs a C\\+\\+ compiler"):
        Engine(tiny_model(), ByteTokenizer(), compile=True)
    (tmp_path / "c.txt").write_text("the cat sat on the mat\\n" * 200, encoding="utf-8")
    code = main(["pretrain", "--corpus", str(tmp_path / "c.txt"), "--tokenizer", "char", "--model", "nano",
                 "--max-steps", "2", "--compile", "true", "--device", "cpu", "--progress", "false",
                 "--out-dir", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--compile on cpu needs a C++ compiler" in err and len(err.splitlines()) == 1
