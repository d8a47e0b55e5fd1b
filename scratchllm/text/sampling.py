"""Data sampling: turn token ids into (input, target) pairs for next-token prediction.

Two paths share one idea (a target is its input shifted by one token):
- the book's `GPTDatasetV1` + `create_dataloader`: a sliding window over an in-memory token list, with
  `max_length` and `stride`, fed through a PyTorch DataLoader;
- `TokenWindows`: windows drawn straight from a memory-mapped token file (see text/prepare.py), so a
  corpus larger than RAM trains with flat memory. Batch `step` is a pure function of (seed, step), which
  makes resuming exact and lets every distributed rank take its own slice of the same global batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ScratchLLMError
from ..fileio import DATA_TOKENIZER_DIR
from .prepare import FORMAT, META
from .registry import load_tokenizer
from .tokenizer import Tokenizer


def _too_short(n_tokens: int, max_length: int, what: str = "the text") -> ScratchLLMError:
    return ScratchLLMError(
        f"{what} has {n_tokens} tokens, fewer than one window of {max_length} + 1; "
        "use a shorter context length or more text"
    )


class GPTDatasetV1(Dataset):
    """The book's sliding-window dataset.

    Window i starts at token i * stride: input = ids[start : start + max_length], target = the same span
    shifted right by one. `stride < max_length` overlaps windows, `stride == max_length` tiles them.
    Windows are cut on the fly from one tensor rather than stored, so memory stays one copy of the ids.
    """

    def __init__(
        self,
        txt: str | Sequence[int],
        tokenizer: Tokenizer | str | None = None,
        max_length: int = 256,
        stride: int = 128,
    ):
        if max_length < 1 or stride < 1:
            raise ScratchLLMError(f"max_length and stride must be >= 1, got {max_length} and {stride}")
        if isinstance(txt, str):
            if tokenizer is None:
                raise ScratchLLMError("GPTDatasetV1 needs a tokenizer to encode text")
            tok = load_tokenizer(tokenizer)
            txt = tok.encode(txt, allowed_special={"<|endoftext|>"} & set(tok.special_tokens))
        self.token_ids = torch.as_tensor(
            list(txt) if not isinstance(txt, torch.Tensor) else txt, dtype=torch.long
        )
        self.max_length = max_length
        self.stride = stride
        # the book: for i in range(0, len(token_ids) - max_length, stride)
        self.starts = range(0, len(self.token_ids) - max_length, stride)
        if len(self.starts) == 0:
            raise _too_short(len(self.token_ids), max_length)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[idx]
        chunk = self.token_ids[start : start + self.max_length + 1]
        return chunk[:-1], chunk[1:]


def create_dataloader(
    txt: str | Sequence[int],
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 0,
    tokenizer: Tokenizer | str = "gpt2",
    seed: int | None = None,
) -> DataLoader:
    """The book's `create_dataloader_v1`: a DataLoader of (input, target) batches over `GPTDatasetV1`.

    `seed` fixes the shuffling order without touching the global RNG.
    """
    dataset = GPTDatasetV1(txt, tokenizer, max_length=max_length, stride=stride)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
    )


create_dataloader_v1 = create_dataloader


class TokenWindows:
    """Batches of (input, target) windows from a flat token array (in memory or np.memmap).

    - `random`: each row starts at a uniformly random offset (nanoGPT's `get_batch`);
    - `sequential`: consecutive non-overlapping windows in order, wrapping around at the end
      (evaluation, and epoch-style training).
    Windows are numbered over the whole run (row j), and row j's window depends on (seed, j) alone, so a
    batch is known from its step, and batch size x accumulation x processes can be rearranged without
    changing what a step trains on. Only the rows' windows are read, so a memory-mapped file is never
    loaded as a whole.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        context_length: int,
        batch_size: int,
        seed: int = 0,
        mode: str = "random",
        rank: int = 0,
        world_size: int = 1,
    ):
        if mode not in ("random", "sequential"):
            raise ValueError(f"mode must be random or sequential, got {mode!r}")
        if len(tokens) < context_length + 1:
            raise _too_short(len(tokens), context_length, "the token data")
        self.tokens = tokens
        self.context_length = context_length
        self.batch_size = batch_size
        self.seed = seed
        self.mode = mode
        self.rank = rank
        self.world_size = world_size
        self.n_windows = (len(tokens) - 1) // context_length  # non-overlapping windows, for sequential mode

    def rows(self, step: int) -> np.ndarray:
        """Global row numbers of this rank's part of batch `step`: row j is the j-th window of the run, so
        one batch of 8, two of 4 (gradient accumulation) or 4 on each of 2 processes read the same windows."""
        start = (step * self.world_size + self.rank) * self.batch_size
        return np.arange(start, start + self.batch_size, dtype=np.uint64)

    def offsets(self, step: int) -> np.ndarray:
        """Start offsets of this rank's windows of batch `step`."""
        rows = self.rows(step)
        if self.mode == "random":
            # a counter-based hash of (seed, row): any row's window is known without replaying the ones before
            starts = _uniform_hash(rows, self.seed) % np.uint64(len(self.tokens) - self.context_length)
        else:
            starts = (rows % np.uint64(self.n_windows)) * np.uint64(self.context_length)
        return starts.astype(np.int64)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets (batch, context_length) of this process at `step`."""
        rows = np.stack(
            [np.asarray(self.tokens[s : s + self.context_length + 1]) for s in self.offsets(step)]
        )
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def steps_per_epoch(self) -> int:
        """Steps that see about every window once (at least 1)."""
        return max(1, self.n_windows // (self.batch_size * self.world_size))


def _uniform_hash(rows: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (seed, row): well-mixed 64-bit numbers, vectorized and stateless."""
    with np.errstate(over="ignore"):
        x = rows ^ (np.uint64(seed & (2**64 - 1)) * np.uint64(0x9E3779B97F4A7C15))
        for _ in range(2):
            x = x + np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x = x ^ (x >> np.uint64(31))
    return x


