"""Weight quantization for faster decoding on CPUs: int8 and int4 weights.

Decoding one token multiplies one activation row by every weight matrix, so its speed is how fast
the weights stream through the CPU: 4 bytes per weight in fp32, 2 in bf16, 1 in int8, half a byte in
int4. Both modes replace every linear layer by one that keeps its weights as small integers plus a few
floating-point numbers that say what the integers stand for.

**int8** (`Int8Linear`): symmetric, one scale per output channel (row of the weight matrix):

    w  ~=  q * scale        scale = max |w| of the row / 127,   q = round(w / scale) in -127..127

so each weight is off by at most half a step, and a row's largest weight sets its step. The product
runs in integers, as CPUs' int8 dot-product instructions (AVX-512 VNNI, AMX) do it: the activations are
quantized on the fly too, each token's row to 8 bits over its own range (dynamic quantization:
min(row, 0)..max(row, 0) onto codes 0..255 with one step and one zero point per row, so that one
token's outlier does not coarsen the others), and the int32 sums are scaled back to floating point.
`F.linear(kernel_input(x), weight_fp32(), bias)` states the numbers. One row (decoding one sequence) runs
on scratchllm's own kernel (scratchllm/native) where it has vector instructions for it (AVX-512 VNNI's u8
x s8 dot products, or AVX2) or where PyTorch has no FBGEMM, and elsewhere on FBGEMM's packed weights
(`quantized::linear_dynamic`, the kernel of PyTorch's `quantize_dynamic`); several rows (a prompt, a
batch) on one int8 x int8 product (`torch._int_mm`, oneDNN) with each row's zero point taken out
afterwards; all sum the same integers (without any, a plain fp32 product computes the stated numbers).
Where FBGEMM runs on an x86 CPU without VNNI the activations get 7 bits (`reduce_range`): its older
instructions would overflow 16-bit sums of 8-bit products. oneDNN's int8 product is slow without VNNI, so
there several rows take scratchllm's kernel too (with AVX2 it reads each weight once per 8 rows).

**int4** (`Int4Linear`): group-wise affine quantization stores each run of `group_size` consecutive
input weights of an output row as 4-bit integers q in 0..15 plus two numbers for the group, a step and
a zero:

    w  ~=  zero + (q - 8) * step       step = (max - min) / 15,  zero = min + 8 * step
                                       q = round((w - zero) / step) + 8

that is, code 0 stands for the group's minimum and code 15 for its maximum, so every weight is off by
at most half a step, and a group's range, not the whole matrix's, sets the step. (`zero`, the value
of the middle code, is the form PyTorch's kernel takes.) Step and zero are stored in bf16, and the
codes are chosen against the rounded values; for a narrow group far from zero (say 100.3 +- 0.01)
bf16's 8 bits of `zero` are coarser than the step, and the error is bf16's, not half a step.
Activations stay in floating point (weight-only quantization); the model computes as before with
slightly different weights.

`Int4Linear` keeps the codes readable (two per byte, `qweight`). One row goes to scratchllm's own kernel
(scratchllm/native), which reads them as they are, where it uses AVX-512 BF16 (groups of 64 or more);
several rows, or one elsewhere, go to PyTorch's CPU kernel for int4 weights
(`aten._weight_int4pack_mm_for_cpu`, the kernel torchao's int4 CPU layout uses), which reads its own
packing of the codes. Both take bf16 activations and round the result to bf16. For one row int4 beats
fp32 by reading an eighth of the bytes (benchmarks/RESULTS.md, "Generation"), but PyTorch's kernel's
cost grows with every row: from `DEQUANTIZE_ROWS` rows on (long prompts, evaluations) the layer
instead dequantizes its weights block by block and runs one fp32 matrix product.

    quantize_model(model, "int8")        # every nn.Linear (and the tied head) -> Int8Linear, in place
    Engine(model, tokenizer).generate(...)

Quantized models are for inference: they cannot be trained, saved or moved off the CPU.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import native
from ..errors import ScratchLLMError

#: Group sizes the int4 CPU kernel accepts, largest first.
GROUP_SIZES = (256, 128, 64, 32)
#: The default group size: GPT-2's widths (768, 1024, 1280, 3072, ...) divide by it, except 1600
#: (gpt2-xl), whose layers fall back to 64.
DEFAULT_GROUP_SIZE = 128
QUANTIZE_MODES = ("int8", "int4")
#: From this many input rows on, `Int4Linear` dequantizes and runs one fp32 GEMM instead of the int4
#: kernel, whose cost grows with every row (benchmarks/RESULTS.md, "Generation").
DEQUANTIZE_ROWS = 128
#: Rows of weights dequantized at a time (256 x 3072 fp32 = 3 MB of temporaries).
DEQUANTIZE_BLOCK = 256
#: The smallest step of int8 activation codes (PyTorch's `SMALL_SCALE_THRESHOLD`): narrower rows are widened.
MIN_ACTIVATION_STEP = 6.1e-5


def int4_supported() -> bool:
    """True when this PyTorch build has the int4 CPU kernel."""
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def group_size_for(in_features: int, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """The largest kernel group size <= `group_size` that divides `in_features`."""
    if group_size not in GROUP_SIZES:
        raise ScratchLLMError(
            f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}"
        )
    for g in GROUP_SIZES:
        if g <= group_size and in_features % g == 0:
            return g
    raise ScratchLLMError(
        f"int4 quantization needs layer input widths divisible by 32, got {in_features}; "
        "use a model whose emb_dim is a multiple of 32, or run it unquantized"
    )


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8, values 0..15, same shape as `weight`), steps and zeros (bf16, one per group:
    shape (out, in // group_size)). Step and zero are rounded to bf16 first, as the kernel stores
    them, and the codes chosen against the rounded values."""
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    step = ((hi - lo) / 15).clamp(min=1e-8).bfloat16()
    zero = (lo + 8 * step.float()).bfloat16()
    q = torch.round((groups - zero.float()[..., None]) / step.float()[..., None]).add_(8).clamp_(0, 15)
    return q.to(torch.uint8).reshape(out_features, in_features), step, zero


