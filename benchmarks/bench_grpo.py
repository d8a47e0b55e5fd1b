"""GRPO on the synthetic arithmetic task: held-out accuracy after pretraining on the task's format, and after
GRPO, with the wall time of each phase, all on the CPU of this machine.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_grpo.py    # the default recipe (~20 min)
    .venv/bin/python benchmarks/bench_grpo.py --pretrain-steps 600 --grpo-minutes 3   # a quick look

The phases are the README's commands: `data arithmetic`, `pretrain` (a character-level model on the
solved problems), `eval-tasks` on the held-out problems (greedy, exact match), `finetune grpo` with the
numeric verifier for --grpo-minutes, `eval-tasks` again. The issue's goal: GRPO adds at least 15 points of
held-out accuracy within 10 minutes, from a model that starts between 20% and 70%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(*args: str) -> float:
    """Run `scratchllm ARGS` in a subprocess; its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "scratchllm", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def accuracy(model: Path, task: Path, out: Path) -> float:
    run(
        "eval-tasks",
        "--model",
        str(model),
        "--task",
        str(task),
        "--max-new-tokens",
        "5",
        "--out",
        str(out),
        "--quiet",
    )
    return json.loads(out.read_text())["summary"]["exact_match"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--digits", type=int, default=2)
    parser.add_argument("--model", default="micro")
    parser.add_argument("--pretrain-steps", type=int, default=4000)
    parser.add_argument("--grpo-minutes", type=float, default=10.0)
    parser.add_argument("--lr", type=float, default=1e-4, help="GRPO's (constant) learning rate")
    parser.add_argument("--dir", default=None, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-grpo-"))
    data = root / "arithmetic"
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; runs in {root}")
    run(
        "data",
        "arithmetic",
        "--out",
        str(data),
        "--digits",
        str(args.digits),
        "--train",
        "5000",
        "--test",
        "200",
    )
    seconds = run(
        "pretrain",
        "--corpus",
        str(data / "corpus.txt"),
        "--tokenizer",
        "char",
        "--model",
        args.model,
        "--context-length",
        "64",
        "--batch-size",
        "32",
        "--lr",
        "3e-3",
        "--min-lr",
        "3e-4",
        "--max-steps",
        str(args.pretrain_steps),
        "--eval-every",
        "0",
        "--sample-tokens",
        "0",
        "--progress",
        "false",
        "--out-dir",
        str(root / "base"),
        "--overwrite",
        "true",
    )
    before = accuracy(root / "base" / "model", data / "test.jsonl", root / "before.json")
    print(f"pretrain: {args.pretrain_steps} steps in {seconds:.0f} s; held-out accuracy {before:.1%}")
    seconds = run(
        "finetune",
        "grpo",
        "--model",
        str(root / "base" / "model"),
        "--data",
        str(data / "train.jsonl"),
        "--val-data",
        str(data / "test.jsonl"),
        "--max-minutes",
        str(args.grpo_minutes),
        "--max-steps",
        "100000",
        "--lr",
        str(args.lr),
        "--min-lr",
        str(args.lr),
        "--max-new-tokens",
        "5",
        "--eval-every",
        "50",
        "--eval-limit",
        "100",
        "--progress",
        "false",
        "--out-dir",
        str(root / "grpo"),
        "--overwrite",
        "true",
    )
    after = accuracy(root / "grpo" / "model", data / "test.jsonl", root / "after.json")
    steps = max(
        json.loads(x).get("step", 0) for x in (root / "grpo" / "metrics.jsonl").read_text().splitlines()
    )
    gain = (after - before) * 100
    print(f"grpo: {steps} steps in {seconds:.0f} s; held-out accuracy {after:.1%} ({gain:+.1f} points)")


if __name__ == "__main__":
    main()
