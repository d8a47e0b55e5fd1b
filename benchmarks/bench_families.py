"""Llama 3 and Qwen3 shapes: greedy decoding speed against transformers, and the memory of loading one.

Decoding: the Qwen3-0.6B and Llama-3.2-1B shapes with random bf16 weights (the same weights in both
engines: ours exported into transformers' `Qwen3ForCausalLM` / `LlamaForCausalLM`, whose logits are
checked against ours first), a 32-token prompt, 128 new tokens, batch 1, greedy. Candidates: our
`Engine` with bf16 weights, int8 and int4 weights (`quantize_model`, what `--quantize int8/int4` runs), and
transformers' `generate` (bf16 weights, its KV cache). They run in rotation (A B C A B C ...) with a
memory-bandwidth measurement, best of --repeats. A decode step reads every linear weight once (the
LM head included), one embedding row and the KV cache so far: the bound is read bandwidth / those
bytes. Each candidate is also timed on the prompt and first token alone, in the same rotation; the
rest of a whole run is its decode steps, reported on their own (tokens/s of the steps, as llama.cpp's
`tg` reports decoding apart from the prompt).

Loading: a Llama-3.2-1B-shape Hugging Face directory (random bf16 weights, two safetensors shards and
an index) is converted with `convert_hf_dir`, then the model directory is loaded with `load_model`,
each in a fresh subprocess that reports its peak resident memory above the baseline after imports,
as a multiple of the weights' size on disk (the goal: at most 1.2x). Temporary files go under /tmp.

    .venv/bin/python benchmarks/bench_families.py                    # everything (about 15 minutes)
    .venv/bin/python benchmarks/bench_families.py --quick            # 32 new tokens, 2 repeats
    .venv/bin/python benchmarks/bench_families.py --models qwen3-0.6b --no-load
    .venv/bin/python benchmarks/bench_families.py --load-only

The machine needs about 10 GiB free: at most two copies of one model's weights plus its int4 form
(and our packed weights) are alive at once; each model is freed before the next.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from bench_generate import load_average, read_bandwidth, rotate

from scratchllm.generation import Engine, GenerationConfig
from scratchllm.hub import hf_config, to_hf_state_dict
from scratchllm.model.quantize import Int4Linear, Int8Linear, int4_supported, quantize_model
from scratchllm.model.registry import build_model, preset_config

MODELS = ("qwen3-0.6b", "llama3.2-1b")
LOAD_MODEL = "llama3.2-1b"


def build_bf16(name: str, context_length: int) -> nn.Module:
    """Our model of preset `name` with random bf16 weights (made in bf16: no fp32 copy on the way)."""
    cfg = preset_config(name, context_length=context_length, drop_rate=0.0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        return build_model(cfg).eval()
    finally:
        torch.set_default_dtype(default)


def to_transformers(model: nn.Module) -> nn.Module:
    """transformers' model of the same family holding the same tensors (assigned, not copied)."""
    import transformers
    from transformers.initialization import no_init_weights

    settings = hf_config(model.cfg, dtype=torch.bfloat16)
    config = transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with no_init_weights():  # its random init would only be overwritten
            hf = getattr(transformers, settings["architectures"][0])(config)
    finally:
        torch.set_default_dtype(default)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def check_logits(model: nn.Module, hf: nn.Module, prompt: torch.Tensor) -> str:
    """Both models' bf16 logits on the prompt, compared; raises when they are not the same model."""
    with torch.inference_mode():
        ours = model(prompt).float()
        theirs = hf(prompt).logits.float()
    diff = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    same_top = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    if diff > 0.05 * scale or same_top < 0.9:
        raise SystemExit(f"the models disagree: max |diff| {diff:.3g} of {scale:.3g}, top-1 {same_top:.0%}")
    return f"max |logit diff| {diff:.3g} (largest logit {scale:.3g}), same top token at {same_top:.0%}"


def linear_bytes(model: nn.Module) -> int:
    """Bytes of every linear layer's weights as its kernel stores them (int8: the codes and the
    per-channel scales; int4: the packed codes and the scales), biases included."""
    total = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            tensors = [m.weight, m.bias]
        elif isinstance(m, Int8Linear):
            tensors = [m.qweight, m.scale, m.bias]
        elif isinstance(m, Int4Linear):
            tensors = [m._kernel_weight, m._kernel_scales, m.bias]
        else:
            continue
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def bytes_per_token(model: nn.Module, kv_positions: float, kv_dtype: torch.dtype) -> dict[str, float]:
    """Bytes a decode step reads: the linear layers' weights (`linear_bytes`), one embedding row, and
    the KV cache at `kv_positions` keys."""
    linear = linear_bytes(model)
    cfg, emb = model.cfg, model.tok_emb.weight
    row = cfg.emb_dim * emb.element_size()
    kv_width = 2 * cfg.n_layers * cfg.n_kv_groups * cfg.head_dim * kv_dtype.itemsize
    return {"linear": linear, "embedding row": row, "kv cache": kv_width * kv_positions}


