"""Weight-only int4 quantization: the codes, the layer against its dequantized weights, whole models,
generation, the refusals and the command line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchllm.model.quantize as quantize_module
from scratchllm.checkpoint import LoadedModel, load_model, save_model
from scratchllm.cli import main
from scratchllm.errors import ScratchLLMError
from scratchllm.generation import Engine, GenerationConfig
from scratchllm.hub import export_hf
from scratchllm.model.gpt import GPTConfig, GPTModel, count_parameters
from scratchllm.model.lora import apply_lora, merge_lora
from scratchllm.model.quantize import (
    Int4Linear,
    dequantize_int4,
    group_size_for,
    int4_supported,
    is_quantized,
    pack_nibbles,
    quantize_int4,
    quantize_model,
    unpack_nibbles,
)
from scratchllm.text.bpe import BPETokenizer

pytestmark = pytest.mark.skipif(not int4_supported(), reason="this PyTorch lacks the int4 CPU kernel")


def model_of(emb_dim: int = 64, vocab: int = 300, bias: bool = True, tie: bool = True) -> GPTModel:
    cfg = GPTConfig(
        vocab_size=vocab,
        context_length=32,
        emb_dim=emb_dim,
        n_heads=4,
        n_layers=2,
        drop_rate=0.0,
        qkv_bias=bias,
        tie_weights=tie,
    )
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # sharper next-token distributions than the tiny initial weights give
        model.tok_emb.weight.mul_(10)
    return model


def test_codes_steps_and_the_half_step_bound():
    w = torch.randn(48, 256) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different scales
    q, step, zero = quantize_int4(w, 64)
    assert q.dtype == torch.uint8 and q.shape == w.shape and int(q.max()) <= 15
    assert step.shape == zero.shape == (48, 4) and step.dtype == zero.dtype == torch.bfloat16
    err = (dequantize_int4(q, step, zero) - w).abs().reshape(48, 4, 64)
    # off by at most half a step (plus the bf16 roundings of step and zero)
    bound = step.float()[..., None] * (0.5 + 8 * 2**-8) + zero.float().abs()[..., None] * 2**-8
    assert bool((err <= bound * 1.001).all())
    assert int(q.min()) == 0 and int((q == 15).sum()) > 0  # each group's range is used end to end


def test_groups_keep_an_outlier_to_itself():
    w = torch.randn(16, 128) * 0.02
    w[0, 5] = 10.0  # one outlier in the first group of row 0
    q, step, zero = quantize_int4(w, 32)
    err = (dequantize_int4(q, step, zero) - w).abs()
    assert float(err[0, 32:].max()) < 0.01  # the other groups of that row keep their fine steps
    assert float(err[1:].max()) < 0.01
    assert float(step[0, 0]) > 0.5  # only the outlier's group got a coarse step


def test_a_constant_group_is_exact():
    w = torch.full((16, 64), 0.25)
    q, step, zero = quantize_int4(w, 32)
    assert torch.equal(dequantize_int4(q, step, zero), w)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 20), st.integers(1, 16), st.integers(0, 2**31 - 1))
def test_nibble_packing_round_trips(rows, half_cols, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, 2 * half_cols), generator=g, dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (rows, half_cols)
    assert torch.equal(unpack_nibbles(packed), q)


def test_group_sizes():
    assert group_size_for(768) == 128
    assert group_size_for(1600) == 64  # gpt2-xl's width
    assert group_size_for(96) == 32
    assert group_size_for(3072, 256) == 256
    with pytest.raises(ScratchLLMError, match="divisible by 32"):
        group_size_for(48)
    with pytest.raises(ScratchLLMError, match="group size"):
        group_size_for(768, 100)


@pytest.mark.parametrize("out_features", [16, 50, 257])  # the kernel pads rows to a multiple of 16
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [(1,), (3, 5)])
def test_layer_equals_its_dequantized_weights(out_features, bias, rows):
    linear = nn.Linear(128, out_features, bias=bias)
    layer = Int4Linear(linear, group_size=64)
    x = torch.randn(*rows, 128)
    with torch.no_grad():
        y, exact = layer(x), linear(x)
    assert y.shape == (*rows, out_features) and y.dtype == torch.float32
    # the kernel takes bf16 activations and returns bf16 before the bias is added
    ref = F.linear(x.bfloat16().float(), layer.weight_fp32())
    assert torch.allclose(
        y - (linear.bias if bias else 0), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max())
    )
    # and near the original layer: 4 bits of a uniform weight are off by 1/15 of its range / sqrt(12),
    # about 7% of its standard deviation
    assert float((y - exact).square().mean().sqrt()) < 0.1 * float(exact.square().mean().sqrt())


@pytest.mark.parametrize("offset", [0.0, 0.3, 3.0])  # groups away from zero: the bf16 zero matters
def test_the_kernel_uses_exactly_the_dequantized_weights(offset):
    linear = nn.Linear(256, 32, bias=False)
    with torch.no_grad():
        linear.weight.add_(offset)
    layer = Int4Linear(linear, group_size=128)
    with torch.no_grad():
        columns = layer(torch.eye(256)[:48])  # 48 one-hot rows (the kernel's path): weight columns
    assert torch.equal(columns, layer.weight_fp32()[:, :48].t().bfloat16().float())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_many_rows_take_the_dequantized_path_with_the_same_numbers(monkeypatch, bias, offset):
    linear = nn.Linear(256, 300, bias=bias)
    with torch.no_grad():
        linear.weight.add_(offset)
    layer = Int4Linear(linear, group_size=128)
    x = torch.randn(2, 40, 256)
    with torch.no_grad():
        monkeypatch.setattr(quantize_module, "DEQUANTIZE_ROWS", 10**9)
        kernel = layer(x)
        monkeypatch.setattr(quantize_module, "DEQUANTIZE_ROWS", 80)  # 80 rows: dequantize
        dequantized = layer(x)
    assert dequantized.shape == kernel.shape == (2, 40, 300)
    # both round the activations and the product to bf16; only the summation order differs
    assert torch.allclose(dequantized, kernel, rtol=2**-7, atol=1e-3)
    assert torch.equal(
        layer.weight_fp32(), dequantize_int4(unpack_nibbles(layer.qweight), layer.step, layer.zero)
    )


def test_quantize_model_replaces_every_linear_and_keeps_the_embeddings():
    model = model_of()
    emb = model.tok_emb.weight.detach().clone()
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        before = model(x)
    assert quantize_model(model) is model and is_quantized(model)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.out_head, Int4Linear)  # the tied head too
    assert torch.equal(model.tok_emb.weight, emb) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        after = model(x)
    rel = float((after - before).abs().max() / before.abs().max())
    assert 0 < rel < 0.05
    agree = float((after.argmax(-1) == before.argmax(-1)).float().mean())
    assert agree > 0.9


def test_a_model_directory_with_lora_adapters_loads_quantized(tmp_path):
    """`--quantize int4` on a LoRA-finetuned model directory: the adapters are merged into the weights
    that are then quantized, the same numbers as merging and quantizing by hand."""

    model = model_of()
    apply_lora(model, rank=4, alpha=2.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.normal_(0.0, 0.05)
    save_model(tmp_path / "lora", model)
    loaded = load_model(tmp_path / "lora", quantize="int4").model
    assert is_quantized(loaded)
    merge_lora(model)
    quantize_model(model)
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("tie", [True, False])
def test_a_quantized_model_counts_the_parameters_it_stands_for(tie):
    model = model_of(tie=tie)
    counts = count_parameters(model), count_parameters(model, count_tied_twice=True)
    quantize_model(model)
    assert (count_parameters(model), count_parameters(model, count_tied_twice=True)) == counts
    assert counts[1] - counts[0] == (300 * 64 if tie else 0)


def test_quantized_models_generate_with_and_without_the_cache():
    model = quantize_model(model_of(bias=False, tie=False))
    engine = Engine(model)
    assert engine.kernels is None  # nothing left for the fp32 prepacked path
    prompts = [[1, 2, 3, 4], [7] * 11]
    cfg = GenerationConfig(max_new_tokens=15, ignore_eos=True)
    cached = [c.token_ids for c in engine.generate(prompts, cfg)]
    uncached = [c.token_ids for c in engine.generate(prompts, cfg, use_cache=False)]
    assert cached == uncached and all(len(t) == 15 for t in cached)


def test_the_loss_uses_the_dequantized_head_and_equals_the_logits_cross_entropy():
    model = quantize_model(model_of(bias=False))
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        fused = model(x[:, :-1], targets=x[:, 1:])  # no full logits: linear_cross_entropy
        logits = model(x[:, :-1])
    plain = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
    assert float(fused) == pytest.approx(float(plain), rel=1e-3)  # the logits are rounded to bf16
    assert not model.weights_tied  # a quantized head has no weight to share


def test_half_and_bf16_models_keep_their_dtype():
    x = torch.randint(0, 300, (1, 5))
    for dtype in (torch.float16, torch.bfloat16):
        model = quantize_model(model_of().to(dtype))
        with torch.no_grad():
            assert model(x).dtype == dtype


def test_refusals():
    with pytest.raises(ScratchLLMError, match="unknown quantization"):
        quantize_model(model_of(), "int3")
    with pytest.raises(ScratchLLMError, match="divisible by 32"):
        quantize_model(model_of(emb_dim=48))
    lora = model_of()
    apply_lora(lora, rank=2, alpha=4)
    with pytest.raises(ScratchLLMError, match="merge"):
        quantize_model(lora)

    with pytest.raises(ScratchLLMError, match="cannot be saved"):
        save_model("unused", quantize_model(model_of()))

    with pytest.raises(ScratchLLMError, match="cannot be exported"):
        export_hf(
            LoadedModel(model=quantize_model(model_of()), tokenizer=None, config=None, extra={}), "unused"
        )
    # checked before the model loads (the path does not even exist)
    with pytest.raises(ScratchLLMError, match="unknown quantization 'int3'"):
        load_model("no/such/model", quantize="int3")
    with pytest.raises(ScratchLLMError, match="CPUs only, not on meta"):
        load_model("no/such/model", device=torch.device("meta"), quantize="int4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_models_are_refused():
    with pytest.raises(ScratchLLMError, match="CPUs only"):
        quantize_model(model_of().cuda())


def test_cli_generate_and_evaluate_with_int4(tmp_path, capsys):
    tok = BPETokenizer({bytes([b]): b for b in range(256)})
    save_model(tmp_path / "m", model_of(vocab=tok.vocab_size), tok)
    loaded = load_model(tmp_path / "m", quantize="int4")
    expected = Engine(loaded.model, tok).generate("Hello", max_new_tokens=12)[0].text
    args = ["--model", str(tmp_path / "m"), "--device", "cpu", "--dtype", "fp32"]
    assert (
        main(
            [
                "generate",
                *args,
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "12",
                "--quantize",
                "int4",
                "--quiet",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"

    corpus = tmp_path / "text.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    losses = {}
    for extra in ([], ["--quantize", "int4"]):
        assert (
            main(
                [
                    "perplexity",
                    "--model",
                    str(tmp_path / "m"),
                    "--corpus",
                    str(corpus),
                    "--device",
                    "cpu",
                    "--json",
                    *extra,
                ]
            )
            == 0
        )
        losses[bool(extra)] = json.loads(capsys.readouterr().out)["loss"]
    assert losses[True] != losses[False] and abs(losses[True] - losses[False]) < 0.05 * losses[False]
    with pytest.raises(SystemExit) as e:
        main(["generate", *args, "--prompt", "Hi", "--quantize", "int8"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_fixed_shape_decoding_of_an_int4_model_equals_the_default():
    from tests.generation.helpers import static_engine

    model = quantize_model(model_of(vocab=257, bias=False, tie=False))  # static_engine's byte tokenizer
    prompts = [[1, 2, 3, 4], [7] * 11, [5, 9]]
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    fixed = [c.token_ids for c in static_engine(model).generate(prompts, cfg)]
    assert fixed == [c.token_ids for c in Engine(model).generate(prompts, cfg)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_compiled_decoding_of_an_int4_model():
    model = quantize_model(model_of(bias=False, tie=False))
    prompts = [[1, 2, 3, 4], [7] * 11]
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    compiled = [c.token_ids for c in Engine(model, compile=True).generate(prompts, cfg)]
    assert compiled == [c.token_ids for c in Engine(model).generate(prompts, cfg)]
