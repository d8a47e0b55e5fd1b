"""Atomic file and directory writes: a crash never leaves a half-written output behind. And one
reader for the JSON / JSON Lines record files that tasks, datasets and instruction data come in.

Everything the project writes (tokenizers, model directories, checkpoints, metrics, plots)
goes through these helpers: data is written to a temporary name in the destination's own
directory (same filesystem, so `os.replace` is atomic), flushed to the disk, and renamed only
once complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

# The files (and folder) that tell the package's directories apart in `directory_kind`; the code that
# writes each kind uses these names, so the two cannot drift apart.
STATE_FILE = "trainer_state.pt"  # a checkpoint (checkpoints/step-N/ of a run directory)
CHECKPOINTS_DIR = "checkpoints"  # a run directory
METRICS_FILE = "metrics.jsonl"  # a run directory
CONFIG_FILE = "config.json"  # a model directory, and a Hugging Face one
DATA_META_FILE = "meta.json"  # a prepared data directory (with its tokenizer in DATA_TOKENIZER_DIR)
DATA_TOKENIZER_DIR = "tokenizer"
TOKENIZER_META_FILE = "tokenizer_meta.json"  # a tokenizer directory


def check_parents(path: str | os.PathLike, what: str = "cannot write") -> None:
    """A one-line error when a file stands where a directory above `path` would have to be."""
    from .errors import ScratchLLMError

    parent = Path(path).parent
    for above in (parent, *parent.parents):
        if above.exists():
            if not above.is_dir():
                raise ScratchLLMError(f"{what} {path}: {above} is a file, not a directory; give another path")
            return


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp (and some writers, like safetensors) create private 0600/0700 entries; give the
    result the usual umask-based modes (a directory's files too)."""
    mask = _umask()
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)
    if directory:
        for child in path.iterdir():
            if child.is_file() and not child.is_symlink():
                os.chmod(child, 0o666 & ~mask)


def check_output_file(
    path: str | os.PathLike,
    what: str = "--out",
    inputs: Mapping[str, object] | None = None,
    writable: bool = False,
) -> None:
    """Raise a one-line error unless `path` can become a file: commands call it before their work,
    so a directory given as the output file fails at once, not after an hour of generation.
    `inputs` ({flag: path}) are the command's input files: an output that is one of them would
    replace the data it was made from, so that is an error too. `writable`: also create and delete
    a file in the nearest existing folder of `path` (missing folders are made when it is written),
    so that a read-only place fails before the work too."""
    from .errors import ScratchLLMError

    path = Path(path).expanduser()
    if path.is_dir():
        raise ScratchLLMError(f"{what} {path} is a directory; give a file path such as {path / 'out.json'}")
    check_parents(path, what)
    for flag, source in (inputs or {}).items():
        src = Path(source).expanduser() if isinstance(source, (str, os.PathLike)) else None
        if src is not None and src.is_file() and path.is_file() and os.path.samefile(path, src):
            raise ScratchLLMError(
                f"{what} {path} is the input file given as {flag}: writing it would replace that "
                "input; choose another output file"
            )
    if writable:
        _probe_folder(path, what)


def _probe_folder(path: Path, what: str) -> None:
    from .errors import ScratchLLMError

    folder = next((p for p in (path.parent, *path.parent.parents) if p.is_dir()), None)
    if folder is None:
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise ScratchLLMError(
            f"{what} {path}: cannot create a file in {folder} ({e.strerror or e}); choose a writable location"
        ) from None
    os.close(fd)
    os.unlink(probe)


def _sync(path: Path) -> None:
    """Flush a finished file, or every file and folder under a directory, to the disk.

    A rename is atomic for running programs, but after a power cut or a kernel crash the file
    system may hold the new name before the data it names (ext4 commits renames to new names
    without the data), so a checkpoint could come back empty after the older ones were pruned."""
    paths = [path]
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            paths += [Path(root, name) for name in files + dirs]
    for p in reversed(paths):  # the files, then the folders that name them
        _fsync(p)


