"""One-row products (decoding one sequence) kernel by kernel: GB/s of weights read, against the bandwidth.

For the matrices of a model shape (GPT-2 124M: 12 blocks of qkv, out, fc1, fc2 and the head; Qwen3-0.6B:
six blocks' worth of qkv, out, gate, up and down), each a distinct copy so nothing stays in the caches,
one row times every matrix, best of --repeats passes. Candidates per weight type:

    fp32, bf16   PyTorch's default (`F.linear`: MKL for fp32), oneDNN on prepacked weights, native
    int8         FBGEMM (`quantized::linear_dynamic`), native (same activation codes, exact int32 sums)
    int4         PyTorch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`), native

    .venv/bin/python benchmarks/bench_kernels.py                 # both shapes, all weight types
    .venv/bin/python benchmarks/bench_kernels.py --shape qwen3-0.6b --dtypes bf16 int8
    .venv/bin/python benchmarks/bench_kernels.py --shape gpt2 --dtypes fp32 bf16 --rows 1,2,3,4,5,8

With --rows, native's product of several rows of x at once (a draft's tokens checked, a small batch) instead:
ms per pass over the matrices for each count of rows, in rotation, and the ratio to one row.

The candidates of a row run in rotation, so a change in load hits them alike. The bandwidth is the read
rate of summing a 512 MiB fp32 tensor. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from bench_families import cpu_name
from bench_generate import _timed, load_average, read_bandwidth

from scratchllm import native
from scratchllm.generation.kernels import packs
from scratchllm.model.quantize import Int4Linear, Int8Linear, _fbgemm_pack, int4_supported

SHAPES = {
    "gpt2": [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)],
    "qwen3-0.6b": [(4096, 1024), (1024, 2048), (3072, 1024), (3072, 1024), (1024, 3072)] * 6,
}
Kernel = Callable[[torch.Tensor, object], torch.Tensor]


def candidates(dtype: str, shapes: list[tuple[int, int]]) -> tuple[int, dict[str, tuple[Kernel, list]]]:
    """Bytes of weights, and per candidate its kernel and its weights (one entry per matrix)."""
    g = torch.Generator().manual_seed(0)
    if dtype in ("fp32", "bf16"):
        t = torch.float32 if dtype == "fp32" else torch.bfloat16
        weights = [torch.randn(n, k, generator=g).to(t) for n, k in shapes]
        found = {"PyTorch's default": (lambda x, w: torch.nn.functional.linear(x, w), weights)}
        if packs(t):  # oneDNN packs bf16 only with the CPU's bf16 instructions
            found["oneDNN packed"] = (
                lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
                [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights],
            )
        if native.available():
            found["native"] = (lambda x, w: native.few_rows_linear(x, w, None), weights)
        return sum(w.numel() * w.element_size() for w in weights), found
    torch.manual_seed(0)
    if dtype == "int8":
        layers = [Int8Linear(torch.nn.Linear(k, n, bias=False)) for n, k in shapes]
        found = {
            "FBGEMM": (
                lambda x, p: torch.ops.quantized.linear_dynamic(x.float(), p, False),
                [_fbgemm_pack(q.qweight, q.scale, None) for q in layers],
            )
        }
        if native.available():
            native_int8 = lambda x, q: native.int8_rows_linear(x, q.qweight, q.scale, q._row_sums, None)  # noqa: E731
            found["native"] = (native_int8, layers)
        return sum(q.qweight.numel() for q in layers), found
    layers = [Int4Linear(torch.nn.Linear(k, n, bias=False)) for n, k in shapes]
    found = {
        "PyTorch's int4": (
            lambda x, q: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, q._kernel_weight, q.group_size, q._kernel_scales
            ),
            layers,
        )
    }
    if native.available():
        native_int4 = lambda x, q: native.int4_one_row_linear(x, q.qweight, q.step, q.zero, q.group_size)  # noqa: E731
        found["native"] = (native_int4, layers)
    return sum(q.qweight.numel() for q in layers), found


def few_rows(dtype: str, shapes: list[tuple[int, int]], counts: list[int], repeats: int) -> dict[int, float]:
    """Best seconds of native's product over every matrix of `shapes` for each count of rows of x."""
    g = torch.Generator().manual_seed(0)
    t = torch.float32 if dtype == "fp32" else torch.bfloat16
    weights = [torch.randn(n, k, generator=g).to(t) for n, k in shapes]
    xs = {m: {k: torch.randn(m, k, generator=g).to(t) for _, k in shapes} for m in counts}
    best = dict.fromkeys(counts, float("inf"))
    with torch.inference_mode():
        for round_ in range(repeats + 1):  # round 0 warms up
            for m in counts:
                pairs = [(xs[m][w.shape[1]], w) for w in weights]
                seconds = _timed(lambda: [native.few_rows_linear(x, w, None) for x, w in pairs])  # noqa: B023
                if round_:
                    best[m] = min(best[m], seconds)
    return best


