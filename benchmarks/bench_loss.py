"""Which way to compute the language-model loss is fastest on a device: the hand-fused head +
cross-entropy (scratchllm/model/loss.py) at several chunk sizes, the plain `F.cross_entropy` of the full
logits, and the model under torch.compile (which takes the plain loss). Each variant times the trainer's own
steps (bench_train.py's "ours": default precision, fused AdamW, clipping) on bench_train.py's throughput
shape, in this one process, with the loss choice patched in.

    python benchmarks/bench_loss.py --device cuda --batch 32      # the GPU chunk size (GPU_CHUNK_ELEMENTS)
    .venv/bin/python benchmarks/bench_loss.py --device cpu --batch 8 --steps 6 --warmup 3
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_train import SHAPE, run_ours

import scratchllm.model.gpt as gpt
import scratchllm.model.loss as loss_module
from scratchllm.device import pick_device


def _plain(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return F.cross_entropy((x @ w.T).flatten(0, 1).float(), t.flatten(), ignore_index=ignore_index)


def run(
    device: str,
    batch: int,
    steps: int,
    warmup: int,
    *,
    rows: int | None = None,
    plain: bool = False,
    compile: bool = False,
) -> tuple[float, str, float | None]:
    """tokens/s, precision and peak GPU memory (MiB, None off CUDA) of `steps` timed trainer steps."""
    saved = loss_module.CHUNK_ELEMENTS, loss_module.GPU_CHUNK_ELEMENTS, gpt.linear_cross_entropy
    if rows is not None:
        loss_module.CHUNK_ELEMENTS = loss_module.GPU_CHUNK_ELEMENTS = rows * SHAPE["vocab_size"]
    if plain:
        gpt.linear_cross_entropy = _plain
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        r = run_ours(steps, warmup, "auto", None, batch, device=device, compile=compile)
    finally:
        loss_module.CHUNK_ELEMENTS, loss_module.GPU_CHUNK_ELEMENTS, gpt.linear_cross_entropy = saved
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return r["tokens"] / r["seconds"], r["precision"], peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    dev = pick_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type.upper()
    print(
        f"# {name}, torch {torch.__version__}, batch {args.batch} x {SHAPE['context_length']}, "
        f"{args.steps} timed steps after {args.warmup}"
    )
    default_rows = loss_module.chunk_rows_for(dev.type, SHAPE["vocab_size"])
    variants = []
    for r in (128, 512, 2048, 8192):
        default = " (the default here)" if r == default_rows else ""
        variants.append((f"fused, {r} rows per chunk{default}", dict(rows=r)))
    # under torch.compile the model itself takes the plain loss (the compiler fuses it)
    variants += [
        ("plain F.cross_entropy", dict(plain=True)),
        ("torch.compile (plain loss)", dict(compile=True)),
    ]
    for label, kw in variants:
        rate, precision, peak = run(str(dev), args.batch, args.steps, args.warmup, **kw)
        mem = f"  peak GPU memory {peak:6.0f} MiB" if peak is not None else ""
        print(f"{label + f' ({precision})':55s} {rate:9.0f} tok/s{mem}", flush=True)


if __name__ == "__main__":
    main()
