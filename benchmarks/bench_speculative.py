"""Speculative decoding at batch 1: a target and a draft trained here on the same corpus, greedy decoding
with and without the draft, tokens/s, acceptance rate and speedup.

    .venv/bin/python benchmarks/bench_speculative.py --distill   # trains (about an hour), then measures
    .venv/bin/python benchmarks/bench_speculative.py --distill --threads 1   # again: reuses the models
    .venv/bin/python benchmarks/bench_speculative.py --dir runs/bench-spec-large --target-shape 768,12,12 \
        --target-tokenizer runs/bench-speculative/target/best --target-minutes 45 \
        --draft runs/bench-speculative/draft/best --distill --draft-steps 3000 --draft-minutes 15
        # a target three times larger (88M), with the first run's tokenizer, so its draft fits too

Training is the README's `scratchllm pretrain` on the built-in corpus (Python's reference documentation),
context 256, batch 8, keeping each run's best checkpoint (evaluated every 100 steps): the target
(--target-shape, default 512 dims x 8 layers, 27M parameters, lr 1e-3) trains a byte-level BPE of 4096 ids
and itself for --target-minutes; the draft (--draft-shape, default 256 x 2, 2.7M, lr 2e-3) trains with the
target's tokenizer for --draft-steps. With --distill, a third model of the draft's shape trains on the
corpus plus the target's greedy continuations (--distill-length tokens) of prefixes every --distill-every
tokens of the training documents (the usual way to raise acceptance); the corpus is named by those two
settings (distill-64x64), that draft by them and its shape (draft-distilled-64x64-256x2x4). A model
directory already in --dir is reused; train where nothing else runs, or the time budget buys fewer steps
(RESULTS.md).

Measurement: the first 8 tokens of --prompts documents that the target's run held out for validation,
each continued by --new-tokens greedy tokens (past the end of text), plainly and with the draft proposing
up to k tokens a round for each k of --draft-tokens, each --draft-confidence (stopping early where the
draft is unsure) and each --draft-schedule (adaptive: as many as the last rounds suggest; fixed: k),
candidates in rotation (plain, k1, k2, ... per prompt) so that load changes hit them alike; each figure
sums each prompt's best time of --repeats runs. The greedy texts with and without the draft are compared
(bf16 weights may part at near ties: the target scores k + 1 positions in one pass). The issue's goal:
at least 1.5x at batch 1 when the acceptance rate is above 60%.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scratchllm.device import pick_device
from scratchllm.generation import Engine, GenerationConfig, resolve_dtype
from scratchllm.generation.speculative import SpeculationStats
from scratchllm.hub import load_model
from scratchllm.model.gpt import count_parameters
from scratchllm.text.corpus import builtin_documents


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def pretrain(
    out: Path,
    shape: str,
    minutes: float,
    steps: int,
    tokenizer: str,
    lr: float,
    corpus: tuple[str, ...] = ("builtin",),
) -> Path:
    """`scratchllm pretrain` on the built-in corpus, unless `out` holds a model; its best checkpoint (the
    lowest validation loss, evaluated every 100 steps)."""
    if not (out / "model" / "config.json").is_file():
        emb, layers, heads = shape.split(",")
        args = [
            *("pretrain", "--corpus", *corpus, "--tokenizer", tokenizer),
            *(("--vocab-size", "4096") if tokenizer == "train" else ()),
            *("--emb-dim", emb, "--n-layers", layers, "--n-heads", heads, "--context-length", "256"),
            *("--batch-size", "8", "--lr", str(lr), "--min-lr", str(lr / 10), "--warmup-steps", "100"),
            *("--beta2", "0.99", "--max-steps", str(steps), "--max-minutes", str(minutes)),
            *("--eval-every", "100", "--eval-batches", "0", "--sample-tokens", "0", "--progress", "false"),
            *("--out-dir", str(out), "--overwrite", "true"),
        ]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "scratchllm", *args], check=True, stdout=subprocess.DEVNULL)
        print(f"trained {out} in {time.perf_counter() - start:.0f} s")
    best = out / "best"
    return best if (best / "config.json").is_file() else out / "model"


def heldout_prompts(data: Path, tokenizer, n: int, tokens: int = 8) -> list[str]:
    """The first `tokens` tokens of the first `n` validation documents the target's run held out (its
    prepared val.bin: documents separated by the end-of-text id), else of sections of the corpus."""
    if (data / "val.bin").is_file():
        ids = np.fromfile(data / "val.bin", dtype=np.uint16).tolist()
        docs, start = [], 0
        for i, t in enumerate([*ids, tokenizer.eot_id]):
            if t == tokenizer.eot_id:
                if i - start >= tokens:
                    docs.append(ids[start : start + tokens])
                start = i + 1
        return [tokenizer.decode(d) for d in docs[:n]]
    print(f"no {data / 'val.bin'}: prompts from the corpus, which both models were trained on")
    picked = builtin_documents()[:: 300 // n][:n]
    return [tokenizer.decode(tokenizer.encode(d.text)[:tokens]) for d in picked]


def distill_corpus(
    out: Path, target: Engine, data: Path, tokens: int = 8, every: int = 64, length: int = 64
) -> Path:
    """The target's greedy continuations (`length` tokens long) of the `tokens`-token prefixes that start
    every `every` tokens of each training document (the prepared train.bin), one file each in `out`:
    text for a draft to learn the target's ways (distillation). Reused when `out` exists."""
    if out.is_dir():
        return out
    ids = np.fromfile(data / "train.bin", dtype=np.uint16).tolist()
    eot = target.tokenizer.eot_id
    docs, start = [], 0
    for i, t in enumerate([*ids, eot]):
        if t == eot:
            docs.append(ids[start:i])
            start = i + 1
    prompts = [d[i : i + tokens] for d in docs for i in range(0, len(d) - tokens, every)]
    started = time.perf_counter()
    texts = []
    for b in range(0, len(prompts), 8):
        batch = prompts[b : b + 8]
        for prompt, c in zip(batch, target.generate(batch, max_new_tokens=length)):
            texts.append(target.tokenizer.decode(prompt) + c.text)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for n, text in enumerate(texts):
        (tmp / f"{n:04d}.txt").write_text(text, encoding="utf-8")
    tmp.rename(out)
    print(f"distillation corpus: {len(texts)} continuations in {time.perf_counter() - started:.0f} s")
    return out


