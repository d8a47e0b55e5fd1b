"""The "next:" hints name a scratchllm that runs: the bare name only when PATH finds the running one."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from scratchllm import hints
from scratchllm.hints import next_hint, quote, scratchllm_command


def script(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def venv(tmp_path, monkeypatch):
    """A project directory with .venv/bin/{python,scratchllm}, the current directory, and a PATH
    without scratchllm; the process runs as `.venv/bin/scratchllm` (how `make demo` runs it)."""
    project = tmp_path / "project"
    bin_dir = project / ".venv" / "bin"
    script(bin_dir / "python")
    script(bin_dir / "scratchllm")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(sys, "argv", [".venv/bin/scratchllm", "demo"])
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    return bin_dir


def test_without_an_activated_venv_the_hint_names_the_venvs_scratchllm(venv):
    assert scratchllm_command() == ".venv/bin/scratchllm"
    assert (
        next_hint("generate --model runs/demo/model")
        == "next: .venv/bin/scratchllm generate --model runs/demo/model"
    )


def test_the_bare_name_when_path_finds_the_running_scratchllm(venv, monkeypatch):
    monkeypatch.setenv("PATH", str(venv))  # the venv activated
    assert scratchllm_command() == "scratchllm"
    monkeypatch.setattr(sys, "argv", [str(venv / "scratchllm")])  # the shell passes the path it found
    assert scratchllm_command() == "scratchllm"


def test_another_scratchllm_on_path_is_not_named(venv, tmp_path, monkeypatch):
    other = script(tmp_path / "other-bin" / "scratchllm")
    monkeypatch.setenv("PATH", str(other.parent))
    assert scratchllm_command() == ".venv/bin/scratchllm"


def test_a_script_outside_the_current_directory_is_named_by_its_full_path(venv, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "argv", [str(venv / "scratchllm")])
    assert scratchllm_command() == str(venv / "scratchllm")


def test_python_dash_m_names_the_script_beside_python_or_python_itself(venv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(Path(hints.__file__).parent / "__main__.py"), "demo"])
    assert scratchllm_command() == ".venv/bin/scratchllm"
    (venv / "scratchllm").unlink()
    assert scratchllm_command() == f".venv{os.sep}bin{os.sep}python -m scratchllm"


def test_a_script_in_the_current_directory_and_paths_with_spaces_are_typed_as_they_run(venv, monkeypatch):
    monkeypatch.chdir(venv)
    monkeypatch.setattr(sys, "argv", ["./scratchllm"])
    assert scratchllm_command() == "./scratchllm"
    assert quote(Path("runs/my demo/model")) == "'runs/my demo/model'" and quote("runs/demo") == "runs/demo"
