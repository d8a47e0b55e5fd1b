from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from scratchllm.errors import ScratchLLMError
from scratchllm.text.sampling import GPTDatasetV1, TokenWindows, create_dataloader, open_tokens
from scratchllm.text.simple import SimpleTokenizer
from tests.conftest import shared_file


def _windows(ds):
    return [(x.tolist(), y.tolist()) for x, y in ds]


def test_stride_equal_to_max_length_tiles():
    ds = GPTDatasetV1(list(range(10)), max_length=4, stride=4)
    # the book's range(0, len - max_length, stride) -> starts 0 and 4
    assert _windows(ds) == [([0, 1, 2, 3], [1, 2, 3, 4]), ([4, 5, 6, 7], [5, 6, 7, 8])]


def test_stride_below_max_length_overlaps():
    ds = GPTDatasetV1(list(range(8)), max_length=4, stride=2)
    assert _windows(ds) == [([0, 1, 2, 3], [1, 2, 3, 4]), ([2, 3, 4, 5], [3, 4, 5, 6])]
    ds1 = GPTDatasetV1(list(range(6)), max_length=3, stride=1)
    assert [x for x, _ in _windows(ds1)] == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]


def test_text_shorter_than_a_window_is_a_clear_error():
    with pytest.raises(ScratchLLMError, match="fewer than one window of 8"):
        GPTDatasetV1(list(range(8)), max_length=8, stride=1)


def test_dataset_encodes_text_with_the_tokenizer():
    tok = SimpleTokenizer.from_corpus("a b c d e f g h")
    ds = GPTDatasetV1("a b c d e f g h", tok, max_length=3, stride=3)
    assert _windows(ds)[0] == (tok.encode("a b c"), tok.encode("b c d"))


def test_dataloader_batches_shuffle_and_drop_last():
    ids = list(range(100))
    loader = create_dataloader(ids, batch_size=4, max_length=5, stride=5, shuffle=False, drop_last=False)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 4, 4, 4, 3]  # 19 windows
    assert batches[0][0][1].tolist() == [5, 6, 7, 8, 9]
    dropped = create_dataloader(ids, batch_size=4, max_length=5, stride=5, shuffle=False, drop_last=True)
    assert len(list(dropped)) == 4
    a = [x.tolist() for x, _ in create_dataloader(ids, batch_size=4, max_length=5, stride=5, seed=3)]
    b = [x.tolist() for x, _ in create_dataloader(ids, batch_size=4, max_length=5, stride=5, seed=3)]
    assert a == b and a != [x.tolist() for x, _ in batches[:4]]


def test_book_first_batch_with_gpt2(monkeypatch):
    """The book's ch. 2 example: the-verdict, batch 1, max_length 4, stride 1."""
    monkeypatch.setenv("SCRATCHLLM_GPT2_TOKENIZER", str(shared_file("gpt2.tiktoken")))
    text = shared_file("the-verdict.txt").read_text(encoding="utf-8")
    loader = create_dataloader(text, batch_size=1, max_length=4, stride=1, shuffle=False)
    it = iter(loader)
    x, y = next(it)
    assert x.tolist() == [[40, 367, 2885, 1464]] and y.tolist() == [[367, 2885, 1464, 1807]]
    x2, _ = next(it)
    assert x2.tolist() == [[367, 2885, 1464, 1807]]


def test_token_windows_random_is_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    w = TokenWindows(tokens, context_length=16, batch_size=4, seed=7)
    x1, y1 = w.batch(5)
    x2, y2 = TokenWindows(tokens, 16, 4, seed=7).batch(5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1]) and torch.equal(y1, x1 + 1)
    assert not torch.equal(x1, w.batch(6)[0])
    assert not torch.equal(x1, TokenWindows(tokens, 16, 4, seed=8).batch(5)[0])
    assert x1.dtype == torch.int64


def test_token_windows_ranks_split_the_global_batch():
    tokens = np.arange(5000, dtype=np.uint32)
    for mode in ("random", "sequential"):
        whole = TokenWindows(tokens, 8, batch_size=6, seed=1, mode=mode).batch(3)[0]
        parts = [
            TokenWindows(tokens, 8, batch_size=3, seed=1, mode=mode, rank=r, world_size=2).batch(3)[0]
            for r in (0, 1)
        ]
        assert torch.equal(torch.cat(parts), whole)


def test_token_windows_sequential_tiles_and_wraps():
    tokens = np.arange(41, dtype=np.uint16)  # 5 windows of 8 (+1 for the last target)
    w = TokenWindows(tokens, 8, batch_size=2, mode="sequential")
    assert w.batch(0)[0][:, 0].tolist() == [0, 8]
    assert w.batch(1)[0][:, 0].tolist() == [16, 24]
    assert w.batch(2)[0][:, 0].tolist() == [32, 0]
    with pytest.raises(ScratchLLMError, match="fewer than one window"):
        TokenWindows(tokens[:8], 8, 1)


def _private_memory_bytes() -> int:
    """Anonymous resident memory: what loading a file into arrays would grow. (File-backed pages of a
    memory map are reclaimable page cache; the kernel may map them in large folios, so total RSS is
    not the measure.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc to read memory use")
def test_windows_from_a_memmap_do_not_load_the_file(tmp_path):
    n = 150_000_000  # 300 MB of uint16 tokens, written in pieces to keep this test's own memory flat
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        block = (np.arange(10_000_000) % 50_000).astype(np.uint16)
        for _ in range(n // len(block)):
            f.write(block.tobytes())
    del block
    before = _private_memory_bytes()
    tokens = open_tokens(path, np.dtype(np.uint16))
    assert len(tokens) == n
    w = TokenWindows(tokens, context_length=256, batch_size=8, seed=0)
    for step in range(50):
        w.batch(step)
    grown = _private_memory_bytes() - before
    assert grown < 40 * 2**20, (
        f"private memory grew by {grown / 2**20:.0f} MiB reading windows from a 300 MB file"
    )
