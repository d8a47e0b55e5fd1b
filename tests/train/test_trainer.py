from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchllm.checkpoint import read_config
from scratchllm.errors import ScratchLLMError
from scratchllm.fileio import STATE_FILE
from scratchllm.model.gpt import GPTModel, preset_config
from scratchllm.train.optim import param_groups
from scratchllm.train.pretrain import LanguageModelTask
from scratchllm.train.rundir import _remove_leftovers, find_resume_checkpoint, list_checkpoints
from scratchllm.train.schedule import lr_at
from scratchllm.train.trainer import Trainer
from scratchllm.train.trainer_config import TrainerConfig

VOCAB = 64


def _tokens(n: int = 20_000, seed: int = 0) -> np.ndarray:
    """A learnable stream: mostly counting up modulo the vocabulary, with some noise."""
    rng = np.random.default_rng(seed)
    base = np.arange(n) % VOCAB
    noise = rng.random(n) < 0.1
    base[noise] = rng.integers(0, VOCAB, noise.sum())
    return base.astype(np.uint16)


def _setup(tmp_path: Path, drop_rate: float = 0.1, task_class: type = LanguageModelTask, **cfg_overrides):
    torch.manual_seed(0)
    model = GPTModel(preset_config("nano", vocab_size=VOCAB, context_length=32, drop_rate=drop_rate))
    settings = dict(out_dir=str(tmp_path / "run"), max_steps=20, warmup_steps=2, lr=3e-3, min_lr=3e-4)
    settings.update(eval_every=10, log_every=1, precision="fp32", device="cpu", progress=False, batch_size=4)
    settings.update(cfg_overrides)
    tokens = _tokens()
    batch_size = settings["batch_size"]
    task = task_class(
        tokens[:18_000], tokens[18_000:], context_length=32, batch_size=batch_size, seed=1, eval_batches=2
    )
    return model, task, TrainerConfig(**settings)


def test_lr_warmup_then_cosine_to_min_lr():
    cfg = TrainerConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg, 110) == pytest.approx(1 / 11)
    assert lr_at(9, cfg, 110) == pytest.approx(10 / 11)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    lin = TrainerConfig(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear")
    assert lr_at(25, lin, 100) == pytest.approx(0.75)
    const = TrainerConfig(lr=0.5, warmup_steps=0, schedule="constant")
    assert lr_at(99, const, 100) == 0.5
    timed = TrainerConfig(lr=1.0, min_lr=0.0, warmup_steps=10, schedule="linear", max_minutes=1.0)
    assert lr_at(5, timed, 110, elapsed_s=50) == pytest.approx(6 / 11)  # warmup goes by steps
    assert lr_at(20, timed, 110, elapsed_s=3) == pytest.approx(0.9)  # the steps are further along
    assert lr_at(10, timed, 110, elapsed_s=40) == 1.0  # warmup's end: the decay starts from the peak
    # the clock is: 15 of the 45 s left after warmup (its 10 of 20 steps took ~15 s)
    assert lr_at(20, timed, 110, elapsed_s=30) == pytest.approx(2 / 3)
    assert lr_at(20, timed, 110, elapsed_s=90) == 0.0
    assert lr_at(20, lin, 100, elapsed_s=30) == pytest.approx(0.8)  # no time budget: steps alone


def test_weight_decay_only_on_matrices_and_tied_weights_once():
    model = GPTModel(preset_config("nano", vocab_size=VOCAB))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def test_training_learns_and_writes_the_run_directory(tmp_path):
    model, task, cfg = _setup(tmp_path, max_steps=60, eval_every=30, checkpoint_every=20, keep_last=2)
    result = Trainer(model, task, cfg, run_config_toml="x = 1\n").fit()
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 61))
    assert [r["step"] for r in evals] == [30, 60]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0  # math.log(64) = 4.16 at the start
    assert evals[-1]["val_loss"] < math.log(VOCAB) - 1.0
    assert result.metrics["val_loss"] == evals[-1]["val_loss"] and result.stopped == "done"
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "config.toml").read_text() == "x = 1\n"
    assert [p.name for p in list_checkpoints(run)] == ["step-000040", "step-000060"]  # keep_last=2
    for name in ("model", "best"):
        assert (run / name / "model.safetensors").exists() and not (run / name / STATE_FILE).exists()


