"""`scratchllm generate` as a settings dataclass: its flags, a TOML file, and a run through the command
table."""

from __future__ import annotations

import io

import pytest

from scratchllm.checkpoint import save_model
from scratchllm.cli import COMMANDS, build_parser, main
from scratchllm.config import load_config, overrides_from_args
from scratchllm.errors import ScratchLLMError
from scratchllm.generation import Engine, GenerationConfig, RuntimeSettings
from scratchllm.generation.command import GenerateSettings
from scratchllm.text.bpe import BPETokenizer
from tests.generation.helpers import tiny_model


def settings_of(argv: list[str], config: str | None = None) -> GenerateSettings:
    args = build_parser(COMMANDS["generate"]).parse_args(["generate", *argv])
    return load_config(GenerateSettings, config, overrides_from_args(args))


def test_flags_become_settings_with_generates_own_defaults():
    s = settings_of(["--prompt", "A"])
    assert s.model == "gpt2" and s.prompt == ["A"]
    assert s.sampling == GenerationConfig(max_new_tokens=100)  # generate's default, not the engine's 256
    assert s.runtime == RuntimeSettings()
    assert (s.no_cache, s.stream, s.echo, s.quiet) == (False, False, False, False)
    s = settings_of(
        [
            "--prompt",
            "A",
            "--prompt",
            "B",
            "--model",
            "m",
            "--max-new-tokens",
            "7",
            "--temperature",
            "0.8",
            "--top-k",
            "5",
            "--top-p",
            "0.9",
            "--seed",
            "3",
            "--stop",
            "\n",
            "--stop",
            "END",
            "--ignore-eos",
            "--repetition-penalty",
            "1.2",
            "--presence-penalty",
            "0.5",
            "--frequency-penalty",
            "0.25",
            "--no-cache",
            "--stream",
            "--echo",
            "--quiet",
            "--device",
            "cpu",
            "--dtype",
            "bf16",
            "--compile",
            "--quantize",
            "int4",
        ]
    )
    assert s.prompt == ["A", "B"] and s.model == "m"
    assert s.sampling == GenerationConfig(
        max_new_tokens=7,
        temperature=0.8,
        top_k=5,
        top_p=0.9,
        seed=3,
        stop=("\n", "END"),
        ignore_eos=True,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=0.25,
    )
    assert (s.no_cache, s.stream, s.echo, s.quiet) == (True, True, True, True)
    assert s.runtime == RuntimeSettings(device="cpu", dtype="bf16", compile=True, quantize="int4")
    assert settings_of(["--prompt", "A", "--no-cache", "false"]).no_cache is False


def test_a_prompt_is_required_and_engine_only_settings_are_not_flags(capsys):
    with pytest.raises(ScratchLLMError, match="required: --prompt"):
        settings_of([])
    for flag in ("--logprobs", "--use-cache", "--eos-id"):
        with pytest.raises(SystemExit):
            settings_of(["--prompt", "A", flag, "1"])


def test_a_toml_file_sets_them_under_the_flags(tmp_path):
    config = tmp_path / "generate.toml"
    config.write_text(
        '[model]\nmodel = "runs/x"\ndtype = "fp32"\n[sampling]\ntemperature = 0.7\ntop_k = 40\n'
    )
    s = settings_of(["--prompt", "A", "--top-k", "8"], str(config))
    assert s.model == "runs/x" and s.runtime.dtype == "fp32"
    assert (s.sampling.temperature, s.sampling.top_k, s.sampling.max_new_tokens) == (0.7, 8, 100)


@pytest.fixture
def model_dir(tmp_path):
    tok = BPETokenizer({bytes([b]): b for b in range(256)})
    model = tiny_model(vocab=tok.vocab_size)
    save_model(tmp_path / "m", model, tok)
    return tmp_path / "m", Engine(model, tok)


def test_generate_runs_through_the_command_table(model_dir, capsys, monkeypatch):
    path, engine = model_dir
    expected = engine.generate("Hello", max_new_tokens=12)[0].text
    hello = [
        "generate",
        "--model",
        str(path),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
    ]
    assert main([*hello, "--dtype", "fp32", "--quiet"]) == 0
    assert capsys.readouterr() == (expected + "\n", "")
    assert main([*hello, "--dtype", "fp32", "--no-cache", "--quiet"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main([*hello, "--dtype", "fp32", "--stream", "--echo"]) == 0
    out, err = capsys.readouterr()
    assert out == "Hello" + expected + "\n"
    assert err.startswith("[12 tokens in ") and "finish: length; cpu, float32]" in err
    # a batch, one prompt from stdin
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi"))
    two = ["generate", "--model", str(path), "--prompt", "Hello", "--prompt", "-", "--max-new-tokens", "12"]
    assert main([*two, "--dtype", "fp32", "--device", "cpu", "--quiet"]) == 0
    hi = engine.generate("Hi", max_new_tokens=12)[0].text
    assert capsys.readouterr().out == f"--- 1/2\n{expected}\n\n--- 2/2\n{hi}\n"


def test_generate_errors_are_one_line(model_dir, capsys):
    path, _ = model_dir
    hello = ["generate", "--model", str(path), "--prompt", "Hello", "--device", "cpu"]
    assert main([*hello, "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert "temperature must be a number >= 0" in err and err.count("\n") == 1
    assert main([*hello, "--prompt", "again", "--stream"]) == 2
    assert "--stream takes one --prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*hello, "--quantize", "int3"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
