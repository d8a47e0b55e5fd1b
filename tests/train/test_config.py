from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from scratchllm.config import (
    add_config_arguments,
    build_config,
    dump_toml,
    load_config,
    overrides_from_args,
    tomllib,
)
from scratchllm.errors import ScratchLLMError
from scratchllm.train.pretrain import PretrainConfig


def test_defaults_file_and_overrides_in_order(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nlr = 0.01\nbatch_size = 4\n[model]\nmodel = "nano"\n', encoding="utf-8")
    cfg = load_config(PretrainConfig, str(path), {"lr": "0.5"})
    assert cfg.lr == 0.5  # the command line wins
    assert cfg.batch_size == 4 and cfg.model == "nano"  # the file wins over defaults
    assert cfg.warmup_steps == PretrainConfig().warmup_steps


def test_unknown_key_names_it_and_the_closest_valid_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nlearning_rat = 0.1\nbatch_sise = 3\n", encoding="utf-8")
    with pytest.raises(ScratchLLMError, match=r"unknown key 'learning_rat'") as e:
        load_config(PretrainConfig, str(path))
    assert str(path) in str(e.value)
    with pytest.raises(ScratchLLMError, match=r"unknown key 'batch_sise'.*did you mean 'batch_size'"):
        build_config(PretrainConfig, {"batch_sise": 3})
    with pytest.raises(ScratchLLMError, match=r"command line: unknown key 'warmup'.*'warmup_steps'"):
        build_config(PretrainConfig, {}, {"warmup": 3})


def test_wrong_types_are_named(tmp_path):
    with pytest.raises(ScratchLLMError, match=r"batch_size = 'eight' is not a valid int"):
        build_config(PretrainConfig, {}, {"batch_size": "eight"})
    with pytest.raises(
        ScratchLLMError, match=r"lr = true is not a valid float|lr = True is not a valid float"
    ):
        build_config(PretrainConfig, {"lr": True})
    with pytest.raises(ScratchLLMError, match=r"max_steps = 2.5 is not a valid int"):
        build_config(PretrainConfig, {"max_steps": 2.5})
    assert build_config(PretrainConfig, {}, {"max_steps": "1e3"}).max_steps == 1000
    assert build_config(PretrainConfig, {}, {"compile": "true"}).compile is True
    assert build_config(PretrainConfig, {"corpus": "a.txt"}).corpus == ["a.txt"]
    assert build_config(PretrainConfig, {}, {"emb_dim": "none"}).emb_dim is None


def test_presets_and_missing_config():
    cfg = load_config(PretrainConfig, "demo")
    assert cfg.corpus == ["builtin"] and cfg.tokenizer == "train"
    with pytest.raises(ScratchLLMError, match=r"neither a file nor a preset.*did you mean 'demo'"):
        load_config(PretrainConfig, "demoo")


def test_invalid_toml_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("lr = = 1\n", encoding="utf-8")
    with pytest.raises(ScratchLLMError, match="not valid TOML"):
        load_config(PretrainConfig, str(path))
    path.write_bytes(b"\xff\xfe[train]\n")  # UTF-16 from a Windows editor
    with pytest.raises(ScratchLLMError, match="not UTF-8 text"):
        load_config(PretrainConfig, str(path))


def test_every_field_is_a_flag_and_dump_round_trips():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PretrainConfig)
    args = parser.parse_args(["--batch-size", "3", "--corpus", "a.txt", "b.txt", "--qkv-bias", "false"])
    over = overrides_from_args(args)
    assert over == {"batch_size": "3", "corpus": ["a.txt", "b.txt"], "qkv_bias": "false"}
    cfg = build_config(PretrainConfig, {}, over)
    text = dump_toml(cfg)
    again = build_config(PretrainConfig, tomllib.loads(text))
    assert again == dataclasses.replace(cfg, out_dir=str(Path(cfg.out_dir).absolute()))  # paths made absolute
    assert "[data]" in text and "[train]" in text


def test_a_bool_flag_alone_means_true():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PretrainConfig)
    over = overrides_from_args(parser.parse_args(["--qkv-bias", "--progress", "false", "--overwrite"]))
    cfg = build_config(PretrainConfig, {}, over)
    assert (cfg.qkv_bias, cfg.progress, cfg.overwrite) == (True, False, True)


