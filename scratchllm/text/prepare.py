"""`scratchllm prepare`: tokenize a corpus once into memory-mapped token files for training.

Output directory:
  train.bin, val.bin   flat token ids (uint16 when the vocabulary fits, else uint32), documents separated
                       by `<|endoftext|>`
  meta.json            tokenizer identity, dtype, token and document counts, source hashes, split settings
  tokenizer/           the tokenizer itself, so training uses exactly the ids that were written

Documents go to train or val by a seeded hash of their index (stable for any number of workers); when that
leaves one side empty (a corpus of one or two files) the last `val_fraction` of the tokens becomes val.
Long documents are cut into chunks for the worker processes only where GPT-style pre-tokenizers always break
(a newline between two non-space characters), so the ids equal encoding each document whole; with a BPE
pattern of the user's own, which may not break there, documents are encoded whole.
Everything is written into a temporary directory that replaces `out` only when complete.

This module avoids importing torch: worker processes start fast.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..errors import ScratchLLMError
from ..fileio import DATA_META_FILE as META
from ..fileio import DATA_TOKENIZER_DIR, atomic_dir, atomic_write_json, check_replaceable
from .bpe import PATTERNS, BPETokenizer
from .corpus import BUILTIN, builtin_documents, iter_documents, resolve_sources
from .registry import load_tokenizer
from .tokenizer import Tokenizer

FORMAT = "scratchllm-tokens"
CHUNK_CHARS = 1 << 20  # work unit for the workers
# With `workers=0` each worker process gets at least this much text: starting one (spawn, imports,
# loading the tokenizer) costs about what encoding it takes (benchmarks/RESULTS.md).
BYTES_PER_WORKER = 16 << 20
_SAFE_CUT = re.compile(r"\S\n(?=\S)")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2's 50257 does), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def split_document(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut `text` into pieces of about `max_chars`, only just after a newline between two non-space
    characters (a boundary the GPT-2 and GPT-4 pre-tokenization patterns never cross)."""
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        target = start + max_chars
        cut = None
        # the last safe cut before the target, else the first one after it
        i = text.rfind("\n", start + 1, target)
        while i > start and cut is None:
            if not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace():
                cut = i + 1
            else:
                i = text.rfind("\n", start + 1, i)
        if cut is None:
            m = _SAFE_CUT.search(text, target)
            if m is None:
                break
            cut = m.end()
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _in_val(index: int, seed: int, val_fraction: float) -> bool:
    """A stable pseudo-random draw per document: blake2b(seed, index) as a number in [0, 1)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


# worker side ----------------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(tokenizer_dir: str, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer = load_tokenizer(tokenizer_dir)
    _worker_dtype = np.dtype(dtype)


def _encode_task(task: tuple[list[Any], list[str]]) -> tuple[list[Any], list[np.ndarray]]:
    keys, texts = task
    assert _worker_tokenizer is not None and _worker_dtype is not None
    # one text at a time: the processes are the parallelism (encode_batch would add threads on top)
    ids = [_worker_tokenizer.encode(t) for t in texts]  # document text is ordinary text: no specials
    return keys, [np.asarray(x, dtype=_worker_dtype) for x in ids]


# parent side ----------------------------------------------------------------------------------


def _corpus_bytes(sources: Sequence[str]) -> int | None:
    """Total size of the path sources, for the progress bar (None when a source has no known size)."""
    total = 0
    for s in resolve_sources(sources):
        if s == BUILTIN:
            total += sum(len(d.text.encode("utf-8")) for d in builtin_documents())
        elif isinstance(s, str):  # hf:
            return None
        else:
            total += s.stat().st_size
    return total


def prepare(
    corpus: Sequence[str] | str = (BUILTIN,),
    tokenizer: str | Tokenizer = "gpt2",
    out: str | os.PathLike = "data/prepared",
    val_fraction: float = 0.1,
    workers: int = 0,
    encoding_errors: str = "strict",
    seed: int = 1337,
    progress: bool = True,
    chunk_chars: int = CHUNK_CHARS,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize `corpus` into `out` (see the module docstring); returns the written meta.json content."""
    if isinstance(corpus, str):
        corpus = [corpus]
    if not 0.0 <= val_fraction < 1.0:
        raise ScratchLLMError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers < 0:
        raise ScratchLLMError(f"--workers must be >= 0, got {workers}")
    check_replaceable(out, META, "prepared data directory")  # before loading or tokenizing anything
    tok = load_tokenizer(tokenizer)
    if tok.eot_id is None:
        raise ScratchLLMError(f"tokenizer {tok.name!r} has no <|endoftext|> token to separate documents")
    dtype = token_dtype(tok.vocab_size)
    total_bytes = _corpus_bytes(corpus)  # also checks that every path exists before any work
    workers = _worker_count(workers, total_bytes, chunk_chars)
    t0 = time.perf_counter()
    # a pattern of the user's own may join pieces across a newline (`\s*\S+`): its documents stay whole
    cuttable = not isinstance(tok, BPETokenizer) or tok.pattern in PATTERNS.values()
    tasks = _Tasks(corpus, encoding_errors, seed, val_fraction, chunk_chars, cut=cuttable)

    with atomic_dir(out, marker=META, what="prepared data directory") as tmp:
        tok.save(tmp / DATA_TOKENIZER_DIR)
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress)
        try:
            counts = _write_tokens(tmp, tasks, workers, tok.eot_id, dtype, bar)
        finally:
            bar.close()
        n_docs = counts["train"][1] + counts["val"][1]
        if n_docs == 0 or counts["train"][0] + counts["val"][0] == n_docs:
            raise ScratchLLMError(f"the corpus ({' '.join(corpus)}) is empty: it has no text to tokenize")
        method = "documents"
        if val_fraction > 0 and (counts["val"][0] == 0 or counts["train"][0] == 0):
            method = "tail"
            _tail_split(tmp, counts, val_fraction, dtype)
        split = {"method": method, "val_fraction": val_fraction, "seed": seed}
        meta = _meta(tok, dtype, counts, split, tasks.sources, extra_meta)
        atomic_write_json(tmp / META, meta)
    seconds = time.perf_counter() - t0
    n_bytes = sum(s["bytes"] for s in meta["sources"])
    if progress:
        print(
            f"prepared {n_docs} documents, {n_bytes / 1e6:.2f} MB -> {meta['train_tokens']:,} train + "
            f"{meta['val_tokens']:,} val tokens ({dtype.name}) in {seconds:.1f} s "
            f"({n_bytes / 1e6 / max(seconds, 1e-9):.2f} MB/s, {workers} worker{'s' if workers > 1 else ''}) "
            f"-> {out}"
        )
    return meta


