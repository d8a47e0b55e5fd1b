"""The package's Python API: every export is what its module defines, and `LLM`'s generation takes
what users pass (a list of prompts, arrays of token ids, numpy integers) or says clearly what it wants."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch

import scratchllm
from scratchllm import cli
from scratchllm.checkpoint import save_model
from scratchllm.cli import COMMANDS, OLD_NAMES, build_parser, overview
from scratchllm.errors import ScratchLLMError
from scratchllm.generation import Engine, GenerationConfig
from scratchllm.model.gpt import GPTModel, preset_config
from scratchllm.text.char import CharTokenizer


def test_every_export_is_its_modules_object_after_all_submodules_are_imported():
    """A submodule named like an export (the package's old `generate.py` against the book's `generate`)
    replaces the export once anything imports it."""
    for info in pkgutil.walk_packages(scratchllm.__path__, "scratchllm."):
        if not info.name.startswith("scratchllm.__"):
            importlib.import_module(info.name)
    for name, module in scratchllm._EXPORTS.items():
        assert getattr(scratchllm, name) is getattr(importlib.import_module(module), name), name
    assert callable(scratchllm.generate) and scratchllm.generate.__name__ == "generate"


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    tok = CharTokenizer.from_corpus("the cat sat on the mat. a dog ran.")
    torch.manual_seed(0)
    path = save_model(
        tmp_path_factory.mktemp("m") / "model",
        GPTModel(preset_config("nano", vocab_size=tok.vocab_size)),
        tok,
    )
    return scratchllm.load(path, device="cpu")


def test_llm_generate_takes_one_prompt_or_a_list(llm):
    one = llm.generate("the cat", max_new_tokens=6)
    assert isinstance(one, str) and one == llm.complete("the cat", max_new_tokens=6)[0].text
    both = llm.generate(["the cat", "a dog"], max_new_tokens=6)
    assert both == [c.text for c in llm.complete(["the cat", "a dog"], max_new_tokens=6)]
    assert both[0] == one
    ids = llm.engine.encode("the cat")
    assert llm.generate(ids, max_new_tokens=6) == one  # token ids are one prompt too
    assert llm.generate([ids, "a dog"], max_new_tokens=6) == both


def test_token_ids_as_arrays_and_numpy_integers_in_settings(llm):
    engine: Engine = llm.engine
    ids = engine.encode("the cat")
    want = engine.generate(ids, max_new_tokens=5)[0].token_ids
    for prompt in (np.array(ids), torch.tensor(ids), tuple(np.array(ids))):  # one prompt, not a batch of ids
        got = engine.generate(prompt, max_new_tokens=np.int64(5))
        assert len(got) == 1 and got[0].token_ids == want
    batch = engine.generate(torch.tensor([ids, ids]), GenerationConfig(max_new_tokens=np.int32(5)))
    assert [c.token_ids for c in batch] == [want, want]
    # an array of texts (numpy, pandas) is a batch of prompts, as a list of texts is
    texts = engine.generate(np.array(["the cat", "a dog"]), max_new_tokens=5)
    assert [c.text for c in texts] == [
        c.text for c in engine.generate(["the cat", "a dog"], max_new_tokens=5)
    ]
    cfg = GenerationConfig(max_new_tokens=np.int64(3), top_k=np.int16(2), seed=np.uint64(2**64 - 1))
    assert (type(cfg.max_new_tokens), type(cfg.top_k), cfg.seed) == (int, int, 2**64 - 1)


def test_a_settings_dict_in_place_of_a_config_is_a_clear_error(llm):
    with pytest.raises(
        ScratchLLMError, match=r"config must be a GenerationConfig, got dict; give settings as keywords"
    ):
        llm.generate("the cat", {"max_new_tokens": 5})
    with pytest.raises(ScratchLLMError, match="the prompt is empty"):
        llm.engine.generate(torch.tensor([], dtype=torch.long))


def test_top_level_help_lists_every_command_and_answers_without_importing_torch():
    def commands(parser):
        return list(next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices)

    names = [n for n in commands(build_parser()) if n not in OLD_NAMES]
    assert commands(build_parser(COMMANDS["generate"])) == commands(build_parser())
    listed = [line.split()[0] for line in overview().splitlines() if line.startswith("  ")]
    assert sorted(set(listed)) == sorted(names)  # the help's one list names every command
    code = (
        "import sys\nfrom scratchllm.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    for flag in ("--help", "--version"):
        done = subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert ("pretrain" in done.stdout) if flag == "--help" else done.stdout.startswith("scratchllm ")


def test_an_engine_takes_a_tokenizer_by_name_or_directory(llm, tmp_path):
    llm.engine.tokenizer.save(tmp_path / "tok")
    by_path = Engine(llm.model, str(tmp_path / "tok"))
    assert by_path.generate("the cat", max_new_tokens=4)[0].text == llm.generate("the cat", max_new_tokens=4)
    with pytest.raises(ScratchLLMError, match="not found"):
        Engine(llm.model, str(tmp_path / "nothing"))

    class Wrapped:  # any object with the Tokenizer methods the engine uses is taken as it is
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

    duck = Engine(llm.model, Wrapped(llm.engine.tokenizer))
    assert duck.generate("the cat", max_new_tokens=4)[0].text == llm.generate("the cat", max_new_tokens=4)


def test_save_model_with_its_arguments_swapped_says_which_comes_first(llm, tmp_path):
    with pytest.raises(ScratchLLMError, match=r"the directory first: save_model\(directory, model"):
        save_model(llm.model, tmp_path / "m")


def test_ctrl_c_before_a_command_runs_is_one_line_and_exit_130(monkeypatch, capsys):
    """Building the command parser imports torch (seconds): Ctrl-C there printed a traceback."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["info", "--preset", "nano"]) == 130
    assert capsys.readouterr().err == "scratchllm: interrupted\n"


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["generate", "--model", "m", "--prompt", "a", "--precision", "bf16"], "did you mean --dtype?"),
        (["perplexity", "--model", "m", "--dtype", "bf16"], "did you mean --precision?"),
        (["finetune", "instruct", "--trainable", "lora"], "did you mean --lora true?"),  # a nested command
        (["finetune", "classify", "--max-stesp", "3"], "did you mean --max-steps?"),
        (
            ["generate", "--model", "m", "--max-tokens", "4", "--prompt", "a"],
            "did you mean --max-new-tokens?",
        ),
    ],
)
def test_a_flag_another_command_names_otherwise_suggests_this_commands_name(argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and hint in err and err.count("\n") == 1


def test_the_program_exits_with_the_commands_code_and_all_its_output():
    """`scratchllm` (and `python -m scratchllm`) run `cli.entry`, which skips Python's last garbage
    collection at exit (1-1.5 s after torch) but must keep the exit code and flush what was printed."""

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "scratchllm"]
    assert script.value == "scratchllm.cli:entry"
    ok = subprocess.run(
        [sys.executable, "-m", "scratchllm", "info", "--preset", "nano"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0] == "preset nano" and lines[-1].lstrip().startswith("KV cache")  # the whole report
    bad = subprocess.run(
        [sys.executable, "-m", "scratchllm", "info", "--preset", "nope"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("scratchllm: error:") and len(bad.stderr.strip().splitlines()) == 1
