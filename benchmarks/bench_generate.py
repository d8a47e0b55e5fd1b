"""Greedy generation speed: scratchllm's engine vs transformers vs the book's code, one process.

The GPT-2 124M shape with random weights (the same weights in all three), a 32-token prompt, 128
new tokens, batch 1; then batch 8, and the time to the first token of a 512-token prompt. Decoding
one token reads every weight matrix once, so batch-1 speed is bounded by memory bandwidth: the
script measures the read bandwidth (a large tensor sum) and reports how close each run gets.

    .venv/bin/python benchmarks/bench_generate.py              # the full run (a few minutes)
    .venv/bin/python benchmarks/bench_generate.py --quick      # fewer tokens and repeats
    python benchmarks/bench_generate.py --device cuda          # on a GPU (adds "transformers bf16")

Candidates run in rotation (A B C A B C ...) so that load changes on a shared machine hit them
alike; each figure is the best of --repeats runs. On an oversubscribed machine run it with
`OMP_WAIT_POLICY=PASSIVE` (or `--threads 1`): libgomp's default spin-waiting then slows every
PyTorch program on the main thread several-fold (see RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from scratchllm.generation import Engine, GenerationConfig, generate_text_simple
from scratchllm.model.gpt import GPTModel, preset_config
from scratchllm.model.quantize import Int4Linear, Int8Linear, int4_supported, quantize_model


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


CPU = torch.device("cpu")


def sync(device: torch.device) -> None:
    """Wait for the work queued on a GPU, so that a timer read next counts it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(repeats: int = 7, device: torch.device = CPU) -> float:
    """GB/s of summing a 512 MiB fp32 tensor (reads it once), best of `repeats`; on a GPU each timing
    covers 10 sums, so that the launch and synchronization overhead is spread over more bytes."""
    x = torch.ones(128 * 1024 * 1024, device=device)
    x.sum()
    n = 1 if device.type == "cpu" else 10
    best = min(_timed(lambda: [x.sum() for _ in range(n)], device) for _ in range(repeats))
    return n * x.numel() * 4 / best / 1e9


def _timed(fn: Callable[[], object], device: torch.device = CPU) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def weight_bytes_per_token(model: GPTModel) -> int:
    """Bytes of weights a decode step reads: every linear layer's matrix and bias (the tied LM head
    included); int8 layers their codes and scales, int4 layers their codes, steps and zeros. The norms'
    and the embeddings' few bytes (one row each) are ignored."""
    total = 0
    for m in model.modules():
        tensors = []
        if isinstance(m, nn.Linear):
            tensors = [m.weight, m.bias]
        elif isinstance(m, Int8Linear):
            tensors = [m.qweight, m.scale, m.bias]
        elif isinstance(m, Int4Linear):
            tensors = [m.qweight, m.step, m.zero, m.bias]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


# ---------------------------------------------------------------------------------------------
# The same random weights in the book's GPTModel and in transformers' GPT2LMHeadModel


def to_book(model: GPTModel):
    from llms_from_scratch.ch04 import GPTModel as BookGPT

    cfg = model.cfg
    book_cfg = dict(
        vocab_size=cfg.vocab_size,
        context_length=cfg.context_length,
        emb_dim=cfg.emb_dim,
        n_heads=cfg.n_heads,
        n_layers=cfg.n_layers,
        drop_rate=0.0,
        qkv_bias=cfg.qkv_bias,
    )
    book = BookGPT(book_cfg).eval()
    book.load_state_dict(_book_state(model, book), strict=True)
    return book, book_cfg


def _book_state(model: GPTModel, book: nn.Module) -> dict:
    sd = {}
    for name, t in model.state_dict().items():
        if ".att.qkv." in name:
            for part, tensor in zip(("W_query", "W_key", "W_value"), t.chunk(3, dim=0)):
                sd[name.replace("qkv", part)] = tensor
        else:
            sd[name.replace("drop_shortcut", "drop_resid")] = t
    for name, t in book.state_dict().items():
        sd.setdefault(name, t)  # the causal-mask buffers
    return sd


