"""Evaluation cost: `token_loss` (what `scratchllm perplexity` and pretraining's evaluations run) with the
model's fused head + cross-entropy, against the plain way (full logits, then `F.cross_entropy`).

GPT-2 124M shape, random weights, batches of 8 windows of 1024 tokens, fp32 on the CPU. Each variant runs
in its own subprocess, so that its peak resident memory is its own.

    .venv/bin/python benchmarks/bench_evaluate.py            # 2 batches per variant (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(variant: str, batches: int) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    import scratchllm.train.evaluate as ev
    from scratchllm.model.gpt import GPTModel, preset_config

    if variant == "plain":

        def plain(model, inputs, targets, ignore_index=-100):
            logits = model(inputs)
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)

        ev.next_token_loss = plain
    torch.manual_seed(0)
    model = GPTModel(preset_config("gpt2", drop_rate=0.0)).eval()
    tokens = np.random.default_rng(0).integers(0, 50257, 8 * 1024 * batches + 1)
    ev.token_loss(model, tokens[:1025], 1024, 1)  # warm-up
    t = time.perf_counter()
    total, n = ev.token_loss(model, tokens, 1024, 8)
    seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"loss": total / n, "tokens": n, "seconds": seconds, "peak_rss_mb": rss}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--child", choices=["plain", "fused"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.batches)
        return
    results = {}
    for variant in ("plain", "fused"):
        cmd = [sys.executable, __file__, "--child", variant, "--batches", str(args.batches)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[variant] = r = json.loads(out.strip().splitlines()[-1])
        rate = r["tokens"] / r["seconds"]
        print(
            f"{variant:6s} loss {r['loss']:.6f} over {r['tokens']} tokens: {r['seconds']:.1f} s "
            f"({rate:.0f} tok/s), peak RSS {r['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    a, b = results["plain"], results["fused"]
    print(
        f"fused / plain: speed {a['seconds'] / b['seconds']:.2f}x, peak RSS "
        f"{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
