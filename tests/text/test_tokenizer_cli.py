"""`scratchllm tokenizer train|encode|decode|info` through `scratchllm.cli.main`, offline."""

from __future__ import annotations

import pytest

from scratchllm.cli import main
from scratchllm.text import gpt2
from scratchllm.text.bpe import BPETokenizer
from scratchllm.text.corpus import builtin_documents
from scratchllm.text.registry import load_tokenizer
from tests.conftest import shared_file
from tests.text.test_bpe import MIXED_CORPUS

pytestmark = pytest.mark.usefixtures("no_gpt2_download")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "mixed.txt"
    path.write_text("\n".join(MIXED_CORPUS * 2), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("cli") / "tok"
    argv = [
        "tokenizer",
        "train",
        "--corpus",
        str(corpus_file),
        "--vocab-size",
        "400",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    return out


def one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scratchllm: error: "), err
    assert match in err, err
    return err


def test_train_writes_a_loadable_tokenizer(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert isinstance(tok, BPETokenizer)
    assert tok.vocab_size == 400 and tok.name == "tok"
    assert sorted(p.name for p in tok_dir.iterdir()) == [
        "encoder.json",
        "tokenizer.tiktoken",
        "tokenizer_meta.json",
        "vocab.bpe",
    ]


def test_train_on_the_builtin_corpus_offline(tmp_path, capsys):
    out = tmp_path / "builtin-tok"
    assert main(["tokenizer", "train", "--vocab-size", "300", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    # the topic count differs between Python versions (300 sections on 3.11, 353 on 3.12)
    n_docs = len(builtin_documents())
    assert "trained 300 tokens" in printed and "bytes/token" in printed and f"{n_docs} documents" in printed
    assert load_tokenizer(out).vocab_size == 300
    # training again into the same directory replaces it
    assert (
        main(["tokenizer", "train", "--vocab-size", "320", "--out", str(out), "--quiet", "--pattern", "gpt4"])
        == 0
    )
    assert load_tokenizer(out).vocab_size == 320


def test_encode_decode_round_trip(tok_dir, capsys):
    text = "naïve café 日本語 😀 <|endoftext|>"
    assert main(["tokenizer", "encode", "--tokenizer", str(tok_dir), "--text", text]) == 0
    ids = capsys.readouterr().out.split()
    assert "399" not in ids  # <|endoftext|> is plain text unless allowed
    assert main(["tokenizer", "decode", "--tokenizer", str(tok_dir), *ids]) == 0
    assert capsys.readouterr().out == text + "\n"
    assert main(["tokenizer", "decode", "--tokenizer", str(tok_dir), ",".join(ids)]) == 0
    assert capsys.readouterr().out == text + "\n"

    assert main(["tokenizer", "encode", "--tokenizer", str(tok_dir), "--text", text, "--allow-special"]) == 0
    assert capsys.readouterr().out.split()[-1] == "399"


def test_encode_a_file(tok_dir, corpus_file, capsys):
    assert main(["tokenizer", "encode", "--tokenizer", str(tok_dir), "--file", str(corpus_file)]) == 0
    ids = [int(i) for i in capsys.readouterr().out.split()]
    assert load_tokenizer(tok_dir).decode(ids) == corpus_file.read_bytes().decode("utf-8")  # CRLF kept
    latin1 = corpus_file.with_name("latin1.txt")
    latin1.write_bytes("café".encode("latin-1"))
    argv = ["tokenizer", "encode", "--tokenizer", str(tok_dir), "--file", str(latin1)]
    assert main(argv) == 2
    assert "pass --encoding-errors replace" in capsys.readouterr().err  # the advice works:
    assert main([*argv, "--encoding-errors", "replace"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.split()]
    assert load_tokenizer(tok_dir).decode(ids) == "caf\ufffd"


def test_info(tok_dir, capsys):
    assert main(["tokenizer", "info", "--tokenizer", str(tok_dir)]) == 0
    out = capsys.readouterr().out
    for expected in (
        "kind:           bpe",
        "vocab size:     400",
        "<|endoftext|> = 399",
        "pattern:        gpt2",
    ):
        assert expected in out
    assert "fingerprint:    " + load_tokenizer(tok_dir).fingerprint() in out


def test_gpt2_through_local_files(monkeypatch, capsys):
    monkeypatch.setenv(gpt2.ENV_VAR, str(shared_file("gpt2.tiktoken")))
    assert main(["tokenizer", "encode", "--text", "Hello world"]) == 0
    assert capsys.readouterr().out == "15496 995\n"
    assert main(["tokenizer", "decode", "15496,995"]) == 0
    assert capsys.readouterr().out == "Hello world\n"
    assert main(["tokenizer", "info"]) == 0
    assert "vocab size:     50,257" in capsys.readouterr().out


def test_gpt2_unavailable_is_one_line(capsys):
    one_line_error(capsys, ["tokenizer", "info"], "SCRATCHLLM_GPT2_TOKENIZER")


def test_bad_input_is_one_line_with_exit_code_2(tok_dir, tmp_path, capsys):
    tok = ["--tokenizer", str(tok_dir)]
    one_line_error(capsys, ["tokenizer", "decode", *tok, "1", "x"], "'x' is not a token id")
    one_line_error(capsys, ["tokenizer", "decode", *tok, "400"], "out of range")
    one_line_error(capsys, ["tokenizer", "decode", *tok, "-3"], "out of range")
    one_line_error(capsys, ["tokenizer", "info", "--tokenizer", str(tmp_path / "nope")], "not found")
    one_line_error(capsys, ["tokenizer", "encode", *tok, "--file", str(tmp_path / "nope.txt")], "cannot read")

    out = tmp_path / "new"
    train = ["tokenizer", "train", "--out", str(out), "--quiet"]
    one_line_error(capsys, [*train, "--vocab-size", "100"], "too small")
    one_line_error(capsys, [*train, "--pattern", "(oops"], "not a valid regex")
    one_line_error(capsys, [*train, "--corpus", str(tmp_path / "missing.txt")], "not found")
    assert not out.exists()  # nothing half-written

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    one_line_error(
        capsys, ["tokenizer", "train", "--out", str(busy), "--quiet"], "is not a tokenizer directory"
    )
    assert (busy / "notes.txt").read_text() == "mine"

    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("café".encode("latin-1"))
    one_line_error(capsys, [*train, "--corpus", str(bad_utf8)], "byte 3 (0xe9)")
    assert (
        main([*train, "--corpus", str(bad_utf8), "--encoding-errors", "replace", "--vocab-size", "260"]) == 0
    )


def test_running_out_of_pairs_is_a_one_line_warning(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("abc abc", encoding="utf-8")
    out = tmp_path / "small-tok"
    assert main(["tokenizer", "train", "--corpus", str(small), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("scratchllm: warning: BPE training stopped") and err.count("\n") == 1
    assert load_tokenizer(out).vocab_size < 300
