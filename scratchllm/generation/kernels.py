"""CPU kernels for decoding: every linear weight packed once into oneDNN's blocked layout, and one row
on whichever kernel a probe finds fastest."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from .. import native
from .fused import FEW_ROWS, fused_routes, has_hooks


class PackedLinears:
    """Every `nn.Linear` weight of a model reordered once into oneDNN's blocked layout, for CPUs.

    A decode step multiplies one activation row by every weight matrix, so its speed is how fast
    the weights stream from memory. PyTorch's default CPU matrix-vector path reads bf16 weights, and
    fp32 ones on some CPUs, well below the memory bandwidth; oneDNN's kernel on prepacked weights (the
    one `torch.compile`'s freezing picks) comes closer (benchmarks/RESULTS.md), and scratchllm's own
    (scratchllm/native) closer still on some CPUs. One row takes whichever of the three a probe finds
    fastest (`one_row_kernel`), 2 to 8 rows (small batches, a draft's tokens checked) native's or the
    packed one (`few_rows_kernel`), more rows (prompts, batches) the packed one. The packed copies take as
    much memory again as the linear weights. Where oneDNN cannot pack the dtype (bf16 on a CPU without
    bf16 instructions) nothing is packed, and more rows take the few rows' kernel (native's reads the
    weights once per 8 rows there, several times faster than PyTorch's bf16 product on such CPUs). Where
    native builds, a decode step's RMSNorms, attention and blocks take fused.py's forwards too.
    `refresh()` rebuilds them when a weight has changed (training between generations; found by the
    version counter, the storage and eight sampled values of each weight, so an edit in place that touches
    none of those is not seen: make a new Engine then); `installed()` routes the linear layers through
    them, for inference only. Subclasses of `nn.Linear` (LoRA layers) keep their own forward.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._linears: list[nn.Linear] = []
        self._packed: list[torch.Tensor] = []
        self._forwards: list[Callable[[torch.Tensor], torch.Tensor]] = []
        self._routes: list[tuple[nn.Module, Callable[..., torch.Tensor]]] = []  # fused.py's forwards
        self._key: tuple | None = None

    @staticmethod
    def supported(model: nn.Module) -> bool:
        """True when every linear weight is on the CPU, in fp32 or bf16, and oneDNN packs that dtype
        here or native's product runs it on vector instructions; or, for a model with no plain linear
        layers left (int8 and int4 weights), when it is on the CPU and fused.py has a forward for some of
        its modules."""
        weights = [m.weight for m in model.modules() if type(m) is nn.Linear]
        if not weights:
            on_cpu = all(p.device.type == "cpu" for p in model.parameters())
            return on_cpu and native.available() and bool(fused_routes(model))
        dtype = weights[0].dtype
        if any(w.device.type != "cpu" or w.dtype != dtype for w in weights):
            return False
        kind = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype)
        return kind is not None and (packs(dtype) or native.vectorized(kind))

    @torch.inference_mode()
    def refresh(self) -> bool:
        """Pack the current weights, unless nothing changed since the last call. False (and nothing
        packed) when the model no longer qualifies, e.g. after moving to a GPU."""
        if not self.supported(self.model):
            self._linears, self._packed, self._forwards, self._key = [], [], [], None
            self._routes = []
            return False
        linears = [m for m in self.model.modules() if type(m) is nn.Linear]
        key = tuple(
            (id(m), m.weight.data_ptr(), _version(m.weight), m.weight.dtype, id(m.bias), _probe(m.weight))
            for m in linears
        ) + (has_hooks(self.model),)  # hooks added since: fewer fused routes
        # the routes hold the other parameters (norms, biases) too: one replaced means new routes
        key += tuple((id(p), p.data_ptr()) for p in self.model.parameters())
        if key != self._key:
            self._linears = linears
            dtype = linears[0].weight.dtype if linears else None
            packed = dtype is not None and packs(dtype)
            self._packed = [
                torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 1) if packed else m.weight
                for m in linears
            ]
            one_row, few_rows = (one_row_kernel(dtype), few_rows_kernel(dtype)) if dtype else ("packed",) * 2
            many = "packed" if packed else "native" if few_rows == "native" else "plain"
            self._forwards = [
                _packed_forward(w, m, one_row, few_rows, many) for m, w in zip(linears, self._packed)
            ]
            # no plain linear layer left (int8, int4): the quantized layers' own kernels decide
            native_rows = not linears or (one_row == "native" and few_rows == "native")
            self._routes = fused_routes(self.model, native_rows) if native.available() else []
            self._key = key
        return True

    def fuses(self, module: nn.Module) -> bool:
        """Whether `installed()` routes `module` through one of fused.py's forwards (after `refresh()`)."""
        return any(m is module for m, _ in self._routes)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Route the linear layers through the packed weights, and a decode step's RMSNorms and
        attention through native's fused kernels (call `refresh()` first)."""
        routes = [*zip(self._linears, self._forwards), *self._routes]
        for m, forward in routes:
            m.__dict__["forward"] = forward  # shadows the class's forward (past nn.Module's slow setattr)
        try:
            yield
        finally:
            for m, _ in routes:
                m.__dict__.pop("forward", None)


