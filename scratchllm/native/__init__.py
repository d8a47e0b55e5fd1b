"""Hand-written CPU kernels (C++: `gemv.cpp`, `decode.cpp`), compiled for this CPU the first time
they are needed.

Decoding one sequence multiplies one activation row by every weight matrix, so it runs at the speed the
weights stream from memory, and PyTorch's own one-row kernels read bf16, int8 and int4 weights well
below that speed (benchmarks/RESULTS.md). These do the product the plain way: four weight rows per
pass over the input while the next four are prefetched, the rows split between PyTorch's threads, on
the instructions made for each weight type where the CPU has them (`instructions()`):
`few_rows_linear` for fp32 and bf16 weights (one row, or up to 8), `int8_rows_linear` and
`int4_one_row_linear` for the layers of model/quantize.py. The rest of a decode step is little
arithmetic in many small eager operations, each costing more to call than to compute: `rms_norm` does
an RMSNorm in one call instead of ten, `decode_attention` a new token's attention (QK-norm, RoPE, the
cache write and the attention itself) in one instead of about twenty-five, and `gpt_layers` and
`transformer_layers` all of a model's blocks for a step in one call instead of a dozen per block.

The source is built once per CPU, PyTorch version and source text with `-march=native` (or the
`-march` in `SCRATCHLLM_NATIVE_ARCH`) into PyTorch's
extension cache (`~/.cache/torch_extensions`, or `TORCH_EXTENSIONS_DIR`), which takes a C++ compiler and
ninja. Without them, or with `SCRATCHLLM_NATIVE=0`, `available()` is False (`unavailable_reason()` says
why) and callers keep PyTorch's kernels.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import threading
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = [HERE / "gemv.cpp", HERE / "decode.cpp", HERE / "layers.cpp"]  # and the header they share, bf16.h
# OpenMP: at::parallel_for is inline, and splits work only where the including code has it; no
# contraction into fused multiply-adds, so that elementwise steps round as PyTorch's do
#: The CPU the kernels are built for: this one unless set, e.g. to x86-64-v3 (AVX2) for an older one.
ARCH_ENV = "SCRATCHLLM_NATIVE_ARCH"
CFLAGS = ["-O3", f"-march={os.environ.get(ARCH_ENV) or 'native'}", "-fopenmp", "-ffp-contract=off"]
#: The linear layers the layers calls take, by kind number: their 4 tensors (int8 and int4: one row only).
LINEAR_KINDS = {
    0: "plain: weight, bias (few_rows_linear)",
    1: "int8: codes, scale, row sums, bias (int8_rows_linear)",
    2: "int4: codes, step, zero, none; a group size (int4_one_row_linear)",
}
#: Set to 0 to keep PyTorch's kernels (comparisons, or a machine whose compiler misbehaves).
ENV_SWITCH = "SCRATCHLLM_NATIVE"
_lock = threading.Lock()
_reason: list[str] = []


def available() -> bool:
    """True when the kernels are built and loaded (building them on the first call, ~15 s)."""
    with _lock:
        return _load()


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True or was not asked yet)."""
    return _reason[0] if _reason else None


