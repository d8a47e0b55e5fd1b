"""The Engine: batches, prompts as text or ids, scoring prompts, eval mode, errors, and the CLI commands
built on it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from scratchllm.checkpoint import save_model
from scratchllm.cli import COMMANDS, build_parser, main
from scratchllm.config import load_config, overrides_from_args
from scratchllm.errors import ScratchLLMError
from scratchllm.finetune import respond
from scratchllm.generation import Decoder, Engine, GenerationConfig
from scratchllm.text.bpe import BPETokenizer
from tests.generation.helpers import CTX, ByteTokenizer, book_greedy, prompts_of, tiny_model


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


def test_token_id_prompts_and_text_prompts_agree():
    engine = Engine(tiny_model(), ByteTokenizer())
    a = engine.generate("hello", max_new_tokens=6, ignore_eos=True)
    b = engine.generate(list(b"hello"), max_new_tokens=6, ignore_eos=True)
    c = engine.generate([list(b"hello")], max_new_tokens=6, ignore_eos=True)
    assert a == b == c


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
        Decoder(tiny_model(), [[]], GenerationConfig(max_new_tokens=3))
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
    cfg = GenerationConfig(temperature=np.float32(0.7), top_p=np.float64(0.9))
    assert cfg.temperature == pytest.approx(0.7)
    # the largest seed torch takes works
    [c] = engine.generate("a", max_new_tokens=2, temperature=1.0, seed=2**64 - 1, ignore_eos=True)
    assert len(c.token_ids) == 2


def test_cli_generate_with_a_model_directory(tmp_path, capsys):
    tok = BPETokenizer({bytes([b]): b for b in range(256)})
    model = tiny_model(vocab=tok.vocab_size)
    save_model(tmp_path / "m", model, tok)
    expected = Engine(model, tok).generate("Hello", max_new_tokens=12)[0].text
    hello = ["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "12"]

    assert main([*hello, "--dtype", "fp32", "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main([*hello, "--dtype", "fp32", "--stream", "--echo", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hello" + expected + "\n"
    assert "tokens" in captured.err
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    # a warning is one line of its own, not Python's file name and source line (a subprocess: pytest
    # records the warnings raised in its own process)
    long = ["generate", "--model", str(tmp_path / "m"), "--prompt", "x" * 30, "--max-new-tokens", "2"]
    long += ["--device", "cpu", "--quiet"]
    run = subprocess.run(
        [sys.executable, "-m", "scratchllm", *long], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0
    expected = f"prompt 0 has 30 tokens, more than the context window of {CTX}; using its last {CTX} tokens"
    assert run.stderr == f"scratchllm: warning: {expected}\n"
    with pytest.warns(UserWarning, match="more than the context window"):  # and recorders still see them
        assert main(long) == 0


def test_cli_penalty_flags_reach_generate_chat_and_respond(tmp_path, capsys, monkeypatch):
    tok = BPETokenizer({bytes([b]): b for b in range(256)})
    model = tiny_model(vocab=tok.vocab_size)
    save_model(tmp_path / "m", model, tok)
    settings = dict(repetition_penalty=3.0, presence_penalty=4.0, frequency_penalty=0.5)
    expected = Engine(model, tok).generate("Hello", max_new_tokens=12, **settings)[0].text
    assert expected != Engine(model, tok).generate("Hello", max_new_tokens=12)[0].text
    flags = ["--repetition-penalty", "3", "--presence-penalty", "4", "--frequency-penalty", "0.5"]
    hello = ["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello"]
    assert (
        main([*hello, "--max-new-tokens", "12", "--dtype", "fp32", "--device", "cpu", "--quiet", *flags]) == 0
    )
    assert capsys.readouterr().out == expected + "\n"
    assert main([*hello, "--repetition-penalty", "0"]) == 2
    assert "repetition_penalty must be a number > 0" in capsys.readouterr().err

    args = build_parser(COMMANDS["chat"]).parse_args(["chat", "--model", "m", *flags])
    cfg = load_config(args.settings_class, None, overrides_from_args(args)).sampling
    assert (cfg.repetition_penalty, cfg.presence_penalty, cfg.frequency_penalty) == (3.0, 4.0, 0.5)
    respond_args = ["respond", "--model", "no/such/model", "--data", "d.json", "--out", "o.json"]
    assert main([*respond_args, "--repetition-penalty", "0"]) == 2  # checked before the model loads
    assert "repetition_penalty must be a number > 0" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(respond, "respond", lambda *a, **kw: seen.update(kw))
    assert main([*respond_args, *flags]) == 0
    assert {k: getattr(seen["config"], k) for k in settings} == settings
