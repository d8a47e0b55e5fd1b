"""Corpus sources: where training text comes from.

A source is one of
- `builtin`: the English reference documentation bundled with every CPython
  (`pydoc_data.topics`, about 465 KB in 79 topics, cut into 300 section documents on Python 3.11
  and 353 on 3.12), so every command has an offline default;
- a text file, a directory (read recursively: *.txt, *.md, *.rst, *.text), or a glob (`docs/**/*.py`);
- `hf:NAME[:SPLIT]`: a Hugging Face dataset's `text` column (needs `pip install scratchllm[hf]` and a
  network, or the datasets cache).

Each file, section of a topic or dataset row is one `Document`; documents are later separated by
`<|endoftext|>`.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import setting
from ..errors import ScratchLLMError

BUILTIN = "builtin"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
ENCODING_ERRORS = ("strict", "replace")


@dataclass
class CorpusSettings:
    """Where a command's text comes from (`--corpus`, `--encoding-errors`): the settings `tokenizer
    train`, `prepare` and `perplexity` share (each embeds them: `setting(CorpusSettings(), ...)`)."""

    corpus: list[str] = setting(
        [BUILTIN],
        "text files, directories, globs, `builtin` (Python's bundled docs, the default) "
        "or `hf:NAME[:SPLIT]` (needs the `hf` extra and a network)",
        "data",
        path=(BUILTIN,),
        metavar="SOURCE",
    )
    encoding_errors: str = setting(
        "strict",
        "what to do with bytes that are not UTF-8: stop with an error naming the file and "
        "offset (strict, default) or replace them with U+FFFD",
        "data",
        choices=ENCODING_ERRORS,
    )

    def __post_init__(self) -> None:
        if self.encoding_errors not in ENCODING_ERRORS:  # a TOML file is not checked by argparse's choices
            raise ScratchLLMError(
                f"encoding_errors must be {' or '.join(ENCODING_ERRORS)}, got {self.encoding_errors!r}"
            )


@dataclass(frozen=True)
class Document:
    """One document of a corpus and where it came from."""

    source: str  # a file path, `builtin:TOPIC` or `hf:NAME:SPLIT#ROW`
    text: str


# A section starts at a title line underlined with =, *, -, +, ~ or ^ (reStructuredText rendered as text).
_SECTION = re.compile(r"\n(?=[^\n]+\n[=*\-+~^]{3,}\n)")


def builtin_documents() -> list[Document]:
    """Python's bundled reference documentation: its 79 topics cut into their ~300 sections, one
    document each (`builtin:TOPIC#N`), in sorted topic order. Sections rather than whole topics, so
    that a validation split drawn by document holds ~10% of the text and a mix of subjects, not
    three arbitrary topics of very different sizes."""
    try:
        from pydoc_data.topics import topics  # here: 465 KB of text, and some distributions strip it
    except ImportError as e:
        raise ScratchLLMError(
            "the built-in corpus needs Python's pydoc_data module, which this Python lacks; "
            "pass --corpus PATH with your own text instead"
        ) from e
    return [
        Document(f"{BUILTIN}:{name}#{i}", section)
        for name in sorted(topics)
        for i, section in enumerate(_SECTION.split(topics[name]))
        if section.strip()
    ]


