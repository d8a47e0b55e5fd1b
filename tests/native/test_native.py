"""scratchllm's own one-row CPU kernels (scratchllm/native) against PyTorch's products."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from scratchllm import native
from scratchllm.generation import fused as fused_routes
from scratchllm.generation import kernels
from scratchllm.model import quantize
from scratchllm.model.parts import GELU, RMSNorm
from scratchllm.model.quantize import (
    Int4Linear,
    Int8Linear,
    activation_qparams,
    int4_supported,
    quantize_activations,
    quantize_model,
)

pytestmark = pytest.mark.skipif(
    not native.available(),
    reason=f"scratchllm's kernels are not available here: {native.unavailable_reason()}",
)

# widths off the kernels' blocks (32 and 64 columns, 4 or 16 rows) as well as on them
SHAPES = [(768, 768), (7, 37), (130, 100), (5, 64), (2304, 96), (1, 1), (50, 160)]


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_few_rows_linear_is_the_linear_product(dtype, out_features, in_features, with_bias, portable):
    g = torch.Generator().manual_seed(out_features * 1000 + in_features)
    w = torch.randn(out_features, in_features, generator=g).to(dtype)
    x = torch.randn(1, 1, in_features, generator=g).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype) if with_bias else None
    got = native.few_rows_linear(x, w, b, portable)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (1, 1, out_features) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    else:  # fp32 sums, then one rounding to bf16: within one bf16 step of the exact value
        step = exact.abs().clamp(min=1e-3) * 2**-7
        assert ((got.double() - exact).abs() <= step).all()


@pytest.mark.parametrize(("dtype", "in_features"), [(torch.float32, 300), (torch.bfloat16, 320)])
def test_the_split_between_threads_does_not_change_a_sum(dtype, in_features):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, in_features, generator=g).to(dtype)  # bf16, 320 columns: AMX where there is AMX
    x = torch.randn(3, in_features, generator=g).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.few_rows_linear(x, w, None)
        torch.set_num_threads(max(2, threads))
        several = native.few_rows_linear(x, w, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, several)


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# 96 columns: whole tiles of 32 (AMX); 603, 512, 259: chunks of 256 columns, with a tail, whole, a tail alone
# (AVX2); 130 rows: 8 tiles of 16 and 2 more
@pytest.mark.parametrize("in_features", [100, 96, 603, 512, 259, 5])
def test_a_few_rows_get_each_rows_own_result(dtype, portable, in_features):
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(130, in_features, generator=g).to(dtype), torch.randn(130, generator=g).to(dtype)
    for rows in [*range(2, 9), 11, 20]:  # more than 8: passes of 8
        x = torch.randn(rows, in_features, generator=g).to(dtype)
        together = native.few_rows_linear(x, w, b, portable)
        assert together.shape == (rows, 130)
        for j in range(rows):  # bitwise: speculative checks and batches agree with decoding alone
            assert torch.equal(together[j], native.few_rows_linear(x[j : j + 1], w, b, portable)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_infinity_come_out_where_pytorchs_product_puts_them(dtype):
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(40, 64, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)
    x = torch.randn(3, 64, generator=g).to(dtype)
    x[0, 5], x[1, 7] = float("nan"), float("inf")
    got, want = native.few_rows_linear(x, w, b), F.linear(x.float(), w.float(), b.float()).to(dtype)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert got[2].isfinite().all()


def test_few_rows_linear_refuses_what_it_cannot_multiply():
    w = torch.randn(8, 16)
    for x in (torch.randn(24), torch.randn(16, 2).t()[0], torch.randn(16).bfloat16()):
        with pytest.raises(RuntimeError, match="few_rows_linear"):
            native.few_rows_linear(x, w, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        native.few_rows_linear(torch.randn(8), w.t(), None)


def _int8_layer(out_features: int, in_features: int, seed: int) -> Int8Linear:
    torch.manual_seed(seed)
    return Int8Linear(torch.nn.Linear(in_features, out_features))


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("reduce_range", [False, True])
def test_int8_one_row_is_int8linears_stated_product(out_features, in_features, reduce_range, portable):
    layer = _int8_layer(out_features, in_features, seed=in_features)
    g = torch.Generator().manual_seed(1)
    rows = [
        torch.randn(1, in_features, generator=g) * 3,
        torch.rand(1, in_features, generator=g) + 1,  # all positive: zero point at code 0
        torch.zeros(1, in_features),  # no range at all
        torch.full((1, in_features), -1e-7),  # narrower than 255 smallest steps: widened
    ]
    for x in rows:
        got = native.int8_rows_linear(
            x, layer.qweight, layer.scale, layer._row_sums, layer.bias, reduce_range, portable
        )
        stated = F.linear(quantize_activations(x, reduce_range), layer.weight_fp32(), layer.bias)
        step, _ = activation_qparams(x, reduce_range)
        # the same integer sums; a code may round the other way at an exact tie
        slack = 1e-5 + float(step) * layer.weight_fp32().abs().amax()
        torch.testing.assert_close(got, stated, rtol=1e-5, atol=slack)
        # a bf16 row (a bf16 model's activations): widened inside, the result rounded to bf16
        row = x.bfloat16()
        got = native.int8_rows_linear(
            row, layer.qweight, layer.scale, layer._row_sums, layer.bias, reduce_range, portable
        )
        want = native.int8_rows_linear(
            row.float(), layer.qweight, layer.scale, layer._row_sums, layer.bias, reduce_range, portable
        )
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize(("rows", "in_features"), [(2, 100), (8, 64), (11, 96), (3, 7)])
def test_int8_rows_each_get_their_own_codes_and_their_result_alone(rows, in_features, portable):
    layer = _int8_layer(130, in_features, seed=rows)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, in_features, generator=g) * 2
    x[0, 1] *= 40  # an outlier row coarsens its own codes only
    args = layer.qweight, layer.scale, layer._row_sums, layer.bias, False, portable
    got = native.int8_rows_linear(x, *args)
    assert got.shape == (1, rows, 130)
    for j in range(rows):
        assert torch.equal(got[0, j], native.int8_rows_linear(x[0, j : j + 1], *args)[0])
    stated = F.linear(quantize_activations(x), layer.weight_fp32(), layer.bias)
    slack = 1e-5 + float(activation_qparams(x)[0].max()) * layer.weight_fp32().abs().amax()
    torch.testing.assert_close(got, stated, rtol=1e-5, atol=slack)


def test_int8_layers_without_vnni_take_natives_kernel_for_several_rows(monkeypatch):
    layer = _int8_layer(130, 96, seed=5)
    if not native.vectorized("int8"):
        pytest.skip("native's int8 product runs the portable loops here")
    layer._native, layer._native_rows, layer.reduce_range = True, True, False  # as an AVX2 CPU sets them

    def no_int_mm(*args):
        raise AssertionError("several rows went to torch._int_mm")

    monkeypatch.setattr(layer, "_several_rows", no_int_mm)
    x = torch.randn(2, 5, 96)
    together = layer(x)
    alone = torch.stack([torch.cat([layer(row[None]) for row in seq]) for seq in x])
    assert torch.equal(together, alone)
    slack = 1e-5 + float(activation_qparams(x)[0].max()) * layer.weight_fp32().abs().amax()
    stated = F.linear(layer.kernel_input(x), layer.weight_fp32(), layer.bias)
    torch.testing.assert_close(together, stated, rtol=1e-5, atol=slack)


def test_bf16_weights_that_onednn_cannot_pack_take_natives_product_for_any_rows(monkeypatch):
    if not native.vectorized("bf16"):
        pytest.skip("native's bf16 product runs the portable loops here")
    # as on a CPU without bf16 instructions, whatever this one has
    monkeypatch.setattr(kernels, "packs", lambda dtype: False)
    monkeypatch.setattr(kernels, "one_row_kernel", lambda dtype: "native")
    monkeypatch.setattr(kernels, "few_rows_kernel", lambda dtype: "native")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 40)).bfloat16().eval()
    linears = kernels.PackedLinears(model)
    assert kernels.PackedLinears.supported(model) and linears.refresh()
    assert all(w is m.weight for w, m in zip(linears._packed, linears._linears))  # nothing packed
    product, rows_taken = native.few_rows_linear, []

    def counted(x, *args):
        rows_taken.append(x.numel() // x.shape[-1])
        return product(x, *args)

    monkeypatch.setattr(native, "few_rows_linear", counted)
    x = torch.randn(20, 64).bfloat16()
    with torch.inference_mode(), linears.installed():
        for rows in (1, 3, 20):  # one row, a few, more than 8: all native's, each row as alone
            rows_taken.clear()
            got = model(x[:rows])
            assert rows_taken == [rows, rows]
            assert all(torch.equal(got[j], model(x[j : j + 1])[0]) for j in range(rows))
        strided = model(x.t().contiguous().t())  # a non-contiguous input is copied, not refused
        assert torch.equal(strided, model(x))
    with torch.inference_mode():
        torch.testing.assert_close(got, model(x), rtol=2**-7, atol=1e-2)  # PyTorch's bf16 product


def test_int8_layers_take_the_kernel_for_one_row_and_match_fbgemm():
    layer = _int8_layer(300, 200, seed=3)
    chosen = layer._native
    if chosen:
        assert layer._packed is None and not layer.reduce_range  # no second copy of the weights
    else:  # no VNNI here, so FBGEMM's kernel was kept: the native (portable) route is forced instead
        assert native.instructions()["int8"] == "portable" and layer._packed is not None
        layer._native, layer.reduce_range = True, False
    x = torch.randn(1, 200) * 2
    got = layer(x)
    stated = F.linear(quantize_activations(x), layer.weight_fp32(), layer.bias)
    torch.testing.assert_close(got, stated, rtol=1e-5, atol=1e-5)
    # FBGEMM's kernel takes 8-bit codes only with VNNI (7 bits without)
    if chosen and "fbgemm" in torch.backends.quantized.supported_engines and quantize._has_vnni():
        from scratchllm.model.quantize import _fbgemm_pack

        fbgemm = torch.ops.quantized.linear_dynamic(
            x, _fbgemm_pack(layer.qweight, layer.scale, layer.bias), False
        )
        torch.testing.assert_close(got, fbgemm, rtol=1e-5, atol=1e-5)


def test_instructions_name_each_kernels_path():
    paths = native.instructions()
    assert set(paths) == {"fp32", "bf16", "int8", "int4"}
    assert paths["fp32"] in ("avx512", "avx2", "portable")
    assert paths["int8"] in ("avx512vnni", "avx2", "portable")
    assert paths["bf16"] in ("amx", "avx512bf16", "avx2", "portable")
    assert paths["int4"] in ("avx512bf16", "avx2", "portable")
    assert paths["int4"] == ("avx512bf16" if paths["bf16"] == "amx" else paths["bf16"])


def test_the_switch_keeps_pytorchs_kernels():
    code = (
        "from scratchllm import native; import torch; from scratchllm.model.quantize import Int8Linear\n"
        "print(native.available(), native.unavailable_reason())\n"
        "print(Int8Linear(torch.nn.Linear(8, 4))._native)"
    )
    env = {**os.environ, native.ENV_SWITCH: "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [f"False turned off by {native.ENV_SWITCH}=0", "False"]


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize(
    ("out_features", "in_features", "group_size"),
    [(768, 768, 128), (7, 256, 64), (130, 96, 32), (9, 512, 256)],
)
def test_int4_one_row_is_int4linears_stated_product(out_features, in_features, group_size, portable):
    if not int4_supported():
        pytest.skip("this PyTorch has no int4 CPU kernel")
    torch.manual_seed(group_size)
    layer = Int4Linear(torch.nn.Linear(in_features, out_features), group_size)
    fast = native.instructions()["int4"] != "portable" and group_size >= 64
    assert layer.group_size == group_size and layer._native == fast
    x = torch.randn(1, 1, in_features)
    got = native.int4_one_row_linear(x, layer.qweight, layer.step, layer.zero, group_size, portable)
    x_in, w = layer.kernel_input(x).double(), layer.weight_fp32().double()
    exact = F.linear(x_in, w)
    assert got.shape == (1, 1, out_features) and got.dtype == torch.bfloat16
    step = exact.abs().clamp(min=1e-3) * 2**-7  # fp32 sums, then one rounding to bf16
    if not portable and native.instructions()["int4"] == "avx2":  # x rounded to 16 bits over its range first
        step = step + w.abs().sum(1) * x_in.abs().max() / 65534
    assert ((got.double() - exact).abs() <= step).all()
    # the layer takes it for one row (forced where it would not: portable loops, small groups);
    # PyTorch's kernel for several, on the same numbers
    layer._native = True
    one = layer(x)
    several = layer(x.expand(1, 3, in_features))
    torch.testing.assert_close(one.expand(1, 3, out_features), several, rtol=2**-7, atol=1e-3)


def test_int4_carries_nan_and_infinity_through():
    if not int4_supported():
        pytest.skip("this PyTorch has no int4 CPU kernel")
    torch.manual_seed(0)
    layer = Int4Linear(torch.nn.Linear(256, 8), 64)
    x = torch.randn(3, 256)
    x[0, 3], x[1, 7] = float("nan"), float("inf")  # AVX2 rounds x to 16 bits only where it is finite
    got = [native.int4_one_row_linear(row, layer.qweight, layer.step, layer.zero, 64) for row in x]
    assert got[0].isnan().all() and not got[1].isfinite().any() and got[2].isfinite().all()


def test_without_a_compiler_pytorchs_kernels_remain(tmp_path):
    code = (
        "from scratchllm import native; import torch; from scratchllm.model.quantize import Int8Linear\n"
        "print(native.available()); print(native.unavailable_reason())\n"
        "layer = Int8Linear(torch.nn.Linear(8, 4)); x = torch.randn(1, 8)\n"
        "print(layer._native, torch.allclose(layer(x), torch.nn.functional.linear(layer.kernel_input(x), "
        "layer.weight_fp32(), layer.bias), atol=1e-5))"
    )
    env = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop(native.ENV_SWITCH, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    available, reason, layer = out.stdout.splitlines()
    assert available == "False" and reason.startswith("the C++ kernels did not build")
    assert layer == "False True"
    assert "building scratchllm's CPU kernels" in out.stderr  # said once, before trying


@pytest.mark.skipif(
    native.available() and native.instructions()["fp32"] != "avx512",
    reason="this CPU's own build runs the AVX2 paths (or has neither)",
)
def test_the_avx2_paths_pass_these_tests_where_the_cpu_has_avx512(tmp_path):
    """The kernels built for x86-64-v3 (AVX2 and FMA, no AVX-512), run on this CPU through this
    directory's tests: CI machines with AVX-512 check the paths of the ones without."""
    env = {**os.environ, native.ARCH_ENV: "x86-64-v3", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop(native.ENV_SWITCH, None)
    code = "from scratchllm import native; assert native.available(); print(native.instructions())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(dict.fromkeys(("fp32", "bf16", "int8", "int4"), "avx2"))
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.dirname(__file__)]
    run = subprocess.run(tests, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_is_the_modules_forward(dtype, unit_offset):
    torch.manual_seed(int(unit_offset))
    norm = RMSNorm(96, eps=1e-6, unit_offset=unit_offset)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96) * 0.3 + (0.0 if unit_offset else 1.0))
    norm = norm.to(dtype)
    x = (torch.randn(1, 16, 1, 96) * 3).to(dtype)  # QK-norm's 16 heads of one decode step
    with torch.inference_mode():
        got, want = native.rms_norm(x, norm.weight, norm.eps, unit_offset), norm(x)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.bfloat16:  # the same roundings, the squares summed in another order
        assert (got == want).float().mean() > 0.99
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0.0)
    else:  # the sum of squares in another order
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_decode_steps_take_the_fused_norm_and_keep_the_tokens(monkeypatch, arch):
    from scratchllm.generation import Engine, GenerationConfig
    from scratchllm.model import registry
    from tests.generation.helpers import ByteTokenizer

    cfg = registry.preset_config("nano", arch, vocab_size=256, context_length=64)
    model = registry.build_model(cfg).eval().to(torch.bfloat16)
    calls: list[int] = []
    fused = native.rms_norm

    def counting(x, weight, eps, unit_offset=False):
        calls.append(x.numel() // x.shape[-1])
        return fused(x, weight, eps, unit_offset)

    monkeypatch.setattr(native, "rms_norm", counting)
    # the layers in one call (test_layers.py) would take the blocks' norms past this counter
    monkeypatch.setattr(fused_routes, "transformer_model_forward", lambda model: None)
    prompts, settings = [[5, 9, 14, 2, 7, 30, 1]], GenerationConfig(max_new_tokens=12, ignore_eos=True)
    packed = Engine(model, ByteTokenizer()).generate(prompts, settings)
    assert calls and max(calls) <= 64  # decode steps' rows (tokens, or heads under QK-norm)
    assert all("forward" not in m.__dict__ for m in model.modules())  # restored afterwards
    plain = Engine(model, ByteTokenizer(), prepack=False).generate(prompts, settings)
    assert [c.token_ids for c in packed] == [c.token_ids for c in plain]
    # int8 weights leave no plain linear layer to pack; the norms still take the fused kernel
    quantize_model(model.float(), "int8")
    calls.clear()
    engine = Engine(model, ByteTokenizer())
    assert engine.kernels is not None
    packed = engine.generate(prompts, settings)
    assert calls and [c.token_ids for c in packed] == [
        c.token_ids for c in Engine(model, ByteTokenizer(), prepack=False).generate(prompts, settings)
    ]


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_tanh_is_the_modules_gelu_with_each_value_on_its_own(dtype, portable):
    """The vector path of this CPU and the portable loop (what CPUs without AVX2 run) alike."""
    torch.manual_seed(2)
    x = (torch.randn(5, 3 * 16 + 5) * 4).to(dtype)  # rows that end inside a vector block
    x[0, :6] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, -30.0])
    got, want = native.gelu_tanh(x, portable), GELU()(x)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got[0, :6], want[0, :6], equal_nan=True)
    exact = GELU()(x.double())[:, 6:]
    if dtype == torch.bfloat16:  # rounded from nearly the exact value (PyTorch's bf16 GELU rounds more often)
        assert (got[:, 6:] == exact.to(dtype)).float().mean() > 0.95
        torch.testing.assert_close(got[:, 6:].double(), exact, rtol=2**-7, atol=1e-6)
    else:
        torch.testing.assert_close(got[:, 6:].double(), exact, rtol=1e-6, atol=1e-6)
    # a value's result does not depend on where it sits: rows alone, and shifted by one place
    assert all(torch.equal(native.gelu_tanh(x[i : i + 1], portable), got[i : i + 1]) for i in range(1, 5))
    assert torch.equal(native.gelu_tanh(x[1:, 1:].contiguous(), portable), got[1:, 1:])


def test_installed_gelus_take_the_native_kernel_and_keep_their_gradient():
    from scratchllm.generation import PackedLinears
    from scratchllm.model import registry

    cfg = registry.preset_config("nano", "gpt2", vocab_size=256, context_length=64)
    model = registry.build_model(cfg).eval()
    exact = registry.build_model(cfg.replace(gelu="exact")).eval()
    routes, exact_routes = PackedLinears(model), PackedLinears(exact)
    assert routes.refresh() and exact_routes.refresh()
    gelus = [m for m in model.modules() if type(m) is GELU]
    assert gelus and all(routes.fuses(m) for m in gelus)
    assert not any(exact_routes.fuses(m) for m in exact.modules() if type(m) is GELU)  # the erf form
    x = torch.randn(3, 40, requires_grad=True)
    with routes.installed():
        with torch.inference_mode():
            assert torch.equal(gelus[0](x.detach()), native.gelu_tanh(x.detach()))
        y = gelus[0](x)  # training: PyTorch's, with its gradient
        y.sum().backward()
    assert y.grad_fn is not None and x.grad is not None
