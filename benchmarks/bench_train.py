"""Pretraining benchmarks: run peers side by side and print ratios.

  python benchmarks/bench_train.py throughput    tokens/s of full training steps, ours vs the book vs
                                                 transformers
  python benchmarks/bench_train.py shakespeare   val loss per wall-clock, character-level Tiny Shakespeare
                                                 (the reference recipe, our best AdamW and Muon recipes)
  python benchmarks/bench_train.py               both

On a GPU: `bench_train.py throughput --device cuda --batch 32 --compile` (--batch: the throughput contenders'
batch size, default 8; --compile adds "ours compiled", our trainer under torch.compile; on a non-CPU device
"transformers autocast" joins, transformers' model under bf16 autocast, as its GPU users train it).

Every contender runs in a fresh subprocess (its own peak RSS, no shared allocator or thread state), one after
the other, from this one command. The shape (SHAPE) and the recipes stay fixed so that runs compare.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SCRATCHLLM_SHARED_DATA", REPO.parent / "shared" / "data"))
SHAPE = dict(vocab_size=50257, context_length=256, emb_dim=384, n_layers=6, n_heads=6, drop_rate=0.0)
BATCH = 8


# ---------------------------------------------------------------------------------------------
# throughput contenders (each runs inside its own subprocess)


def _random_batches(n: int, batch: int, ctx: int, vocab: int, seed: int = 0, device: str = "cpu"):
    """The same token ids on every device (drawn on the CPU), then moved to `device` before timing."""
    import torch

    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab, (n, batch, ctx + 1), generator=g)
    return [(d[:, :-1].contiguous().to(device), d[:, 1:].contiguous().to(device)) for d in data]


def _sync(device: str) -> None:
    """Wait for the device's queued work, so a timer read after it counts finished work (a no-op on the
    CPU)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def _time_steps(step, batches, warmup: int, device: str = "cpu") -> tuple[float, list[float]]:
    losses = []
    for x, y in batches[:warmup]:
        losses.append(step(x, y))
    _sync(device)
    t0 = time.perf_counter()
    for x, y in batches[warmup:]:
        losses.append(step(x, y))
    _sync(device)
    return time.perf_counter() - t0, losses


def _real_tokens():
    """Tiny Shakespeare in GPT-2 tokens: a loss curve that falls, to compare precisions on."""
    import numpy as np

    from scratchllm.text.gpt2 import load_gpt2_files

    tok = load_gpt2_files(DATA / "gpt2.tiktoken")
    return np.asarray(tok.encode((DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")), dtype=np.uint16)


def run_ours(
    steps: int,
    warmup: int,
    precision: str,
    preset: str | None,
    batch: int,
    real: bool = False,
    device: str = "cpu",
    compile: bool = False,
) -> dict:
    """Our trainer with the defaults a user gets (precision auto -> bf16 on this CPU or a GPU, fused AdamW,
    clipping); `compile`: TrainerConfig(compile=True), torch.compile of the model (compiled in the
    warm-up)."""
    import numpy as np
    import torch

    from scratchllm.model.gpt import GPTConfig, GPTModel, preset_config
    from scratchllm.train.pretrain import LanguageModelTask
    from scratchllm.train.trainer import Trainer
    from scratchllm.train.trainer_config import TrainerConfig

    torch.manual_seed(0)
    cfg = preset_config(preset, drop_rate=0.0) if preset else GPTConfig(**SHAPE)
    ctx = SHAPE["context_length"]
    model = GPTModel(cfg)
    if real:
        tokens = _real_tokens()
    else:
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 2_000_000).astype(np.uint16)
    split = int(len(tokens) * 0.9)
    task = LanguageModelTask(tokens[:split], tokens[split:], ctx, batch, seed=0, eval_batches=1)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-train-{os.getpid()}"
    tcfg = TrainerConfig(
        out_dir=str(out),
        batch_size=batch,
        max_steps=steps + warmup,
        warmup_steps=10,
        eval_every=0,
        log_every=1,
        precision=precision,
        progress=False,
        device=device,
        checkpoint_every=0,
        lr=6e-4,
        compile=compile,
    )
    trainer = Trainer(model, task, tcfg)
    # time the loop's own steps (the same code path as `scratchllm pretrain`), without the final eval/saves
    losses, t0 = [], None
    for i in range(steps + warmup):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        loss, _ = trainer._train_step()
        trainer.step += 1
        losses.append(loss)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "tokens": steps * batch * ctx,
        "losses": losses,
        "precision": trainer.precision,
    }


def run_book(steps: int, warmup: int, batch: int = BATCH, device: str = "cpu") -> dict:
    import torch
    from llms_from_scratch.ch04 import GPTModel

    torch.manual_seed(0)
    cfg = {**SHAPE, "qkv_bias": False}
    model = GPTModel(cfg)
    model.out_head.weight = model.tok_emb.weight  # tied, as the benchmark shape asks
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)

    def step(x, y):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    batches = _random_batches(
        steps + warmup, batch, SHAPE["context_length"], SHAPE["vocab_size"], device=device
    )
    seconds, losses = _time_steps(step, batches, warmup, device)
    return {"seconds": seconds, "tokens": steps * batch * SHAPE["context_length"], "losses": losses}