def few_rows_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, portable: bool = False
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for an `x` holding contiguous rows, fp32 or bf16 like `weight` (contiguous,
    CPU), summed in fp32; each weight row is read once for up to 8 of them (more rows take passes of 8), and
    each row's result is bitwise the one it gets alone. `portable`: the plain loops even where the CPU has
    faster instructions (`instructions()`). Call `available()` first."""
    return torch.ops.scratchllm.few_rows_linear(x, weight, bias, portable)


def int8_rows_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    row_sums: torch.Tensor,
    bias: torch.Tensor | None,
    reduce_range: bool = False,
    portable: bool = False,
) -> torch.Tensor:
    """`Int8Linear`'s product (model/quantize.py) for an `x` holding one or more rows: each row quantized
    to 8-bit codes as `quantize_activations` does, exact int32 sums against the int8 weights `qweight`
    (N, K) (`row_sums`: each weight row's sum, int32), scaled by the row's step and `scale` (one per
    output), plus `bias`; each row's result is the one it gets alone. The result in bf16 for a bf16 `x`,
    else fp32. Several rows read each weight once per 8 rows with AVX2, once per row otherwise (where
    oneDNN's int8 product is the one for several). Call `available()` first."""
    return torch.ops.scratchllm.int8_rows_linear(x, qweight, scale, row_sums, bias, reduce_range, portable)


def int4_one_row_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    step: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    portable: bool = False,
) -> torch.Tensor:
    """`Int4Linear`'s product (model/quantize.py) for an `x` holding one row: x rounded to bf16, the
    weights zero + (q - 8) * step from two 4-bit codes per byte of `qweight` (N, K / 2) and a bf16 step
    and zero per `group_size` columns (N, K / group_size), fp32 sums, a bf16 result (no bias).
    Call `available()` first."""
    return torch.ops.scratchllm.int4_one_row_linear(x, qweight, step, zero, group_size, portable)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """`RMSNorm`'s forward (model/parts.py) in one call, for the few rows of a decode step: x and
    weight contiguous and of one type, fp32 or bf16. Call `available()` first."""
    return torch.ops.scratchllm.rms_norm(x, weight, eps, unit_offset)


def gelu_tanh(x: torch.Tensor, portable: bool = False) -> torch.Tensor:
    """GPT-2's tanh GELU (`GELU()` of model/parts.py) of a contiguous fp32 or bf16 `x`, vectorized: each
    value's result the same wherever it sits (within a few fp32 steps of `F.gelu`'s). `portable`: the
    plain loop (std::exp) even where the CPU has vector instructions. Call `available()` first."""
    return torch.ops.scratchllm.gelu_tanh(x, portable)


def gpt_layers(
    x: torch.Tensor,
    params: list[torch.Tensor | None],
    kinds: list[int],
    groups: list[int],
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    pos: int,
    n_heads: int,
    eps: float,
    gelu: str,
    scale: float,
    positions: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """GPT-2's blocks (model/gpt.py, eval mode) over a decode step's few new tokens `x` (batch, tokens,
    emb_dim), in one call: per layer, `x + out_proj(attention(qkv(norm1(x))))`, then
    `x + fc2(gelu(fc1(norm2(x))))`, with the products of the linear layers' routes and
    `decode_attention` (no RoPE or QK-norm; `pos`, `positions`, `slots` and `scale` as it takes them),
    so the result equals those routes' bit for bit. `params`: 20 per layer (norm1 scale, shift; norm2
    scale, shift; then qkv, out_proj, fc1 and fc2, 4 each as `LINEAR_KINDS` lists them, with their
    kind and int4 group size in `kinds` and `groups`, 4 per layer); `gelu`: F.gelu's `approximate`
    ("tanh" or "none"); one key and value cache per layer. Call `available()` first."""
    return torch.ops.scratchllm.gpt_layers(
        x, params, kinds, groups, k_caches, v_caches, pos, n_heads, eps, gelu, scale, positions, slots
    )


def gpt_greedy_proposals(
    ids: torch.Tensor,
    embeddings: tuple[torch.Tensor, torch.Tensor],
    layers: tuple,
    final_norm: tuple[torch.Tensor, torch.Tensor, float],
    head: tuple[torch.Tensor, torch.Tensor | None],
    k: int,
    confidence: float,
) -> torch.Tensor:
    """A GPT-2 draft's greedy proposals in one call: `ids` (1, T) fed through the token and position
    `embeddings` (from the caches' position) and `gpt_layers` (`layers`: its arguments after x, from
    `params` to `scale`, without `positions` and `slots`), then up to `k` times the most likely next token
    after the `final_norm` (scale, shift, eps) and the `head` (weight, bias; its product
    `few_rows_linear`), stopping where its probability is below `confidence` (0: never), each kept one
    fed in turn. Returns the proposals (int64); the caches then hold T more tokens and every proposal but
    a k-th (the caller advances its position). Call `available()` first."""
    return torch.ops.scratchllm.gpt_greedy_proposals(
        ids, *embeddings, *layers, *final_norm, *head, k, confidence
    )


def transformer_layers(
    x: torch.Tensor,
    params: list[torch.Tensor | None],
    kinds: list[int],
    groups: list[int],
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    pos: int,
    n_heads: int,
    n_kv_heads: int,
    eps: float,
    unit_offset: bool,
    scale: float,
    act: str,
    ropes: list[torch.Tensor | None],
    windows: list[int],
    rings: list[int],
    positions: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """model/transformer.py's blocks with a gated MLP (Llama 3, Qwen3, Gemma 3; eval mode) over a decode
    step's few new tokens `x`, in one call, through `rms_norm`, the linear layers' products and
    `decode_attention` as their routes run them (the same result, bit for bit). `params`: 26 per layer
    (the weights of norm1, q_norm, k_norm, post_att_norm, norm2, post_ff_norm, None where the model has
    none; then qkv, out_proj, gate, up and down, 4 each as `LINEAR_KINDS` lists them, with `kinds` and
    `groups` 5 per layer); every RMSNorm has `eps` and `unit_offset`; `act`: "silu" or "gelu_tanh";
    `ropes`: the full layers' cos and sin tables for the new positions, then the sliding layers'; per
    layer its sliding window (0: none) and whether its cache is a ring (`rings`). Call `available()`
    first."""
    return torch.ops.scratchllm.transformer_layers(
        x, params, kinds, groups, k_caches, v_caches, pos, n_heads, n_kv_heads, eps, unit_offset, scale,
        act, ropes, windows, rings, positions, slots,
    )  # fmt: skip


def decode_attention(
    qkv: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    unit_offset: bool,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: int,
    scale: float,
    positions: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    window: int = 0,
    ring: bool = False,
) -> torch.Tensor:
    """A few new tokens per sequence through attention (model/gqa.py's and model/attention.py's forward):
    `qkv` (batch, new tokens, (n_heads + 2 n_kv_heads) * head_dim) is the fused projection's output,
    fp32 or bf16; `q_norm`/`k_norm` the QK-norm weights (or None); `cos`/`sin` the new position's RoPE
    row (or None); the key and value are written into `k_cache`/`v_cache` (batch, n_kv_heads, max_len,
    head_dim; fp32 or bf16, contiguous) at `pos` and after, and each query attends over the positions up
    to its own with scores times `scale`. A cache of independent sequences (`SlotKVCache`) gives each new
    token's position (`positions`, int64 (batch, new tokens)) and each row's cache row (`slots`, int64
    (batch,)); a position past the cache's last column writes into that column (a row's padding).
    `window` > 0: each token sees only the `window` latest positions (a sliding-window layer); `ring`:
    the cache keeps just those, position p in column p % window (one new token per row).
    Returns (batch, new tokens, n_heads * head_dim) in qkv's type. Call `available()` first."""
    return torch.ops.scratchllm.decode_attention(
        qkv,
        n_heads,
        n_kv_heads,
        q_norm,
        k_norm,
        eps,
        unit_offset,
        cos,
        sin,
        k_cache,
        v_cache,
        pos,
        scale,
        positions,
        slots,
        window,
        ring,
    )


@functools.cache
def instructions() -> dict[str, str]:
    """What each kernel runs on in this build, by weight type: {"fp32": "avx512", "bf16": "amx",
    "int8": "avx512vnni", "int4": "avx512bf16"} on a CPU with all of them ("amx": bf16 products on AMX
    tiles where the weights' width is a multiple of 32, else "avx512bf16"), "avx2" for each on a CPU with
    AVX2 and FMA but no AVX-512, "portable" (the plain loops) where one is missing. int4's fast path also
    needs groups of 64 columns or more. Call `available()` first."""
    return dict(item.split("=") for item in torch.ops.scratchllm.instructions().split())


def vectorized(kind: str) -> bool:
    """The kernels are available and the one for `kind` weights ("fp32", "bf16", "int8", "int4") runs on
    this CPU's vector instructions, not the portable loops (which PyTorch's own kernels outrun)."""
    return available() and instructions()[kind] != "portable"


@functools.cache
def _load() -> bool:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        _reason.append(f"turned off by {ENV_SWITCH}=0")
        return False
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        name = f"scratchllm_native_{_fingerprint()}"
        if not (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists():
            print("building scratchllm's CPU kernels for this CPU (once, about 15 s)", file=sys.stderr)
        load(
            name=name,
            sources=[str(path) for path in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, a CPU the flags do not fit: PyTorch's kernels remain
        last_line = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        _reason.append(f"the C++ kernels did not build: {last_line[:200]}")
        return False
    return True


def _fingerprint() -> str:
    """The CPU's feature flags, PyTorch's version, the compiler flags and the sources: one build per
    combination."""
    flags = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), flags)
    sources = [path.read_text(encoding="utf-8") for path in (*SOURCES, HERE / "bf16.h")]
    text = "\n".join([flags, torch.__version__, *CFLAGS, *sources])
    return hashlib.sha256(text.encode()).hexdigest()[:12]
