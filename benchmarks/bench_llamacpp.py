"""Batch-1 decoding against llama.cpp on the same weights, in one process: ours / llama.cpp at 32-bit,
16-bit and 8-bit weights.

The GPT-2 124M shape with random weights (GPT-2's tokenizer, from `$SCRATCHLLM_GPT2_TOKENIZER` or
../shared/data) is exported with `export_gguf` as f32, f16, bf16 and q8_0 files, which llama.cpp loads
through llama-cpp-python. Pairs: ours fp32 vs llama.cpp f32, ours bf16 weights vs llama.cpp f16 (and
bf16), ours `--quantize int8` vs llama.cpp q8_0. Each run decodes 128 greedy tokens after the same
32-token prompt at batch 1, on the same number of threads (2); llama.cpp through its C API (decode,
then the argmax of the last logits: no Python sampler), ours through `Engine.generate`. The candidates
run in rotation with a 512 MiB read-bandwidth measurement, best of --repeats. A decode step reads every
matrix once (the tied head included): the bound is read bandwidth / those bytes, ours as their kernels
store them, llama.cpp's as the GGUF file stores them.

    .venv/bin/python benchmarks/bench_llamacpp.py                  # about 3 minutes
    .venv/bin/python benchmarks/bench_llamacpp.py --quick          # 32 tokens, 2 repeats
    .venv/bin/python benchmarks/bench_llamacpp.py --breakdown      # also: where a step of ours goes

Both sides run their threads on OpenMP (llama.cpp's ggml is built with it), so libgomp's default
spin-waiting is each one's normal setting; `OMP_WAIT_POLICY=PASSIVE` slows both (RESULTS.md).

`--llama-extra-bufts` lets llama.cpp repack weights for its AMX kernels (off by default: its AMX q8_0
matmul crashes on some CPUs, tests/test_gguf.py).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from bench_families import cpu_name, linear_bytes
from bench_generate import _timed, load_average, read_bandwidth, rotate

from scratchllm.checkpoint import LoadedModel
from scratchllm.generation import Engine, GenerationConfig
from scratchllm.hub import export_gguf
from scratchllm.model.gpt import GPTModel, preset_config
from scratchllm.model.quantize import QuantizedLinear, quantize_model
from scratchllm.text.gpt2 import load_gpt2_files

SHARED_DATA = Path(
    os.environ.get("SCRATCHLLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
# ours -> llama.cpp's file types it is compared with
PAIRS = {"fp32": ("f32",), "bf16 weights": ("f16", "bf16"), "int8": ("q8_0",)}


def gpt2_tokenizer():
    env = os.environ.get("SCRATCHLLM_GPT2_TOKENIZER")
    return load_gpt2_files(env or SHARED_DATA)


def gguf_bytes(path: Path) -> int:
    """Bytes a llama.cpp decode step reads: every tensor of the file but the position embeddings (one
    row); the token embeddings count whole, since the tied head reads them all."""
    import gguf

    reader = gguf.GGUFReader(path)
    return sum(int(t.n_bytes) for t in reader.tensors if t.name != "position_embd.weight")


@contextlib.contextmanager
def llama_model(path: Path, threads: int, ctx: int, extra_bufts: bool) -> Iterator:
    """llama.cpp's model of the file (its default f16 KV cache), closed afterwards."""
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    defaults = lib.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = extra_bufts
        return p

    lib.llama_model_default_params = params
    try:
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False
        )
    finally:
        lib.llama_model_default_params = defaults
    try:
        yield llm
    finally:
        llm.close()


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `prompt`: llama.cpp's decode, then the argmax of the last logits."""
    llm.reset()
    vocab = llm.n_vocab()
    out: list[int] = []
    llm.eval(prompt)
    for _ in range(n):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))
        out.append(int(logits.argmax()))
        if len(out) < n:
            llm.eval(out[-1:])
    return out


# ---------------------------------------------------------------------------------------------
# Where a decode step of ours goes