def timed(engine: Engine, prompt: str, cfg: GenerationConfig) -> tuple[float, list[int], SpeculationStats]:
    """Seconds of one greedy generation, its tokens, and the draft's counts."""
    start = time.perf_counter()
    [c] = engine.generate(prompt, cfg)
    seconds = time.perf_counter() - start
    return seconds, c.token_ids, engine.last_speculation or SpeculationStats()


def measure(
    engines: dict[str, Engine], prompts: list[str], cfg: GenerationConfig, repeats: int
) -> tuple[dict[str, float], dict[str, list[list[int]]], dict[str, SpeculationStats]]:
    """Per engine, in rotation: the summed best seconds per prompt, the tokens, the draft's counts."""
    for e in engines.values():  # warm up: first calls pack weights and allocate
        e.generate(prompts[0], cfg.replace(max_new_tokens=8))
    best = {name: [float("inf")] * len(prompts) for name in engines}
    tokens: dict[str, list[list[int]]] = {name: [[] for _ in prompts] for name in engines}
    stats = {name: SpeculationStats() for name in engines}
    for _ in range(repeats):
        for i, prompt in enumerate(prompts):
            for name, engine in engines.items():
                seconds, ids, s = timed(engine, prompt, cfg)
                best[name][i] = min(best[name][i], seconds)
                tokens[name][i] = ids
                for field in ("rounds", "proposed", "accepted", "tokens"):
                    setattr(stats[name], field, getattr(stats[name], field) + getattr(s, field))
    return {name: sum(b) for name, b in best.items()}, tokens, stats


