"""The one settings system, as every command uses it: a dataclass of `setting()` fields becomes flags
(positional arguments, choices, repeated flags, one-of groups), reads TOML, and embeds another settings
dataclass (as commands embed `GenerationConfig`) whose fields become flags of their own."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from scratchllm.config import (
    add_config_arguments,
    build_config,
    check_required,
    dump_toml,
    overrides_from_args,
    setting,
)
from scratchllm.errors import ScratchLLMError


@dataclass
class Sampling:
    temperature: float = setting(0.0, "0: greedy", "sampling")
    top_k: int | None = setting(None, "the k likeliest only", "sampling")
    seed: int | None = setting(None, "a seed", "sampling")
    stop: Sequence[str] = setting((), "stop strings", "sampling", repeat=True)


@dataclass
class Command:
    model: str = setting("gpt2", "the model", positional="?")
    prompt: list[str] = setting([], "a prompt; repeat for a batch", flags=("--prompt", "-p"), repeat=True)
    text: str | None = setting(None, "a text", exclusive="source", required=True)
    file: str | None = setting(None, "a file", exclusive="source", required=True)
    dtype: str = setting("auto", "precision", choices=("auto", "fp32", "bf16"))
    src: str | None = setting(None, "a directory", flags=("--from",))
    quiet: bool = setting(False, "no summary")
    sampling: Sampling = setting(
        Sampling(temperature=0.7), "how tokens are chosen", only=("temperature", "top_k", "stop")
    )


def parse(argv: list[str]) -> Command:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Command)
    return build_config(Command, None, overrides_from_args(parser.parse_args(argv)))


def test_flags_positionals_choices_and_repeats():
    cmd = parse(shlex.split("runs/m -p A --prompt B --text hi --dtype bf16 --from d --quiet"))
    got = (cmd.model, cmd.prompt, cmd.text, cmd.file, cmd.dtype, cmd.src, cmd.quiet)
    assert got == ("runs/m", ["A", "B"], "hi", None, "bf16", "d", True)
    assert parse(["--file", "f"]).model == "gpt2" and parse(["--file", "f"]).prompt == []


def test_one_of_a_group_is_required_and_at_most_one(capsys):
    with pytest.raises(SystemExit):
        parse(["--text", "a", "--file", "b"])
    with pytest.raises(SystemExit):
        parse(["--text", "a", "--dtype", "fp16"])  # not a choice
    assert "--dtype" in capsys.readouterr().err
    # required settings are checked once the settings file's values are in: either may give them
    with pytest.raises(ScratchLLMError, match=r"required: --text or --file \(on the command line"):
        check_required(parse([]))
    check_required(build_config(Command, {"settings": {"file": "f.txt"}}))
    check_required(parse(["--file", "f"]))


def test_an_embedded_dataclass_lends_its_fields_as_flags_with_the_commands_defaults():
    cmd = parse(["--text", "a"])
    assert cmd.sampling == Sampling(temperature=0.7)  # the command's default, not Sampling's own
    cmd = parse(["--text", "a", "--top-k", "40", "--stop", "\n", "--stop", "END"])
    assert cmd.sampling == Sampling(temperature=0.7, top_k=40, stop=("\n", "END"))
    with pytest.raises(SystemExit):
        parse(["--text", "a", "--seed", "1"])  # not among `only`


def test_toml_files_set_embedded_fields_in_their_section_and_dump_them_back():
    cmd = build_config(Command, {"sampling": {"temperature": 1.5}, "settings": {"text": "x"}}, {"top_k": "5"})
    assert cmd.sampling.temperature == 1.5 and cmd.sampling.top_k == 5 and cmd.text == "x"
    dumped = dump_toml(cmd)
    assert "[sampling]\ntemperature = 1.5\ntop_k = 5\n" in dumped and 'text = "x"' in dumped
    with pytest.raises(ScratchLLMError, match=r"unknown key 'top_p' \(did you mean 'top_k'\?\)"):
        build_config(Command, {"sampling": {"top_p": 0.9}})


def test_a_setting_named_twice_is_a_programming_error():
    @dataclass
    class Clash:
        temperature: float = setting(1.0, "t")
        sampling: Sampling = setting(Sampling(), "s")

    with pytest.raises(TypeError, match="named twice"):
        build_config(Clash)
