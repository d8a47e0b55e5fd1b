"""Nothing of the user's is lost in a run directory: files of their own where a run writes its
config.toml, metrics.jsonl, loss.png or reports are refused, an unreadable newest checkpoint gives way
to the one before it, leftovers of killed writes go, and a finished run says how to go on."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from scratchllm import checkpoint
from scratchllm.cli import main
from scratchllm.errors import ScratchLLMError
from scratchllm.fileio import STATE_FILE
from scratchllm.model.gpt import GPTModel, preset_config
from scratchllm.text.simple import SimpleTokenizer
from scratchllm.train.rundir import is_own_run_directory, list_checkpoints, run_lock
from scratchllm.train.trainer import Trainer
from tests.train.test_trainer import _setup

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = shlex.split(
    "--model nano --context-length 32 --batch-size 4 --eval-batches 2 --warmup-steps 2 --progress false "
    "--sample-tokens 0 --workers 1 --device cpu --precision fp32 --tokenizer char"
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("the cat sat on the mat and ran. " * 400, encoding="utf-8")
    return path


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


# ----------------------------------------------------------------------------------------------
# a user's own files where a run writes its own


@pytest.mark.parametrize("name", ["config.toml", "metrics.jsonl", "loss.png"])
def test_a_users_own_file_where_pretrain_writes_is_refused_and_kept(name, corpus, tmp_path, capsys):
    """They were overwritten (exit 0), while a folder of the user's in the run's way was refused."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text('{"kind": "notes", "step": 1}\n')  # a metrics.jsonl, but not of a run
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    assert main(["pretrain", "--corpus", str(corpus), "--out-dir", str(out), "--max-steps", "2", *FAST]) == 2
    err = capsys.readouterr().err
    assert f"--out-dir {out} cannot hold this run: {out / name} is not an earlier run's" in err
    assert (
        "the run would overwrite it; move it away or give another --out-dir" in err and err.count("\n") == 1
    )
    assert _tree(out) == before  # no .lock, tokenizer or data either