def test_resuming_before_the_newest_checkpoint_sets_the_later_outputs_aside(tmp_path):
    """Pruning went by step number, so the abandoned continuation's step-20 outlived (and, with
    keep_last 1, deleted) the checkpoint the resumed run had just written; best/ kept its model."""
    model, task, cfg = _setup(tmp_path, max_steps=20, checkpoint_every=10, eval_every=10)
    Trainer(model, task, cfg, extra={"step": 999, "trained_by": "x"}).fit()  # a base model's step is not kept
    run = tmp_path / "run"
    assert read_config(run / "best")[1]["step"] == 20
    assert "step" not in read_config(run / "checkpoints" / "step-000010")[1]
    for suffix in ("", "-2"):  # the same rewind twice: a second name, not an error
        model, task, cfg = _setup(
            tmp_path, max_steps=15, checkpoint_every=5, eval_every=10, keep_last=2, lr=1e-2
        )
        trainer = Trainer(model, task, cfg)
        trainer.fit(resume=str(run / "checkpoints" / "step-000010"))
        # the new run's own two; pruning by step number kept the old step-20 instead of step-10
        assert [p.name for p in list_checkpoints(run)] == ["step-000010", "step-000015"]
        assert (run / "checkpoints" / f"step-000020.abandoned-at-step-10{suffix}").is_dir()
        assert (run / f"best.abandoned-at-step-10{suffix}").is_dir() and read_config(run / "best")[1][
            "step"
        ] == 15
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 16))  # one history
        # make step-20 and a best/ written at step 20 again, for the second rewind
        model, task, cfg = _setup(tmp_path, max_steps=20, checkpoint_every=10, eval_every=10, keep_last=4)
        Trainer(model, task, cfg).fit(resume=str(run / "checkpoints" / "step-000015"))
    # a resume after a crash (no later checkpoint): nothing is set aside, though best/ is newer
    (run / "checkpoints" / "step-000020").rename(run / "gone")
    before = sorted(p.name for p in run.rglob("*abandoned*"))
    model, task, cfg = _setup(tmp_path, max_steps=20, checkpoint_every=10, eval_every=10)
    Trainer(model, task, cfg).fit(resume="latest")
    assert sorted(p.name for p in run.rglob("*abandoned*")) == before


def test_a_second_run_in_the_same_directory_at_once_is_refused(tmp_path):
    """Two at once interleaved their metrics.jsonl and pruned each other's checkpoints."""
    fcntl = pytest.importorskip("fcntl")
    model, task, cfg = _setup(tmp_path, max_steps=2)
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "a") as held:  # as another process's run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(
            ScratchLLMError,
            match=r"another process is training in .*run \(it holds .*\.lock\); wait for it to end",
        ):
            Trainer(model, task, cfg).fit()
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # what a killed run left half written goes, once no other process uses the directory
    ck = tmp_path / "run" / "checkpoints"
    (ck / ".step-000002.ab12cd34.tmp").mkdir(parents=True)
    (tmp_path / "run" / ".env.old").write_text("a user's own")  # not ours: left alone
    assert Trainer(model, task, cfg).fit().steps == 2  # released: the next run goes ahead
    assert not list(ck.glob(".*")) and (tmp_path / "run" / ".env.old").read_text() == "a user's own"
    # killed between atomic_dir's two renames: the only copy of the checkpoint is put back
    (ck / "step-000002").rename(tmp_path / "moved")
    (ck / ".step-000002.ef56gh78.old").mkdir()
    (tmp_path / "moved").rename(ck / ".step-000002.ef56gh78.old" / "dir")
    _remove_leftovers(tmp_path / "run")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000002"] and not list(ck.glob(".*"))


def test_grad_accumulation_equals_a_bigger_batch(tmp_path):
    losses = []
    for batch, accum in ((8, 1), (4, 2)):
        run = tmp_path / f"b{batch}"
        model, task, cfg = _setup(
            run, drop_rate=0.0, max_steps=5, batch_size=batch, grad_accum=accum, eval_every=0
        )
        Trainer(model, task, cfg).fit()
        lines = (tmp_path / f"b{batch}" / "run" / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(x)["loss"] for x in lines if '"train"' in x])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_torch_compile_trains_like_eager_mode(tmp_path):
    """`--compile`: the compiled model (plain loss, fused by the compiler) follows the eager run."""
    losses = []
    for compiled in (False, True):
        run = tmp_path / f"compile-{compiled}"
        model, task, cfg = _setup(run, drop_rate=0.0, max_steps=6, eval_every=0, compile=compiled)
        result = Trainer(model, task, cfg).fit()
        assert result.steps == 6
        lines = (run / "run" / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(x)["loss"] for x in lines if '"train"' in x])
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)


