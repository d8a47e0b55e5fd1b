"""`scratchllm perplexity` (formerly `evaluate`) as a settings dataclass: its flags, and runs through the
command table."""

from __future__ import annotations

import json

import pytest

from scratchllm.checkpoint import save_model
from scratchllm.cli import COMMANDS, build_parser, main
from scratchllm.config import load_config, overrides_from_args
from scratchllm.errors import ScratchLLMError
from scratchllm.text.bpe import BPETokenizer
from scratchllm.text.corpus import CorpusSettings
from scratchllm.train.evaluate import PerplexitySettings, evaluate_text
from tests.generation.helpers import tiny_model


def settings_of(argv: list[str]) -> PerplexitySettings:
    args = build_parser(COMMANDS["perplexity"]).parse_args(["perplexity", *argv])
    return load_config(PerplexitySettings, None, overrides_from_args(args))


def test_flags_become_settings():
    s = settings_of(["--model", "m"])
    assert s == PerplexitySettings(model="m")
    assert s.text == CorpusSettings(corpus=["builtin"], encoding_errors="strict")
    assert (s.context_length, s.batch_size, s.max_tokens, s.device, s.precision, s.quantize, s.json) == (
        None,
        8,
        0,
        "auto",
        "fp32",
        None,
        False,
    )
    s = settings_of(
        [
            "--model",
            "m",
            "--corpus",
            "a.txt",
            "docs/",
            "--encoding-errors",
            "replace",
            "--context-length",
            "16",
            "--batch-size",
            "2",
            "--max-tokens",
            "100",
            "--device",
            "cpu",
            "--precision",
            "bf16",
            "--quantize",
            "int4",
            "--json",
        ]
    )
    assert s.text == CorpusSettings(corpus=["a.txt", "docs/"], encoding_errors="replace")
    assert (s.context_length, s.batch_size, s.max_tokens, s.device, s.precision, s.quantize, s.json) == (
        16,
        2,
        100,
        "cpu",
        "bf16",
        "int4",
        True,
    )


def test_a_model_is_required(capsys):
    with pytest.raises(ScratchLLMError, match="required: --model"):
        settings_of([])


@pytest.fixture
def model_and_text(tmp_path):
    tok = BPETokenizer({bytes([b]): b for b in range(256)}, special_tokens={"<|endoftext|>": 256})
    save_model(tmp_path / "m", tiny_model(vocab=tok.vocab_size), tok)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    return str(tmp_path / "m"), str(text)


def test_perplexity_runs_through_the_command_table(model_and_text, capsys):
    model, text = model_and_text
    expected = evaluate_text(model, [text], device="cpu")
    args = ["perplexity", "--model", model, "--corpus", text, "--device", "cpu"]
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(expected)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{model}: loss {expected['loss']:.4f} nats/token") and "bits/byte" in out
    # the old name still works, with a notice on stderr
    assert main(["evaluate", *args[1:], "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == pytest.approx(expected)
    assert "`evaluate` is now `perplexity`" in captured.err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--context-length", "-5"], "--context-length must be >= 1"),
        (["--max-tokens", "-1"], "--max-tokens must be >= 0 (0: all), got -1"),
        (["--batch-size", "x"], "batch_size = 'x' is not a valid int"),
    ],
)
def test_bad_settings_are_one_line_errors(model_and_text, capsys, flags, message):
    model, text = model_and_text
    assert main(["perplexity", "--model", model, "--corpus", text, "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
