"""Output files: a directory or a path under a file is a one-line error before any work."""

from __future__ import annotations

import pytest

from scratchllm.cli import main
from scratchllm.errors import ScratchLLMError
from scratchllm.fileio import atomic_write_text, check_output_file


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


@pytest.mark.parametrize(
    "argv",
    [
        ["respond", "--model", "no-model", "--data", "no-data.json"],
        ["eval", "--model", "no-model", "--task", "no-task.jsonl"],
        ["classify", "--model", "no-model", "--file", "no-file.tsv"],
        [
            "judge",
            "--responses",
            "no-responses.json",
            "--judge-url",
            "http://127.0.0.1:9/v1",
            "--judge-model",
            "m",
        ],
    ],
)
def test_commands_check_out_before_their_work(argv, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a directory; give a file path" in err and len(err.splitlines()) == 1