def row_counts(text: str) -> list[int]:
    """--rows: positive whole numbers separated by commas (argparse reports a ValueError as bad input)."""
    counts = [int(c) for c in text.split(",")]
    if min(counts) < 1:
        raise ValueError(text)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    kinds = ["fp32", "bf16", "int8", "int4"]
    ap.add_argument("--dtypes", nargs="+", choices=kinds, default=kinds)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    ap.add_argument(
        "--rows", type=row_counts, help="counts of rows of x, as 1,2,4: native's product of several rows"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = native.instructions() if native.available() else f"unavailable: {native.unavailable_reason()}"
    print(
        f"# machine: {cpu_name()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); native kernels: {paths}; "
        f"load average: {load_average()}"
    )
    bw = read_bandwidth()
    print(f"read bandwidth (sum of a 512 MiB tensor): {bw:.1f} GB/s")
    shapes = SHAPES if args.shape == "all" else [args.shape]
    if args.rows:
        if not native.available():
            raise SystemExit("--rows measures native's kernels, which are not available here")
        counts = sorted({1, *args.rows})
        for shape in shapes:
            for dtype in (d for d in args.dtypes if d in ("fp32", "bf16")):
                best = few_rows(dtype, SHAPES[shape], counts, args.repeats)
                cells = " / ".join(f"{best[m] * 1e3:.2f}" for m in counts)
                ratios = " / ".join(f"{best[m] / best[1]:.2f}" for m in counts)
                print(f"{shape} {dtype}, rows {'/'.join(map(str, counts))}: {cells} ms = {ratios} x one row")
        return
    for shape in shapes:
        for dtype in args.dtypes:
            if dtype == "int4" and not int4_supported():
                continue
            nbytes, found = candidates(dtype, SHAPES[shape])
            widths = {k for _, k in SHAPES[shape]}
            x_type = torch.float32 if dtype in ("fp32", "int8") else torch.bfloat16
            xs = {k: torch.randn(1, k).to(x_type) for k in widths}
            best = dict.fromkeys(found, float("inf"))
            with torch.inference_mode():
                for round_ in range(args.repeats + 1):  # round 0 warms up (oneDNN builds its kernels)
                    for name, (kernel, weights) in found.items():
                        pairs = [(xs[k], w) for (_, k), w in zip(SHAPES[shape], weights)]
                        seconds = _timed(lambda: [kernel(x, w) for x, w in pairs])  # noqa: B023
                        if round_:
                            best[name] = min(best[name], seconds)
            rates = {name: nbytes / s / 1e9 for name, s in best.items()}
            row = ", ".join(f"{name} {r:.1f} GB/s ({r / bw:.0%})" for name, r in rates.items())
            print(f"{shape} {dtype} ({nbytes / 1e6:.0f} MB): {row}")


if __name__ == "__main__":
    main()
