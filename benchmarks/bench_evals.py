"""Multiple-choice scoring throughput (items/s): `scratchllm eval-tasks`' scorer vs transformers, one process.

A HellaSwag-format file is generated here (contexts and endings cut from the-verdict.txt, about as
long as HellaSwag's: ~60-token contexts, four ~20-token endings). The GPT-2 124M shape gets random
weights in a transformers GPT2LMHeadModel, which is saved and converted (scratchllm.hub) so both
sides hold the same weights. Each side scores every item's four endings:

- scratchllm `evaluate_task` (what `scratchllm eval-tasks` runs): tokenize, run each item's context once
  and its four endings on copies of the context's KV cache (`score_choices`), and put only the
  positions that predict ending tokens through the output head;
- scratchllm `loglikelihoods`: every (context, ending) as its own sequence, longest first, right
  padded, only the ending positions through the output head: shows what sharing the context saves;
- transformers: lm-evaluation-harness's loop with GPT2LMHeadModel on the same token ids and
  batches (every (context, ending) alone, logits and log-softmax for every position, then the
  ending's log-probabilities gathered).

Batch 1 (one sequence per forward pass; for `evaluate_task`, whose unit is an item, one item: its
context and its four endings; on the first --items-batch1 items, as it is slow) and batched
(--batch-size sequences, or endings, per forward pass). Candidates run in rotation so load changes
hit them alike; each figure is the best of --repeats. The per-ending log-likelihoods of the sides are
compared too.

    .venv/bin/python benchmarks/bench_evals.py            # several minutes on 2 cores
    .venv/bin/python benchmarks/bench_evals.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from scratchllm import hub
from scratchllm.evals import EvalSettings, TaskFile, encode_context, evaluate_task, loglikelihoods, read_task
from scratchllm.text.registry import load_tokenizer

DATA = Path(os.environ.get("SCRATCHLLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def make_hellaswag_file(path: Path, n_items: int, seed: int = 0) -> None:
    """HellaSwag-shaped items: a ~45-word context and four ~15-word endings, the first right."""
    source = DATA / "the-verdict.txt"
    if source.exists():
        words = re.sub(r"\s+", " ", source.read_text(encoding="utf-8")).split(" ")
    else:  # no shared data: a fixed vocabulary still gives realistic lengths
        rng0 = random.Random(1)
        words = ["".join(rng0.choice("etaoinshrdlu") for _ in range(rng0.randint(2, 8))) for _ in range(5000)]
    rng = random.Random(seed)

    def span(n: int) -> str:
        start = rng.randrange(len(words) - n)
        return " ".join(words[start : start + n])

    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_items):
            record = {
                "ctx": span(rng.randint(35, 55)),
                "endings": [span(rng.randint(10, 20)) for _ in range(4)],
                "label": rng.randrange(4),
            }
            f.write(json.dumps(record) + "\n")


def requests_of(task, tokenizer) -> list[tuple[list[int], list[int]]]:
    """The (context, continuation) token ids `evaluate_task` scores, in item order, zero-shot."""
    out = []
    for item in task.items:
        ctx, moved = encode_context(tokenizer, item.context)
        out += [(ctx, tokenizer.encode(moved + " " + c)) for c in item.choices]
    return out


@torch.inference_mode()
def score_full_logits(
    forward: Callable[[torch.Tensor], torch.Tensor], requests, batch_size: int
) -> list[float]:
    """lm-evaluation-harness's scoring loop: longest first, right padding, log-softmax over every
    position's logits, the continuation's log-probabilities gathered and summed."""
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    out = [0.0] * len(requests)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        seqs = [(requests[i][0] + requests[i][1])[:-1] for i in batch]
        idx = torch.zeros((len(batch), max(map(len, seqs))), dtype=torch.long)
        for r, s in enumerate(seqs):
            idx[r, : len(s)] = torch.tensor(s)
        logprobs = F.log_softmax(forward(idx).float(), dim=-1)
        for r, i in enumerate(batch):
            cont = requests[i][1]
            n = len(seqs[r])
            rows = logprobs[r, n - len(cont) : n]
            out[i] = float(rows.gather(1, torch.tensor(cont)[:, None]).sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--items", type=int, default=16, help="HellaSwag-format items (4 endings each), batched runs"
    )
    ap.add_argument("--items-batch1", type=int, default=4, help="the first N of them for the batch-1 runs")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass when batched")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="8 items (2 at batch 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:  # smaller defaults; flags given explicitly stay
        for name, value in dict(items=8, items_batch1=2).items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # the 124M shape, random weights
    tokenizer = load_tokenizer(DATA if (DATA / "encoder.json").exists() else "gpt2")
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, _ = hub.load_hf_dir(tmp)
        task_path = Path(tmp) / "hellaswag-format.jsonl"
        make_hellaswag_file(task_path, args.items)
        task = read_task(task_path)
    small = TaskFile(task.path, task.format, task.items[: args.items_batch1])
    lengths = [len(c) + len(t) for c, t in requests_of(task, tokenizer)]
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, threads {torch.get_num_threads()}, load {load_average()}"
    )
    print(
        f"# {args.items} items x 4 endings ({args.items_batch1} items at batch 1), "
        f"{sum(lengths) / len(lengths):.0f} tokens per sequence on average (context + ending), "
        "GPT-2 124M shape, fp32"
    )

    def ours(t: TaskFile, bs: int) -> Callable[[], list[float]]:
        def run() -> list[float]:
            res = evaluate_task(model, tokenizer, t, EvalSettings(batch_size=bs))
            return [ll for item in res["items"] for ll in item["loglikelihoods"]]

        return run

    def flat(t: TaskFile, bs: int) -> Callable[[], list[float]]:
        requests = requests_of(t, tokenizer)
        return lambda: [s.loglikelihood for s in loglikelihoods(model, requests, bs)]

    def hf_logits(x: torch.Tensor) -> torch.Tensor:
        return hf(x).logits

    def hf_loop(t: TaskFile, bs: int) -> Callable[[], list[float]]:
        requests = requests_of(t, tokenizer)
        return lambda: score_full_logits(hf_logits, requests, bs)

    candidates: dict[str, tuple[int, int, Callable[[], list[float]]]] = {}  # name -> (batch, items, run)
    for bs, t in ((1, small), (args.batch_size, task)):
        n = len(t.items)
        per_pass = "one item (context once + 4 endings) per pass" if bs == 1 else f"{bs} endings per pass"
        candidates[f"scratchllm evaluate_task, batch {bs}: {per_pass}"] = (bs, n, ours(t, bs))
        candidates[f"scratchllm loglikelihoods (each ending alone), batch {bs}"] = (bs, n, flat(t, bs))
        candidates[f"transformers GPT2LMHeadModel, batch {bs}"] = (bs, n, hf_loop(t, bs))
    best = {name: float("inf") for name in candidates}
    lls: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        for name, (_, _, fn) in candidates.items():
            t0 = time.perf_counter()
            lls[name] = fn()
            seconds = time.perf_counter() - t0
            best[name] = min(best[name], seconds)
            print(
                f"  repeat {rep + 1}: {name}: {seconds:.2f} s (load {load_average()})",
                file=sys.stderr,
                flush=True,
            )

    print("\n| scorer | items/s | ratio to transformers, same batch |\n| --- | ---: | ---: |")
    for name, (bs, n, _) in candidates.items():
        ref = best[f"transformers GPT2LMHeadModel, batch {bs}"]
        print(f"| {name} | {n / best[name]:.3f} | {ref / best[name]:.2f}x |")
    diffs = []
    for bs in (1, args.batch_size):
        ref = lls[f"transformers GPT2LMHeadModel, batch {bs}"]
        for name in candidates:
            if name.startswith("scratchllm") and candidates[name][0] == bs:
                diffs += [abs(a - b) for a, b in zip(lls[name], ref, strict=True)]
    print(
        f"\nlargest per-ending log-likelihood difference to transformers: {max(diffs):.2e} nats; "
        f"load {load_average()}"
    )


if __name__ == "__main__":
    main()
