"""`scratchllm prepare`: corpus -> memory-mapped token files, the same for any number of worker processes."""

from __future__ import annotations

import builtins
import json
import random

import numpy as np
import pytest

from scratchllm.cli import main
from scratchllm.errors import ScratchLLMError
from scratchllm.text import prepare as prep
from scratchllm.text.bpe import train_bpe
from scratchllm.text.corpus import load_documents
from scratchllm.text.sampling import load_prepared

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "sang", "to", "moon", "café", "naïve", "über"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 documents, one of them long enough to be cut into pieces for the workers."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(12):
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            for _ in range(400 if i == 5 else 20)
        ]
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_bpe([d.text for d in load_documents([str(corpus)])], 300, progress=False)


def _tokens(directory, split: str, dtype: str) -> list[int]:
    return np.fromfile(directory / f"{split}.bin", dtype=dtype).tolist()


def test_one_and_two_workers_write_the_same_tokens_as_encoding_each_document(corpus, tokenizer, tmp_path):
    metas = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        metas[workers] = prep.prepare(
            [str(corpus)],
            tokenizer,
            out,
            val_fraction=0.25,
            workers=workers,
            progress=False,
            chunk_chars=2000,
        )
    a, b = tmp_path / "w1", tmp_path / "w2"
    assert metas[1] == metas[2] == json.loads((a / prep.META).read_text())
    meta = metas[1]
    assert meta["dtype"] == "uint16" and meta["documents"] == 12 and meta["split"]["method"] == "documents"
    assert meta["train_documents"] > 0 and meta["val_documents"] > 0
    for split in ("train", "val"):
        assert (a / f"{split}.bin").read_bytes() == (b / f"{split}.bin").read_bytes()
    # each split is its documents encoded whole, each followed by <|endoftext|>
    docs = load_documents([str(corpus)])
    assert len(docs[5].text) > 4 * 2000  # the long one was cut into several pieces
    expected = {"train": [], "val": []}
    for index, doc in enumerate(docs):
        split = "val" if prep._in_val(index, 1337, 0.25) else "train"
        expected[split] += tokenizer.encode(doc.text) + [tokenizer.eot_id]
    for split in ("train", "val"):
        assert _tokens(a, split, "uint16") == expected[split]
        assert meta[f"{split}_tokens"] == len(expected[split])
    # one source entry per file: its size and content hash, to tell later whether the corpus changed
    assert [(s["source"], s["bytes"]) for s in meta["sources"]] == [
        (str(corpus / f"doc{i:02d}.txt"), len(d.text.encode())) for i, d in enumerate(docs)
    ]


def test_split_document_cuts_only_where_pre_tokenization_breaks():
    text = "alpha beta\ngamma delta\n\n  indented\nend"
    pieces = prep.split_document(text, max_chars=12)
    assert "".join(pieces) == text and len(pieces) > 1
    assert all(p.endswith("\n") and not p.endswith(" \n") for p in pieces[:-1])
    assert prep.split_document("no newline at all", max_chars=4) == ["no newline at all"]


def test_a_pattern_of_ones_own_keeps_documents_whole(corpus, tmp_path):
    """`\\s*\\S+` joins a newline to the word after it, so cutting at a newline would change the ids:
    with such a pattern, documents are encoded whole (and still on several workers)."""
    docs = load_documents([str(corpus)])
    tok = train_bpe([d.text for d in docs], 300, pattern=r"\s*\S+|\s+", progress=False)
    out = tmp_path / "p"
    prep.prepare([str(corpus)], tok, out, val_fraction=0.0, workers=2, progress=False, chunk_chars=2000)
    expected = [i for d in docs for i in [*tok.encode(d.text), tok.eot_id]]
    assert _tokens(out, "train", "uint16") + _tokens(out, "val", "uint16") == expected


