"""The commands that "next:" hints print, spelled so that they run as shown.

After `make demo` the venv is not activated, so a bare `scratchllm` is not on PATH; the hint then
names the executable that is running (e.g. `.venv/bin/scratchllm`) instead.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

SCRIPT = "scratchllm"


def _script_names() -> tuple[str, ...]:
    return (SCRIPT, f"{SCRIPT}.exe", f"{SCRIPT}-script.py") if os.name == "nt" else (SCRIPT,)


def running_executable() -> Path | None:
    """The `scratchllm` script that runs this process: `sys.argv[0]` when it is that script, else the
    one installed next to the running Python (`python -m scratchllm`, tests), else None."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 and Path(argv0).name in _script_names() and Path(argv0).is_file():
        return Path(argv0)
    for name in _script_names()[:2]:
        beside = Path(sys.executable).parent / name
        if beside.is_file():
            return beside
    return None


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _shown(path: Path) -> str:
    """`path` as a user can type it here: relative to the current directory when below it."""
    absolute = Path(os.path.abspath(path))
    try:
        text = str(absolute.relative_to(Path.cwd()))
        if os.sep not in text:  # a bare name would be looked up on PATH
            text = os.curdir + os.sep + text
    except ValueError:
        text = str(absolute)
    return shlex.quote(text)


def scratchllm_command() -> str:
    """How to run scratchllm in a hint: `scratchllm` when that name on PATH is the running one,
    else the running script's path (`.venv/bin/scratchllm`), else `PYTHON -m scratchllm`."""
    on_path = shutil.which(SCRIPT)
    running = running_executable()
    if on_path and (running is None or _same_file(on_path, running)):
        return SCRIPT
    if running is not None:
        return _shown(running)
    return f"{_shown(Path(sys.executable))} -m {SCRIPT}"


def quote(value: str | os.PathLike) -> str:
    """A path or word as one shell argument (unchanged when it needs no quotes)."""
    return shlex.quote(str(value))


def next_hint(args: str) -> str:
    """The line `next: <scratchllm> ARGS` that ends a command's summary."""
    return f"next: {scratchllm_command()} {args}"


__all__ = ["next_hint", "quote", "running_executable", "scratchllm_command"]