def test_token_budget_sizes_the_schedule(tmp_path):
    """Fixed tokens per step: the token budget is the run's length, so warmup and decay end with it
    (not at max_steps, which would leave the learning rate undecayed); without max_steps too."""
    for max_steps in (100, 0):
        model, task, cfg = _setup(tmp_path / str(max_steps), max_steps=max_steps, max_tokens=32 * 4 * 7 - 5)
        trainer = Trainer(model, task, cfg)
        result = trainer.fit()
        assert trainer.total_steps == result.steps == 7 and result.tokens == 32 * 4 * 7
        lrs = [r["lr"] for r in result.history if r["kind"] == "train"]
        assert lrs[-1] == pytest.approx(lr_at(6, cfg, 7)) and lrs[-1] < cfg.lr / 2


def test_a_time_budget_ends_with_the_learning_rate_decayed(tmp_path, monkeypatch):
    """--max-minutes stops a run before max_steps: the decay follows the clock, so the last steps
    train at min_lr, not at the lr a 1000-step schedule has at step 6. A fake clock: 1 s per step."""
    clock = iter(float(i) for i in range(10**6))  # each call 1 s later: a step = 2 calls, dt = 1 s
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    model, task, cfg = _setup(tmp_path, max_steps=1000, max_minutes=0.1, warmup_steps=0, eval_every=0)
    result = Trainer(model, task, cfg).fit()
    assert result.steps == 6 and result.stopped == "budget"
    lrs = [r["lr"] for r in result.history if r["kind"] == "train"]
    assert lrs == pytest.approx([lr_at(0, cfg, 1000, elapsed_s=t) for t in range(6)])
    assert lrs[0] == cfg.lr and lrs[-1] < cfg.min_lr + 0.1 * (cfg.lr - cfg.min_lr) < lr_at(5, cfg, 1000)


class _NaNAfter12Steps(LanguageModelTask):
    """A task whose loss turns NaN at its 13th call (step 13 with no accumulation)."""

    calls = 0

    def loss(self, model, batch):
        self.calls += 1
        loss = super().loss(model, batch)
        return loss * float("nan") if self.calls == 13 else loss


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model, task, cfg = _setup(
        tmp_path, task_class=_NaNAfter12Steps, max_steps=50, checkpoint_every=5, eval_every=0
    )
    with pytest.raises(ScratchLLMError, match=r"loss became nan at step 13.*step-000010"):
        Trainer(model, task, cfg).fit()
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == "step-000010"


def test_corrupt_and_incompatible_checkpoints_are_clear_errors(tmp_path):
    model, task, cfg = _setup(tmp_path, max_steps=4, eval_every=0)
    Trainer(model, task, cfg).fit()
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    other = GPTModel(preset_config("nano", vocab_size=VOCAB, context_length=32, emb_dim=32))
    with pytest.raises(
        ScratchLLMError, match=r"holds a model with emb_dim 64; this run builds emb_dim 32; resume"
    ):
        Trainer(other, task, cfg).fit(resume=str(ckpt))
    # changed settings: allowed (more steps, another lr), with a warning that names them
    model1, task1, cfg1 = _setup(
        tmp_path / "more", max_steps=6, lr=1e-3, eval_every=0, weight_decay=0.01, beta1=0.5
    )
    logged: list[str] = []
    trainer = Trainer(model1, task1, cfg1, log=logged.append)
    trainer.fit(resume=str(ckpt))
    [warning] = [line for line in logged if line.startswith("warning:")]
    assert "max_steps 4 -> 6, lr 0.003 -> 0.001, weight_decay 0.1 -> 0.01, beta1 0.9 -> 0.5" in warning
    assert "not as the stopped run would have" in warning and "muon" not in warning
    # and the optimizer uses them (loading its state would bring back the stopped run's)
    assert [(g["weight_decay"], g["betas"]) for g in trainer.optimizer.param_groups] == [
        (0.01, (0.5, 0.95)),
        (0.0, (0.5, 0.95)),
    ]
    state = ckpt / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    model2, task2, cfg2 = _setup(tmp_path)
    with pytest.raises(
        ScratchLLMError, match=r"cannot read .*trainer_state\.pt \(.+\); resume from an earlier checkpoint"
    ):
        Trainer(model2, task2, cfg2).fit(resume=str(ckpt))
    for foreign in ([1, 2], {"step": 3}):  # loads (no pickle needed), but is no state of ours
        torch.save(foreign, state)
        with pytest.raises(ScratchLLMError, match=r"trainer_state\.pt is not a checkpoint state written by"):
            Trainer(model2, task2, cfg2).fit(resume=str(ckpt))
    with pytest.raises(ScratchLLMError, match=r"no checkpoint"):
        Trainer(model2, task2, _setup(tmp_path / "empty")[2]).fit(resume="latest")


