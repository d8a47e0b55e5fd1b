"""Which way to compute the language-model loss is fastest on a device: the hand-fused head +
cross-entropy (scratchllm/model/loss.py) at several chunk sizes, the plain `F.cross_entropy` of the full
logits, and the model under torch.compile (which takes the plain loss). Full training steps (bf16 autocast where supported, fused AdamW,
clipping) on the issue-4 throughput shape, one process, the same data for every variant.

    python benchmarks/bench_loss.py --device cuda --batch 32      # what set GPU_CHUNK_ELEMENTS
    .venv/bin/python benchmarks/bench_loss.py --device cpu --batch 8 --steps 6 --warmup 3
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

import scratchllm.model.gpt as gpt
import scratchllm.model.loss as loss_module
from scratchllm.device import pick_device, resolve_precision
from scratchllm.model.gpt import GPTConfig, GPTModel
from scratchllm.train.trainer import TrainerConfig, make_optimizer

SHAPE = dict(vocab_size=50257, context_length=256, emb_dim=384, n_layers=6, n_heads=6, drop_rate=0.0)


def _plain(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return F.cross_entropy((x @ w.T).flatten(0, 1).float(), t.flatten(), ignore_index=ignore_index)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(dev: torch.device, precision: str, batch: int, steps: int, warmup: int, *, rows: int | None = None,
        plain: bool = False, compile: bool = False) -> tuple[float, float | None]:  # fmt: skip
    """tokens/s and peak GPU memory (MiB, None on CPU) of `steps` timed training steps."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**SHAPE)).to(dev)
    opt = make_optimizer(model, TrainerConfig(), dev)
    saved = loss_module.CHUNK_ELEMENTS, loss_module.GPU_CHUNK_ELEMENTS, gpt.linear_cross_entropy
    if rows is not None:
        loss_module.CHUNK_ELEMENTS = loss_module.GPU_CHUNK_ELEMENTS = rows * SHAPE["vocab_size"]
    if plain:
        gpt.linear_cross_entropy = _plain
    forward = torch.compile(model) if compile else model
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, SHAPE["vocab_size"], (batch, SHAPE["context_length"]), generator=g).to(dev)
    y = torch.randint(0, SHAPE["vocab_size"], (batch, SHAPE["context_length"]), generator=g).to(dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        for i in range(warmup + steps):
            if i == warmup:
                _sync(dev)
                t0 = time.perf_counter()
            with amp:
                loss = forward(x, targets=y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
        _sync(dev)
        seconds = time.perf_counter() - t0
    finally:
        loss_module.CHUNK_ELEMENTS, loss_module.GPU_CHUNK_ELEMENTS, gpt.linear_cross_entropy = saved
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return steps * batch * SHAPE["context_length"] / seconds, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", default="auto", help="auto (bf16 where fast), bf16 or fp32")
    args = p.parse_args()
    dev = pick_device(args.device)
    precision = resolve_precision(args.precision, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, {precision}, batch {args.batch} x {SHAPE['context_length']}, "
          f"{args.steps} timed steps after {args.warmup}")  # fmt: skip
    default_rows = loss_module.chunk_rows_for(dev.type, SHAPE["vocab_size"])
    variants = [(f"fused, {r} rows per chunk" + (" (the default here)" if r == default_rows else ""), dict(rows=r))
                for r in (128, 512, 2048, 8192)]  # fmt: skip
    # under torch.compile the model itself takes the plain loss (the compiler fuses it)
    variants += [
        ("plain F.cross_entropy", dict(plain=True)),
        ("torch.compile (plain loss)", dict(compile=True)),
    ]
    for label, kw in variants:
        rate, peak = run(dev, precision, args.batch, args.steps, args.warmup, **kw)
        mem = f"  peak GPU memory {peak:6.0f} MiB" if peak is not None else ""
        print(f"{label:48s} {rate:9.0f} tok/s{mem}", flush=True)


if __name__ == "__main__":
    main()
