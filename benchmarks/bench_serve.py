"""The OpenAI-compatible server under concurrent load: what batching waiting requests buys, and
what HTTP costs, side by side in one process.

A random GPT-2 124M-shaped model with GPT-2's tokenizer (from shared/data), N different prompts,
greedy, `max_tokens` each. Runs, in rotation (so load changes on a shared machine hit all alike),
best of --repeats:

  engine          Engine.generate on each prompt, one after another, on a worker thread (no server, no HTTP)
  http-serial     one client sending the N requests one after another
  queue-b1        N clients at once, server with --max-batch-size 1 (a plain request queue / lock)
  queue-b8        N clients at once, --max-batch-size 8
  queue-bN        N clients at once, --max-batch-size N

    .venv/bin/python benchmarks/bench_serve.py            # 16 requests x 32 tokens
    .venv/bin/python benchmarks/bench_serve.py --quick    # 8 requests x 16 tokens
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from scratchllm.generation import Engine, GenerationConfig
from scratchllm.model.gpt import GPTModel, preset_config
from scratchllm.serve.app import create_app
from scratchllm.serve.chat import chat_model
from scratchllm.text.registry import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests/ holds the server runner
from tests.serve.helpers import BackgroundServer

DATA = Path(os.environ.get("SCRATCHLLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SUBJECTS = ["the weather", "a cat", "the sea", "bread", "a train", "music", "the moon", "a garden", "chess"]
SUBJECTS += ["rivers", "winter", "a library", "coffee", "mountains", "a bridge", "the city"]


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--preset", default="gpt2-small")
    ap.add_argument("--quick", action="store_true", help="8 requests x 16 tokens, 1 repeat")
    args = ap.parse_args()
    if args.quick:  # smaller defaults; flags given explicitly stay
        for name, value in dict(requests=8, max_tokens=16, repeats=1).items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)

    tiktoken_file = DATA / "gpt2.tiktoken"
    if not tiktoken_file.exists():
        sys.exit(f"needs {tiktoken_file} (GPT-2's tokenizer; set SCRATCHLLM_SHARED_DATA)")
    tok = load_tokenizer(str(tiktoken_file))
    torch.manual_seed(0)
    model = GPTModel(preset_config(args.preset, drop_rate=0.0)).eval()
    engine = Engine(model, tok)
    chat = chat_model(engine, name="bench")
    n = args.requests
    prompts = [f"Here is a short story about {SUBJECTS[i % len(SUBJECTS)]} number {i}:" for i in range(n)]
    cfg = GenerationConfig(max_new_tokens=args.max_tokens)
    with ThreadPoolExecutor(max_workers=1) as worker:  # warm up (weight packing, allocator)
        worker.submit(engine.generate, prompts[:2], cfg).result()

    servers = {b: BackgroundServer(create_app(chat, max_batch_size=b)).start() for b in sorted({1, 8, n})}
    http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=n + 4))

    def ask(url: str, prompt: str) -> int:
        body = {"model": "bench", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
        r = http.post(url + "/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    def engine_serial() -> int:
        # on a worker thread, as in the server: under load the main thread decodes slowly (RESULTS.md)
        with ThreadPoolExecutor(max_workers=1) as worker:
            return worker.submit(
                lambda: sum(engine.generate([p], cfg)[0].completion_tokens for p in prompts)
            ).result()

    def http_serial() -> int:
        return sum(ask(servers[8].url, p) for p in prompts)

    def concurrent(batch: int):
        def run() -> int:
            with ThreadPoolExecutor(max_workers=n) as pool:
                return sum(pool.map(lambda p: ask(servers[batch].url, p), prompts))

        return run

    candidates = {"engine": engine_serial, "http-serial": http_serial}
    candidates |= {f"queue-b{b}": concurrent(b) for b in (1, 8, n)}
    best: dict[str, tuple[float, int]] = {}
    cpu = platform.processor() or platform.machine()
    print(
        f"# {args.preset} random weights, {n} requests x {args.max_tokens} tokens, greedy; "
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}; load before: {load_average()}"
    )
    for _ in range(args.repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            tokens = fn()
            seconds = time.perf_counter() - start
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, tokens)
    base = best["queue-b1"][0]
    print(f"{'run':<12} {'seconds':>8} {'tokens/s':>9} {'req/s':>7} {'vs queue-b1':>12}")
    for name, (seconds, tokens) in best.items():
        print(f"{name:<12} {seconds:8.2f} {tokens / seconds:9.1f} {n / seconds:7.2f} {base / seconds:11.2f}x")
    print(f"# load after: {load_average()}")
    for s in servers.values():
        s.stop()


if __name__ == "__main__":
    main()
