"""The same pretrain command under torchrun: 2 CPU processes (gloo) train like one process with the same
global batch, with DDP (AdamW or Muon) and with FSDP2 sharding."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import has_fully_shard

pytestmark = pytest.mark.slow

FP32_EPS = torch.finfo(torch.float32).eps


def _args(corpus: Path, out: Path, batch: int) -> list[str]:
    settings = shlex.split(
        "--vocab-size 300 --model nano --context-length 32 --max-steps 12 --eval-every 6 --eval-batches 2 "
        "--log-every 1 --drop-rate 0 --progress false --sample-tokens 0 --warmup-steps 2 --workers 1 "
        "--device cpu --precision fp32 --checkpoint-every 6"
    )
    return ["pretrain", "--corpus", str(corpus), *settings, "--batch-size", str(batch), "--out-dir", str(out)]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "scratchllm",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _losses(run: Path) -> list[float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"] + [
        r["val_loss"] for r in records if r["kind"] == "eval"
    ]


MODES = {
    "ddp": [],
    "fsdp": ["--fsdp", "true"],
    "ddp-muon": ["--optimizer", "muon"],
    "ddp-gemma3": ["--arch", "gemma3"],  # sliding windows, GeGLU, sandwich norms
    "fsdp-qwen3-moe": ["--fsdp", "true", "--arch", "qwen3-moe"],  # a mixture of experts, sharded
}
FSDP = ["--fsdp", "true"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The corpus, and a function giving the one-process run with some extra flags (run once each)."""
    root = tmp_path_factory.mktemp("dist")
    corpus = root / "corpus.txt"
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    rng = np.random.default_rng(1)
    corpus.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 20_000)), encoding="utf-8")
    runs: dict[tuple[str, ...], Path] = {}

    def run(extra: list[str]) -> Path:
        if tuple(extra) not in runs:
            out = root / f"single-{len(runs)}"
            command = [sys.executable, "-m", "scratchllm", *_args(corpus, out, 8), *extra]
            done = subprocess.run(command, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            runs[tuple(extra)] = out
        return runs[tuple(extra)]

    return corpus, run


@pytest.mark.parametrize(
    "mode",
    [
        "ddp",
        pytest.param(
            "fsdp", marks=pytest.mark.skipif(not has_fully_shard(), reason="--fsdp needs torch >= 2.6")
        ),
        "ddp-muon",
        "ddp-gemma3",
        pytest.param(
            "fsdp-qwen3-moe",
            marks=pytest.mark.skipif(not has_fully_shard(), reason="--fsdp needs torch >= 2.6"),
        ),
    ],
)
def test_two_processes_match_one_with_the_same_global_batch(single, tmp_path, mode):
    corpus, single_run = single
    extra = MODES[mode]
    reference = single_run(extra[2:] if extra[:2] == FSDP else extra)  # one process shards nothing
    out = tmp_path / mode
    done = _torchrun(_args(corpus, out, 4) + extra)
    assert done.returncode == 0, done.stderr[-3000:]
    # fp32 throughout (--precision fp32 keeps Muon's products in fp32 too): the runs differ only in the
    # order gradients are summed (two halves all-reduced vs one batch), a few ulps that 12 steps carry on
    assert _losses(out) == pytest.approx(_losses(reference), rel=32 * FP32_EPS)
    a, b = (
        load_file(out / "model" / "model.safetensors"),
        load_file(reference / "model" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=64 * FP32_EPS, atol=64 * FP32_EPS) for k in a)
    # only the main process writes: one summary, one metrics file with one line per step
    assert done.stdout.count("loss plot:") == 1

    # an exact resume under the same launcher, from the middle checkpoint
    resumed_dir = tmp_path / f"{mode}-resumed"
    resumed_dir.mkdir()
    for name in ("tokenizer", "data", "checkpoints"):
        subprocess.run(["cp", "-r", str(out / name), str(resumed_dir / name)], check=True)
    subprocess.run(["rm", "-rf", str(resumed_dir / "checkpoints" / "step-000012")], check=True)
    done = _torchrun(_args(corpus, resumed_dir, 4) + extra + ["--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    assert (resumed_dir / "model" / "model.safetensors").read_bytes() == (
        out / "model" / "model.safetensors"
    ).read_bytes()


_VARIABLE_TOKENS = """
import os, sys
import numpy as np, torch
from scratchllm.model.gpt import GPTModel, preset_config
from scratchllm.train.pretrain import LanguageModelTask
from scratchllm.train.trainer import Trainer
from scratchllm.train.trainer_config import TrainerConfig

class VariableTokens(LanguageModelTask):  # as classify (real lengths) and instruct (padded batches) count
    def batch_tokens(self, batch):
        return int(batch[0].numel()) + (40 if os.environ["RANK"] == "0" else 0)

torch.manual_seed(0)
tokens = (np.arange(20000) % 64).astype(np.uint16)
model = GPTModel(preset_config("nano", vocab_size=64, context_length=32, drop_rate=0.0))
cfg = TrainerConfig(out_dir=sys.argv[1], max_steps=50, max_tokens=2000, warmup_steps=2, eval_every=0,
                    precision="fp32", device="cpu", progress=False, batch_size=4)
task = VariableTokens(tokens[:18000], tokens[18000:], context_length=32, batch_size=4, seed=1, eval_batches=1)
result = Trainer(model, task, cfg).fit()
print("rank", os.environ["RANK"], "steps", result.steps, result.stopped, flush=True)
"""


def test_a_token_budget_stops_every_process_at_the_same_step(tmp_path):
    """Processes count tokens as their own batches times the processes; when batches differ in tokens
    (classify, instruct), the first to reach --max-tokens must not stop alone (the others would wait
    for it in the next all-reduce forever)."""
    script = tmp_path / "variable_tokens.py"
    script.write_text(_VARIABLE_TOKENS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(script), str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank"))
    assert lines == ["rank 0 steps 6 budget", "rank 1 steps 6 budget"]