def to_book_kv(model: GPTModel, book_cfg: dict):
    """The package's KV-cache variant (llms_from_scratch.kv_cache.gpt2) with the same weights."""
    from llms_from_scratch.kv_cache.gpt2 import GPTModel as BookKV

    book = BookKV(book_cfg).eval()
    book.load_state_dict(_book_state(model, book), strict=True)
    return book


def to_transformers(model: GPTModel):
    """The same weights in a transformers GPT2LMHeadModel, through the project's own export mapping."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from scratchllm.hub import hf_config, to_hf_state_dict

    settings = {**hf_config(model.cfg), "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    hf = GPT2LMHeadModel(GPT2Config(**settings)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not unexpected and all(
        "lm_head" in m or "attn.bias" in m or "masked_bias" in m for m in missing
    ), missing
    hf.tie_weights()
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    hf.generation_config.pad_token_id = 0
    return hf


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--long-prompt", type=int, default=512)
    ap.add_argument("--book-uncached-tokens", type=int, default=128, help="new tokens for the slow book loop")
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 2 repeats")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    compile_help = "also time Engine(compile=True): torch.compile, CUDA graphs on GPUs"
    ap.add_argument("--compile", action="store_true", help=compile_help)
    args = ap.parse_args()
    if args.device == "cpu":
        dev = CPU
    else:
        from scratchllm.device import pick_device
        from scratchllm.errors import ScratchLLMError

        try:
            dev = pick_device(args.device)
        except ScratchLLMError as e:
            raise SystemExit(f"error: {e}") from None
        if dev.type != "cuda":
            raise SystemExit(f"error: --device {args.device}: this benchmark runs on cpu or cuda")
    gpu = dev.type == "cuda"
    has_book = importlib.util.find_spec("llms_from_scratch") is not None
    if args.quick:  # smaller defaults; flags given explicitly stay
        for name, value in dict(new_tokens=32, repeats=2, book_uncached_tokens=32).items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import transformers

    cpu = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    print(
        f"# machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({threads} threads), "
        f"transformers {transformers.__version__}, python {platform.python_version()}"
    )
    policy = os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp spins)")
    print(f"# OMP_WAIT_POLICY={policy}; load average at start: {load_average()}")
    if gpu:
        print(
            f"# device: {dev} ({torch.cuda.get_device_name(dev)}); every timing synchronizes the GPU before "
            f"reading the clock; float32 matmul precision {torch.get_float32_matmul_precision()!r}"
        )
    if not has_book:
        print("# llms_from_scratch is not installed: the book's contenders are skipped")
    bw = read_bandwidth(device=dev)
    print(f"read bandwidth (sum of a 512 MiB tensor, best of 7): {bw:.1f} GB/s")

    model = GPTModel(preset_config("gpt2", drop_rate=0.0)).eval()
    model_bf16 = GPTModel(model.cfg).eval().to(torch.bfloat16)
    model_bf16.load_state_dict(model.state_dict())
    book = book_kv = None
    if has_book:
        book, book_cfg = to_book(model)
        book_kv = to_book_kv(model, book_cfg)
    hf = to_transformers(model)
    # on a GPU: transformers with bf16 weights too, as its GPU users run it
    hf_bf16 = to_transformers(model).to(device=dev, dtype=torch.bfloat16) if gpu else None
    # every model is built on the CPU from the same weights, then moved (a no-op on the CPU)
    for m in (model, model_bf16, book, book_kv, hf):
        if m is not None:
            m.to(dev)
    ctx = model.cfg.context_length
    n_new = args.new_tokens
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 50256, (1, args.prompt_len), generator=g)
    prompt_d = prompt.to(dev)  # for transformers and the book (the engine takes token lists)
    greedy = GenerationConfig(max_new_tokens=n_new, ignore_eos=True)

    engines = {"ours fp32": Engine(model)}
    if not gpu:  # prepacking is for CPUs: on a GPU both engines would be the same
        engines["ours fp32, PyTorch's default linear kernels"] = Engine(model, prepack=False)
    engines["ours bf16 weights"] = Engine(model_bf16)
    model_int4 = model_int8 = None
    if not gpu:  # the int8 and int4 kernels are CPU ones
        model_int8 = quantize_model(copy.deepcopy(model), "int8")
        engines["ours int8 weights"] = Engine(model_int8)
    if not gpu and int4_supported():
        model_int4 = quantize_model(copy.deepcopy(model))
        engines["ours int4 weights"] = Engine(model_int4)
    compiled = [f"ours {w} compiled" for w in ("fp32", "bf16 weights")] if args.compile else []
    if args.compile:
        engines["ours fp32 compiled"] = Engine(model, compile=True)
        engines["ours bf16 weights compiled"] = Engine(model_bf16, compile=True)

    def ours(name: str, prompts: list[list[int]], cfg: GenerationConfig = greedy) -> list[list[int]]:
        return [c.token_ids for c in engines[name].generate(prompts, cfg)]

    def hf_generate(ids: torch.Tensor, n: int, lm: nn.Module = hf) -> torch.Tensor:
        with torch.inference_mode():
            mask = torch.ones_like(ids)
            out = lm.generate(ids, max_new_tokens=n, do_sample=False, use_cache=True, attention_mask=mask)
            return out[:, ids.shape[1] :]

    def book_kv_generate(ids: torch.Tensor, n: int) -> torch.Tensor:
        # the book's cached loop, driven directly: the package's own one needs model.cfg / reset_kv_cache
        from llms_from_scratch.kv_cache.utils import KVCache

        with torch.no_grad():
            cache = KVCache(n_layers=book_cfg["n_layers"])
            book_kv.current_pos = 0
            logits = book_kv(ids, use_cache=True, cache=cache)
            out = []
            for _ in range(n):
                nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
                out.append(nxt)
                logits = book_kv(nxt, use_cache=True, cache=cache)
            return torch.cat(out, dim=1)

    # -- correctness first: every candidate must produce the same tokens from the same weights
    p = prompt[0].tolist()
    ref = ours("ours fp32", [p])[0]
    checks = {}
    if not gpu:
        checks["ours fp32, PyTorch's default linear kernels"] = ours(
            "ours fp32, PyTorch's default linear kernels", [p]
        )[0]
    no_cache = greedy.replace(use_cache=False, max_new_tokens=32)
    checks["ours, no KV cache"] = ours("ours fp32", [p], no_cache)[0]
    checks["transformers"] = hf_generate(prompt_d, n_new)[0].tolist()
    if book is not None:
        uncached = generate_text_simple(book, prompt_d, 32, ctx)
        checks["book generate_text_simple (uncached)"] = uncached[0, -32:].tolist()
    checks["ours bf16 weights"] = ours("ours bf16 weights", [p])[0]
    if model_int8 is not None:
        checks["ours int8 weights"] = ours("ours int8 weights", [p])[0]
    if model_int4 is not None:
        checks["ours int4 weights"] = ours("ours int4 weights", [p])[0]
    for name in compiled:  # the first call of each batch size compiles
        t = time.perf_counter()
        checks[name] = ours(name, [p])[0]
        print(f"  ({name}: first call, compilation included, {time.perf_counter() - t:.1f} s)")
    if hf_bf16 is not None:
        checks["transformers bf16 weights"] = hf_generate(prompt_d, n_new, hf_bf16)[0].tolist()
    book_kv_error = None if book_kv is not None else "llms_from_scratch is not installed"
    if book_kv is not None:
        try:
            checks["book kv-cache loop"] = book_kv_generate(prompt_d, n_new)[0].tolist()
            book_kv_error = None
        except Exception as e:  # the package's kv_cache GPTModel fails on its first one-token step
            book_kv_error = f"{type(e).__name__}: {e}"
    print(f"\nsame greedy tokens as ours fp32 ({n_new} tokens; the uncached runs compare their first 32):")
    for name, toks in checks.items():
        same = toks == ref[: len(toks)]
        agree = next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), len(toks))
        print(f"  {name:45s} {'yes' if same else f'no (first {agree} agree)'}")
    if gpu:
        print("  (bf16 runs, and fp32 ones with other GPU kernels, may part from fp32 after a near-tie)")
    else:
        print("  (bf16, int8 and int4 weights are rounded: random weights, whose top logits nearly tie, part")
        print("   from fp32 after a few tokens; `scratchllm perplexity --quantize` measures quality)")
    if book_kv_error and has_book:
        print(f"  llms_from_scratch.kv_cache.gpt2.GPTModel is not usable: {book_kv_error}")

    # -- batch 1 decoding speed
    print(
        f"\nbatch 1, {args.prompt_len}-token prompt, {n_new} new tokens, greedy (best of {args.repeats}; "
        "tokens/s):"
    )
    candidates: dict[str, Callable[[], float]] = {
        "ours fp32": lambda: len(ours("ours fp32", [p])[0]),
        "ours bf16 weights": lambda: len(ours("ours bf16 weights", [p])[0]),
    }
    if model_int8 is not None:
        candidates["ours int8 weights"] = lambda: len(ours("ours int8 weights", [p])[0])
    if model_int4 is not None:
        candidates["ours int4 weights"] = lambda: len(ours("ours int4 weights", [p])[0])
    for name in compiled:
        candidates[name] = lambda name=name: len(ours(name, [p])[0])
    if not gpu:
        candidates["ours fp32, PyTorch's default linear kernels"] = lambda: len(
            ours("ours fp32, PyTorch's default linear kernels", [p])[0]
        )
    hf_name = "transformers GPT2LMHeadModel.generate (KV cache)"
    candidates[hf_name] = lambda: hf_generate(prompt_d, n_new).shape[1]
    if hf_bf16 is not None:
        candidates["transformers bf16 weights"] = lambda: hf_generate(prompt_d, n_new, hf_bf16).shape[1]
    if not book_kv_error:
        candidates["book kv-cache loop"] = lambda: book_kv_generate(prompt_d, n_new).shape[1]
    # the bandwidth too, in the rotation: on a shared machine it changes with the neighbours' load
    big = torch.ones(128 * 1024 * 1024, device=dev)
    candidates["(read bandwidth, GB/s)"] = lambda: big.sum().item() * 4 / 1e9  # GB read
    rates = rotate(candidates, args.repeats, dev)
    bw = max(bw, *rates.pop("(read bandwidth, GB/s)"))
    print(f"  read bandwidth, best of the start and the rotation: {bw:.1f} GB/s")
    uncached_n = args.book_uncached_tokens
    if book is not None:
        rates["book generate_text_simple (uncached)"] = [
            uncached_n / _timed(lambda: generate_text_simple(book, prompt_d, uncached_n, ctx), dev)
        ]
    hf_best = max(rates[hf_name])
    bytes32 = weight_bytes_per_token(model)
    bytes4 = weight_bytes_per_token(model_int4) if model_int4 is not None else 0
    bytes8 = weight_bytes_per_token(model_int8) if model_int8 is not None else 0
    for name, r in rates.items():
        best = max(r)
        kinds = {"bf16": bytes32 // 2, "int8": bytes8, "int4": bytes4}
        nbytes = next((n for k, n in kinds.items() if k in name), bytes32)
        bound = bw * 1e9 / nbytes  # tokens/s if a step took only its weight reads
        print(
            f"  {name:50s} {best:7.1f}  (median {statistics.median(r):6.1f})  {best / hf_best:5.2f}x "
            f"transformers  {best / bound:4.0%} of the bandwidth bound ({bound:5.1f} tok/s)"
        )
    int8 = f", {bytes8 / 1e6:.0f} MB int8" if bytes8 else ""
    int4 = f", {bytes4 / 1e6:.0f} MB int4" if bytes4 else ""
    print(f"  weights read per token: {bytes32 / 1e6:.0f} MB fp32, {bytes32 / 2e6:.0f} MB bf16{int8}{int4}")

    # -- batch 8
    bp = torch.randint(0, 50256, (args.batch, args.prompt_len), generator=g)
    bp_d = bp.to(dev)
    lens = [max(1, args.prompt_len - 3 * i) for i in range(args.batch)]
    mixed = [bp[i, : lens[i]].tolist() for i in range(args.batch)]
    print(
        f"\nbatch {args.batch}, {n_new} new tokens each, greedy (best of {args.repeats}; tokens/s over the "
        "batch):"
    )
    candidates = {
        "ours fp32": lambda: sum(map(len, ours("ours fp32", bp.tolist()))),
        "ours bf16 weights": lambda: sum(map(len, ours("ours bf16 weights", bp.tolist()))),
        **(
            {"ours int8 weights": lambda: sum(map(len, ours("ours int8 weights", bp.tolist())))}
            if model_int8
            else {}
        ),
        **(
            {"ours int4 weights": lambda: sum(map(len, ours("ours int4 weights", bp.tolist())))}
            if model_int4
            else {}
        ),
        f"ours fp32, prompt lengths {lens[-1]}..{lens[0]} (left padding)": lambda: sum(
            map(len, ours("ours fp32", mixed))
        ),
        "transformers": lambda: hf_generate(bp_d, n_new).numel(),
    }
    for name in compiled:
        candidates[name] = lambda name=name: sum(map(len, ours(name, bp.tolist())))
    if hf_bf16 is not None:
        candidates["transformers bf16 weights"] = lambda: hf_generate(bp_d, n_new, hf_bf16).numel()
    rates = rotate(candidates, args.repeats, dev)
    hf_best = max(rates["transformers"])
    for name, r in rates.items():
        print(f"  {name:50s} {max(r):7.1f}  {max(r) / hf_best:5.2f}x transformers")

    # -- first token of a long prompt
    long_prompt = torch.randint(0, 50256, (1, args.long_prompt), generator=g)
    long_d = long_prompt.to(dev)
    one = GenerationConfig(max_new_tokens=1, ignore_eos=True)
    lp = long_prompt[0].tolist()
    print(f"\nfirst-token latency, {args.long_prompt}-token prompt (best of {args.repeats}; ms):")
    candidates = {
        "ours fp32": lambda: ours("ours fp32", [lp], one) and 1,
        "ours bf16 weights": lambda: ours("ours bf16 weights", [lp], one) and 1,
        **({"ours int8 weights": lambda: ours("ours int8 weights", [lp], one) and 1} if model_int8 else {}),
        **({"ours int4 weights": lambda: ours("ours int4 weights", [lp], one) and 1} if model_int4 else {}),
        "transformers": lambda: hf_generate(long_d, 1).shape[1],
    }
    if hf_bf16 is not None:
        candidates["transformers bf16 weights"] = lambda: hf_generate(long_d, 1, hf_bf16).shape[1]
    if book is not None:
        candidates["book (one forward pass)"] = lambda: (
            generate_text_simple(book, long_d, 1, ctx).shape[1] - args.long_prompt
        )
    rates = rotate(candidates, args.repeats, dev)
    hf_ms = 1000 / max(rates["transformers"])
    for name, r in rates.items():
        ms = 1000 / max(r)
        print(f"  {name:50s} {ms:7.{2 if gpu else 0}f}  {ms / hf_ms:5.2f}x transformers' time")
    print(f"\n# load average at end: {load_average()}")


def rotate(
    candidates: dict[str, Callable[[], float]], repeats: int, device: torch.device = CPU
) -> dict[str, list[float]]:
    """Tokens per second of each candidate, run in rotation `repeats` times (after one warm-up each)."""
    for fn in candidates.values():
        fn()
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            sync(device)
            t = time.perf_counter()
            n = fn()
            sync(device)
            rates[name].append(n / (time.perf_counter() - t))
    return rates


if __name__ == "__main__":
    sys.exit(main())