def test_workers_auto_starts_no_process_for_a_small_corpus(corpus, tokenizer, tmp_path, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(prep.mp, "get_context", lambda *a: started.append(a) or pytest.fail("spawned a pool"))
    prep.prepare([str(corpus)], tokenizer, tmp_path / "auto", workers=0)
    assert started == [] and "1 worker)" in capsys.readouterr().out
    assert prep.BYTES_PER_WORKER >= 1 << 20
    # asking for more workers than pieces of work (or cores) starts no idle processes
    prep.prepare([str(corpus)], tokenizer, tmp_path / "many", workers=999)
    assert started == [] and "1 worker)" in capsys.readouterr().out


def test_a_source_of_unknown_size_reaches_its_own_error(tokenizer, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):  # offline either way: the datasets package is "missing"
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    for workers in (0, 4):  # hf: sources have no known size (was a TypeError in the worker count)
        with pytest.raises(ScratchLLMError, match=r"scratchllm\[hf\]"):
            prep.prepare(["hf:x/y"], tokenizer, tmp_path / f"hf{workers}", workers=workers, progress=False)


def test_a_prepared_directory_with_a_bad_token_dtype_is_refused(corpus, tokenizer, tmp_path):
    out = tmp_path / "p"
    prep.prepare([str(corpus)], tokenizer, out, workers=1, progress=False)
    meta = json.loads((out / prep.META).read_text())
    (out / prep.META).write_text(json.dumps({**meta, "dtype": "float99"}))
    with pytest.raises(ScratchLLMError, match="token dtype 'float99' is not uint16 or uint32"):
        load_prepared(out)
    damaged = {  # file content -> the error
        json.dumps(
            {"format": meta["format"]}
        ).encode(): "damaged .no tokenizer, dtype, train_tokens, val_tokens.",
        json.dumps({**meta, "tokenizer": "gpt2"}).encode(): "damaged .no tokenizer fingerprint.",
        b"\xff{}": "unreadable .'utf-8' codec",
        b"[1, 2]": "not a scratchllm token file description",
    }
    for content, message in damaged.items():
        (out / prep.META).write_bytes(content)
        with pytest.raises(ScratchLLMError, match=message):
            load_prepared(out)


def test_one_file_takes_its_tail_as_validation(tokenizer, tmp_path):
    text = "\n".join(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(8)) for i in range(300))
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    meta = prep.prepare(
        [str(tmp_path / "one.txt")], tokenizer, tmp_path / "out", val_fraction=0.1, workers=1, progress=False
    )
    ids = tokenizer.encode(text) + [tokenizer.eot_id]
    n_val = int(len(ids) * 0.1)
    assert meta["split"]["method"] == "tail" and meta["val_tokens"] == n_val
    assert _tokens(tmp_path / "out", "train", "uint16") == ids[:-n_val]
    assert _tokens(tmp_path / "out", "val", "uint16") == ids[-n_val:]


def test_cli_prepare_replaces_only_its_own_output_and_rejects_bad_settings(corpus, tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    argv = [
        "tokenizer",
        "train",
        "--corpus",
        str(corpus),
        "--vocab-size",
        "280",
        "--out",
        str(tok_dir),
        "--quiet",
    ]
    assert main(argv) == 0
    out = tmp_path / "data"
    prepare = [
        "prepare",
        "--corpus",
        str(corpus),
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(out),
        "--workers",
        "1",
    ]
    assert main(prepare) == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer", "train.bin", "val.bin"]
    assert "prepared 12 documents" in capsys.readouterr().out
    (out / "train.bin").write_bytes(b"")
    assert main(prepare) == 0  # an earlier prepared directory is replaced as a whole
    assert (out / "train.bin").stat().st_size > 0
    capsys.readouterr()
    # a directory of something else (here: the corpus itself) is never replaced
    for bad, message in (
        (["--out", str(corpus)], "is not a prepared data directory (it has no meta.json)"),
        (["--workers=-1"], "--workers must be >= 0"),
        (["--val-fraction=1"], "--val-fraction"),
    ):
        assert main([*prepare, *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert len(list(corpus.iterdir())) == 12 and (out / "meta.json").exists()