def read_text_file(path: str | os.PathLike, encoding_errors: str = "strict") -> str:
    """Read a UTF-8 text file (or UTF-16/32 with a byte-order mark); with `strict`, bytes that do not decode
    raise an error naming the offset."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ScratchLLMError(f"cannot read {path}: {e.strerror or e}") from e
    # a byte-order mark says the encoding (Windows tools write UTF-16 and UTF-8 with one); UTF-32's
    # marks begin like UTF-16's, so they are tried first
    codec = next((c for bom, c in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(codec, errors=encoding_errors)
    except UnicodeDecodeError as e:
        raise ScratchLLMError(
            f"{path}: byte {e.start} (0x{data[e.start]:02x}) is not valid {codec.upper()}; convert the file "
            "to UTF-8 or pass --encoding-errors replace"
        ) from e
    return text.removeprefix("\ufeff")  # utf-16 and utf-32 remove the mark; a second one is not text either


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _text_files_in(path: Path) -> list[Path]:
    """The text files under a directory, sorted; the other kinds skipped are named in a warning, so that
    a folder of .py or .html files is not half-read unnoticed (hidden ones, such as .git/ or .DS_Store,
    are left out without a word)."""
    found = [p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))]
    files = sorted(p for p in found if p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ScratchLLMError(
            f"directory {path} has no text files ({', '.join(TEXT_SUFFIXES)}); use a glob such as "
            f"'{path}/**/*.py' for other kinds"
        )
    kinds = Counter(p.suffix.lower() or "(none)" for p in found if p.suffix.lower() not in TEXT_SUFFIXES)
    if kinds:
        listed = ", ".join(f"{n} {suffix}" for suffix, n in kinds.most_common(4))
        others = f"{kinds.total()} other{'s' if kinds.total() > 1 else ''}"
        _warn_once(
            f"directory {path}: read {len(files)} text files ({', '.join(TEXT_SUFFIXES)}), skipped {others} "
            f"({listed}{', ...' if len(kinds) > 4 else ''}); a glob such as '{path}/**/*.py' reads other "
            "kinds"
        )
    return files


def resolve_paths(source: str) -> list[Path]:
    """The files one path-like source stands for, sorted so runs are reproducible."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return _text_files_in(path)
    if glob.has_magic(source):
        files = sorted(
            Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file()
        )
        if not files:
            raise ScratchLLMError(f"glob {source!r} matches no files")
        return files
    if path.is_symlink():
        raise ScratchLLMError(f"corpus source {source!r} is a broken symbolic link (to {os.readlink(path)})")
    raise ScratchLLMError(
        f"corpus source {source!r} not found: give a file, a directory, a glob, `builtin` or hf:NAME"
    )


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A warning about the corpus, once per process: commands read their sources more than once
    (to size them, to train the tokenizer, to tokenize)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _hf_documents(spec: str) -> Iterator[Document]:
    parts = spec.split(":")
    name = parts[1] if len(parts) > 1 else ""
    split = parts[2] if len(parts) > 2 else "train"
    if not name:
        raise ScratchLLMError(
            f"corpus source {spec!r}: expected hf:NAME[:SPLIT], e.g. hf:roneneldan/TinyStories"
        )
    try:
        import datasets  # optional and slow to import: only for hf: sources
    except ImportError as e:
        raise ScratchLLMError(
            f"corpus source {spec!r} needs the Hugging Face datasets package: pip install 'scratchllm[hf]'"
        ) from e
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # network, auth, missing split: all reported the same way
        raise ScratchLLMError(f"cannot load Hugging Face dataset {name!r} split {split!r}: {e}") from e
    for i, row in enumerate(ds):
        if "text" not in row:
            raise ScratchLLMError(
                f"Hugging Face dataset {name!r} has no `text` column (columns: {sorted(row)})"
            )
        yield Document(f"hf:{name}:{split}#{i}", row["text"])


def resolve_sources(sources: Sequence[str] | str = (BUILTIN,)) -> list[str | Path]:
    """The files (and `builtin` / `hf:` names) that `sources` stand for, in order, each once: a file
    given twice (`notes/ notes/*.md`) would be read twice, and could land in train and val both.
    Every path is checked here, before any text is read."""
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise ScratchLLMError("no corpus given: pass --corpus PATH... or --corpus builtin")
    resolved: list[str | Path] = []
    seen: set[str | Path] = set()
    repeated = 0
    for source in sources:
        for item in [source] if source == BUILTIN or source.startswith("hf:") else resolve_paths(source):
            key = item.resolve() if isinstance(item, Path) else item
            if key in seen:
                repeated += 1
                continue
            seen.add(key)
            resolved.append(item)
    if repeated:
        _warn_once(
            f"{repeated} corpus source{'s' if repeated > 1 else ''} given more than once (say, a directory "
            "and a glob inside it); each is read once"
        )
    return resolved


def iter_documents(
    sources: Sequence[str] | str = (BUILTIN,), encoding_errors: str = "strict"
) -> Iterator[Document]:
    """All documents of the given sources, in order (`resolve_sources`). Paths are checked before any
    text is read."""
    for item in resolve_sources(sources):
        if item == BUILTIN:
            yield from builtin_documents()
        elif isinstance(item, str):
            yield from _hf_documents(item)
        else:
            yield Document(str(item), read_text_file(item, encoding_errors))


def load_documents(
    sources: Sequence[str] | str = (BUILTIN,), encoding_errors: str = "strict"
) -> list[Document]:
    """Like `iter_documents`, as a list; an all-empty corpus is an error."""
    docs = list(iter_documents(sources, encoding_errors))
    if not any(d.text.strip() for d in docs):
        names = sources if isinstance(sources, str) else " ".join(sources)
        raise ScratchLLMError(f"the corpus ({names}) is empty: it has no text")
    return docs


def source_fingerprints(docs: Sequence[Document]) -> list[dict]:
    """Per-source sha256 of the text, recorded with prepared data and training runs."""
    by_source: dict[str, hashlib._Hash] = {}
    sizes: dict[str, int] = {}
    for d in docs:
        key = BUILTIN if d.source.startswith(f"{BUILTIN}:") else d.source.split("#", 1)[0]
        h = by_source.setdefault(key, hashlib.sha256())
        data = d.text.encode("utf-8")
        h.update(data)
        sizes[key] = sizes.get(key, 0) + len(data)
    return [{"source": k, "bytes": sizes[k], "sha256": h.hexdigest()} for k, h in by_source.items()]
