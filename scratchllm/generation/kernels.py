"""CPU kernels for decoding: every linear weight packed once into oneDNN's blocked layout."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn


class PackedLinears:
    """Every `nn.Linear` weight of a model reordered once into oneDNN's blocked layout, for CPUs.

    A decode step multiplies one activation row by every weight matrix, so its speed is how fast
    the weights stream from memory. PyTorch's default CPU matrix-vector path reads bf16 weights, and
    fp32 ones on some CPUs, well below the memory bandwidth; oneDNN's kernel on prepacked weights (the
    one `torch.compile`'s freezing picks) comes closer (benchmarks/RESULTS.md). Where the default kernel
    is the faster one for a single row (fp32 on some CPUs: `packing_pays` measures it), one row takes it
    and several rows (batches, prompts) the packed one. The packed copies take as much memory again
    as the linear weights. `refresh()` rebuilds them when a weight has changed (training between
    generations; found by the version counter, the storage and eight sampled values of each weight,
    so an edit in place that touches none of those is not seen: make a new Engine then);
    `installed()` routes the linear layers through them, for inference only. Subclasses of
    `nn.Linear` (LoRA layers) keep their own forward.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._linears: list[nn.Linear] = []
        self._packed: list[torch.Tensor] = []
        self._forwards: list[Callable[[torch.Tensor], torch.Tensor]] = []
        self._key: tuple | None = None

    @staticmethod
    def supported(model: nn.Module) -> bool:
        """True when every linear weight is on the CPU, in fp32 or (with native support) bf16, and
        PyTorch has oneDNN's prepacked linear."""
        if not torch.backends.mkldnn.is_available() or not hasattr(
            torch.ops.mkldnn, "_reorder_linear_weight"
        ):
            return False
        weights = [m.weight for m in model.modules() if type(m) is nn.Linear]
        if not weights or any(w.device.type != "cpu" or w.dtype != weights[0].dtype for w in weights):
            return False
        if weights[0].dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return weights[0].dtype == torch.float32

    @torch.inference_mode()
    def refresh(self) -> bool:
        """Pack the current weights, unless nothing changed since the last call. False (and nothing
        packed) when the model no longer qualifies, e.g. after moving to a GPU."""
        if not self.supported(self.model):
            self._linears, self._packed, self._forwards, self._key = [], [], [], None
            return False
        linears = [m for m in self.model.modules() if type(m) is nn.Linear]
        key = tuple(
            (id(m), m.weight.data_ptr(), _version(m.weight), m.weight.dtype, id(m.bias), _probe(m.weight))
            for m in linears
        )
        if key != self._key:
            self._linears = linears
            self._packed = [torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 1) for m in linears]
            one_row_plain = not packing_pays(linears[0].weight.dtype)
            self._forwards = [
                _packed_forward(w, m.bias, m.weight if one_row_plain else None)
                for m, w in zip(linears, self._packed)
            ]
            self._key = key
        return True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Route the linear layers through the packed weights (call `refresh()` first)."""
        for m, forward in zip(self._linears, self._forwards):
            m.forward = forward  # an instance attribute shadows the class's forward
        try:
            yield
        finally:
            for m in self._linears:
                m.__dict__.pop("forward", None)


_probe_lock = threading.Lock()


def packing_pays(dtype: torch.dtype) -> bool:
    """Whether oneDNN's prepacked kernel multiplies one row (decoding one sequence) by weights of
    `dtype` faster than PyTorch's default kernel on this CPU at the current thread count (several
    rows always go packed). Callers check `PackedLinears.supported` first. bf16: always. fp32: it
    depends on the CPU (benchmarks/RESULTS.md, "Idle rerun"), so a probe times both kernels over
    64 MB of weights, once per process and thread count, and keeps the packed kernel unless the
    default one is clearly (10%) faster."""
    if dtype != torch.float32:
        return True
    with _probe_lock:
        return _fp32_packing_pays(torch.get_num_threads())


@functools.cache
def _fp32_packing_pays(threads: int) -> bool:
    """The fp32 probe for `threads` threads (seeded data, the global random state untouched)."""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        weights = [torch.randn(1024, 1024, generator=g, dtype=torch.float32) for _ in range(16)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]  # beyond the caches
        x = torch.randn(1, 1024, generator=g, dtype=torch.float32)

        def plain_pass() -> float:
            start = time.perf_counter()
            for w in weights:
                torch.nn.functional.linear(x, w)
            return time.perf_counter() - start

        def packed_pass() -> float:
            start = time.perf_counter()
            for w in packed:
                torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            return time.perf_counter() - start

        plain_pass(), packed_pass()  # warm-up: oneDNN builds its kernel on first use
        times = [(plain_pass(), packed_pass()) for _ in range(3)]
    return min(t[1] for t in times) <= 1.1 * min(t[0] for t in times)


def _probe(weight: torch.Tensor) -> tuple[float, ...]:
    """Eight values spread over a weight: they tell a change that the version counter misses (a copy
    through `.data`, a weight loaded under inference mode, where tensors keep no counter)."""
    flat = weight.detach().reshape(-1)
    # integer positions: float32 linspace rounds numel - 1 past the end for big weights (GPT-2's head)
    return tuple(flat[torch.arange(8) * (flat.numel() - 1) // 7].tolist())


def _version(t: torch.Tensor) -> int | None:
    """The in-place modification counter (None for inference tensors, which do not keep one)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _packed_forward(
    weight: torch.Tensor, bias: torch.Tensor | None, one_row: torch.Tensor | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The packed product; with `one_row` (the plain weight), a single row takes PyTorch's default kernel."""
    linear = torch.ops.mkldnn._linear_pointwise

    def forward(x: torch.Tensor) -> torch.Tensor:
        if one_row is not None and x.numel() == x.shape[-1]:
            return torch.nn.functional.linear(x, one_row, bias)
        return linear(x, weight, bias, "none", [], "")

    return forward
