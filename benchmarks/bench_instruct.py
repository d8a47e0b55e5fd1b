"""Instruction finetuning: scratchllm's trainer against the book's chapter 7 training code.

Two measurements, both on ../shared/data/instruction-data.json in the book's split (file order:
935 train / 55 val / 110 test), GPT-2's tokenizer, batch 8, AdamW lr 5e-5, weight decay 0.1:

1. Throughput on a GPT-2 shape (default gpt2-small, random weights, untied head and dropout 0 like
   the book's model): both train the same `--steps` batches (the first batches of our epoch-0 order,
   built by each side's own dataset and collate code) from the same initial weights, alternating
   `--repeats` times. The first step of each run is a warm-up and is not counted. scratchllm: the
   trainer's `fit` loop (`InstructionTask` + `Trainer`; evaluation and checkpoint writing switched
   off); the book: `llms_from_scratch.ch05.train_model_simple` over ch07's `InstructionDataset` +
   `custom_collate_fn` batches (its periodic evaluation and end-of-epoch sample switched off).
   Minutes per epoch = the padded tokens of one epoch / tokens per second.
2. Validation loss after `--epochs` full epochs on a smaller shape (`--loss-shape`, default mini,
   because two epochs of gpt2-small take hours per side on a CPU): scratchllm through
   `finetune_instruct` (the `finetune instruct` code path), the book through its ch07 script
   steps (DataLoader with shuffle, `train_model_simple` with eval_freq=5, eval_iter=5), from the
   same initial weights. Both final models are scored by both loss functions (ours: per target
   token over the whole validation set; the book's `calc_loss_loader`: mean of the batch means).

    .venv/bin/python benchmarks/bench_instruct.py [--shape gpt2-small] [--shape gpt2-medium]
        [--steps 8] [--repeats 2] [--loss-shape mini] [--epochs 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from llms_from_scratch import ch05
from llms_from_scratch.ch04 import GPTModel as BookGPTModel
from llms_from_scratch.ch07 import InstructionDataset as BookInstructionDataset
from llms_from_scratch.ch07 import custom_collate_fn as book_collate
from llms_from_scratch.ch07 import format_input
from torch.utils.data import DataLoader

from scratchllm.checkpoint import save_model
from scratchllm.finetune.instruct import (
    InstructConfig,
    InstructionDataset,
    InstructionTask,
    finetune_instruct,
    split_data,
)
from scratchllm.model.gpt import GPTModel, preset_config
from scratchllm.text.gpt2 import load_gpt2_files
from scratchllm.train.trainer import Trainer
from scratchllm.train.trainer_config import TrainerConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCRATCHLLM_SHARED_DATA", REPO.parent / "shared" / "data"))
LR, WEIGHT_DECAY, BATCH = 5e-5, 0.1, 8


def make_models(shape: str, seed: int = 123) -> tuple[GPTModel, BookGPTModel]:
    """Our model and the book's, with identical random weights (the book's model has no weight tying)."""
    overrides = dict(vocab_size=50257, drop_rate=0.0, qkv_bias=True, tie_weights=False)
    torch.manual_seed(seed)
    ours = GPTModel(preset_config(shape, **overrides))
    c = ours.cfg
    book = BookGPTModel(
        dict(
            vocab_size=c.vocab_size,
            context_length=c.context_length,
            emb_dim=c.emb_dim,
            n_heads=c.n_heads,
            n_layers=c.n_layers,
            drop_rate=0.0,
            qkv_bias=True,
        )
    )
    state = {}
    for name, tensor in ours.state_dict().items():
        if ".att.qkv." in name:  # our fused projection stacks the book's W_query, W_key, W_value
            for part, chunk in zip(("W_query", "W_key", "W_value"), tensor.chunk(3, dim=0)):
                state[name.replace("qkv", part)] = chunk.clone()
        else:
            state[name] = tensor.clone()
    missing, unexpected = book.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("att.mask") for k in missing), (missing, unexpected)
    x = torch.randint(0, 50257, (2, 16))
    ours.eval(), book.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), book(x), atol=1e-4, rtol=1e-4)
    return ours, book


class TimedBatches:
    """A list of batches posing as a DataLoader; records when each batch is handed out."""

    def __init__(self, batches):
        self.batches = batches
        self.times: list[float] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            self.times.append(time.perf_counter())
            yield b


def steady(step_seconds: list[float], step_tokens: list[int]) -> tuple[float, int]:
    """Seconds and tokens of all steps but the first (warm-up)."""
    return sum(step_seconds[1:]), sum(step_tokens[1:])


# the book's optimizer settings, as ours runs them: constant rate, no warmup, no clipping
BOOK_RECIPE = dict(
    lr=LR,
    min_lr=LR,
    warmup_steps=0,
    schedule="constant",
    weight_decay=WEIGHT_DECAY,
    beta2=0.999,
    grad_clip=0.0,
)


def run_ours(
    model: GPTModel, task: InstructionTask, steps: int, out_dir: str
) -> tuple[list[float], list[int]]:
    cfg = TrainerConfig(
        out_dir=out_dir,
        batch_size=BATCH,
        max_steps=steps,
        **BOOK_RECIPE,
        precision="fp32",
        device="cpu",
        eval_every=0,
        log_every=1,
        progress=False,
    )
    trainer = Trainer(model, task, cfg, log=lambda s: None)
    # time the training steps only: no evaluation, no checkpoint files
    task.evaluate = lambda model, amp: {"val_loss": 0.0}  # type: ignore[method-assign]
    trainer.save_checkpoint = lambda: None  # type: ignore[method-assign]
    trainer._save_model_dir = lambda name: None  # type: ignore[method-assign]
    trainer._plot = lambda: None  # type: ignore[method-assign]
    result = trainer.fit()
    recs = [r for r in result.history if r["kind"] == "train"]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}, *recs], recs)]
    return [t / r["tokens_per_s"] for t, r in zip(tokens, recs)], tokens


def run_book(model: BookGPTModel, batches: list, tokenizer) -> tuple[list[float], list[int]]:
    loader = TimedBatches(batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    saved = ch05.evaluate_model, ch05.generate_and_print_sample
    ch05.evaluate_model = lambda *a, **k: (0.0, 0.0)
    ch05.generate_and_print_sample = lambda *a, **k: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ch05.train_model_simple(
                model,
                loader,
                loader,
                optimizer,
                "cpu",
                num_epochs=1,
                eval_freq=10**9,
                eval_iter=1,
                start_context="",
                tokenizer=tokenizer,
            )
        end = time.perf_counter()
    finally:
        ch05.evaluate_model, ch05.generate_and_print_sample = saved
    marks = [*loader.times, end]
    return [b - a for a, b in itertools.pairwise(marks)], [int(x.numel()) for x, _ in batches]


def throughput(shape: str, steps: int, repeats: int, train, val, tokenizer, workdir: str) -> dict:
    ours_model, book_model = make_models(shape)
    ours_ds, book_ds = InstructionDataset(train, tokenizer), BookInstructionDataset(train, tokenizer)
    task = InstructionTask(
        ours_ds,
        InstructionDataset(val, tokenizer),
        batch_size=BATCH,
        eot_id=tokenizer.eot_id,
        seed=123,
        context_length=ours_model.cfg.context_length,
    )
    order = task.epoch_order(0)
    index_lists = [order[i * BATCH : (i + 1) * BATCH] for i in range(steps + 1)]
    collate = partial(book_collate, device="cpu", allowed_max_length=ours_model.cfg.context_length)
    book_batches = [collate([book_ds[i] for i in idx]) for idx in index_lists]
    ours_batches = [task.train_batch(i) for i in range(steps + 1)]
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(ours_batches, book_batches))
    epoch_tokens = sum(int(task.train_batch(i)[0].numel()) for i in range(task.batches_per_epoch))
    runs: dict[str, list[float]] = {"scratchllm": [], "book": []}
    for r in range(repeats):
        for who in ("scratchllm", "book"):
            if who == "scratchllm":
                seconds, tokens = run_ours(copy.deepcopy(ours_model), task, steps + 1, f"{workdir}/tp-{r}")
            else:
                seconds, tokens = run_book(copy.deepcopy(book_model), book_batches, tokenizer)
            s, t = steady(seconds, tokens)
            runs[who].append(t / s)
            print(
                f"  {shape} {who:10s} run {r + 1}: {t / s:,.0f} tokens/s ({s / steps:.2f} s/step, "
                f"load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    best = {who: max(v) for who, v in runs.items()}
    return {
        "shape": shape,
        "steps": steps,
        "epoch_tokens": epoch_tokens,
        "steps_per_epoch": task.batches_per_epoch,
        "tokens_per_s": runs,
        "best_tokens_per_s": best,
        "minutes_per_epoch": {who: epoch_tokens / v / 60 for who, v in best.items()},
        "ratio_ours_over_book": best["scratchllm"] / best["book"],
    }


def val_losses(shape: str, epochs: int, train, val, tokenizer, workdir: str) -> dict:
    ours_model, book_model = make_models(shape)
    ctx = ours_model.cfg.context_length
    base = Path(workdir) / f"init-{shape}"
    save_model(base, ours_model, tokenizer)

    val_ds = InstructionDataset(val, tokenizer)
    scorer = InstructionTask(val_ds, val_ds, batch_size=BATCH, eot_id=tokenizer.eot_id, context_length=ctx)
    collate = partial(book_collate, device="cpu", allowed_max_length=ctx)
    book_val_loader = DataLoader(
        BookInstructionDataset(val, tokenizer),
        batch_size=BATCH,
        collate_fn=collate,
        shuffle=False,
        drop_last=False,
        num_workers=0,
    )

    def score(model) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            return {
                "ours_per_token": scorer.dataset_loss(model, val_ds, len(val_ds), contextlib.nullcontext),
                "book_calc_loss_loader": ch05.calc_loss_loader(book_val_loader, model, "cpu"),
            }

    initial = score(ours_model)
    print(f"  {shape}: initial val loss {initial}", flush=True)

    # scratchllm: the `finetune instruct` code path with the book's settings
    cfg = InstructConfig(
        data=str(SHARED / "instruction-data.json"),
        split_seed=None,
        model=str(base),
        out_dir=f"{workdir}/ours-{shape}",
        epochs=epochs,
        batch_size=BATCH,
        **BOOK_RECIPE,
        eval_every=0,
        sample_tokens=0,
        precision="fp32",
        device="cpu",
        progress=False,
        seed=123,
    )
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        result = finetune_instruct(cfg)
    ours_wall = time.perf_counter() - t0
    from scratchllm.checkpoint import load_model

    ours_final = score(load_model(Path(cfg.out_dir) / "model").model)
    print(
        f"  {shape} scratchllm: {result.steps} steps, train {result.seconds:.0f} s, wall {ours_wall:.0f} s, "
        f"val {ours_final} (load {os.getloadavg()[0]:.1f})",
        flush=True,
    )

    # the book: chapter 7's script steps
    torch.manual_seed(123)
    train_loader = DataLoader(
        BookInstructionDataset(train, tokenizer),
        batch_size=BATCH,
        collate_fn=collate,
        shuffle=True,
        drop_last=True,
        num_workers=0,
    )
    optimizer = torch.optim.AdamW(book_model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        ch05.train_model_simple(
            book_model,
            train_loader,
            book_val_loader,
            optimizer,
            "cpu",
            num_epochs=epochs,
            eval_freq=5,
            eval_iter=5,
            start_context=format_input(val[0]),
            tokenizer=tokenizer,
        )
    book_wall = time.perf_counter() - t0
    book_final = score(book_model)
    print(
        f"  {shape} book: {epochs * len(train_loader)} steps, wall {book_wall:.0f} s (with its evaluation "
        f"every 5 steps), val {book_final} (load {os.getloadavg()[0]:.1f})",
        flush=True,
    )
    return {
        "shape": shape,
        "epochs": epochs,
        "initial": initial,
        "scratchllm": {
            "val": ours_final,
            "steps": result.steps,
            "train_seconds": result.seconds,
            "wall_seconds": ours_wall,
        },
        "book": {"val": book_final, "steps": epochs * len(train_loader), "wall_seconds": book_wall},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--shape", action="append", help="throughput model shape(s) (default gpt2-small; none: skip)"
    )
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side, alternating")
    ap.add_argument(
        "--loss-shape", default="mini", help="shape for the epochs/val-loss comparison (none: skip)"
    )
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    data_file = SHARED / "instruction-data.json"
    if not data_file.exists():
        sys.exit(f"{data_file} not found (set SCRATCHLLM_SHARED_DATA)")
    tokenizer = load_gpt2_files(SHARED)
    train, val, _ = split_data(json.loads(data_file.read_text()), seed=None)  # the book's split
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
        f"load {os.getloadavg()}; {len(train)} train / {len(val)} val examples",
        flush=True,
    )
    results: dict = {"throughput": [], "loss": None}
    with tempfile.TemporaryDirectory(prefix="bench_instruct_") as work:
        for shape in [s for s in args.shape or ["gpt2-small"] if s != "none"]:
            r = throughput(shape, args.steps, args.repeats, train, val, tokenizer, work)
            results["throughput"].append(r)
            print(
                f"{shape}: scratchllm {r['best_tokens_per_s']['scratchllm']:,.0f} tokens/s "
                f"({r['minutes_per_epoch']['scratchllm']:.1f} min/epoch), "
                f"book {r['best_tokens_per_s']['book']:,.0f} tokens/s "
                f"({r['minutes_per_epoch']['book']:.1f} min/epoch); "
                f"ratio ours/book {r['ratio_ours_over_book']:.2f}x",
                flush=True,
            )
        if args.loss_shape != "none":
            results["loss"] = val_losses(args.loss_shape, args.epochs, train, val, tokenizer, work)
    print(f"load at the end: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