def _worker_count(workers: int, total_bytes: int | None, chunk_chars: int) -> int:
    """The worker processes to start: `workers` (0: one per core, as many as the text keeps busy)."""
    cores = os.cpu_count() or 1
    if total_bytes is None:  # a source of unknown size (hf:): one worker per core
        return min(workers or cores, cores)
    if not workers:
        workers = max(1, min(cores, total_bytes // BYTES_PER_WORKER))
    # never more processes than cores or pieces of work: the rest would only start and sit idle
    return max(1, min(workers, cores, -(-total_bytes // chunk_chars)))


class _Tasks:
    """The corpus as work for the workers: (keys, texts) of about `chunk_chars` characters each, a key
    being (split, last piece of its document, bytes). Reading it also hashes every source."""

    def __init__(
        self,
        corpus: Sequence[str],
        encoding_errors: str,
        seed: int,
        val_fraction: float,
        chunk_chars: int,
        cut: bool = True,
    ):
        """`cut` False: documents stay whole (for a pattern that may join pieces across newlines)."""
        self.corpus, self.encoding_errors = corpus, encoding_errors
        self.seed, self.val_fraction = seed, val_fraction
        self.chunk_chars, self.cut = chunk_chars, cut
        self.hashes: dict[str, Any] = {}

    def __iter__(self) -> Iterator[tuple[list[Any], list[str]]]:
        keys: list[Any] = []
        texts: list[str] = []
        size = 0
        for index, doc in enumerate(iter_documents(self.corpus, self.encoding_errors)):
            self._hash(doc.source, doc.text)
            split = "val" if _in_val(index, self.seed, self.val_fraction) else "train"
            pieces = split_document(doc.text, self.chunk_chars) if self.cut else [doc.text]
            for j, piece in enumerate(pieces):
                keys.append((split, j == len(pieces) - 1, len(piece.encode("utf-8"))))
                texts.append(piece)
                size += len(piece)
                if size >= self.chunk_chars:
                    yield keys, texts
                    keys, texts, size = [], [], 0
        if texts:
            yield keys, texts

    def _hash(self, source: str, text: str) -> None:
        src = BUILTIN if source.startswith(f"{BUILTIN}:") else source.split("#", 1)[0]
        entry = self.hashes.setdefault(src, {"sha256": hashlib.sha256(), "bytes": 0, "documents": 0})
        data = text.encode("utf-8")
        entry["sha256"].update(data)
        entry["bytes"] += len(data)
        entry["documents"] += 1

    @property
    def sources(self) -> list[dict[str, Any]]:
        """Each source's bytes, documents and SHA-256, once the corpus has been read."""
        return [
            {"source": k, "bytes": v["bytes"], "documents": v["documents"], "sha256": v["sha256"].hexdigest()}
            for k, v in self.hashes.items()
        ]


def _write_tokens(
    directory: Path, tasks: _Tasks, workers: int, eot_id: int, dtype: np.dtype, bar: Any
) -> dict[str, list[int]]:
    """Encode the tasks (in `workers` processes) into train.bin and val.bin, each document followed
    by `<|endoftext|>`; returns {split: [tokens, documents]}."""
    counts = {"train": [0, 0], "val": [0, 0]}
    eot = np.asarray([eot_id], dtype=dtype).tobytes()
    tokenizer_dir = str(directory / DATA_TOKENIZER_DIR)
    files = {s: open(directory / f"{s}.bin", "wb") for s in ("train", "val")}  # noqa: SIM115
    pool = None
    try:
        if workers == 1:
            _init_worker(tokenizer_dir, dtype.str)
            results: Iterator = map(_encode_task, tasks)
        else:
            pool = mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer_dir, dtype.str))
            results = pool.imap(_encode_task, tasks)
        for keys, arrays in results:
            for (split, last, nbytes), ids in zip(keys, arrays):
                files[split].write(ids.tobytes())
                counts[split][0] += len(ids)
                if last:
                    files[split].write(eot)
                    counts[split][0] += 1
                    counts[split][1] += 1
                bar.update(nbytes)
    finally:
        for f in files.values():
            f.close()
        if pool is not None:
            pool.terminate()
    return counts


def _meta(
    tok: Tokenizer,
    dtype: np.dtype,
    counts: dict[str, list[int]],
    split: dict[str, Any],
    sources: list[dict[str, Any]],
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """What meta.json holds."""
    return {
        "format": FORMAT,
        "version": 1,
        "dtype": dtype.name,
        "train_tokens": counts["train"][0],
        "val_tokens": counts["val"][0],
        "documents": counts["train"][1] + counts["val"][1],
        "train_documents": counts["train"][1],
        "val_documents": counts["val"][1],
        "tokenizer": {
            "name": tok.name,
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "fingerprint": tok.fingerprint(),
        },
        "split": split,
        "sources": sources,
        "scratchllm_version": __version__,
        **(extra or {}),
    }


def _tail_split(directory: Path, counts: dict[str, list[int]], val_fraction: float, dtype: np.dtype) -> None:
    """Too few documents for a document split: the last `val_fraction` of the tokens become val.

    Only the tail is copied (through a memory map) and train.bin is truncated, so memory stays flat
    even for one huge file."""
    train, val = directory / "train.bin", directory / "val.bin"
    if counts["train"][0] == 0:  # every document was drawn for val: start from all of them as train
        os.replace(val, train)
        val.touch()
        counts["train"], counts["val"] = counts["val"], [0, 0]
    n = counts["train"][0]
    n_val = max(1, int(n * val_fraction))
    tokens = np.memmap(train, dtype=dtype, mode="r")
    with open(val, "wb") as f:
        f.write(tokens[n - n_val :].tobytes())
    del tokens
    os.truncate(train, (n - n_val) * dtype.itemsize)
    counts["train"][0] = n - n_val
    counts["val"] = [n_val, 0]