def test_finetune_commands_refuse_a_users_report_and_split_files(tmp_path, capsys):
    tok = SimpleTokenizer.from_corpus("good bad a b c d")
    base = checkpoint.save_model(
        tmp_path / "base", GPTModel(preset_config("nano", vocab_size=tok.vocab_size, context_length=24)), tok
    )
    rows = [{"text": f"a {w} b", "label": w} for w in ("good", "bad") * 20]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "classify"
    out.mkdir()
    (out / "classification.json").write_text('{"mine": true}')
    before = _tree(out)
    argv = ["finetune", "classify", "--model", str(base), "--data", str(data), "--out-dir", str(out)]
    argv += shlex.split("--max-steps 1 --progress false --device cpu")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{out / 'classification.json'} is not an earlier run's" in err and err.count("\n") == 1
    assert _tree(out) == before
    # the same file, written by an earlier run here, is the run's own to replace
    (out / ".lock").touch()
    assert main(argv) == 0
    assert json.loads((out / "classification.json").read_text())["steps"] == 1
    instr = tmp_path / "instructions.json"
    instr.write_text(json.dumps([{"instruction": f"say {w}", "input": "", "output": w} for w in "abcd" * 5]))
    out = tmp_path / "instruct"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train.json").write_text("[]")
    (out / "config.toml").write_text("# my notes\n")
    before = _tree(out)
    assert (
        main(["finetune", "instruct", "--model", str(base), "--data", str(instr), "--out-dir", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert f"{out / 'config.toml'} (and data/train.json) are not an earlier run's" in err
    assert (
        "would overwrite them; move them away or give another --out-dir" in err
        and err.count("\n") == 1
        and _tree(out) == before
    )


def test_an_earlier_runs_directory_is_known_by_its_lock_checkpoints_or_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("x = 1\n")
    assert not is_own_run_directory(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')  # someone else's records
    assert not is_own_run_directory(run)
    (run / "metrics.jsonl").write_text(
        '{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "ev'
    )  # cut by a kill
    assert is_own_run_directory(run)
    (run / "metrics.jsonl").unlink()
    (run / ".lock").touch()
    assert is_own_run_directory(run)
    (run / ".lock").unlink()
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "checkpoints" / "step-000002" / STATE_FILE).touch()
    assert is_own_run_directory(run)
    # a run directory copied without its hidden files and checkpoints: its outputs are replaced
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 7, "loss": 2.0}\n')
    model, task, cfg = _setup(tmp_path, max_steps=2, eval_every=0)
    Trainer(model, task, cfg, run_config_toml="y = 2\n").fit()
    assert (run / "config.toml").read_text() == "y = 2\n" and max(_losses(run)) == 2


def test_a_run_leaves_its_mark_only_once_it_wrote_something(tmp_path):
    """The `.lock` that a refused start made stayed beside the user's files, and the next start
    took the directory for an earlier run's and overwrote them."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("mine\n")
    for _ in range(2):
        model, task, cfg = _setup(tmp_path, max_steps=2, eval_every=0)
        with pytest.raises(ScratchLLMError, match=r"config\.toml is not an earlier run's"):
            Trainer(model, task, cfg, run_config_toml="y = 2\n").fit()
        assert sorted(p.name for p in run.iterdir()) == ["config.toml"]
    (run / "config.toml").unlink()
    model, task, cfg = _setup(tmp_path, max_steps=2, eval_every=0)
    trainer = Trainer(model, task, cfg, run_config_toml="y = 2\n")
    trainer._train_step = lambda: (_ for _ in ()).throw(RuntimeError("out of memory"))  # after config.toml
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.fit()
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.toml"]  # a start of ours
    model, task, cfg = _setup(tmp_path, max_steps=2, eval_every=0)
    assert Trainer(model, task, cfg, run_config_toml="z = 3\n").fit().steps == 2  # the re-run goes ahead
    assert (run / "config.toml").read_text() == "z = 3\n"


# ----------------------------------------------------------------------------------------------
# resume and leftovers


@pytest.mark.parametrize("broken", [STATE_FILE, "model.safetensors"])
def test_resume_latest_skips_an_unreadable_newest_checkpoint(broken, tmp_path, capsys):
    model, task, cfg = _setup(tmp_path, max_steps=10, checkpoint_every=5, keep_last=3, eval_every=0)
    Trainer(model, task, cfg).fit()
    run = tmp_path / "run"
    reference = _losses(run)
    newest = run / "checkpoints" / "step-000010" / broken
    newest.write_bytes(newest.read_bytes()[:200])  # truncated
    capsys.readouterr()
    model, task, cfg = _setup(tmp_path, max_steps=10, checkpoint_every=5, keep_last=3, eval_every=0)
    result = Trainer(model, task, cfg).fit(resume="latest")
    printed = capsys.readouterr().out
    assert f"skipping the checkpoint step-000010: cannot read {newest} (" in printed
    assert f"resumed from {run / 'checkpoints' / 'step-000005'} at step 5" in printed
    assert result.steps == 10 and _losses(run) == reference  # continued exactly from step 5
    assert (run / "checkpoints" / "step-000010.abandoned-at-step-5").is_dir()  # set aside, not deleted
    # an explicit checkpoint is taken as given; none readable is one line that says what to do
    for ckpt in list_checkpoints(run):
        (ckpt / STATE_FILE).write_bytes(b"not a checkpoint")
    model, task, cfg = _setup(tmp_path, max_steps=10, eval_every=0)
    with pytest.raises(
        ScratchLLMError, match=r"cannot read .*step-000010.*resume from an earlier checkpoint"
    ):
        Trainer(model, task, cfg).fit(resume=str(run / "checkpoints" / "step-000010"))
    none_readable = (
        r"--resume: no readable checkpoint in .*checkpoints \(the newest: cannot read .*step-000010.*\); "
        r"start over with --overwrite true"
    )
    with pytest.raises(ScratchLLMError, match=none_readable):
        Trainer(model, task, cfg).fit(resume="latest")


def test_taking_the_run_lock_removes_the_leftovers_of_killed_writes(tmp_path):
    run = tmp_path / "run"
    (run / ".model.ab12cd34.tmp").mkdir(parents=True)  # killed while writing model/
    (run / ".model.ab12cd34.tmp" / "model.safetensors").write_bytes(b"half")
    (run / ".data.xy_9zz00.tmp").mkdir()  # pretrain's prepared data
    (run / ".metrics.jsonl.q1w2e3r4.tmp").write_text("half")
    (run / ".best.ef56gh78.old" / "dir").mkdir(parents=True)  # killed between the two renames
    (run / ".best.ef56gh78.old" / "dir" / "config.json").write_text("{}")
    mine = [run / ".model.bak", run / ".best.notes.old", run / ".model.ab12cd3.tmp"]  # not our names
    for p in mine:
        p.mkdir()
    with run_lock(run):
        pass
    assert sorted(p.name for p in run.iterdir()) == sorted([".lock", "best", *(p.name for p in mine)])
    assert (run / "best" / "config.json").read_text() == "{}"  # the only copy, put back


def test_resuming_a_run_that_used_its_budget_says_how_to_extend_it(corpus, tmp_path, capsys):
    """A bare --resume of a finished run evaluated again and re-reported the last step, silently."""
    out = tmp_path / "run"
    argv = ["pretrain", "--corpus", str(corpus), "--out-dir", str(out), *FAST]
    argv += shlex.split("--eval-every 0 --log-every 1 --max-steps 100000 --max-minutes 0.002")
    assert main(argv) == 0
    steps = max(_losses(out))
    assert 0 < steps < 100000
    metrics = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["pretrain", "--out-dir", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert (
        f"the run already ended at step {steps}: it used its time budget (--max-minutes 0.002: " in printed
        and "nothing is left to train: to go on, resume with a larger --max-minutes (0: no limit)" in printed
    )
    assert (out / "metrics.jsonl").read_bytes() == metrics  # no second evaluation of the same step
    # a budget past what the first run used (a loaded machine can take many times 0.002 minutes for its
    # first steps), and a step limit that keeps the test short
    longer = ["--max-minutes", "1", "--max-steps", str(steps + 2)]
    assert main(["pretrain", "--out-dir", str(out), "--resume", *longer]) == 0
    assert max(_losses(out)) == steps + 2 and "already ended" not in capsys.readouterr().out
    # a step budget, the same
    model, task, cfg = _setup(tmp_path / "steps", max_steps=3, eval_every=0)
    Trainer(model, task, cfg).fit()
    logged: list[str] = []
    model, task, cfg = _setup(tmp_path / "steps", max_steps=3, eval_every=0)
    result = Trainer(model, task, cfg, log=logged.append).fit(resume="latest")
    assert result.steps == 3 and result.metrics["val_loss"] > 0
    assert (
        "the run already ended at step 3: it used its --max-steps 3; nothing is left to train: to go on, "
        "resume with a larger --max-steps" in logged
    )