def dequantize_int4(q: torch.Tensor, step: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The fp32 weights that codes, steps and zeros stand for: zero + (q - 8) * step."""
    out_features, in_features = q.shape
    groups = q.float().reshape(out_features, step.shape[-1], -1) - 8
    return (zero.float()[..., None] + groups * step.float()[..., None]).reshape(out_features, in_features)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: column 2j in the low half, 2j + 1 in the high half."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The codes `pack_nibbles` packed, one per byte again."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


class QuantizedLinear(nn.Module):
    """What the quantized layers share: their shape, a floating-point bias, and the numbers they compute
    with: `F.linear(kernel_input(x), weight_fp32(), bias)` is what the layer computes, up to the order
    of summation (the loss uses that form, without the full logits: model/loss.py)."""

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def weight_fp32(self) -> torch.Tensor:
        """The weights this layer stands for, in fp32."""
        raise NotImplementedError

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in fp32, rounded as the layer's kernel rounds its activations."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def int8_kernel_supported() -> bool:
    """True when this PyTorch build has FBGEMM's dynamic quantized linear (x86 builds); elsewhere
    `Int8Linear` runs one row the way it runs several."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_dynamic"
    )


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8, -127..127, same shape as `weight`) and scales (fp32, one per output row), with
    w ~= q * scale and scale = the row's largest |w| / 127."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


