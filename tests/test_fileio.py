"""Output files: a directory or a path under a file is a one-line error before any work."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from scratchllm.cli import main
from scratchllm.errors import ScratchLLMError
from scratchllm.fileio import atomic_write_text, check_output_file

JUDGE = shlex.split("--judge-url http://127.0.0.1:9/v1 --judge-model m")  # a judge that is never reached


def test_output_files_must_be_files(tmp_path):
    check_output_file(tmp_path / "new" / "dirs" / "out.json")  # missing parents are created later: fine
    with pytest.raises(ScratchLLMError, match="is a directory; give a file path"):
        check_output_file(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ScratchLLMError, match=r"f\.txt is a file, not a directory"):
        check_output_file(tmp_path / "f.txt" / "out.json")
    with pytest.raises(ScratchLLMError, match="is a directory"):
        atomic_write_text(tmp_path, "never written")
    assert (tmp_path / "f.txt").read_text() == "x"


def test_an_output_below_a_file_is_a_one_line_error_before_any_work(tmp_path, capsys):
    """`--out afile/x`: every command that writes a directory says so before its work (no
    NotADirectoryError traceback after training a tokenizer or a model)."""
    (tmp_path / "afile").write_text("x")
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. " * 200)
    below = str(tmp_path / "afile" / "sub" / "out")
    for argv in (
        ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "270", "--out", below],
        ["prepare", "--corpus", str(corpus), "--tokenizer", "no-such-tokenizer", "--out", below],
        ["pretrain", "--corpus", str(corpus), "--tokenizer", "char", "--model", "nano", "--out-dir", below],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert f"{tmp_path / 'afile'} is a file, not a directory" in err and len(err.splitlines()) == 1, err
    with pytest.raises(ScratchLLMError, match="is a file, not a directory"):
        atomic_write_text(tmp_path / "afile" / "x.txt", "never written")
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize(
    "argv",
    [
        shlex.split("respond --model no-model --data no-data.json"),
        shlex.split("eval-tasks --model no-model --task no-task.jsonl"),
        shlex.split("classify --model no-model --file no-file.tsv"),
        ["judge", "--responses", "no-responses.json", *JUDGE],
    ],
)
def test_commands_check_out_before_their_work(argv, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a directory; give a file path" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "argv, flag",
    [
        (shlex.split("respond --model no-model --data {input}"), "--data"),
        (shlex.split("eval-tasks --model no-model --task {input}"), "--task"),
        (
            shlex.split("eval-tasks --model no-model --task hellaswag --fewshot-file {input}"),
            "--fewshot-file",
        ),
        (shlex.split("classify --model no-model --file {input}"), "--file"),
        (["judge", "--responses", "{input}", *JUDGE], "--responses"),
    ],
)
def test_an_output_that_is_the_input_file_is_refused(argv, flag, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data.json"
    data.write_text('[{"instruction": "keep me"}]')
    monkeypatch.chdir(tmp_path)
    # the same file under another spelling of its path
    argv = [a.replace("{input}", str(data)) for a in argv]
    assert main([*argv, "--out", "./data.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"is the input file given as {flag}" in err and len(err.splitlines()) == 1
    assert data.read_text() == '[{"instruction": "keep me"}]'


def test_empty_record_files_say_what_to_write(tmp_path):
    from scratchllm.fileio import read_json_records

    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(ScratchLLMError, match=r"a\.json has no records; write a JSON list of objects"):
        read_json_records(tmp_path / "a.json")
    (tmp_path / "b.jsonl").write_text("\n")
    with pytest.raises(ScratchLLMError, match=r"b\.jsonl has no records; write one JSON object per line"):
        read_json_records(tmp_path / "b.jsonl")


def test_a_failed_replacement_puts_the_old_directory_back(tmp_path, monkeypatch):
    """The old directory was moved aside, then lost when the new one could not take its place."""
    from scratchllm import fileio

    target = tmp_path / "best"
    with fileio.atomic_dir(target, marker="m", what="thing") as tmp:
        (tmp / "m").write_text("old")
    real = os.replace

    def failing(src, dst):
        if Path(dst) == target and str(src).endswith(".tmp"):  # the new directory taking its place
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", failing)
    with (
        pytest.raises(OSError, match="disk full"),
        fileio.atomic_dir(target, marker="m", what="thing") as tmp,
    ):
        (tmp / "m").write_text("new")
    assert (target / "m").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_outputs_reach_the_disk_before_their_rename(tmp_path, monkeypatch):
    """Every file and folder of a new directory (and a new file) is fsynced before the rename that
    publishes it, and the parent folder after it: a power cut cannot leave a named but empty output."""
    import scratchllm.fileio as fileio

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = fileio._fsync, os.replace
    monkeypatch.setattr(fileio, "_fsync", lambda p: (events.append(("sync", str(p))), real_fsync(p))[1])
    monkeypatch.setattr(
        fileio.os, "replace", lambda a, b: (events.append(("rename", str(b))), real_replace(a, b))[1]
    )

    out = tmp_path / "model"
    with fileio.atomic_dir(out, marker="config.json", what="model directory") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"w" * 100)
        (tmp / "config.json").write_text("{}")
    rename = events.index(("rename", str(out)))
    synced = {Path(p).relative_to(tmp) for kind, p in events[:rename] if kind == "sync" and Path(p) != tmp}
    assert synced == {Path("sub"), Path("sub/weights.bin"), Path("config.json")}
    assert ("sync", str(tmp)) in events[:rename] and events[rename + 1] == ("sync", str(tmp_path))
    assert (out / "sub" / "weights.bin").read_bytes() == b"w" * 100

    events.clear()
    atomic_write_text(tmp_path / "notes.txt", "hello")
    assert [kind for kind, _ in events] == ["sync", "rename", "sync"] and events[-1][1] == str(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "hello"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes")
def test_a_pipe_or_link_inside_an_output_does_not_stop_the_sync(tmp_path):
    """Only files and folders are synced: opening a named pipe would wait for a writer forever."""
    import signal

    import scratchllm.fileio as fileio

    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("the sync waited on the pipe"))
    signal.alarm(10)
    try:
        with fileio.atomic_dir(tmp_path / "out", marker="config.json", what="model directory") as tmp:
            os.mkfifo(tmp / "pipe")
            (tmp / "link").symlink_to("nowhere")
            (tmp / "config.json").write_text("{}")
    finally:
        signal.alarm(0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "link", "pipe"]