def run_transformers(
    steps: int, warmup: int, batch: int = BATCH, device: str = "cpu", autocast: bool = False
) -> dict:
    """transformers' GPT2LMHeadModel in fp32; `autocast`: its forward pass under bf16 autocast (weights and
    optimizer stay fp32), the mixed precision its users train with on GPUs."""
    import contextlib

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=SHAPE["vocab_size"],
        n_positions=SHAPE["context_length"],
        n_embd=SHAPE["emb_dim"],
        n_layer=SHAPE["n_layers"],
        n_head=SHAPE["n_heads"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(cfg).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    kind = torch.device(device).type

    def amp():
        return torch.autocast(kind, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def step(x, y):
        with amp():
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    batches = _random_batches(
        steps + warmup, batch, SHAPE["context_length"], SHAPE["vocab_size"], device=device
    )
    seconds, losses = _time_steps(step, batches, warmup, device)
    result = {"seconds": seconds, "tokens": steps * batch * SHAPE["context_length"], "losses": losses}
    if autocast:
        result["precision"] = "bf16"
    return result


def _child(args: argparse.Namespace) -> None:
    if args.child == "ours":
        settings = (args.steps, args.warmup, args.precision, args.preset, args.batch, args.real)
        result = run_ours(*settings, args.device, args.compile)
    elif args.child == "book":
        result = run_book(args.steps, args.warmup, args.batch, args.device)
    else:
        result = run_transformers(args.steps, args.warmup, args.batch, args.device, args.autocast)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device.startswith("cuda"):
        import torch

        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(torch.device(args.device)) / 2**20
    print("RESULT " + json.dumps(result))


def _spawn(name: str, *extra: str, optional: bool = False) -> dict | None:
    """Run one contender in a fresh process; a failure stops the benchmark, or (`optional`) is printed and
    gives None."""
    cmd = [sys.executable, __file__, "--child", name, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        if optional:
            print(f"{name} {' '.join(extra)} failed, skipped:\n{done.stderr[-1500:]}")
            return None
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _book_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llms_from_scratch") is not None


def throughput(
    steps: int, warmup: int, loss_steps: int, device: str = "cpu", batch: int = BATCH, compile: bool = False
) -> None:
    on = "" if device == "cpu" else f"; on {device}"
    print(
        f"# training throughput: vocab 50257, context 256, 6 layers, 6 heads, 384 dims, batch {batch}, tied, "
        f"dropout 0; {steps} timed steps after {warmup} warm-up steps{on}"
    )
    contenders: list[tuple[str, str, tuple[str, ...], bool]] = [  # name, child, flags, optional
        ("ours", "ours", (), False),
        ("ours fp32", "ours", ("--precision", "fp32"), False),
    ]
    if compile:
        contenders.append(("ours compiled", "ours", ("--compile",), True))
    if _book_installed():
        contenders.append(("book", "book", (), False))
    else:
        print("book: skipped (llms_from_scratch is not installed)")
    contenders.append(("transformers", "transformers", (), False))
    if device != "cpu":  # on GPUs transformers' users train under bf16 autocast
        contenders.append(("transformers autocast", "transformers", ("--autocast",), True))
    width = max(24, *(len(name) + 8 for name, *_ in contenders))
    rows = {}
    common = ["--steps", str(steps), "--warmup", str(warmup), "--batch", str(batch), "--device", device]
    for name, child, extra, optional in contenders:
        r = _spawn(child, *common, *extra, optional=optional)
        if r is None:
            continue
        rows[name] = r
        tag = f" ({r['precision']})" if "precision" in r else " (fp32)"
        gpu = f"   peak GPU memory {r['peak_gpu_mb']:6.0f} MB" if "peak_gpu_mb" in r else ""
        print(
            f"{name + tag:{width}s} {r['tokens'] / r['seconds']:8.0f} tok/s   peak RSS "
            f"{r['peak_rss_mb']:6.0f} MB{gpu}"
        )
    rate = {name: r["tokens"] / r["seconds"] for name, r in rows.items()}
    best_peer = max(rate[n] for n in ("book", "transformers") if n in rate)
    ours = rate["ours"]
    print(f"ours / best fp32 peer: {ours / best_peer:.2f}x (goal 2x = {2 * best_peer:.0f} tok/s)")
    if "ours compiled" in rate:
        compiled = rate["ours compiled"]
        print(
            f"ours compiled / best fp32 peer: {compiled / best_peer:.2f}x; "
            f"ours compiled / ours: {compiled / ours:.2f}x"
        )
    if "transformers autocast" in rate:
        mixed = rate["transformers autocast"]
        also = f"; ours compiled: {rate['ours compiled'] / mixed:.2f}x" if "ours compiled" in rate else ""
        print(f"ours / transformers autocast (both bf16 mixed precision): {ours / mixed:.2f}x{also}")

    # the loss over loss_steps steps on real text: our default precision against our fp32, same init and data
    missing = [f for f in ("tinyshakespeare.txt", "gpt2.tiktoken") if not (DATA / f).exists()]
    if missing:
        print(
            f"loss tracking skipped: {', '.join(str(DATA / f) for f in missing)} not found "
            "(set SCRATCHLLM_SHARED_DATA to the folder that holds them)"
        )
    else:
        _loss_tracking(loss_steps, device)
    small = shlex.split("--warmup 2 --preset gpt2-small --batch 4")
    g = _spawn("ours", "--steps", str(max(3, steps // 4)), *small, "--device", device)
    gpu = f", peak GPU memory {g['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in g else ""
    print(
        f"gpt2-small preset, batch 4, context 256 ({g['precision']}): "
        f"{g['tokens'] / g['seconds']:.0f} tok/s, peak RSS {g['peak_rss_mb']:.0f} MB{gpu}"
    )


def _loss_tracking(loss_steps: int, device: str) -> None:
    run = ["--steps", str(loss_steps), "--warmup", "0", "--real", "--device", device]
    a = _spawn("ours", *run)
    b = _spawn("ours", *run, "--precision", "fp32")
    diffs = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
    last = min(20, len(a["losses"]))
    print(
        f"loss over {loss_steps} steps on Tiny Shakespeare (GPT-2 tokens), {a['precision']} vs fp32: "
        f"first {a['losses'][0]:.4f} vs {b['losses'][0]:.4f}, "
        f"last-{last} mean {sum(a['losses'][-last:]) / last:.4f} vs {sum(b['losses'][-last:]) / last:.4f}, "
        f"max |diff| {max(diffs):.4f}, mean |diff| {sum(diffs) / len(diffs):.4f}"
    )


# ---------------------------------------------------------------------------------------------
# quality per wall-clock: character-level Tiny Shakespeare


def _pretrain(out: Path, *flags: str) -> tuple[float, dict]:
    corpus = DATA / "tinyshakespeare.txt"
    quiet = shlex.split("--progress false --sample-tokens 0 --device cpu")
    cmd = [sys.executable, "-m", "scratchllm", "pretrain", "--config", "shakespeare-char"]
    cmd += ["--corpus", str(corpus), "--out-dir", str(out), *quiet, *flags]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "eval"][-1]
    return wall, last


def shakespeare(seed: int | None = None) -> None:
    import tempfile

    if not (DATA / "tinyshakespeare.txt").exists():
        print(f"skipped: {DATA / 'tinyshakespeare.txt'} not found")
        return
    print(
        "# quality per wall-clock: char-level Tiny Shakespeare, first 90% train / last 10% val, val loss on "
        "the whole val split; wall = the whole `scratchllm pretrain` command (tokenizer, data, training, "
        "evals)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "the reference recipe, fp32": ["--precision", "fp32"],
            "the reference recipe, our defaults": [],
            "our best AdamW recipe": BEST_ADAMW,
            "our best recipe (Muon)": BEST,
        }
        for name, flags in runs.items():
            flags = [*flags, "--seed", str(seed)] if seed is not None else flags
            wall, last = _pretrain(Path(tmp) / name.replace(" ", "_"), *flags)
            print(
                f"{name:36s} val loss {last['val_loss']:.4f} at step {last['step']}, {wall:5.1f} s wall "
                f"({last['train_seconds']:.1f} s in training steps)  {' '.join(flags)}"
            )
    print("goal: val loss <= 1.886 in <= 50 s wall (the reference implementation: 1.886 in 99 s here)")


# fp32 (the model is too narrow for bf16 to pay off), 6x the reference learning rate, fewer tokens; the
# search and its seeds: see benchmarks/RESULTS.md
BEST_ADAMW = shlex.split(
    "--precision fp32 --batch-size 16 --max-steps 1000 --lr 6e-3 --min-lr 6e-4 --warmup-steps 50 "
    "--weight-decay 0 --eval-every 0"
)
# Muon for the blocks' matrices reaches the loss in under half the steps (see benchmarks/RESULTS.md)
BEST = shlex.split(
    "--precision fp32 --batch-size 16 --max-steps 380 --lr 1e-2 --min-lr 1e-3 --warmup-steps 0 "
    "--weight-decay 0 --eval-every 0 --optimizer muon --muon-momentum 0.9"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", nargs="?", default="all", choices=["all", "throughput", "shakespeare"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loss-steps", type=int, default=200)
    p.add_argument("--device", default="cpu", help="throughput: cpu (default), cuda, cuda:N or mps")
    p.add_argument(
        "--batch", type=int, default=BATCH, help=f"throughput: the contenders' batch (default {BATCH})"
    )
    p.add_argument(
        "--compile", action="store_true", help='throughput: also time "ours compiled" (torch.compile)'
    )
    p.add_argument(
        "--seed", type=int, default=None, help="shakespeare: the runs' --seed (default: the config's)"
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    p.add_argument("--real", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--autocast", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    gpu = ""
    if args.device != "cpu":
        from scratchllm.device import pick_device
        from scratchllm.errors import ScratchLLMError

        try:
            dev = pick_device(args.device)
        except ScratchLLMError as e:
            raise SystemExit(f"error: {e}") from None
        if dev.type == "cuda":
            import torch

            gpu = f"; GPU: {torch.cuda.get_device_name(dev)}"
    print(
        f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}; "
        f"{time.strftime('%Y-%m-%d')}{gpu}"
    )
    if args.which in ("all", "throughput"):
        throughput(args.steps, args.warmup, args.loss_steps, args.device, args.batch, args.compile)
    if args.which in ("all", "shakespeare"):
        shakespeare(args.seed)


if __name__ == "__main__":
    main()