# ---------------------------------------------------------------------------------------------
# the real command in subprocesses: kill -9 and SIGTERM, then resume


def _cli_args(corpus: Path, out: Path, steps: int) -> list[str]:
    settings = shlex.split(
        "--vocab-size 300 --model nano --context-length 32 --batch-size 4 --eval-every 50 --eval-batches 2 "
        "--checkpoint-every 10 --log-every 1 --drop-rate 0.1 --progress false --sample-tokens 0 "
        "--keep-last 100 --warmup-steps 5 --workers 1 --device cpu"
    )
    command = [sys.executable, "-m", "scratchllm", "pretrain", "--corpus", str(corpus), *settings]
    return [*command, "--max-steps", str(steps), "--out-dir", str(out)]


# CPU kernels sum in an order that depends on the thread count (LayerNorm's backward does), and torch's
# default count follows the CPU affinity a process starts with: every run of these tests gets the same one
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train_losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    words = ["alpha", "beta", "gamma", "delta", "the", "cat", "sat", "on", "mat", "and", "ran"]
    rng = np.random.default_rng(0)
    path.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 30_000)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_cli_args(corpus, out, 200), check=True, capture_output=True, timeout=300, env=ONE_THREAD)
    return out


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None or path.exists(), f"run ended before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.005)


@pytest.mark.slow
def test_resume_after_kill_9_is_bitwise_identical(corpus, reference_run, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cli_args(corpus, out, 200), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD
    )
    _wait_for(out / "checkpoints" / "step-000020", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists(), "the run finished before it was killed; the test proves less"
    resume = ["--resume", str(out / "checkpoints" / "step-000020")]
    resumed = subprocess.run(
        [*_cli_args(corpus, out, 200), *resume], capture_output=True, text=True, timeout=300, env=ONE_THREAD
    )
    assert resumed.returncode == 0, resumed.stderr
    ref, got = _train_losses(reference_run), _train_losses(out)
    assert sorted(got) == sorted(ref) == list(range(1, 201))
    differ = [(s, got[s], ref[s]) for s in ref if got[s] != ref[s]]  # exactly equal floats, both sides
    assert not differ, f"{len(differ)} steps differ, the first: {differ[:3]}"
    assert (out / "model" / "model.safetensors").read_bytes() == (
        reference_run / "model" / "model.safetensors"
    ).read_bytes()


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_sigterm_saves_a_checkpoint_and_resume_finishes_identically(corpus, reference_run, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _cli_args(corpus, out, 200), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD
    )
    _wait_for(out / "checkpoints" / "step-000010", proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr  # saved, then says it was stopped
    assert "stopped by SIGTERM" in stdout + stderr
    stopped_at = max(int(p.name.split("-")[1]) for p in list_checkpoints(out))
    assert 10 <= stopped_at < 200
    resumed = subprocess.run(
        _cli_args(corpus, out, 200) + ["--resume"],
        capture_output=True,
        text=True,
        timeout=300,
        env=ONE_THREAD,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped_at:06d}'}" in resumed.stdout + resumed.stderr
    assert (out / "model" / "model.safetensors").read_bytes() == (
        reference_run / "model" / "model.safetensors"
    ).read_bytes()


def test_resume_from_a_run_directory_names_its_newest_checkpoint(tmp_path):
    for step in (3, 5):
        (tmp_path / "run" / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (tmp_path / "run" / "checkpoints" / f"step-{step}" / STATE_FILE).touch()
    assert find_resume_checkpoint("latest", tmp_path / "run").name == "step-5"
    with pytest.raises(
        ScratchLLMError, match=r"a run directory, not a checkpoint; .*the newest: .*step-5\), or"
    ):
        find_resume_checkpoint(str(tmp_path / "run"), tmp_path / "other")
    with pytest.raises(ScratchLLMError, match="not a resumable checkpoint"):
        find_resume_checkpoint(str(tmp_path), tmp_path / "other")


@pytest.mark.slow
def test_a_resume_with_another_thread_count_says_it_will_not_be_bitwise(corpus, tmp_path):
    out = tmp_path / "run"
    subprocess.run(_cli_args(corpus, out, 10), check=True, capture_output=True, timeout=300, env=ONE_THREAD)
    two = {**os.environ, "OMP_NUM_THREADS": "2"}
    resumed = subprocess.run(
        [*_cli_args(corpus, out, 12), "--resume"], capture_output=True, text=True, timeout=300, env=two
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "with 2 CPU threads where the run had 1" in resumed.stdout + resumed.stderr
    assert "OMP_NUM_THREADS=1" in resumed.stdout + resumed.stderr
