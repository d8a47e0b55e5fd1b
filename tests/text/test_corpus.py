from __future__ import annotations

import builtins
from pydoc_data.topics import topics

import pytest

from scratchllm.errors import ScratchLLMError
from scratchllm.text.corpus import builtin_documents, iter_documents, load_documents, source_fingerprints


def test_builtin_corpus_is_python_docs():
    docs = builtin_documents()
    assert len(docs) > 50
    assert sum(len(d.text) for d in docs) > 300_000
    assert all(d.source.startswith("builtin:") for d in docs)
    # each topic is cut into its sections (`builtin:TOPIC#N`), topics in sorted order, sections in order

    names = [d.source.split(":", 1)[1].split("#")[0] for d in docs]
    assert list(dict.fromkeys(names)) == sorted(topics)
    assert len(docs) > 2 * len(topics)
    sections = [d.text for d in docs if d.source.startswith("builtin:typesseq#")]
    assert [d.source for d in docs if d.source.startswith("builtin:typesseq#")] == [
        f"builtin:typesseq#{i}" for i in range(len(sections))
    ]
    assert "\n".join(sections) == topics["typesseq"]  # nothing lost but the newlines the cuts replace
    assert sections[1].startswith("Common Sequence Operations\n=====")


def test_files_directories_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta", encoding="utf-8")
    (tmp_path / "sub" / "c.py").write_text("gamma", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.txt").write_text("delta", encoding="utf-8")

    (tmp_path / ".DS_Store").write_bytes(b"\0")  # hidden ones are left out without a word
    with pytest.warns(UserWarning, match=r"read 2 text files .*, skipped 1 other \(1 \.py\); a glob") as seen:
        assert [d.text for d in iter_documents([str(tmp_path)])] == ["alpha", "beta"]
        assert [d.text for d in iter_documents([str(tmp_path)])] == ["alpha", "beta"]  # said once
    assert len(seen) == 1
    assert [d.text for d in iter_documents([str(tmp_path / "sub" / "c.py")])] == ["gamma"]
    assert [d.text for d in iter_documents([f"{tmp_path}/**/*.py"])] == ["gamma"]
    both = [d.text for d in iter_documents([str(tmp_path / "a.txt"), "builtin"])]
    assert both[0] == "alpha" and len(both) > 50


def test_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(ScratchLLMError, match="not found"):
        list(iter_documents([str(tmp_path / "nope.txt")]))
    with pytest.raises(ScratchLLMError, match="matches no files"):
        list(iter_documents([f"{tmp_path}/*.zzz"]))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ScratchLLMError, match="no text files"):
        list(iter_documents([str(tmp_path / "empty_dir")]))
    with pytest.raises(ScratchLLMError, match="no corpus"):
        list(iter_documents([]))


def test_paths_are_checked_before_reading(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("x", encoding="utf-8")
    it = iter_documents([str(good), str(tmp_path / "missing.txt")])
    with pytest.raises(ScratchLLMError, match=r"missing\.txt"):
        next(it)


def test_non_utf8_names_file_and_offset(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 ok".encode("latin-1"))
    with pytest.raises(ScratchLLMError, match=r"latin1\.txt: byte 3 \(0xe9\).*--encoding-errors replace"):
        load_documents([str(bad)])
    docs = load_documents([str(bad)], encoding_errors="replace")
    assert docs[0].text == "caf\ufffd ok"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-8-sig"])
def test_a_byte_order_mark_says_the_encoding(tmp_path, encoding):
    """UTF-16 from Windows tools was an error whose advice (--encoding-errors replace) trained on
    NUL-interleaved text; a UTF-8 mark became a character of the text."""
    path = tmp_path / "marked.txt"
    text = "Hello, wörld: ünïcode ✓\nline two\n"
    data = text.encode(encoding)
    if encoding == "utf-16-be":  # Python writes no mark for an explicit byte order
        data = b"\xfe\xff" + data
    path.write_bytes(data)
    assert [d.text for d in load_documents([str(path)])] == [text]


def test_a_source_given_twice_is_read_once(tmp_path):
    (tmp_path / "notes").mkdir()
    for name in ("a", "b"):
        (tmp_path / "notes" / f"{name}.txt").write_text(name, encoding="utf-8")
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "notes" / "a.txt")
    sources = [str(tmp_path / "notes"), f"{tmp_path}/notes/*.txt", str(link), "builtin", "builtin"]
    with pytest.warns(UserWarning, match="4 corpus sources given more than once"):
        docs = load_documents(sources)
    assert [d.text for d in docs[:2]] == ["a", "b"] and len(docs) == 2 + len(builtin_documents())


def test_a_broken_symbolic_link_says_so(tmp_path):
    (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(ScratchLLMError, match=r"gone.txt' is a broken symbolic link \(to .*nowhere.txt\)"):
        load_documents([str(tmp_path / "gone.txt")])


def test_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ScratchLLMError, match="empty"):
        load_documents([str(tmp_path / "blank.txt")])


def test_hf_source_without_datasets_package(monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ScratchLLMError, match=r"scratchllm\[hf\]"):
        list(iter_documents(["hf:roneneldan/TinyStories"]))


def test_source_fingerprints_group_builtin():
    docs = builtin_documents()
    fps = source_fingerprints(docs)
    assert len(fps) == 1 and fps[0]["source"] == "builtin"
    assert fps[0]["bytes"] == sum(len(d.text.encode()) for d in docs)