# ---------------------------------------------------------------------------------------------
# Decoding


def bench_decode(name: str, args: argparse.Namespace, bw: float) -> dict[str, float]:
    """Time the candidates on one model shape; print and return their tokens/s (and the bandwidth)."""
    model = build_bf16(name, args.context)
    hf = to_transformers(model)
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n## {name} shape: {n_params / 1e6:.0f}M parameters, {cfg.n_layers} layers")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g)
    print(f"  logits, ours vs transformers (bf16, the prompt): {check_logits(model, hf, prompt)}")
    n_new = args.new_tokens
    greedy = GenerationConfig(max_new_tokens=n_new, ignore_eos=True)
    engines = {"ours bf16 weights": Engine(model)}
    model_int8 = quantize_model(copy.deepcopy(model), "int8")
    engines["ours int8 weights"] = Engine(model_int8)
    model_int4 = None
    if int4_supported():
        model_int4 = quantize_model(copy.deepcopy(model))
        engines["ours int4 weights"] = Engine(model_int4)
    p = prompt[0].tolist()

    def ours(engine: Engine) -> list[int]:
        return engine.generate([p], greedy)[0].token_ids

    def theirs(n: int = n_new) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                use_cache=True,
            )
        return out[0, prompt.shape[1] :].tolist()

    first = GenerationConfig(max_new_tokens=1, ignore_eos=True)

    ref = theirs()
    for label, engine in engines.items():
        toks = ours(engine)
        agree = next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), len(toks))
        print(f"  greedy tokens of {label} that match transformers': first {agree} of {len(toks)}")
    candidates: dict[str, Callable[[], float]] = {k: (lambda e=e: len(ours(e))) for k, e in engines.items()}
    hf_name = f"transformers {type(hf).__name__}.generate (bf16)"
    candidates[hf_name] = lambda: len(theirs())
    # the prompt and first token alone: the rest of a run's time is its n_new - 1 decode steps
    for label, engine in engines.items():
        candidates[f"{label} (first token)"] = lambda e=engine: len(e.generate([p], first)[0].token_ids)
    candidates[f"{hf_name} (first token)"] = lambda: len(theirs(1))
    big = torch.ones(128 * 1024 * 1024)
    candidates["(read bandwidth, GB/s)"] = lambda: big.sum().item() * 4 / 1e9
    rates = rotate(candidates, args.repeats)
    bw = max(bw, *rates.pop("(read bandwidth, GB/s)"))
    print(f"  read bandwidth, best of the start and the rotation: {bw:.1f} GB/s")
    kv_positions = args.prompt_len + (n_new + 1) / 2  # the mean number of keys a step reads
    kv_dtype = torch.float32  # the engine's cache for bf16 weights on CPUs (transformers': bf16)
    need = {"ours bf16 weights": bytes_per_token(model, kv_positions, kv_dtype)}
    need[hf_name] = bytes_per_token(model, kv_positions, torch.bfloat16)
    need["ours int8 weights"] = bytes_per_token(model_int8, kv_positions, kv_dtype)
    if model_int4 is not None:
        need["ours int4 weights"] = bytes_per_token(model_int4, kv_positions, kv_dtype)
    first_token = {label: 1 / max(rates.pop(f"{label} (first token)")) for label in need}
    hf_best = max(rates[hf_name])
    hf_decode = (n_new - 1) / (n_new / hf_best - first_token[hf_name])
    out = {"bandwidth": bw}
    print(f"  {'':48s} whole run: prompt, first token and {n_new - 1} steps | the steps alone")
    for label, r in rates.items():
        best, nbytes = max(r), sum(need[label].values())
        bound = bw * 1e9 / nbytes
        decode = (n_new - 1) / (n_new / best - first_token[label])
        out[label], out[f"{label} decode"] = best, decode
        print(
            f"  {label:48s} {best:6.2f} tok/s (median {statistics.median(r):6.2f})  {best / hf_best:5.2f}x "
            f"transformers  {best / bound:4.0%} of the bound ({bound:5.1f} tok/s) | "
            f"{decode:6.2f} tok/s  {decode / hf_decode:5.2f}x  {decode / bound:4.0%}"
        )
    for label, parts in need.items():
        shown = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in parts.items())
        print(f"  MB read per token, {label}: {sum(parts.values()) / 1e6:.0f} ({shown})")
    return out  # the models go with this frame; the caller collects