def packs(dtype: torch.dtype) -> bool:
    """oneDNN's prepacked linear runs `dtype` weights here (bf16 needs the CPU's bf16 instructions)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


_probe_lock = threading.Lock()
#: The kernels one row can take, in order of preference when a probe finds them within 10% of the fastest
#: (native: 20%).
ONE_ROW_KERNELS = ("native", "packed", "plain")


def one_row_kernel(dtype: torch.dtype) -> str:
    """Which kernel multiplies one row (decoding one sequence) by weights of `dtype` fastest on this
    CPU at the current thread count: "native" (scratchllm/native's hand-written kernel, where it
    builds), "packed" (oneDNN on prepacked weights) or "plain" (PyTorch's default, MKL for fp32).
    It depends on the CPU (benchmarks/RESULTS.md), so a probe times each over 64 MB of weights, once
    per process, dtype and thread count, and takes the first in `ONE_ROW_KERNELS` within 10% of the
    fastest (native within 20%: only its product lets a step's layers run in one call, generation/fused.py,
    which is worth more than that). Callers check `PackedLinears.supported` first."""
    with _probe_lock:
        return _time_kernels(dtype, torch.get_num_threads(), native.available())[0]


def few_rows_kernel(dtype: torch.dtype) -> str:
    """The same for 2 to `FEW_ROWS` rows (a few sequences, a draft's tokens checked in one pass):
    "native" wherever one row takes native (each row then gets exactly its one-row result: a batch's
    rows are scored as each alone would be, and a draft's tokens as decoding them one at a time would
    score them), else native only where its product of four rows is at least as fast as oneDNN's
    packed one; more rows always go packed."""
    with _probe_lock:
        return _time_kernels(dtype, torch.get_num_threads(), native.available())[1]


@functools.cache
def _time_kernels(dtype: torch.dtype, threads: int, with_native: bool) -> tuple[str, str]:
    """The probe for `dtype` and `threads` threads (seeded data, the global random state untouched):
    the one-row kernel and the few-rows kernel."""
    g = torch.Generator().manual_seed(0)
    count = 64 * 2**20 // (1024 * 1024 * torch.finfo(dtype).bits // 8)  # beyond the caches
    with torch.inference_mode():
        weights = [torch.randn(1024, 1024, generator=g).to(dtype) for _ in range(count)]
        x1, x4 = torch.randn(1, 1024, generator=g).to(dtype), torch.randn(4, 1024, generator=g).to(dtype)
        candidates = {"plain": (torch.nn.functional.linear, weights)}
        if packs(dtype):
            candidates["packed"] = (
                lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
                [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights],
            )
        if with_native:
            candidates["native"] = (lambda x, w: native.few_rows_linear(x, w, None), weights)

        def one_pass(name: str, x: torch.Tensor) -> float:
            kernel, ws = candidates[name]
            start = time.perf_counter()
            for w in ws:
                kernel(x, w)
            return time.perf_counter() - start

        for name in candidates:  # warm-up: oneDNN builds its kernel on first use
            one_pass(name, x1)
        times = dict.fromkeys(candidates, float("inf"))
        for _ in range(5):  # in rotation, so that a slow moment of the machine hits every candidate alike
            for name in candidates:
                times[name] = min(times[name], one_pass(name, x1))
        fastest = min(times.values())
        margin = {"native": 1.2}
        one = next(n for n in ONE_ROW_KERNELS if times.get(n, float("inf")) <= margin.get(n, 1.1) * fastest)
        other = "packed" if "packed" in candidates else "plain"
        few = "native" if one == "native" else other
        if with_native and one != "native":
            one_pass(other, x4)
            native_time, other_time = (min(one_pass(n, x4) for _ in range(3)) for n in ("native", other))
            few = "native" if native_time <= other_time else other
    return one, few


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
    packed: torch.Tensor,
    linear: nn.Linear,
    one_row: str = "packed",
    few_rows: str = "packed",
    many: str = "packed",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`linear`'s product on its `packed` weight; a single row takes the `one_row` kernel, 2 to
    `FEW_ROWS` rows the `few_rows` one, more the `many` one (where oneDNN cannot pack, "native" or
    "plain")."""
    weight, bias = linear.weight, linear.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        kernel = one_row if rows == 1 else few_rows if rows <= FEW_ROWS else many
        if kernel == "native":
            if x.dtype == weight.dtype:
                return native.few_rows_linear(x.contiguous(), weight, bias)
            kernel = "plain" if many == "native" else many
        if kernel == "plain":
            return torch.nn.functional.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    return forward
