"""`scratchllm tokenizer train|encode|decode|info` and `prepare` through the command table: the flags
(and a `--config` file) become each command's settings, and the commands run end to end, offline."""

from __future__ import annotations

import pytest

from scratchllm.cli import main
from scratchllm.text import commands
from scratchllm.text.bpe import BPETokenizer
from scratchllm.text.commands import (
    PrepareSettings,
    TokenizerDecodeSettings,
    TokenizerEncodeSettings,
    TokenizerInfoSettings,
    TokenizerTrainSettings,
)
from scratchllm.text.corpus import CorpusSettings
from scratchllm.text.registry import load_tokenizer
from scratchllm.text.sampling import load_prepared
from tests.text.test_bpe import MIXED_CORPUS

pytestmark = pytest.mark.usefixtures("no_gpt2_download")


def settings_of(monkeypatch, function: str, argv: list[str]):
    """The settings object the command line hands to `commands.<function>` for `argv`."""
    seen = []
    monkeypatch.setattr(commands, function, seen.append)
    assert main(argv) == 0
    (settings,) = seen
    return settings


def test_tokenizer_train_flags_and_defaults(monkeypatch, tmp_path):
    assert settings_of(monkeypatch, "tokenizer_train_command", ["tokenizer", "train", "--out", "t"]) == (
        TokenizerTrainSettings(text=CorpusSettings(["builtin"], "strict"), out="t")
    )
    argv = ["tokenizer", "train", "--corpus", "a.txt", "docs/", "--encoding-errors", "replace", "--out", "t"]
    argv += ["--vocab-size", "300", "--special-tokens", "<|a|>", "<|b|>", "--pattern", "gpt4", "--quiet"]
    assert settings_of(monkeypatch, "tokenizer_train_command", argv) == TokenizerTrainSettings(
        text=CorpusSettings(["a.txt", "docs/"], "replace"),
        vocab_size=300,
        out="t",
        special_tokens=["<|a|>", "<|b|>"],
        pattern="gpt4",
        quiet=True,
    )
    assert (
        settings_of(monkeypatch, "tokenizer_train_command", ["tokenizer", "train", "--out", "none"]).out
        == "none"
    )
    config = tmp_path / "tok.toml"
    config.write_text('[data]\ncorpus = ["notes/"]\n[tokenizer]\nvocab_size = 500\nquiet = true\n')
    argv = ["tokenizer", "train", "--config", str(config), "--out", "t", "--vocab-size", "600"]
    settings = settings_of(monkeypatch, "tokenizer_train_command", argv)
    assert (settings.text.corpus, settings.vocab_size, settings.quiet) == (["notes/"], 600, True)


def test_encode_decode_info_and_prepare_flags(monkeypatch):
    argv = ["tokenizer", "encode", "--tokenizer", "t", "--text", "none", "--allow-special"]
    assert settings_of(monkeypatch, "tokenizer_encode_command", argv) == TokenizerEncodeSettings(
        tokenizer="t", text="none", allow_special=True
    )  # `none` is a text like any other
    argv = ["tokenizer", "encode", "--file", "f.txt", "--encoding-errors", "replace"]
    assert settings_of(monkeypatch, "tokenizer_encode_command", argv) == TokenizerEncodeSettings(
        file="f.txt", reading=CorpusSettings(encoding_errors="replace")
    )
    argv = ["tokenizer", "decode", "--tokenizer", "t", "1", "2,3"]
    assert settings_of(monkeypatch, "tokenizer_decode_command", argv) == TokenizerDecodeSettings(
        "t", ["1", "2,3"]
    )
    argv = ["tokenizer", "info"]
    assert settings_of(monkeypatch, "tokenizer_info_command", argv) == TokenizerInfoSettings("gpt2")
    argv = ["prepare", "--out", "d", "--corpus", "c/", "--tokenizer", "t", "--val-fraction", "0.2"]
    argv += ["--workers", "2", "--seed", "7", "--quiet", "--encoding-errors", "replace"]
    assert settings_of(monkeypatch, "prepare_command", argv) == PrepareSettings(
        text=CorpusSettings(["c/"], "replace"),
        tokenizer="t",
        out="d",
        val_fraction=0.2,
        workers=2,
        seed=7,
        quiet=True,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["tokenizer", "encode"],  # --text or --file is required
        ["tokenizer", "encode", "--text", "a", "--file", "b"],  # and only one of them
        ["tokenizer", "decode"],  # ids are required
        ["tokenizer", "train"],  # --out is required
        ["prepare", "--out", "d", "--encoding-errors", "ignore"],  # not a choice
        ["prepare"],
    ],
)
def test_missing_or_conflicting_flags_exit_2(argv, capsys):
    try:
        code = main(argv)  # a required setting missing after the --config file's values: one line, 2
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("scratchllm") and err.count("\n") == 1


def test_encoding_errors_from_a_file_are_checked(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('[data]\nencoding_errors = "ignore"\n')
    assert main(["prepare", "--config", str(config), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "encoding_errors must be strict or replace, got 'ignore'" in err and err.count("\n") == 1


def test_train_encode_decode_info_prepare_end_to_end(tmp_path, capsys):
    corpus = tmp_path / "mixed.txt"
    corpus.write_text("\n".join(MIXED_CORPUS * 2), encoding="utf-8")
    tok_dir = tmp_path / "tok"
    argv = [
        "tokenizer",
        "train",
        "--corpus",
        str(corpus),
        "--vocab-size",
        "400",
        "--out",
        str(tok_dir),
        "--quiet",
    ]
    assert main(argv) == 0
    assert "trained 400 tokens (1 special)" in capsys.readouterr().out
    tok = load_tokenizer(tok_dir)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 400

    text = "naïve café 日本語 <|endoftext|>"
    assert main(["tokenizer", "encode", "--tokenizer", str(tok_dir), "--text", text, "--allow-special"]) == 0
    ids = capsys.readouterr().out.split()
    assert ids[-1] == "399"
    assert main(["tokenizer", "decode", "--tokenizer", str(tok_dir), ",".join(ids)]) == 0
    assert capsys.readouterr().out == text + "\n"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    encode_file = ["tokenizer", "encode", "--tokenizer", str(tok_dir), "--file", str(latin1)]
    assert main(encode_file) == 2
    assert "pass --encoding-errors replace" in capsys.readouterr().err
    assert main([*encode_file, "--encoding-errors", "replace"]) == 0
    assert tok.decode([int(i) for i in capsys.readouterr().out.split()]) == "caf\ufffd"
    assert main(["tokenizer", "info", "--tokenizer", str(tok_dir)]) == 0
    assert "vocab size:     400" in capsys.readouterr().out
    assert main(["tokenizer", "decode", "--tokenizer", str(tok_dir), "400"]) == 2
    assert "out of range" in capsys.readouterr().err

    data = tmp_path / "data"
    argv = ["prepare", "--corpus", str(corpus), "--tokenizer", str(tok_dir), "--out", str(data)]
    assert main(argv) == 0
    assert "prepared 1 documents" in capsys.readouterr().out
    prepared = load_prepared(data, tok)
    assert len(prepared.train) > 0 and len(prepared.val) > 0 and prepared.val[-1] == tok.eot_id
    assert main([*argv, "--workers=-1"]) == 2
    assert "--workers must be >= 0" in capsys.readouterr().err
