"""Fixed-shape decoding (CompiledDecoding: torch.compile, CUDA graphs on GPUs)."""

from __future__ import annotations

import shutil

import pytest
import torch

from scratchllm.checkpoint import save_model
from scratchllm.cli import main
from scratchllm.errors import ScratchLLMError
from scratchllm.generation import CompiledDecoding, Engine, GenerationConfig
from scratchllm.text.bpe import BPETokenizer
from tests.generation.helpers import ByteTokenizer, book_greedy, prompts_of, static_engine, tiny_model


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
    assert [CompiledDecoding.batch_rows(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


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
    tok = BPETokenizer({bytes([b]): b for b in range(256)})
    model = tiny_model(seed=4, vocab=tok.vocab_size)
    prompts = ["Hello", "A longer prompt"]
    cfg = GenerationConfig(max_new_tokens=30, ignore_eos=True)  # past the 24-token window
    expected = Engine(model, tok).generate(prompts, cfg)
    engine = Engine(model, tok, compile=True)
    assert [c.token_ids for c in engine.generate(prompts, cfg)] == [c.token_ids for c in expected]
    save_model(tmp_path / "m", model, tok)
    argv = ["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-new-tokens", "12"]
    argv += ["--dtype", "fp32", "--device", "cpu", "--quiet"]
    assert main([*argv, "--compile"]) == 0
    assert capsys.readouterr().out == Engine(model, tok).generate("Hello", max_new_tokens=12)[0].text + "\n"


def test_compile_without_a_compiler_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ScratchLLMError, match="needs a C\\+\\+ compiler"):
        Engine(tiny_model(), ByteTokenizer(), compile=True)
    (tmp_path / "c.txt").write_text("the cat sat on the mat\\n" * 200, encoding="utf-8")
    argv = ["pretrain", "--corpus", str(tmp_path / "c.txt"), "--tokenizer", "char", "--model", "nano"]
    argv += ["--max-steps", "2", "--compile", "true", "--device", "cpu", "--progress", "false"]
    code = main([*argv, "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--compile on cpu needs a C++ compiler" in err and len(err.splitlines()) == 1
