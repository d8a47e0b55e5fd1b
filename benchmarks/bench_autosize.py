"""`pretrain --model auto` against every preset at the same time budget, on held-out bits per byte.

  python benchmarks/bench_autosize.py prepare                   tokenizers + prepared data of each corpus
  python benchmarks/bench_autosize.py compare --minutes 5 15    every preset and auto, per corpus and budget
  python benchmarks/bench_autosize.py sweep --minutes 1 2       the shapes the rule was derived from
  python benchmarks/bench_autosize.py report                    auto's gap to the best preset (results.jsonl)

Corpora: `builtin` (Python's docs), Tiny Shakespeare and the King James Bible (public domain; extracted from
Debian's bible-kjv-text package into runs/autosize/kjv.txt, see benchmarks/RESULTS.md). Each corpus gets one
BPE of 8192 ids and one train/val split, shared by every run on it, so the held-out text is the same. Runs go
one at a time, each in a fresh single-threaded subprocess (OMP_NUM_THREADS=1); every result records the load
average. Held-out bits per byte: the final model's summed loss over the whole validation split, in its own
context windows, over the UTF-8 bytes of those tokens. Results are appended to runs/autosize/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SCRATCHLLM_SHARED_DATA", REPO.parent / "shared" / "data"))
WORK = REPO / "runs" / "autosize"
CORPORA = {
    "builtin": ("builtin", 2),  # source, split seed (seed 2 holds out 9% of the tokens, the default 3%)
    "shakespeare": (str(DATA / "tinyshakespeare.txt"), 1337),
    "kjv": (str(WORK / "kjv.txt"), 1337),
}
PRESETS = ("nano", "micro", "mini", "small-cpu")
# (name, pretrain flags): the presets plus shapes between and around them, at two context lengths
SWEEP = {
    "nano": ["--model", "nano"],
    "nano-256": ["--model", "nano", "--context-length", "256"],
    "d96-l3": ["--model", "nano", "--emb-dim", "96", "--n-layers", "3", "--n-heads", "3"],
    "micro-128": ["--model", "micro", "--context-length", "128"],
    "micro": ["--model", "micro"],
    "d192-l4": ["--model", "micro", "--emb-dim", "192", "--n-layers", "4", "--n-heads", "6"],
    "mini": ["--model", "mini"],
    "small-cpu": ["--model", "small-cpu"],
    "micro-lr2e-3": ["--model", "micro", "--lr", "2e-3", "--min-lr", "2e-4"],
    "micro-drop0.1": ["--model", "micro", "--drop-rate", "0.1"],
    "micro-warm20": ["--model", "micro", "--warmup-steps", "20"],
    "micro-lr2e-3-warm20": ["--model", "micro", "--lr", "2e-3", "--min-lr", "2e-4", "--warmup-steps", "20"],
    "nano-lr2e-3-warm20": ["--model", "nano", "--lr", "2e-3", "--min-lr", "2e-4", "--warmup-steps", "20"],
    "mini-lr2e-3-warm20": ["--model", "mini", "--lr", "2e-3", "--min-lr", "2e-4", "--warmup-steps", "20"],
}
SUMMARY = re.compile(r"^(done|budget): ([\d,]+) steps, ([\d,]+) tokens in (\d+) s")


def prepare(names: list[str]) -> None:
    """One BPE tokenizer and one prepared train/val split per corpus (skipped when there already)."""
    for name in names:
        source, seed = CORPORA[name]
        tok, data = WORK / f"tok-{name}", WORK / f"data-{name}"
        cli = [sys.executable, "-m", "scratchllm"]
        if not (tok / "tokenizer.json").exists() and not any(tok.glob("*")):
            subprocess.run(
                [*cli, "tokenizer", "train", "--corpus", source, "--vocab-size", "8192", "--out", str(tok)],
                check=True,
            )
        if not (data / "meta.json").exists():
            subprocess.run(
                [
                    *cli,
                    "prepare",
                    "--corpus",
                    source,
                    "--tokenizer",
                    str(tok),
                    "--out",
                    str(data),
                    "--quiet",
                    "--seed",
                    str(seed),
                ],
                check=True,
            )


def held_out_bits_per_byte(model_dir: Path, data_dir: Path) -> tuple[float, int]:
    """Bits per byte of the model over the whole validation split (its own context windows); the
    <|endoftext|> ids count as predicted tokens with no bytes."""
    import numpy as np
    import torch

    from scratchllm.checkpoint import load_model
    from scratchllm.text.sampling import load_prepared
    from scratchllm.train.evaluate import token_loss

    torch.set_num_threads(1)
    loaded = load_model(str(model_dir))
    data = load_prepared(data_dir)
    val = np.asarray(data.val)
    total, _ = token_loss(loaded.model, val, loaded.config.context_length, batch_size=16)
    eot = loaded.tokenizer.eot_id
    n_bytes = len(loaded.tokenizer.decode_bytes(int(t) for t in val if t != eot))
    return total / (math.log(2) * n_bytes), n_bytes


def train(corpus: str, name: str, flags: list[str], minutes: float, tag: str) -> dict:
    """One pretraining run in a fresh single-threaded process, then its held-out bits per byte."""
    data_dir = WORK / f"data-{corpus}"
    out = WORK / "runs" / f"{tag}-{corpus}-{name}-{minutes:g}m"
    cmd = [
        sys.executable,
        "-m",
        "scratchllm",
        "pretrain",
        "--data",
        str(data_dir),
        *flags,
        "--max-minutes",
        str(minutes),
        "--max-steps",
        "100000000",
        "--eval-every",
        "0",
        "--eval-batches",
        "1",
        "--sample-tokens",
        "0",
        "--progress",
        "false",
        "--overwrite",
        "true",
        "--out-dir",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    load_before = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} on {corpus} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    stats = _summary(proc.stdout)
    bpb, n_bytes = held_out_bits_per_byte(out / "model", data_dir)
    saved = json.loads((out / "model" / "config.json").read_text())
    config = saved["model"]
    meta = json.loads((data_dir / "meta.json").read_text())
    record = {
        "tag": tag,
        "corpus": corpus,
        "name": name,
        "minutes": minutes,
        "bits_per_byte": round(bpb, 4),
        "params": saved["info"]["parameters"],
        "emb_dim": config["emb_dim"],
        "n_layers": config["n_layers"],
        "context_length": config["context_length"],
        "drop_rate": config.get("drop_rate"),
        **stats,
        "train_tokens_corpus": meta["train_tokens"],
        "epochs": round(stats["tokens"] / meta["train_tokens"], 2),
        "val_bytes": n_bytes,
        "wall_s": round(wall, 1),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "auto": [line for line in proc.stdout.splitlines() if line.startswith("auto:")],
    }
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return record


def _summary(stdout: str) -> dict:
    for line in stdout.splitlines():
        m = SUMMARY.match(line)
        if m:
            steps, tokens, seconds = (int(g.replace(",", "")) for g in m.groups()[1:])
            return {
                "steps": steps,
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": round(tokens / max(seconds, 1)),
            }
    raise SystemExit(f"no summary line in the run's output:\n{stdout[-2000:]}")


def compare(corpora: list[str], budgets: list[float], arch: str | None, which: list[str]) -> None:
    """Every preset and auto at each budget, one at a time (`which`: all, presets, auto or names)."""
    family = ["--arch", arch] if arch else []
    groups = {"all": [*PRESETS, "auto"], "presets": list(PRESETS)}
    names = list(dict.fromkeys(name for w in which for name in groups.get(w, [w])))
    for minutes in budgets:
        for corpus in corpora:
            for name in names:
                train(corpus, name, ["--model", name, *family], minutes, "compare")
    report()


def report() -> None:
    """Auto's gap to the best preset for each corpus and budget in results.jsonl (the latest run of each)."""
    latest: dict[tuple, dict] = {}
    for line in (WORK / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["tag"] == "compare":
            latest[(r["corpus"], r["minutes"], r["name"])] = r
    print("| corpus | budget | " + " | ".join([*PRESETS, "auto"]) + " | best preset | auto's gap |")
    print("| --- | ---: |" + " ---: |" * (len(PRESETS) + 3))
    for corpus, minutes in sorted({(c, m) for c, m, _ in latest}):
        runs = {n: latest.get((corpus, minutes, n)) for n in [*PRESETS, "auto"]}
        cells = [f"{r['bits_per_byte']:.4f}" if r else "-" for r in runs.values()]
        done = [runs[p] for p in PRESETS if runs[p]]
        best = min(done, key=lambda r: r["bits_per_byte"]) if done else None
        gap = (
            f"{runs['auto']['bits_per_byte'] / best['bits_per_byte'] - 1:+.1%}"
            if best and runs["auto"]
            else "-"
        )
        print(
            f"| {corpus} | {minutes:g} min | "
            + " | ".join(cells)
            + f" | {best['name'] if best else '-'} | {gap} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("prepare", "compare", "sweep", "report"))
    ap.add_argument(
        "--which",
        nargs="+",
        default=["all"],
        choices=("all", "presets", "auto", *PRESETS),
        help="compare: what to run (two processes can split the runs between the two cores)",
    )
    ap.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    ap.add_argument("--minutes", nargs="+", type=float, default=[5.0, 15.0])
    ap.add_argument("--shapes", nargs="+", default=list(SWEEP), choices=list(SWEEP))
    ap.add_argument("--arch", default=None, help="model family (default gpt2)")
    args = ap.parse_args()
    if args.what == "prepare":
        prepare(args.corpora)
    elif args.what == "compare":
        compare(args.corpora, args.minutes, args.arch, args.which)
    elif args.what == "report":
        report()
    else:
        for minutes in args.minutes:
            for corpus in args.corpora:
                for name in args.shapes:
                    train(corpus, name, SWEEP[name], minutes, "sweep")


if __name__ == "__main__":
    main()
