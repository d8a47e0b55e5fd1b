"""int8 and int4 quantization: the codes, the layers against the numbers they stand for, whole models of
every family, generation, the refusals and the command line."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchllm.model.quantize as quantize_module
from scratchllm import native
from scratchllm.checkpoint import LoadedModel, load_model, save_model
from scratchllm.cli import main
from scratchllm.errors import ScratchLLMError
from scratchllm.generation import Engine, GenerationConfig
from scratchllm.hub import export_hf
from scratchllm.model.gpt import GPTConfig, GPTModel, count_parameters
from scratchllm.model.lora import apply_lora, merge_lora
from scratchllm.model.quantize import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    group_size_for,
    int4_supported,
    int8_kernel_supported,
    is_quantized,
    pack_nibbles,
    quantize_activations,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_nibbles,
)
from scratchllm.model.registry import build_model, preset_config
from scratchllm.text.bpe import BPETokenizer

needs_int4 = pytest.mark.skipif(not int4_supported(), reason="this PyTorch lacks the int4 CPU kernel")
needs_fbgemm = pytest.mark.skipif(not int8_kernel_supported(), reason="this PyTorch lacks FBGEMM (x86 only)")
MODES = [pytest.param("int8"), pytest.param("int4", marks=needs_int4)]


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


@needs_int4
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


@needs_int4
@pytest.mark.parametrize("offset", [0.0, 0.3, 3.0])  # groups away from zero: the bf16 zero matters
def test_the_kernel_uses_exactly_the_dequantized_weights(offset):
    linear = nn.Linear(256, 32, bias=False)
    with torch.no_grad():
        linear.weight.add_(offset)
    layer = Int4Linear(linear, group_size=128)
    with torch.no_grad():
        columns = layer(torch.eye(256)[:48])  # 48 one-hot rows (the kernel's path): weight columns
    assert torch.equal(columns, layer.weight_fp32()[:, :48].t().bfloat16().float())


@needs_int4
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


# ----------------------------------------------------------------------------------------------
# int8: the codes, the activations' codes, the layer's numbers


def test_int8_codes_are_off_by_at_most_half_a_step():
    w = torch.randn(48, 256) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different scales
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.shape == (48,) and scale.dtype == torch.float32
    assert int(q.min()) >= -127 and bool((q.abs().amax(dim=1) == 127).all())  # each row's largest: the end
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] * (0.5 + 1e-6)).all())


def test_an_all_zero_row_stays_zero():
    w = torch.randn(4, 64)
    w[1] = 0
    q, scale = quantize_int8(w)
    assert bool(torch.isfinite(scale).all()) and not bool(q[1].any())


@pytest.mark.parametrize("reduce_range", [False, True])
def test_each_row_of_activations_gets_its_own_8_bit_grid(reduce_range):
    levels = 128 if reduce_range else 256
    x = torch.randn(3, 500) * torch.tensor([[0.01], [1.0], [300.0]]) + torch.tensor([[0.0], [0.5], [-40.0]])
    x[1, 0] = 0.0
    r = quantize_activations(x, reduce_range)
    for row, rounded in zip(x, r):
        step = float(max(row.max(), 0) - min(row.min(), 0)) / (levels - 1)
        assert len(rounded.unique()) <= levels
        assert float((rounded - row).abs().max()) <= step * 0.51  # half a step (the zero point may shift it)
    assert float(r[1, 0]) == 0.0  # zero is a level of every grid
    # each row, alone, gets the same grid: PyTorch's choice for a whole tensor (what FBGEMM uses)
    for row in x:
        scale, zero = torch._choose_qparams_per_tensor(row, reduce_range)
        expected = torch.fake_quantize_per_tensor_affine(row, scale, zero, 0, levels - 1)
        assert torch.allclose(quantize_activations(row[None], reduce_range)[0], expected, atol=scale * 1.01)


def int8_tolerance(layer: Int8Linear, x: torch.Tensor) -> float:
    """How far two correct int8 paths may part: fp32 summation order, and an activation exactly between two
    codes rounding either way (one step of one input, times the largest weight)."""
    step = float(max(x.max(), 0) - min(x.min(), 0)) / 255 * 2  # reduce_range doubles the step
    return step * float(layer.weight_fp32().abs().max()) * 1.01 + 1e-5


@pytest.mark.parametrize("out_features", [16, 50, 257])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [(1,), (1, 1), (3, 5)])  # one row: FBGEMM's kernel; several: torch._int_mm
def test_int8_layer_computes_its_stated_numbers(out_features, bias, rows):
    linear = nn.Linear(96, out_features, bias=bias)
    layer = Int8Linear(linear)
    x = torch.randn(*rows, 96) * 2 + 0.3
    with torch.no_grad():
        y, exact = layer(x), linear(x)
        stated = F.linear(layer.kernel_input(x), layer.weight_fp32(), linear.bias)
    assert y.shape == (*rows, out_features) and y.dtype == torch.float32
    assert torch.allclose(y, stated, rtol=1e-5, atol=int8_tolerance(layer, x))
    # and near the fp32 layer: 8 bits of weights and of activations, about 1% each
    assert float((y - exact).square().mean().sqrt()) < 0.03 * float(exact.square().mean().sqrt())


@needs_fbgemm
def test_one_row_and_several_rows_sum_the_same_integers():
    """FBGEMM (one row) and torch._int_mm (several): each row of a batch as if it ran alone."""
    layer = Int8Linear(nn.Linear(128, 300))
    x = torch.randn(6, 128) * 3
    x[2] *= 50  # an outlier token coarsens its own row only
    with torch.no_grad():
        together = layer(x)
        alone = torch.cat([layer(row[None]) for row in x])
    assert torch.allclose(together, alone, rtol=1e-5, atol=int8_tolerance(layer, x))


def test_without_the_kernels_the_plain_path_gives_the_same_numbers(monkeypatch):
    linear = nn.Linear(96, 40)
    fast = Int8Linear(linear)
    monkeypatch.setattr(quantize_module, "int8_kernel_supported", lambda: False)
    plain = Int8Linear(linear)
    monkeypatch.delattr(torch, "_int_mm")  # neither FBGEMM nor oneDNN's int8 product: the fp32 reference
    assert plain._packed is None and not plain.reduce_range and torch.equal(plain.qweight, fast.qweight)
    x = torch.randn(2, 7, 96)
    with torch.no_grad():
        y, stated = plain(x), F.linear(plain.kernel_input(x), plain.weight_fp32(), linear.bias)
        assert torch.allclose(y, stated, rtol=1e-5, atol=1e-5)
        if not fast.reduce_range:  # the kernels quantize to 8 bits too (7 on CPUs without VNNI)
            assert torch.allclose(y, fast(x), rtol=1e-5, atol=int8_tolerance(fast, x))


def test_an_int8_model_copies_and_keeps_its_buffers_in_the_state_dict():
    model = quantize_model(model_of(), "int8")
    x = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model)(x), model(x))
    keys = model.state_dict().keys()
    assert "out_head.qweight" in keys and "out_head.scale" in keys and not any("_row_sums" in k for k in keys)


@pytest.mark.parametrize("arch", ["gpt2", "llama3", "qwen3", "qwen3-moe", "gemma3"])
def test_int8_logits_of_every_family_stay_close_to_fp32(arch):
    """The tolerance int8 keeps on random nano models: logits within 5% RMS of fp32's (Gemma 3's norms
    after each sub-layer amplify the rounding most: about 4%; the others 1-1.5%), and the same top token
    at 90% of the positions at least. The MoE router stays in floating point."""
    torch.manual_seed(0)
    model = build_model(preset_config("nano", arch, vocab_size=300)).eval()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        before = model(x).float()
        quantize_model(model, "int8")
        after = model(x).float()
    routers = [m for name, m in model.named_modules() if name.endswith("router")]
    assert all(type(r) is nn.Linear for r in routers) and bool(routers) == (arch == "qwen3-moe")
    assert not any(type(m) is nn.Linear for name, m in model.named_modules() if not name.endswith("router"))
    rms = float((after - before).square().mean().sqrt() / before.square().mean().sqrt())
    assert 0 < rms < 0.05
    assert float((after.argmax(-1) == before.argmax(-1)).float().mean()) >= 0.9


# ----------------------------------------------------------------------------------------------
# whole models, int8 and int4


@pytest.mark.parametrize("mode", MODES)
def test_quantize_model_replaces_every_linear_and_keeps_the_embeddings(mode):
    model = model_of()
    emb = model.tok_emb.weight.detach().clone()
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        before = model(x)
    assert quantize_model(model, mode) is model and is_quantized(model)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.out_head, Int8Linear if mode == "int8" else Int4Linear)  # the tied head too
    assert torch.equal(model.tok_emb.weight, emb) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        after = model(x)
    rel = float((after - before).abs().max() / before.abs().max())
    assert 0 < rel < 0.05
    agree = float((after.argmax(-1) == before.argmax(-1)).float().mean())
    assert agree > 0.9


@pytest.mark.parametrize("mode", MODES)
def test_a_model_directory_with_lora_adapters_loads_quantized(tmp_path, mode):
    """`--quantize` on a LoRA-finetuned model directory: the adapters are merged into the weights
    that are then quantized, the same numbers as merging and quantizing by hand."""

    model = model_of()
    apply_lora(model, rank=4, alpha=2.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.normal_(0.0, 0.05)
    save_model(tmp_path / "lora", model)
    loaded = load_model(tmp_path / "lora", quantize=mode).model
    assert is_quantized(loaded)
    merge_lora(model)
    quantize_model(model, mode)
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tie", [True, False])
def test_a_quantized_model_counts_the_parameters_it_stands_for(tie, mode):
    model = model_of(tie=tie)
    counts = count_parameters(model), count_parameters(model, count_tied_twice=True)
    quantize_model(model, mode)
    assert (count_parameters(model), count_parameters(model, count_tied_twice=True)) == counts
    assert counts[1] - counts[0] == (300 * 64 if tie else 0)


@pytest.mark.parametrize("mode", MODES)
def test_quantized_models_generate_with_and_without_the_cache(mode):
    model = quantize_model(model_of(bias=False, tie=False), mode)
    engine = Engine(model)
    # no plain linear left to pack; where native builds, the decode step's attention still goes fused
    assert (engine.kernels is not None) == native.available()
    prompts = [[1, 2, 3, 4], [7] * 11]
    cfg = GenerationConfig(max_new_tokens=15, ignore_eos=True)
    cached = [c.token_ids for c in engine.generate(prompts, cfg)]
    uncached = [c.token_ids for c in engine.generate(prompts, cfg, use_cache=False)]
    assert cached == uncached and all(len(t) == 15 for t in cached)


@pytest.mark.parametrize("mode", MODES)
def test_the_loss_uses_the_dequantized_head_and_equals_the_logits_cross_entropy(mode):
    model = quantize_model(model_of(bias=False), mode)
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        fused = model(x[:, :-1], targets=x[:, 1:])  # no full logits: linear_cross_entropy
        logits = model(x[:, :-1])
    plain = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
    assert float(fused) == pytest.approx(float(plain), rel=1e-3)  # the logits are rounded to bf16
    assert not model.weights_tied  # a quantized head has no weight to share


@pytest.mark.parametrize("mode", MODES)
def test_half_and_bf16_models_keep_their_dtype(mode):
    x = torch.randint(0, 300, (1, 5))
    for dtype in (torch.float16, torch.bfloat16):
        model = quantize_model(model_of().to(dtype), mode)
        with torch.no_grad():
            assert model(x).dtype == dtype


@needs_int4
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


def test_int8_refusals():
    with pytest.raises(ScratchLLMError, match="choose one of: int8, int4"):
        quantize_model(model_of(), "int2")
    with pytest.raises(ScratchLLMError, match="int8 quantization runs on CPUs only, not on meta"):
        load_model("no/such/model", device=torch.device("meta"), quantize="int8")
    with pytest.raises(ScratchLLMError, match="cannot be saved"):
        save_model("unused", quantize_model(model_of(), "int8"))
    lora = model_of()
    apply_lora(lora, rank=2, alpha=4)
    with pytest.raises(ScratchLLMError, match="merge"):
        quantize_model(lora, "int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_models_are_refused(mode):
    with pytest.raises(ScratchLLMError, match="CPUs only"):
        quantize_model(model_of().cuda(), mode)


@pytest.mark.parametrize("mode", MODES)
def test_cli_generate_and_evaluate_quantized(tmp_path, capsys, mode):
    tok = BPETokenizer({bytes([b]): b for b in range(256)})
    save_model(tmp_path / "m", model_of(vocab=tok.vocab_size), tok)
    loaded = load_model(tmp_path / "m", quantize=mode)
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
                mode,
                "--quiet",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"

    corpus = tmp_path / "text.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    losses = {}
    for extra in ([], ["--quantize", mode]):
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
        main(["generate", *args, "--prompt", "Hi", "--quantize", "int3"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("mode", MODES)
def test_fixed_shape_decoding_of_a_quantized_model_equals_the_default(mode):
    from tests.generation.helpers import static_engine

    model = quantize_model(model_of(vocab=257, bias=False, tie=False), mode)  # static_engine's byte tokenizer
    prompts = [[1, 2, 3, 4], [7] * 11, [5, 9]]
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    fixed = [c.token_ids for c in static_engine(model).generate(prompts, cfg)]
    assert fixed == [c.token_ids for c in Engine(model).generate(prompts, cfg)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler (g++)")
@pytest.mark.parametrize("mode", MODES)
def test_compiled_decoding_of_a_quantized_model(mode):
    """int8 compiles its one-row steps through torch._int_mm (FBGEMM's packed weights are opaque to it)."""
    model = quantize_model(model_of(bias=False, tie=False), mode)
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7]] if mode == "int8" else [[1, 2, 3, 4], [7] * 11]  # int8: one row, FBGEMM's case
    compiled = [c.token_ids for c in Engine(model, compile=True).generate(prompts, cfg)]
    assert compiled == [c.token_ids for c in Engine(model).generate(prompts, cfg)]