def _fsync(path: Path) -> None:
    try:
        if not stat.S_ISREG(mode := os.lstat(path).st_mode) and not stat.S_ISDIR(mode):
            return  # a link is synced with its folder; opening a FIFO would wait for a writer
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on Windows; nothing to do there
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and platforms, for folders) do not sync this way
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`, on error delete it."""
    check_output_file(path, "output")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # its parents were checked above
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            _publish_mode(tmp_path, directory=False)
            _sync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)  # the rename itself
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def directory_kind(path: str | os.PathLike) -> str | None:
    """What an existing directory is, by its files: "checkpoint", "model directory", "Hugging Face
    model directory", "prepared data directory", "tokenizer directory" or "run directory"; None for
    anything else. Outputs check it so that one kind never silently replaces another (a model
    directory holds tokenizer files too, an exported Hugging Face directory a config.json too)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return "checkpoint"
    if (path / CONFIG_FILE).is_file():
        try:
            config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = None
        if isinstance(config, dict) and config.get("format") == "scratchllm-model":
            return "model directory"
        if isinstance(config, dict) and "model_type" in config:
            return "Hugging Face model directory"
        return None
    if (path / DATA_META_FILE).is_file() and (path / DATA_TOKENIZER_DIR).is_dir():
        return "prepared data directory"
    if (path / TOKENIZER_META_FILE).is_file():
        return "tokenizer directory"
    if (path / CHECKPOINTS_DIR).is_dir() or (path / METRICS_FILE).is_file():
        return "run directory"
    return None


def check_replaceable(path: str | os.PathLike, marker: str, what: str, inside: Iterable[Path] = ()) -> None:
    """Raise unless `path` may be replaced as a whole by a new `what`: it is new, an empty
    directory, or a `what` written before (it holds the file `marker` and `directory_kind` does not
    name another kind), and none of the paths in `inside` (what the new output is made from) lies in
    it. So a mistyped output path never takes a run directory, a model, a source or the current
    directory down with it."""
    from .errors import ScratchLLMError

    path = Path(path).expanduser()
    check_parents(path)
    here = path.resolve()
    for source in inside:
        source = Path(source).resolve()
        if source == here or here in source.parents:
            raise ScratchLLMError(
                f"{path} holds {source}, which this writes from; give another output directory"
            )
    if not path.exists():
        return
    if not path.is_dir():
        raise ScratchLLMError(f"{path} is a file, not a directory; give a new or empty directory")
    if not any(path.iterdir()):
        return
    kind = directory_kind(path)
    if kind is not None and kind != what:
        raise ScratchLLMError(
            f"{path} is a {kind}, not a {what}; it would be replaced as a whole, so give a new or empty "
            "directory"
        )
    if not (path / marker).is_file():
        raise ScratchLLMError(
            f"{path} is not empty and is not a {what} (it has no {marker}); it would be replaced as a "
            "whole, so give a new or empty directory"
        )


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike, *, marker: str, what: str, inside: Iterable[Path] = ()
) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `path` as a whole.

    An existing `path` is moved aside first and deleted only after the new one is in place,
    so readers see either the old complete directory or the new complete one. It must be empty
    or an earlier `what`, known by its `marker` file, and hold none of the `inside` paths
    (`check_replaceable`).
    """
    check_replaceable(path, marker, what, inside)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # its parents were checked above
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield tmp
        _publish_mode(tmp, directory=True)
        _sync(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "dir")
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        if old is not None and (old / "dir").exists() and not path.exists():
            os.replace(old / "dir", path)  # the new one did not take its place: the old one goes back
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Reading record files


def read_json_records(
    path: str | os.PathLike,
    what: str = "data file",
    hint: str = "one JSON object per line",
    unwrap: str | None = None,
) -> list[tuple[str, int, dict[str, Any]]]:
    """`(where, number, object)` for the objects of a JSON Lines file (one per line; blank lines
    skipped) or of a JSON file holding a list (told apart by the `.jsonl` suffix or a leading `[`), each
    with where it came from (`path, line N` or `path, record [i]`, for error messages) and its 1-based
    line or list position. Every problem (missing, not UTF-8, bad JSON, not an object, no records) is a
    one-line `ScratchLLMError` naming the file and line; `what` and `hint` say what the file should be.
    `unwrap`: a JSON object whose `unwrap` key holds the list (a file this package wrote with its
    records inside) stands for that list."""
    from .errors import ScratchLLMError

    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8").removeprefix("\ufeff")  # a byte-order mark is not JSON
    except FileNotFoundError:
        raise ScratchLLMError(f"{what} {path} not found; give a JSON or JSONL file ({hint})") from None
    except IsADirectoryError:
        raise ScratchLLMError(f"{path} is a directory; give a JSON or JSONL {what}") from None
    except UnicodeDecodeError as e:
        raise ScratchLLMError(f"{path}: not UTF-8 text (byte {e.start}); save the {what} as UTF-8") from None
    except OSError as e:
        raise ScratchLLMError(f"cannot read {what} {path}: {e.strerror or e}") from None

    def listed(data: list[Any]) -> list[tuple[str, int, Any]]:
        return [(f"{path}, record [{i}]", i + 1, obj) for i, obj in enumerate(data)]

    def one_object(data: dict[str, Any]) -> list[tuple[str, int, Any]]:
        if unwrap is not None and isinstance(data.get(unwrap), list):
            return listed(data[unwrap])
        raise ScratchLLMError(
            f"{path}: one JSON object (keys {sorted(data)[:8]}), not a list of records; write a [...] list "
            f"of objects or {hint}"
        )

    items: list[tuple[str, int, Any]] = []
    if path.suffix.lower() == ".jsonl" or not text.lstrip().startswith("["):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((f"{path}, line {n}", n, json.loads(line)))
            except json.JSONDecodeError as e:
                try:  # a pretty-printed object is valid JSON, just not a list of records
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    whole = None
                if isinstance(whole, dict):
                    items = one_object(whole)
                    break
                raise ScratchLLMError(
                    f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}); a JSONL file has "
                    "one {...} object per line, a JSON file one [...] list"
                ) from None
        one = items[0][2] if len(items) == 1 else None
        if unwrap is not None and isinstance(one, dict) and isinstance(one.get(unwrap), list):
            items = listed(one[unwrap])  # the same, written on one line
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ScratchLLMError(
                f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
            ) from None
        if not isinstance(data, list):
            raise ScratchLLMError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        items = listed(data)
    for where, _, obj in items:
        if not isinstance(obj, dict):
            raise ScratchLLMError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if not items:
        listed_form = path.suffix.lower() != ".jsonl" and text.lstrip().startswith("[")
        form = "a JSON list of objects" if listed_form else hint
        raise ScratchLLMError(f"{what} {path} has no records; write {form}")
    return items