# ---------------------------------------------------------------------------------------------
# prepared token files (written by text/prepare.py)


@dataclass
class PreparedData:
    """A prepared corpus: memory-mapped train/val token arrays, their sidecar and tokenizer."""

    path: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]
    tokenizer: Tokenizer


def open_tokens(path: str | os.PathLike, dtype: np.dtype) -> np.ndarray:
    """Memory-map a token file read-only (an empty file maps to an empty array)."""
    path = Path(path)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def load_prepared(path: str | os.PathLike, expected_tokenizer: Tokenizer | None = None) -> PreparedData:
    """Open a directory written by `scratchllm prepare`; check it against `expected_tokenizer` if given."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.exists():
        raise ScratchLLMError(
            f"{path} is not a prepared data directory (no {META}); run `scratchllm prepare` first"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise ScratchLLMError(f"{meta_path}: unreadable ({e}); re-run `scratchllm prepare`") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ScratchLLMError(f"{meta_path}: not a scratchllm token file description")
    missing = [k for k in ("tokenizer", "dtype", "train_tokens", "val_tokens") if k not in meta]
    if missing or not isinstance(meta["tokenizer"], dict) or "fingerprint" not in meta["tokenizer"]:
        raise ScratchLLMError(
            f"{meta_path}: damaged (no {', '.join(missing) or 'tokenizer fingerprint'}); re-run `scratchllm "
            "prepare`"
        )
    tokenizer = load_tokenizer(path / DATA_TOKENIZER_DIR)
    if tokenizer.fingerprint() != meta["tokenizer"]["fingerprint"]:
        raise ScratchLLMError(
            f"{path}: the stored tokenizer does not match {META}; re-run `scratchllm prepare`"
        )
    if expected_tokenizer is not None and expected_tokenizer.fingerprint() != tokenizer.fingerprint():
        raise ScratchLLMError(
            f"{path} was prepared with tokenizer {meta['tokenizer']['name']!r} (fingerprint "
            f"{tokenizer.fingerprint()}), not the requested {expected_tokenizer.name!r} "
            f"({expected_tokenizer.fingerprint()}); re-run `scratchllm prepare --tokenizer ...` or drop "
            "--tokenizer"
        )
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise ScratchLLMError(
            f"{meta_path}: token dtype {meta.get('dtype')!r} is not uint16 or uint32; re-run `scratchllm "
            "prepare`"
        )
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for split in ("train", "val"):
        file = path / f"{split}.bin"
        if not file.exists():
            raise ScratchLLMError(f"{file} is missing; re-run `scratchllm prepare`")
        expected = meta[f"{split}_tokens"] * dtype.itemsize
        if file.stat().st_size != expected:
            raise ScratchLLMError(
                f"{file} has {file.stat().st_size} bytes, {META} says {expected}; the file is truncated or "
                "stale, re-run `scratchllm prepare`"
            )
        arrays[split] = open_tokens(file, dtype)
    return PreparedData(path, arrays["train"], arrays["val"], meta, tokenizer)
