"""Continuous batching against the static scheduler: closed-loop clients over HTTP, in one process.

A random GPT-2-style model (GPT-2's tokenizer from shared/data; the shape is set by the flags, the
context 1280 tokens to hold the longest prompt and reply) behind two servers, `--scheduler static` and
`--scheduler continuous`. For each concurrency C (default 16 and 64), C clients (asyncio + httpx)
each stream completions one after another until --requests-per-client x C requests are answered;
every request has a prompt of random token ids, 10 to 1000 tokens long (uniform), and max_tokens 8 to
256 (uniform), greedy; both servers get the same requests. Reported per run: generated tokens/s over
the run's wall time, and p50/p99 time to first token (the first streamed text) and to last token (the
end of the stream), over all requests and over the short ones (max_tokens <= 64 and a prompt of at
most 500 tokens).

    .venv/bin/python benchmarks/bench_continuous.py                       # 16 and 64 clients
    .venv/bin/python benchmarks/bench_continuous.py --clients 4 --requests-per-client 2   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from scratchllm.generation import Engine
from scratchllm.model.gpt import GPTConfig, GPTModel
from scratchllm.serve.app import create_app
from scratchllm.serve.chat import chat_model
from scratchllm.text.registry import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests/ holds the server runner
from tests.serve.helpers import BackgroundServer

DATA = Path(os.environ.get("SCRATCHLLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CONTEXT = 1280
EOT = 50256


@dataclass
class Result:
    prompt_tokens: int
    max_tokens: int
    ttft: float  # seconds to the first streamed text
    latency: float  # seconds to the end of the stream
    tokens: int  # completion tokens (usage)

    @property
    def short(self) -> bool:
        return self.max_tokens <= 64 and self.prompt_tokens <= 500


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def workload(n: int, seed: int) -> list[tuple[list[int], int]]:
    """`n` (prompt token ids, max_tokens) pairs: prompts of 10-1000 tokens, max_tokens 8-256."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rnd.randrange(EOT) for _ in range(rnd.randint(10, 1000))]
        out.append((prompt, rnd.randint(8, 256)))
    return out


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> Result:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return Result(len(prompt), max_tokens, latency if ttft is None else ttft, latency, tokens)


async def closed_loop(
    url: str, requests: list[tuple[list[int], int]], clients: int
) -> tuple[float, list[Result]]:
    """`clients` clients, each sending the next waiting request as soon as its last one ended."""
    todo = iter(requests)
    results: list[Result] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:

        async def run_client() -> None:
            for prompt, max_tokens in todo:
                results.append(await one_request(client, url, prompt, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(run_client() for _ in range(clients)))
        return time.perf_counter() - start, results


def quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def summary(seconds: float, results: list[Result]) -> dict[str, float]:
    short = [r for r in results if r.short]
    row = {"seconds": seconds, "tokens/s": sum(r.tokens for r in results) / seconds}
    for name, rs in (("all", results), ("short", short)):
        for q in (0.5, 0.99):
            row[f"{name} ttft p{round(q * 100)}"] = quantile([r.ttft for r in rs], q) if rs else float("nan")
            row[f"{name} e2e p{round(q * 100)}"] = (
                quantile([r.latency for r in rs], q) if rs else float("nan")
            )
    row["short n"] = len(short)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-batch-size", type=int, default=64, help="both servers' --max-batch-size")
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--emb-dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tiktoken_file = DATA / "gpt2.tiktoken"
    if not tiktoken_file.exists():
        sys.exit(f"needs {tiktoken_file} (GPT-2's tokenizer; set SCRATCHLLM_SHARED_DATA)")
    torch.manual_seed(args.seed)
    cfg = GPTConfig(
        vocab_size=50257,
        context_length=CONTEXT,
        emb_dim=args.emb_dim,
        n_heads=args.heads,
        n_layers=args.layers,
        drop_rate=0.0,
    )
    chat = chat_model(Engine(GPTModel(cfg).eval(), load_tokenizer(str(tiktoken_file))), name="bench")
    servers = {
        kind: BackgroundServer(
            create_app(
                chat, max_batch_size=args.max_batch_size, scheduler=kind, prefill_chunk=args.prefill_chunk
            )
        ).start()
        for kind in ("static", "continuous")
    }
    for server in servers.values():  # warm up (weight packing, allocator)
        asyncio.run(closed_loop(server.url, workload(2, seed=-1), 2))

    cpu = platform.processor() or platform.machine()
    print(
        f"# GPT shape emb {args.emb_dim}, {args.layers} layers, {args.heads} heads, context {CONTEXT}, "
        f"vocab 50257, random weights; prompts 10-1000 tokens, max_tokens 8-256, greedy, streamed; "
        f"--max-batch-size {args.max_batch_size}, --prefill-chunk {args.prefill_chunk}; {cpu}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"load before: {load_average()}",
        flush=True,
    )
    names = ["seconds", "tokens/s", "all ttft p50", "all ttft p99", "all e2e p50", "all e2e p99"]
    names += ["short ttft p50", "short ttft p99", "short e2e p50", "short e2e p99", "short n"]
    print("| clients | scheduler | " + " | ".join(names) + " |")
    print("|---|---|" + "---:|" * len(names))
    for clients in args.clients:
        requests = workload(clients * args.requests_per_client, seed=args.seed + clients)
        for kind, server in servers.items():
            seconds, results = asyncio.run(closed_loop(server.url, requests, clients))
            row = summary(seconds, results)
            cells = [f"{row[n]:.0f}" if n == "short n" else f"{row[n]:.1f}" for n in names]
            print(f"| {clients} | {kind} | " + " | ".join(cells) + f" |  load {load_average()}", flush=True)
    print(f"# load after: {load_average()}")
    for server in servers.values():
        server.stop()


if __name__ == "__main__":
    main()
