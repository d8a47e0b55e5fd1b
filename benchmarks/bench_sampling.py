"""What the engine's extras cost per decoded token: penalties against repetition and log-probabilities.

The GPT-2 124M shape with random weights, a 32-token prompt, greedy decoding of 64 new tokens at batch 1
(where per-token overhead shows most), in fp32 on the CPU; candidates in rotation, best of --repeats.

    .venv/bin/python benchmarks/bench_sampling.py
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from scratchllm.generate import Engine, GenerationConfig, apply_penalties
from scratchllm.model.gpt import GPTModel, preset_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    print(
        f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d')}"
    )
    torch.manual_seed(0)
    model = GPTModel(preset_config("gpt2-small", drop_rate=0.0)).eval()
    engine = Engine(model)
    prompt = [list(range(100, 132))]
    base = GenerationConfig(max_new_tokens=args.tokens, ignore_eos=True)
    candidates = {
        "plain greedy": base,
        "repetition_penalty 1.2": base.replace(repetition_penalty=1.2),
        "presence 0.5 + frequency 0.5": base.replace(presence_penalty=0.5, frequency_penalty=0.5),
        "logprobs 5": base.replace(logprobs=5),
    }
    engine.generate(prompt, base)  # warm-up
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(args.repeats):
        for name, cfg in candidates.items():
            t0 = time.perf_counter()
            engine.generate(prompt, cfg)
            best[name] = min(best[name], time.perf_counter() - t0)
    for name, seconds in best.items():
        print(
            f"{name:30s} {args.tokens / seconds:6.1f} tok/s  ({seconds / best['plain greedy']:.3f}x the plain time)"
        )

    logits = torch.randn(1, model.cfg.vocab_size)
    seen = torch.rand(1, model.cfg.vocab_size) < 0.01
    counts = seen.float()
    for name, kw in [("repetition", dict(seen=seen, repetition_penalty=1.2)),
                     ("presence + frequency", dict(counts=counts, presence_penalty=0.5, frequency_penalty=0.5))]:  # fmt: skip
        for _ in range(10):
            apply_penalties(logits, **kw)
        t0 = time.perf_counter()
        for _ in range(1000):
            apply_penalties(logits, **kw)
        print(f"apply_penalties, {name}: {(time.perf_counter() - t0):.3f} ms per call (one 50257-token row)")


if __name__ == "__main__":
    main()
