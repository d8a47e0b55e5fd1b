"""The run directory's rules: one run at a time (`run_lock`), what a run may start in (`check_run_start`),
which checkpoint `--resume` means, which settings a resumed run continues with, and what a run leaves
behind (its checkpoints, metrics.jsonl, loss.png, config.toml, model/ and best/)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..checkpoint import read_config
from ..config import load_config
from ..errors import ScratchLLMError
from ..fileio import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    STATE_FILE,
    atomic_write_text,
    check_parents,
    check_replaceable,
    directory_kind,
)

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None  # type: ignore[assignment]

PLOT_FILE = "loss.png"
RUN_CONFIG_FILE = "config.toml"
# what every run writes into its directory, checked before any work (check_run_start)
RUN_MODEL_DIRS = ("model", "best")
RUN_FILES = (METRICS_FILE, PLOT_FILE, RUN_CONFIG_FILE)
LOCK_FILE = ".lock"  # run_lock's; left in place once a run wrote anything, it marks the directory as ours
# folders written whole (fileio.atomic_dir) into a run directory: pretrain adds tokenizer/ and data/
ATOMIC_DIRS = (*RUN_MODEL_DIRS, "tokenizer", "data")


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Resumable checkpoints of a run, oldest first."""
    ck = Path(out_dir) / CHECKPOINTS_DIR
    if not ck.is_dir():
        return []
    found = [p for p in ck.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints of a run."""
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def clear_earlier_run(out_dir: str | os.PathLike) -> None:
    """Delete an earlier run's checkpoints and metrics, for a fresh run started with `--overwrite`."""
    for old in list_checkpoints(out_dir):
        shutil.rmtree(old)
    (Path(out_dir) / METRICS_FILE).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# one run at a time


_held_locks: dict[Path, bool] = {}  # the run directories whose lock this process holds: had they one before?


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike, main: bool = True) -> Iterator[None]:
    """One run at a time in a run directory: two would replace each other's tokenizer and data,
    interleave their metrics and prune each other's checkpoints. An advisory lock on `.lock` (POSIX
    `flock`), taken by the main process (`main`), re-entrant within a process: commands take it right
    after `check_run_start`, and `Trainer.fit` again. Taking it also removes the leftovers of killed saves.
    The `.lock` file stays once the run wrote anything: it tells a later run that the directory is ours."""
    out_dir = Path(out_dir)
    if fcntl is None or not main or (out_dir.exists() and not out_dir.is_dir()):  # check_run_start says so
        yield
        return
    check_parents(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    key = out_dir.resolve()
    if key in _held_locks:
        yield
        return
    had_lock = (out_dir / LOCK_FILE).is_file()
    before = {p.name for p in out_dir.iterdir()}
    with open(out_dir / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ScratchLLMError(
                f"another process is training in {out_dir} (it holds {out_dir / LOCK_FILE}); wait for it to "
                "end, or give another --out-dir"
            ) from None
        except OSError as e:  # a file system without locks (some NFS and Lustre mounts)
            warnings.warn(
                f"cannot lock {out_dir / LOCK_FILE} ({e.strerror}): a second run started in {out_dir} "
                "meanwhile would not be refused",
                stacklevel=3,
            )
            yield
            return
        _held_locks[key] = had_lock
        try:
            _remove_leftovers(out_dir)
            yield
        finally:
            del _held_locks[key]
            fcntl.flock(f, fcntl.LOCK_UN)
            # a run that wrote nothing: no mark of ours is left (nor the directory, if it made it)
            if not had_lock and {p.name for p in out_dir.iterdir()} - {LOCK_FILE} == before:
                (out_dir / LOCK_FILE).unlink(missing_ok=True)
                if created:
                    out_dir.rmdir()


def _remove_leftovers(out_dir: Path) -> None:
    """What a killed save left half done (`fileio.atomic_dir`'s `.NAME.XXXXXXXX.tmp` / `.old` folders, and
    `atomic_path`'s `.NAME.XXXXXXXX.tmp` files), for the checkpoints and the run's other outputs: the
    caller holds the run's lock. A `.old` whose folder is missing (killed between the two renames) is
    put back."""
    folders = {out_dir / CHECKPOINTS_DIR: r"step-\d+", out_dir: "|".join(map(re.escape, ATOMIC_DIRS))}
    for folder, names in folders.items():
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = re.fullmatch(rf"\.({names})\.[a-z0-9_]{{8}}\.(tmp|old)", p.name)
            if not m or not p.is_dir() or p.is_symlink():
                continue
            if m.group(2) == "old" and (p / "dir").is_dir() and not (folder / m.group(1)).exists():
                os.replace(p / "dir", folder / m.group(1))
            shutil.rmtree(p, ignore_errors=True)
    files = "|".join(map(re.escape, RUN_FILES))
    for p in out_dir.iterdir():
        if re.fullmatch(rf"\.({files})\.[a-z0-9_]{{8}}\.tmp", p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# starting a run


def check_run_start(
    out_dir: str | os.PathLike,
    resume: str | None,
    overwrite: bool = False,
    dirs: Mapping[str, tuple[str, str]] | None = None,
    files: Iterable[str] = (),
) -> Path | None:
    """The checkpoint a run resumes from (None for a fresh run), or a one-line error: `--resume`
    without a checkpoint, or a fresh run in a directory holding an earlier run's checkpoints (it
    would mix with them: `--resume` would later pick up the earlier run's newer ones) unless
    `overwrite`, or an output of the run that cannot be written (a `model/` folder of something
    else, a directory named `metrics.jsonl`): that would fail only at the first save, after the
    training; or a file where the run writes one (config.toml, metrics.jsonl, ...) in a directory
    that is not a run directory of ours (`is_own_run_directory`): it is the user's, never replaced.
    `dirs` ({name: (marker, kind)}) and `files` name a command's outputs beyond the trainer's own.
    Commands call it before their slow setup; `Trainer.fit` again at the start."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ScratchLLMError(f"--out-dir {out_dir} is a file; give a directory for the run")
    check_parents(out_dir)
    kind = directory_kind(out_dir)
    if kind not in (None, "run directory"):  # a run writes model/, tokenizer/, checkpoints/ into it
        raise ScratchLLMError(
            f"--out-dir {out_dir} is a {kind}, not a run directory; give a new directory for the run"
        )
    _check_run_outputs(Path(out_dir), dirs or {}, files)
    earlier = list_checkpoints(out_dir)
    if resume is not None:
        path = find_resume_checkpoint(resume, out_dir)
        own = (Path(out_dir) / CHECKPOINTS_DIR).resolve()
        if earlier and path.resolve().parent != own:  # continuing another run here would splice the two
            raise ScratchLLMError(
                f"--resume {resume} is not a checkpoint of {out_dir}, which holds another run (the last: "
                f"{earlier[-1].name}); to continue from it, give a new --out-dir"
            )
        return path
    if earlier and not overwrite:
        raise ScratchLLMError(
            f"{out_dir} holds the checkpoints of an earlier run (the last: {earlier[-1].name}): continue it "
            "with --resume, start over with --overwrite true (deletes them), or give another --out-dir"
        )
    return None


def _check_run_outputs(out_dir: Path, dirs: Mapping[str, tuple[str, str]], files: Iterable[str]) -> None:
    def refuse(path: Path, why: str) -> None:
        raise ScratchLLMError(
            f"--out-dir {out_dir} cannot hold this run: {path} {why}; move it away or give another --out-dir"
        )

    if (out_dir / CHECKPOINTS_DIR).exists() and not (out_dir / CHECKPOINTS_DIR).is_dir():
        refuse(out_dir / CHECKPOINTS_DIR, "is a file, where the run keeps its checkpoints")
    for name, (marker, what) in {
        **{d: (CONFIG_FILE, "model directory") for d in RUN_MODEL_DIRS},
        **dirs,
    }.items():
        try:
            check_replaceable(out_dir / name, marker, what)
        except ScratchLLMError:
            refuse(out_dir / name, f"is not a {what}, and the run would replace it as a whole")
    for name in (*RUN_FILES, *files):
        if (out_dir / name).is_dir():
            refuse(out_dir / name, "is a directory, where the run writes a file")
    found = [out_dir / name for name in (*RUN_FILES, *files) if os.path.lexists(out_dir / name)]
    if found and not is_own_run_directory(out_dir):
        others = ", ".join(str(p.relative_to(out_dir)) for p in found[1:])
        are, them = ("is", "it") if not others else (f"(and {others}) are", "them")
        raise ScratchLLMError(
            f"--out-dir {out_dir} cannot hold this run: {found[0]} {are} not an earlier run's (the directory "
            f"holds no .lock, checkpoint or metrics of one), and the run would overwrite {them}; move {them} "
            "away or give another --out-dir"
        )


def is_own_run_directory(out_dir: str | os.PathLike) -> bool:
    """Whether a run of ours wrote into `out_dir`, so that its config.toml, metrics.jsonl, loss.png and
    the commands' reports there are the run's own to replace: it holds the `.lock` that `run_lock`
    leaves once a run wrote anything (not the one this process just made), a checkpoint, or a
    metrics.jsonl of the trainer's records (a run directory copied without its hidden files)."""
    out_dir = Path(out_dir)
    held = _held_locks.get(out_dir.resolve())  # under this process's lock: was the .lock there before?
    if (out_dir / LOCK_FILE).is_file() if held is None else held:
        return True
    return bool(list_checkpoints(out_dir)) or _holds_our_metrics(out_dir / METRICS_FILE)


def _holds_our_metrics(path: Path) -> bool:
    """Whether `path` holds `Trainer` records: JSON objects of kind train or eval with a step, every
    line but the last (which a crash may have cut)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    records = []
    for n, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines) - 1:
                return False
    return bool(records) and all(
        isinstance(r, dict) and r.get("kind") in ("train", "eval") and isinstance(r.get("step"), int)
        for r in records
    )


# ----------------------------------------------------------------------------------------------
# resuming a run


def settings_to_resume(
    cls: type, config: str | None, overrides: dict[str, Any], resume: str | None, preset: bool = False
) -> tuple[str | None, bool, dict[str, Any]]:
    """The settings a resumed run continues with, as `(config, preset, overrides)` for `load_config`:
    a `--config` file given; else, for `--resume PATH` to a checkpoint of another run (a fork), that
    run's config.toml, with the --out-dir given (or the default: never the other run's directory,
    which it would rewind); else the run's own config.toml in its --out-dir. The flags given change
    them. A run without a saved config.toml keeps `config` (the defaults or the preset)."""
    if resume is None or (config is not None and not preset):
        return config, preset, overrides
    out_dir = Path(load_config(cls, config, overrides, preset=preset).out_dir).expanduser()
    saved = out_dir / RUN_CONFIG_FILE
    checkpoint = Path(resume).expanduser()
    if resume not in ("", "latest") and checkpoint.parent.name == CHECKPOINTS_DIR:
        source = checkpoint.parent.parent
        if source.resolve() != out_dir.resolve() and (source / RUN_CONFIG_FILE).is_file():
            saved, overrides = source / RUN_CONFIG_FILE, {**overrides, "out_dir": str(out_dir)}
    if not saved.is_file():
        return config, preset, overrides
    if os.environ.get("RANK", "0") == "0":  # before torch.distributed starts: torchrun's rank
        print(f"resuming with the settings of {saved} (and the flags given)")
    return str(saved), False, overrides


def find_resume_checkpoint(resume: str, out_dir: str | os.PathLike) -> Path:
    """`latest` (or empty): the newest checkpoint of `out_dir`; else a checkpoint directory."""
    if resume in ("", "latest"):
        found = list_checkpoints(out_dir)
        if not found:
            raise ScratchLLMError(
                f"--resume: no checkpoint in {Path(out_dir) / CHECKPOINTS_DIR}; start without --resume"
            )
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        found = list_checkpoints(path)
        if found:  # a run directory
            raise ScratchLLMError(
                f"--resume {resume}: a run directory, not a checkpoint; give one of its checkpoints (the "
                f"newest: {found[-1]}), or continue it in place with --out-dir {resume} --resume"
            )
        raise ScratchLLMError(
            f"--resume {resume}: not a resumable checkpoint (no {STATE_FILE}); give a step-N directory"
        )
    return path


def metrics_until(out_dir: str | os.PathLike, step: int, rewrite: bool) -> list[dict[str, Any]] | None:
    """The metrics records of a run up to `step` (a crashed run may have logged more), or None without
    a metrics.jsonl; `rewrite`: keep only those in the file too."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return None
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if rec.get("step", 0) <= step:
            kept.append(rec)
    if rewrite:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def later_outputs(out_dir: str | os.PathLike, step: int) -> list[Path]:
    """What a resume at `step` replaces: the checkpoints after it, and best/ if one of them wrote it.
    (A resume after a crash has none: the replay writes the same best/ again.)"""
    out_dir = Path(out_dir)
    best = out_dir / "best"
    later = [c for c in list_checkpoints(out_dir) if int(c.name.split("-")[1]) > step]
    try:
        best_step = read_config(best)[1].get("step") if later and (best / CONFIG_FILE).is_file() else None
    except ScratchLLMError:
        best_step = None
    if isinstance(best_step, int) and best_step > step:
        later.append(best)
    return later


def set_aside(paths: Iterable[Path], step: int) -> None:
    """Rename `paths` to `*.abandoned-at-step-N`, so that they are kept but no longer picked by `--resume`
    or pruned in place of the new checkpoints."""
    for p in paths:
        target, n = p.with_name(f"{p.name}.abandoned-at-step-{step}"), 1
        while target.exists():  # rewound to this step before
            n += 1
            target = p.with_name(f"{p.name}.abandoned-at-step-{step}-{n}")
        p.rename(target)
