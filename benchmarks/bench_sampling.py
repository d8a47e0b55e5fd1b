"""What the engine's extras cost per decoded token: penalties against repetition and log-probabilities.

The GPT-2 124M shape with random weights, a 32-token prompt, greedy decoding of 64 new tokens at batch 1
(where per-token overhead shows most), in fp32 on the CPU; candidates in rotation, best of --repeats.

Then scoring prompts (the server's `echo` + `logprobs`, lm-evaluation-harness's log-likelihood requests):
--prompts texts of 20-200 tokens scored one forward pass each (`prompt_logprobs` in a loop) against
`score_prompts` (padded into shared passes, only real positions through the output head), in tokens
scored per second.

    .venv/bin/python benchmarks/bench_sampling.py
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from scratchllm.generation import Engine, GenerationConfig, apply_penalties, sample_next_token
from scratchllm.model.gpt import GPTModel, preset_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=32, help="prompts to score (20-200 tokens each)")
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
            f"{name:30s} {args.tokens / seconds:6.1f} tok/s  ({seconds / best['plain greedy']:.3f}x the "
            "plain time)"
        )

    logits = torch.randn(1, model.cfg.vocab_size)
    seen = torch.rand(1, model.cfg.vocab_size) < 0.01
    counts = seen.float()
    penalties = {
        "repetition": dict(seen=seen, repetition_penalty=1.2),
        "presence + frequency": dict(counts=counts, presence_penalty=0.5, frequency_penalty=0.5),
    }
    for name, kw in penalties.items():
        for _ in range(10):
            apply_penalties(logits, **kw)
        t0 = time.perf_counter()
        for _ in range(1000):
            apply_penalties(logits, **kw)
        print(f"apply_penalties, {name}: {(time.perf_counter() - t0):.3f} ms per call (one 50257-token row)")

    # sampling itself, one row: ours (with its overflow guard) against the book's steps
    def book_sample(
        row: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator
    ) -> torch.Tensor:
        row = row / temperature
        kth = torch.topk(row, top_k, dim=-1).values[:, -1:]
        row = row.masked_fill(row < kth, -torch.inf)
        return torch.multinomial(torch.softmax(row, dim=-1), 1, generator=generator)

    samplers = {
        "book's steps": lambda gen: book_sample(logits, 0.8, 40, gen),
        "sample_next_token": lambda gen: sample_next_token(logits, 0.8, 40, generator=gen),
    }
    per_call = {}
    for name, run in samplers.items():
        gen = torch.Generator().manual_seed(0)
        for _ in range(10):
            run(gen)
        t0 = time.perf_counter()
        for _ in range(1000):
            run(gen)
        per_call[name] = time.perf_counter() - t0  # seconds per 1000 calls = ms per call
    book = per_call["book's steps"]
    for name, ms in per_call.items():
        print(f"{name}, temperature 0.8, top_k 40: {ms:.3f} ms per call ({ms / book:.2f}x the book's)")

    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(20, 201, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    tokens = sum(lengths)
    scorers = {
        "prompt_logprobs, one by one": lambda: [engine.prompt_logprobs(p, 1) for p in prompts],
        "score_prompts, batched": lambda: engine.score_prompts(prompts, 1),
    }
    best = dict.fromkeys(scorers, float("inf"))
    for _ in range(args.repeats):
        for name, run in scorers.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    one = best["prompt_logprobs, one by one"]
    for name, seconds in best.items():
        print(
            f"{name:30s} {tokens / seconds:8.0f} tokens/s  ({one / seconds:.2f}x the one-by-one rate; "
            f"{args.prompts} prompts, {tokens} tokens)"
        )


if __name__ == "__main__":
    main()