def step_ms(engine: Engine, prompt: list[int], n: int, repeats: int) -> float:
    """Milliseconds per decode step: (time of n new tokens - time of 1) / (n - 1), best of `repeats`."""

    def run(tokens: int) -> float:
        t = time.perf_counter()
        engine.generate([prompt], GenerationConfig(max_new_tokens=tokens, ignore_eos=True))
        return time.perf_counter() - t

    run(2)
    return min(run(n) - run(1) for _ in range(repeats)) / (n - 1) * 1e3


def products_ms(engine: Engine, model: nn.Module, repeats: int) -> float:
    """Milliseconds of a decode step's weight products: one row through every linear layer, in the
    model's order, each on the route and kernel a step gives it (the engine's installed forwards, if any;
    inside the one-call layers the same kernels run), best of `repeats`."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, QuantizedLinear))]
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    xs = {k: torch.randn(1, 1, k).to(dtype) for k in {m.in_features for m in layers}}
    kernels = engine.kernels  # None where the engine decodes on the modules' own forwards
    routes = kernels.installed() if kernels is not None and kernels.refresh() else contextlib.nullcontext()
    with torch.inference_mode(), routes:
        run = lambda: [m(xs[m.in_features]) for m in layers]  # noqa: E731
        run()
        return min(_timed(run) for _ in range(repeats)) * 1e3


def breakdown(name: str, model: nn.Module, prompt: list[int], n: int, repeats: int) -> None:
    """Print where a batch-1 decode step of `model` goes: its weight products (timed alone, as the step
    runs them) and everything else (attention, norms, activations, sampling, Python), as ms and share.
    Timed alone, each product also pays a Python call that the one-call layers do not: the rest is at
    least what is shown."""
    engine = Engine(model)
    full = step_ms(engine, prompt, n, repeats)
    products = min(products_ms(engine, model, max(repeats, 5)), full)
    rest = full - products
    print(
        f"  ours {name}: {full:.2f} ms per step: weight products {products:.2f} ({products / full:.0%}), "
        f"everything else {rest:.2f} ({rest / full:.0%})"
    )


def first_agreeing(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def export_all(model: GPTModel, kinds: list[str], tmp: Path) -> dict[str, Path]:
    """`model` (with GPT-2's tokenizer) written by `export_gguf` as each GGUF type, one directory each
    (each file gets a Modelfile beside it)."""
    loaded = LoadedModel(model=model, tokenizer=gpt2_tokenizer(), config=model.cfg, extra={})
    files = {}
    for kind in kinds:
        (tmp / kind).mkdir()
        files[kind] = export_gguf(loaded, tmp / kind / f"model-{kind}.gguf", kind)
    return files


def compare(
    engines: dict[str, Engine], llamas: dict, prompt: list[int], n_new: int, repeats: int
) -> dict[str, list[float]]:
    """Greedy agreement with ours fp32, then tokens/s of every candidate in rotation (with the bandwidth)."""
    greedy = GenerationConfig(max_new_tokens=n_new, ignore_eos=True)
    ref = engines["fp32"].generate([prompt], greedy)[0].token_ids
    print(f"\ngreedy tokens that match ours fp32 ({n_new} tokens; random weights part after near-ties):")
    for name, engine in engines.items():
        print(
            f"  ours {name:20s} first {first_agreeing(engine.generate([prompt], greedy)[0].token_ids, ref)}"
        )
    for kind, llm in llamas.items():
        print(f"  llama.cpp {kind:15s} first {first_agreeing(llama_greedy(llm, prompt, n_new), ref)}")
    candidates: dict[str, Callable[[], float]] = {}
    for name, engine in engines.items():
        candidates[f"ours {name}"] = lambda e=engine: len(e.generate([prompt], greedy)[0].token_ids)
    for kind, llm in llamas.items():
        candidates[f"llama.cpp {kind}"] = lambda llm=llm: len(llama_greedy(llm, prompt, n_new))
    big = torch.ones(128 * 1024 * 1024)
    candidates["(read bandwidth, GB/s)"] = lambda: big.sum().item() * 4 / 1e9
    print(f"\nbatch 1, {len(prompt)}-token prompt, {n_new} new tokens, greedy, best of {repeats}:")
    return rotate(candidates, repeats)


def report(rates: dict[str, list[float]], need: dict[str, int], bw: float) -> None:
    """Tokens/s, share of the bandwidth bound, and ours / llama.cpp per pair."""
    bw = max(bw, *rates.pop("(read bandwidth, GB/s)"))
    print(f"  read bandwidth, best of the start and the rotation: {bw:.1f} GB/s")
    for label, r in rates.items():
        bound = bw * 1e9 / need[label]
        print(
            f"  {label:24s} {max(r):7.1f} tok/s (median {statistics.median(r):7.1f})  "
            f"{max(r) / bound:4.0%} of the bound ({bound:6.1f} tok/s; {need[label] / 1e6:4.0f} MB per token)"
        )
    print("\nours / llama.cpp (best of each):")
    for ours, theirs in PAIRS.items():
        for kind in theirs:
            if f"llama.cpp {kind}" in rates:
                ratio = max(rates[f"ours {ours}"]) / max(rates[f"llama.cpp {kind}"])
                print(f"  ours {ours:14s} / llama.cpp {kind:5s} {ratio:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2", help="a GPT-2 preset (default: gpt2, the 124M shape)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="threads for both (default 2)")
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 2 repeats")
    extra_help = "llama.cpp's AMX/repacked weight buffers (its q8_0 crashed with them on the 2-core Xeon)"
    ap.add_argument("--llama-extra-bufts", action="store_true", help=extra_help)
    ap.add_argument("--no-bf16-gguf", action="store_true", help="skip llama.cpp's bf16 file")
    ap.add_argument("--breakdown", action="store_true", help="also: where a decode step of ours goes")
    args = ap.parse_args()
    if args.quick:
        for name, value in dict(new_tokens=32, repeats=2).items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
    import llama_cpp

    torch.set_num_threads(args.threads)
    print(
        f"# machine: {cpu_name()}, {os.cpu_count()} CPUs; {args.threads} threads each: torch "
        f"{torch.__version__}, llama-cpp-python {llama_cpp.__version__}; python {platform.python_version()}"
    )
    policy = os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp spins)")
    print(f"# OMP_WAIT_POLICY={policy}; load average at start: {load_average()}")
    bw = read_bandwidth()
    print(f"read bandwidth (sum of a 512 MiB tensor, best of 7): {bw:.1f} GB/s")

    torch.manual_seed(0)
    model = GPTModel(preset_config(args.preset, drop_rate=0.0)).eval()
    ours = {
        "fp32": model,
        "bf16 weights": copy.deepcopy(model).to(torch.bfloat16),
        "int8": quantize_model(copy.deepcopy(model), "int8"),
    }
    prompt = torch.randint(0, 50256, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    kinds = [k for ks in PAIRS.values() for k in ks if not (k == "bf16" and args.no_bf16_gguf)]
    tmp = Path(tempfile.mkdtemp(prefix="bench_llamacpp_", dir="/tmp"))
    try:
        files = export_all(model, kinds, tmp)
        sizes = ", ".join(f"{k} {p.stat().st_size / 1e6:.0f} MB" for k, p in files.items())
        print(f"GGUF files under {tmp}: {sizes}")
        with contextlib.ExitStack() as stack:
            ctx = args.prompt_len + args.new_tokens + 8
            llamas = {
                kind: stack.enter_context(llama_model(path, args.threads, ctx, args.llama_extra_bufts))
                for kind, path in files.items()
            }
            rates = compare(
                {k: Engine(m) for k, m in ours.items()}, llamas, prompt, args.new_tokens, args.repeats
            )
        need = {f"ours {name}": linear_bytes(m) for name, m in ours.items()}
        need |= {f"llama.cpp {kind}": gguf_bytes(path) for kind, path in files.items()}
    finally:
        shutil.rmtree(tmp)
    report(rates, need, bw)
    if args.breakdown:
        print(
            f"\nwhere a decode step goes (ms, best of {args.repeats}; products timed alone, on its kernels):"
        )
        for name, m in ours.items():
            breakdown(name, m, prompt, args.new_tokens, args.repeats)
    print(f"\n# load average at end: {load_average()}")


if __name__ == "__main__":
    sys.exit(main())