def activation_qparams(x: torch.Tensor, reduce_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `x` (..., in), the step (fp32) and the zero point (the code that stands for 0) of its
    8-bit codes: min(row, 0)..max(row, 0) onto codes 0..255 (0..127 with `reduce_range`), chosen as
    PyTorch's `ChooseQuantizationParams` chooses them for FBGEMM (a range narrower than 255 small
    steps is widened; the zero point is the one whose rounding loses less of the range)."""
    qmax = 127 if reduce_range else 255
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0).double()
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0).double()
    scale = (hi - lo) / qmax
    single = scale.float()
    scale = torch.where((single == 0) | single.reciprocal().isinf(), 0.1, scale)
    small = scale < MIN_ACTIVATION_STEP
    if torch.compiler.is_compiling() or bool(small.any()):  # rare; a compiled graph has no data-dependent if
        widen = MIN_ACTIVATION_STEP / scale
        lo, hi = (
            torch.where(small, torch.where(hi == 0, -MIN_ACTIVATION_STEP * qmax, lo * widen), lo),
            torch.where(small, torch.where(lo == 0, MIN_ACTIVATION_STEP * qmax, hi * widen), hi),
        )
        scale = scale.clamp(min=MIN_ACTIVATION_STEP)
    below, above = lo / scale, hi / scale
    from_min = -below.abs() < qmax - above.abs()  # that zero point loses less of the range to rounding
    zero = torch.where(from_min, -below, qmax - above).round().clamp(0, qmax)
    return scale.float(), zero.float()


def activation_codes(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, reduce_range: bool, offset: int = 0
) -> torch.Tensor:
    """The 8-bit codes of `x` under `activation_qparams`, minus `offset`, as fp32 values."""
    qmax = 127 if reduce_range else 255
    return torch.addcmul(zero - offset, x, scale.reciprocal()).round_().clamp_(-offset, qmax - offset)


def quantize_activations(x: torch.Tensor, reduce_range: bool = False) -> torch.Tensor:
    """`x` rounded as `Int8Linear` rounds its input (fp32): each row to its own 256 levels (128 with
    `reduce_range`) spanning min(row, 0)..max(row, 0), zero exactly representable."""
    scale, zero = activation_qparams(x, reduce_range)
    return (activation_codes(x, scale, zero, reduce_range) - zero) * scale


class Int8Linear(QuantizedLinear):
    """A linear layer with int8 weights (one scale per output channel) and a floating-point bias;
    the product runs in int8 on dynamically quantized activations (module docstring)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        check_quantize("int8", linear.weight.device)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )
        self.register_buffer("_row_sums", q.sum(dim=1, dtype=torch.int32), persistent=False)
        self._native = native.vectorized("int8") or (native.available() and not int8_kernel_supported())
        fbgemm = int8_kernel_supported() and not self._native
        self._packed = _fbgemm_pack(q, scale, self.bias) if fbgemm else None
        # FBGEMM on x86 without VNNI sums pairs of u8 x s8 products in 16 bits, which 8-bit inputs overflow
        self.reduce_range = self._packed is not None and not _has_vnni()
        # several rows too: oneDNN's int8 product is slow without VNNI
        self._native_rows = native.vectorized("int8") and not _has_vnni()

    def weight_fp32(self) -> torch.Tensor:
        return self.qweight * self.scale[:, None]  # one pass: a separate .float() copies slowly

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_activations(x, self.reduce_range).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ScratchLLMError(f"int8 layers run on CPUs only, got an input on {x.device.type}")
        rows = x.reshape(-1, self.in_features)
        # one sequence: scratchllm's kernel or FBGEMM's (torch.compile traces neither)
        one_row = len(rows) == 1 and not torch.compiler.is_compiling()
        if one_row and self._native:
            y = native.int8_rows_linear(rows, self.qweight, self.scale, self._row_sums, self.bias)
        elif one_row and self._packed is not None:
            y = torch.ops.quantized.linear_dynamic(rows.float(), self._packed, self.reduce_range)
        elif self._native_rows and not torch.compiler.is_compiling():
            y = native.int8_rows_linear(rows, self.qweight, self.scale, self._row_sums, self.bias)
        elif hasattr(torch, "_int_mm"):
            y = self._several_rows(rows, x.dtype)
        else:
            y = F.linear(self.kernel_input(rows), self.weight_fp32(), _float(self.bias))
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _several_rows(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Several rows (FBGEMM would quantize them together): each row's own codes, one int8 x int8
        matrix product with int32 sums (oneDNN), then the zero points taken out and the scales applied;
        the result in `dtype`."""
        scale, zero = activation_qparams(rows, self.reduce_range)
        offset = 0 if self.reduce_range else 128  # codes 0..255 -> -128..127, which int8 holds
        codes = activation_codes(rows, scale, zero, self.reduce_range, offset).to(torch.int8)
        sums = torch._int_mm(codes, self.qweight.t())
        sums.addr_((zero - offset).flatten().to(torch.int32), self._row_sums, alpha=-1)
        y = sums.float().mul_(scale)
        out = torch.empty(y.shape, dtype=dtype)
        if self.bias is None:
            return torch.mul(y, self.scale, out=out)
        return torch.addcmul(self.bias, y, self.scale, out=out)


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _has_vnni() -> bool:
    """The CPU has int8 dot-product instructions (AVX-512 VNNI or AVX-VNNI)."""
    check = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(check()) if check is not None else False


def _fbgemm_pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.ScriptObject:
    """The codes and scales in FBGEMM's packed layout (with the bias, added in the kernel)."""
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch deprecates quantized tensors; this is the one use
            zero = torch.zeros(len(scale), dtype=torch.long)
            weight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
            return torch.ops.quantized.linear_prepack(weight, _float(bias))
    finally:
        torch.backends.quantized.engine = previous


class Int4Linear(QuantizedLinear):
    """A linear layer with int4 weights (group-wise steps and zeros) and a floating-point bias."""

    def __init__(self, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__()
        check_quantize("int4", linear.weight.device)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = group_size_for(self.in_features, group_size)
        q, step, zero = quantize_int4(linear.weight, self.group_size)
        self.register_buffer("qweight", pack_nibbles(q))
        self.register_buffer("step", step)
        self.register_buffer("zero", zero)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )
        self._native = native.vectorized("int4") and self.group_size >= 64
        # PyTorch's kernel's layout: rows padded to a multiple of 16, steps and zeros as (groups, out, 2)
        pad = -self.out_features % 16
        q = F.pad(q, (0, 0, 0, pad)).to(torch.int32)
        steps_zeros = torch.stack((step, zero), dim=-1).transpose(0, 1)
        self.register_buffer(
            "_kernel_weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False
        )
        self.register_buffer(
            "_kernel_scales", F.pad(steps_zeros, (0, 0, 0, pad)).bfloat16().contiguous(), persistent=False
        )

    def weight_fp32(self) -> torch.Tensor:
        """The weights this layer stands for, in fp32. Dequantized in blocks of rows whose
        temporaries stay in the CPU's caches (faster than the whole matrix at once)."""
        out = torch.empty(self.out_features, self.in_features)
        for start in range(0, self.out_features, DEQUANTIZE_BLOCK):
            end = min(start + DEQUANTIZE_BLOCK, self.out_features)
            q = unpack_nibbles(self.qweight[start:end])
            out[start:end] = dequantize_int4(q, self.step[start:end], self.zero[start:end])
        return out

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.bfloat16().float()  # the kernel takes bf16 activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ScratchLLMError(f"int4 layers run on CPUs only, got an input on {x.device.type}")
        # a slice of a bf16 batch (the last position of each row) is a view the kernel refuses
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if len(rows) == 1 and self._native and not torch.compiler.is_compiling():
            y = native.int4_one_row_linear(rows, self.qweight, self.step, self.zero, self.group_size)
        elif rows.shape[0] < DEQUANTIZE_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows, self._kernel_weight, self.group_size, self._kernel_scales
            )
            if y.shape[-1] != self.out_features:
                y = y[:, : self.out_features]
        else:
            # the kernel's cost grows with every row; for many rows (a long prompt, an evaluation)
            # one fp32 GEMM on the same dequantized weights is faster, with the kernel's roundings
            # (bf16 activations in, bf16 out): the two paths differ only in summation order
            y = F.linear(rows.float(), self.weight_fp32()).bfloat16()
        y = y.reshape(*x.shape[:-1], self.out_features)
        return (torch.add(self.bias, y) if self.bias is not None else y).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def check_quantize(mode: str, device: torch.device | str = "cpu") -> None:
    """Raise a one-line error unless `mode` is known, this PyTorch has its kernel and `device` is a CPU."""
    if mode not in QUANTIZE_MODES:
        raise ScratchLLMError(f"unknown quantization {mode!r}; choose one of: {', '.join(QUANTIZE_MODES)}")
    if mode == "int4" and not int4_supported():
        raise ScratchLLMError(
            f"this PyTorch ({torch.__version__}) lacks the int4 CPU kernel; "
            "upgrade torch (2.6 or newer), use --quantize int8 or run the model unquantized"
        )
    if torch.device(device).type != "cpu":
        raise ScratchLLMError(
            f"{mode} quantization runs on CPUs only, not on {torch.device(device).type}; "
            "add --device cpu, or leave quantization out on a GPU"
        )


def quantize_model(model: nn.Module, mode: str = "int4", group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Replace every `nn.Linear` of `model` (the attention and feed-forward projections and the
    output head, tied or not) by an `Int8Linear` or `Int4Linear` (`mode` "int8" or "int4"; int4 in
    groups of `group_size`), in place; returns the model, in eval mode, its remaining parameters
    frozen. Embeddings, norms and a mixture of experts' router (its small scores pick the experts)
    stay in floating point. Merge LoRA adapters first (`merge_lora`)."""
    first = next(model.parameters(), None)
    check_quantize(mode, first.device if first is not None else "cpu")
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    if any(isinstance(child, nn.Linear) and type(child) is not nn.Linear for _, _, child in linears):
        raise ScratchLLMError("quantization: the model has LoRA adapters; merge them first (merge_lora)")
    for parent, name, child in linears:
        if type(child) is nn.Linear and name != "router":
            layer = Int8Linear(child) if mode == "int8" else Int4Linear(child, group_size)
            setattr(parent, name, layer)
    model.eval().requires_grad_(False)
    return model


def is_quantized(model: nn.Module) -> bool:
    """The model has quantized (int8 or int4) layers."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())
