"""CPU kernels for decoding: every linear weight packed once into oneDNN's blocked layout."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn


class PackedLinears:
    """Every `nn.Linear` weight of a model reordered once into oneDNN's blocked layout, for CPUs.

    A decode step multiplies one activation row by every weight matrix, so its speed is how fast
    the weights stream from memory. PyTorch's default CPU matrix-vector path reads them well below
    the memory bandwidth; oneDNN's kernel on prepacked weights (the one `torch.compile`'s freezing
    picks) comes closer (benchmarks/RESULTS.md). The packed copies take as much memory again as the
    linear weights. `refresh()` rebuilds them when a weight has changed (training between
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
            self._forwards = [_packed_forward(w, m.bias) for m, w in zip(linears, self._packed)]
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
    weight: torch.Tensor, bias: torch.Tensor | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    linear = torch.ops.mkldnn._linear_pointwise

    def forward(x: torch.Tensor) -> torch.Tensor:
        return linear(x, weight, bias, "none", [], "")

    return forward
