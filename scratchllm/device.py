"""Device and precision choices shared by training, generation and evaluation."""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import ScratchLLMError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; an explicit name is checked for availability."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ScratchLLMError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ScratchLLMError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ScratchLLMError(f"device {name!r} requested but Apple MPS is not available; use --device cpu")
    return device


#: Overrides the CPU's bf16 detection behind every `auto` choice: 1 takes the bf16 paths, 0 the fp32 ones.
CPU_BF16_ENV = "SCRATCHLLM_CPU_BF16"


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX), where bf16 pays off,
    unless $SCRATCHLLM_CPU_BF16 says otherwise (0 or 1: the same choices on every machine)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ScratchLLMError(f"${CPU_BF16_ENV} must be 0 or 1 (or unset to detect), got {forced!r}")
    try:
        caps = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        return False
    return "AVX512" in caps.upper() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn `auto` into bf16 where the hardware runs it fast, else fp32."""
    if precision not in PRECISIONS:
        raise ScratchLLMError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ScratchLLMError("precision fp16 is not supported on CPU; use bf16 or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"


def check_compile(device: torch.device) -> None:
    """Fail early, in one line, where `torch.compile` cannot build kernels for `device`: its code
    generator compiles C++ on CPUs and Triton kernels on CUDA (Triton builds its launchers with a C
    compiler), and a missing compiler otherwise surfaces as a long traceback at the first step."""
    import importlib.util
    import shutil

    if device.type == "cpu":
        names, need = (os.environ.get("CXX"), "g++", "clang++", "c++"), "a C++ compiler (g++ or clang++)"
    elif device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ScratchLLMError(
                "--compile on CUDA needs Triton (pip install triton), or leave out --compile"
            )
        names, need = (os.environ.get("CC"), "cc", "gcc", "clang"), "a C compiler (gcc or clang) for Triton"
    else:
        return
    if not any(name and shutil.which(name) for name in names):
        raise ScratchLLMError(
            f"--compile on {device.type} needs {need} on PATH: install one (e.g. apt install g++) "
            "or leave out --compile"
        )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for the forward pass (weights stay fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# Dense bf16/fp16 tensor-core peaks (FLOP/s) of common GPUs, for the MFU estimate.
_GPU_PEAKS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}
_measured_peaks: dict[tuple[str, str], float] = {}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak matrix-multiply FLOP/s used for MFU: a table for known GPUs; on CPU, measured once per
    process with a large matmul in the training precision (so MFU says how well the model's work
    keeps the matrix units busy, not a vendor figure that CPUs rarely reach)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in _GPU_PEAKS.items() if k in name), None)
        return peak if precision != "fp32" or peak is None else peak / 16  # fp32 without TF32 is far slower
    if device.type != "cpu":
        return None
    key = (device.type, precision)
    if key not in _measured_peaks:
        import time

        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        a = torch.randn(1024, 1024, dtype=dtype)
        b = torch.randn(1024, 1024, dtype=dtype)
        a @ b  # warm up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.2:
            a @ b
            n += 1
        _measured_peaks[key] = 2 * 1024**3 * n / (time.perf_counter() - t0)
    return _measured_peaks[key]