def report(
    total: int,
    seconds: dict[str, float],
    tokens: dict[str, list[list[int]]],
    stats: dict[str, SpeculationStats],
) -> None:
    """The table: tokens/s, speedup over the target alone, acceptance, and whether the texts agree."""
    base = total / seconds["target alone"]
    print("| candidate | tok/s | speedup | acceptance | tokens per target pass | same text as alone |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| target alone | {base:.1f} | 1.00x | | 1.00 | |")
    for name in list(seconds)[1:]:
        s, speed = stats[name], total / seconds[name]
        same = sum(a == b for a, b in zip(tokens[name], tokens["target alone"]))
        print(
            f"| {name} | {speed:.1f} | {speed / base:.2f}x | {s.acceptance_rate:.0%} | "
            f"{s.tokens_per_round:.2f} | {same}/{len(tokens[name])} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="runs/bench-speculative", help="where the models are trained or reused")
    ap.add_argument("--target-shape", default="512,8,8", help="emb_dim,n_layers,n_heads")
    ap.add_argument("--draft-shape", default="256,2,4", help="emb_dim,n_layers,n_heads")
    ap.add_argument("--target-minutes", type=float, default=40.0)
    ap.add_argument(
        "--target-tokenizer",
        default="train",
        help="train (a BPE of 4096 ids, trained with the target) or a model directory whose tokenizer to use",
    )
    ap.add_argument("--draft-minutes", type=float, default=10.0)
    ap.add_argument("--draft-steps", type=int, default=1500)
    ap.add_argument("--draft", help="a draft model directory to measure instead of training one")
    ap.add_argument("--distill", action="store_true", help="also measure a draft distilled from the target")
    ap.add_argument(
        "--distill-every", type=int, default=64, help="a distillation prompt every N tokens of training text"
    )
    ap.add_argument(
        "--distill-length", type=int, default=64, help="the target's greedy tokens per distillation prompt"
    )
    ap.add_argument(
        "--distilled-draft", help="a distilled draft directory to measure instead of training one"
    )
    ap.add_argument("--draft-tokens", default="1,2,3,4", help="the k values to measure")
    ap.add_argument(
        "--draft-confidence",
        default="0,0.5",
        help="the draft_confidence values to measure with each k (0: the draft always proposes k; 0.5: the "
        "CLI's default)",
    )
    ap.add_argument(
        "--draft-schedule",
        default="adaptive,fixed",
        help="the draft_schedule values to measure with each k and confidence (adaptive: k is the most a "
        "round proposes; fixed: every round proposes k)",
    )
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CPUs with native bf16), fp32, bf16")
    ap.add_argument("--draft-dtype", help="the drafts' weights (default: --dtype's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.dir)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"load average at the start: {load_average()}")
    target_dir = pretrain(
        root / "target", args.target_shape, args.target_minutes, 100_000, args.target_tokenizer, 1e-3
    )
    draft_dir = Path(args.draft) if args.draft else None
    if draft_dir is None:
        draft_dir = pretrain(
            root / "draft", args.draft_shape, args.draft_minutes, args.draft_steps, str(target_dir), 2e-3
        )

    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    draft_dtype = resolve_dtype(args.draft_dtype, device) if args.draft_dtype else dtype
    target = load_model(target_dir, device=device, dtype=dtype)
    plain = Engine(target.model, target.tokenizer)
    drafts = {"draft": draft_dir}
    if args.distill:
        # named by their settings, so that other settings make (not reuse) a corpus and a draft
        tag = f"{args.distill_every}x{args.distill_length}"
        corpus = distill_corpus(
            root / f"distill-{tag}",
            plain,
            root / "target" / "data",
            every=args.distill_every,
            length=args.distill_length,
        )
        drafts["distilled draft"] = args.distilled_draft or pretrain(
            root / f"draft-distilled-{tag}-{args.draft_shape.replace(',', 'x')}",
            args.draft_shape,
            args.draft_minutes,
            args.draft_steps,
            str(target_dir),
            2e-3,
            corpus=("builtin", str(corpus)),
        )
    ks = [int(k) for k in args.draft_tokens.split(",")]
    confidences = [float(c) for c in args.draft_confidence.split(",")]
    schedules = args.draft_schedule.split(",")
    engines = {"target alone": plain}
    for label, path in drafts.items():
        draft = load_model(path, device=device, dtype=draft_dtype).model
        print(f"{label}: {path}, {count_parameters(draft) / 1e6:.2f}M parameters, {draft_dtype}")
        for k, c, schedule in itertools.product(ks, confidences, schedules):
            name = f"{label}, {schedule} k={k}" + (f", confidence {c:g}" if c else "")
            engines[name] = Engine(
                target.model,
                target.tokenizer,
                draft=draft,
                draft_tokens=k,
                draft_confidence=c,
                draft_schedule=schedule,
            )
    print(
        f"target: {target_dir}, {count_parameters(target.model) / 1e6:.1f}M parameters; {dtype}, "
        f"{torch.get_num_threads()} threads"
    )
    prompts = heldout_prompts(root / "target" / "data", target.tokenizer, args.prompts)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    seconds, tokens, stats = measure(engines, prompts, cfg, args.repeats)
    print(f"load average at the end: {load_average()}")
    print(f"{len(prompts)} held-out prompts x {args.new_tokens} greedy tokens, best of {args.repeats}")
    report(args.new_tokens * len(prompts), seconds, tokens, stats)


if __name__ == "__main__":
    main()