# ---------------------------------------------------------------------------------------------
# Loading: each step in a fresh process, so that its peak resident memory is its own


def write_hf_dir(out: Path, shards: int = 2) -> int:
    """A Hugging Face directory of the 1B shape with random bf16 weights in `shards` safetensors files
    and an index; returns the bytes of tensor data."""
    from safetensors.torch import save_file

    model = build_bf16(LOAD_MODEL, preset_config(LOAD_MODEL).context_length)
    tensors = to_hf_state_dict(model)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    names, weight_map, at = list(tensors), {}, 0
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {}
        while names and (i == shards - 1 or at < total * (i + 1) / shards):
            name = names.pop(0)
            part[name] = tensors[name]
            at += tensors[name].numel() * tensors[name].element_size()
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg, dtype=torch.bfloat16), indent=2))
    return total


def peak_step(step: str, src: Path, dst: Path) -> None:
    """In this (fresh) process: convert or load, then print a JSON line of the peak resident memory
    above the baseline after imports, and the resident memory at the end."""
    import psutil

    from scratchllm.hub import convert_hf_dir, load_model

    gc.collect()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    t = time.perf_counter()
    if step == "convert":
        convert_hf_dir(src, dst)
        kept = None
    else:
        kept = load_model(str(dst))
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra": peak - base, "end": psutil.Process().memory_info().rss - base, "s": seconds}))
    del kept


def bench_load(keep: bool) -> dict[str, float]:
    """Write, convert and load the 1B shape, each in its own subprocess; print peak memory ratios."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_families_", dir="/tmp"))
    src, dst = tmp / "hf", tmp / "converted"
    here = Path(__file__).resolve()

    def run(*argv: str) -> dict:
        done = subprocess.run([sys.executable, str(here), *argv], check=True, capture_output=True, text=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    print(f"\n## peak resident memory, {LOAD_MODEL} shape (random bf16 weights), under {tmp}")
    run("--load-step", "write", "--src", str(src), "--dst", str(dst))["bytes"]
    on_disk = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(f"  Hugging Face directory: 2 shards + index, {on_disk / 1e9:.3f} GB on disk")
    out = {}
    for step, what in (("convert", "convert_hf_dir (HF shards -> model directory)"), ("load", "load_model")):
        r = run("--load-step", step, "--src", str(src), "--dst", str(dst))
        size = on_disk if step == "convert" else (dst / "model.safetensors").stat().st_size
        out[step] = r["extra"] / size
        print(
            f"  {what:46s} peak +{r['extra'] / 1e9:.3f} GB = {r['extra'] / size:.2f}x the weights on disk "
            f"({size / 1e9:.3f} GB); +{r['end'] / 1e9:.3f} GB at the end; {r['s']:.1f} s"
        )
    if not keep:
        import shutil

        shutil.rmtree(tmp)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated presets")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--context", type=int, default=512, help="context_length (keeps the KV caches small)")
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 2 repeats")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    ap.add_argument("--no-load", action="store_true", help="skip the loading-memory measurement")
    ap.add_argument("--load-only", action="store_true", help="only the loading-memory measurement")
    ap.add_argument("--keep", action="store_true", help="keep the temporary model directories")
    ap.add_argument("--load-step", choices=["write", "convert", "load"], help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_step == "write":
        print(json.dumps({"bytes": write_hf_dir(args.src)}))
        return
    if args.load_step:
        peak_step(args.load_step, args.src, args.dst)
        return
    if args.quick:  # smaller defaults; flags given explicitly stay
        for name, value in dict(new_tokens=32, repeats=2).items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    print(
        f"# machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"python {platform.python_version()}"
    )
    policy = os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp spins)")
    print(f"# OMP_WAIT_POLICY={policy}; load average at start: {load_average()}")
    if not args.load_only:
        bw = read_bandwidth()
        print(f"read bandwidth (sum of a 512 MiB tensor, best of 7): {bw:.1f} GB/s")
        n, r = args.new_tokens, args.repeats
        print(f"batch 1, {args.prompt_len}-token prompt, {n} new tokens, greedy, best of {r} (tokens/s)")
        for name in args.models.split(","):
            bench_decode(name.strip(), args, bw)
            gc.collect()
    if not args.no_load:
        bench_load(args.keep)
    print(f"\n# load average at end: {load_average()}")


def cpu_name() -> str:
    """The CPU's model name and its AVX-512 BF16 / AMX support, from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    flags = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in info]
    return f"{names[0] if names else '?'} ({', '.join(flags) or 'no AVX-512'})"


if __name__ == "__main__":
    sys.exit(main())