def test_saved_settings_hold_absolute_paths_and_keep_names(tmp_path, monkeypatch):
    """A run's config.toml is read back by `--resume` from any directory: relative paths are saved as
    absolute ones; names (builtin, hf:..., gpt2, train) stay names, even beside a folder of that name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "gpt2").mkdir()  # the tokenizer name wins over a folder of that name
    (tmp_path / "tok").mkdir()
    (tmp_path / "micro").mkdir()  # the model preset is a name only, never a path
    corpus = ["notes", "essays/*.md", "builtin", "hf:wikitext:train", "missing.txt"]
    settings = {"tokenizer": "gpt2", "out_dir": "runs/new", "init_from": "gpt2-medium", "model": "micro"}
    cfg = build_config(PretrainConfig, {}, {"corpus": corpus, **settings})
    saved = tomllib.loads(dump_toml(cfg))
    flat = {k: v for section in saved.values() for k, v in section.items()}
    assert flat["corpus"] == [str(tmp_path / "notes"), str(tmp_path / "essays/*.md"), *corpus[2:]]
    assert flat["tokenizer"] == "gpt2" and flat["init_from"] == "gpt2-medium" and flat["model"] == "micro"
    assert flat["out_dir"] == str(tmp_path / "runs" / "new")  # always a path, made or not
    cfg = build_config(PretrainConfig, {}, {"tokenizer": "tok", "init_from": "./tok/../tok", "data": "~/d"})
    flat = {k: v for section in tomllib.loads(dump_toml(cfg)).values() for k, v in section.items()}
    assert flat["tokenizer"] == flat["init_from"] == str(tmp_path / "tok")
    assert flat["data"] == str(Path("~/d").expanduser())
    # a colon in a path is not a scheme; a file named like a hub model is not the model's directory
    (tmp_path / "ch:1").mkdir()
    (tmp_path / "gpt2-medium").write_text("not a model")
    other = build_config(PretrainConfig, {}, {"corpus": ["ch:1"], "init_from": "gpt2-medium"})
    flat = {k: v for section in tomllib.loads(dump_toml(other)).values() for k, v in section.items()}
    assert flat["corpus"] == [str(tmp_path / "ch:1")] and flat["init_from"] == "gpt2-medium"
    assert cfg.tokenizer == "tok"  # the settings themselves are not changed


def test_a_directory_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch, capsys):
    """`--config demo` (and `demo --help`, which shows the preset's values) read the shipped preset
    even where the current directory holds a `demo/` directory, e.g. a run's output."""
    from scratchllm.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert load_config(PretrainConfig, "demo").out_dir == "runs/demo"
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0 and "(default: 'runs/demo')" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(ScratchLLMError, match="is a directory; give a TOML file or a preset name"):
        load_config(PretrainConfig, str(tmp_path / "demo"))
    # a file named like a preset: --config takes the file (a path first), and says what it hides when
    # it is not TOML; the demo command, which has no --config, always runs its own preset
    (tmp_path / "demo").rmdir()
    (tmp_path / "demo").write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(ScratchLLMError, match=r"not valid TOML.*the file demo here hides the preset 'demo'"):
        load_config(PretrainConfig, "demo")
    assert load_config(PretrainConfig, "demo", preset=True).out_dir == "runs/demo"
    assert (
        main(["demo", "--max-steps", "0", "--out-dir", str(tmp_path / "run")]) == 2
    )  # fails after the preset
    assert "max_steps is 0" in capsys.readouterr().err
    (tmp_path / "mine.toml").write_text("[train]\nmax_steps = 7\n")
    assert load_config(PretrainConfig, "mine.toml").max_steps == 7
    assert load_config(PretrainConfig, "shakespeare-char-muon").optimizer == "muon"


def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_unknown_sections_and_tables_are_named_with_the_file(tmp_path):
    path = _toml(tmp_path, "[trian]\nlr = 0.1\n")
    with pytest.raises(ScratchLLMError, match=r"unknown section \[trian\] \(did you mean \[train\]\?\)") as e:
        load_config(PretrainConfig, path)
    assert str(e.value).startswith(path) and "[data], [eval], [model]" in str(e.value)
    with pytest.raises(ScratchLLMError, match=r"run.toml: unknown section \[train\.extra\].*under \[train\]"):
        load_config(PretrainConfig, _toml(tmp_path, "[train]\nlr = 0.1\n[train.extra]\nx = 1\n"))
    with pytest.raises(ScratchLLMError, match=r"run.toml \[train\]: unknown key 'learning_rate'"):
        load_config(PretrainConfig, _toml(tmp_path, "[train]\nlearning_rate = 0.1\n"))
    with pytest.raises(
        ScratchLLMError, match=r"run.toml \[train\]: lr is a TOML table, but it takes a float"
    ):
        load_config(PretrainConfig, _toml(tmp_path, "[train.lr]\nvalue = 0.1\n"))
    # sections only group keys: one in another known section, or at the top, still counts
    cfg = load_config(PretrainConfig, _toml(tmp_path, 'batch_size = 3\n[model]\nlr = 0.1\nmodel = "nano"\n'))
    assert (cfg.batch_size, cfg.lr, cfg.model) == (3, 0.1, "nano")


QUOTED = r" \(a quoted string\); write it without quotes: "


@pytest.mark.parametrize(
    "line, message",
    [
        ('lr = "0.001"', r'\[train\]: lr = "0.001" is not a valid float' + QUOTED + "lr = 0.001"),
        ('max_steps = "100"', r'max_steps = "100" is not a valid int' + QUOTED + "max_steps = 100"),
        (
            'max_steps = "many"',
            r'max_steps = "many" is not a valid int \(a string\); write an int, e.g. max_steps = 1',
        ),
        ("max_steps = 1.5", r"max_steps = 1.5 is not a valid int; it takes a whole number"),
        ("max_steps = true", r"max_steps = true is not a valid int"),
        ("lr = false", r"lr = false is not a valid float"),
        ("compile = 1", r"compile = 1 is not a valid bool; write compile = true or compile = false"),
        ('compile = "yes"', r'compile = "yes" is not a valid bool' + QUOTED + "compile = true"),
        ("emb_dim = 1.5", r"emb_dim = 1.5 is not a valid int or none"),
        ("lr = [0.1]", r"lr is a TOML list, but it takes a float"),
    ],
)
def test_a_toml_value_of_the_wrong_type_is_refused(tmp_path, line, message):
    path = _toml(tmp_path, f"[train]\n{line}\n")
    with pytest.raises(ScratchLLMError, match=message) as e:
        load_config(PretrainConfig, path)
    assert str(e.value).startswith(f"{path} [train]: ") and "\n" not in str(e.value)


def test_toml_numbers_that_fit_and_flags_parsed_from_strings(tmp_path):
    cfg = load_config(
        PretrainConfig, _toml(tmp_path, "[train]\nlr = 1\nmax_steps = 1e3\nwarmup_steps = 20.0\n")
    )
    assert (cfg.lr, cfg.max_steps, cfg.warmup_steps) == (1.0, 1000, 20)
    assert isinstance(cfg.lr, float) and isinstance(cfg.max_steps, int)
    cfg = load_config(PretrainConfig, _toml(tmp_path, '[model]\nemb_dim = "none"\n'))
    assert cfg.emb_dim is None  # TOML has no null: "none" is how a file unsets an optional setting
    # the command line gives strings, parsed by the setting's type, over the file
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, PretrainConfig)
    args = parser.parse_args(["--lr", "0.001", "--max-steps", "1e3", "--compile", "--progress", "false"])
    cfg = load_config(PretrainConfig, _toml(tmp_path, "[train]\nlr = 0.5\n"), overrides_from_args(args))
    assert (cfg.lr, cfg.max_steps, cfg.compile, cfg.progress) == (0.001, 1000, True, False)
    with pytest.raises(ScratchLLMError, match=r"command line: max_steps = '1.5' is not a valid int"):
        build_config(PretrainConfig, {}, {"max_steps": "1.5"})
