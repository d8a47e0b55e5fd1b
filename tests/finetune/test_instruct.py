from __future__ import annotations

import contextlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from llms_from_scratch.ch07 import InstructionDataset as BookInstructionDataset
from llms_from_scratch.ch07 import custom_collate_fn as book_collate

from scratchllm import cli as table
from scratchllm.checkpoint import load_model, read_config, save_model
from scratchllm.cli import main
from scratchllm.config import load_config, overrides_from_args
from scratchllm.errors import ScratchLLMError
from scratchllm.finetune.instruct import (
    IGNORE_INDEX,
    InstructConfig,
    InstructionDataset,
    InstructionTask,
    custom_collate_fn,
    finetune_instruct,
    load_instruction_data,
    split_data,
)
from scratchllm.finetune.respond import RespondSettings, respond
from scratchllm.generation import GenerationConfig, RuntimeSettings
from scratchllm.hints import scratchllm_command
from scratchllm.model.gpt import GPTModel, preset_config
from scratchllm.model.quantize import int4_supported
from scratchllm.text.bpe import train_bpe
from scratchllm.text.templates import ALPACA, PHI3, TEMPLATE_KEY, template_for_model
from scratchllm.train.rundir import list_checkpoints
from tests.conftest import shared_file

COLORS = ["red", "green", "blue", "black", "white", "pink", "gray", "gold"]
ANIMALS = ["cat", "dog", "cow", "owl", "fox", "bee", "ant", "eel"]
# a tiny instruction set a nano model learns in seconds: 8 facts, and 8 words to repeat from the input
RECORDS = [
    {"instruction": f"Name the {c} animal.", "input": "", "output": f"The {c} {a}."}
    for c, a in zip(COLORS, ANIMALS)
]
RECORDS += [{"instruction": "Repeat the word.", "input": w, "output": w} for w in ANIMALS]


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Toy:
    data: Path  # RECORDS as a JSON list
    base: Path  # a random nano model directory with a small BPE tokenizer


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Toy:
    root = tmp_path_factory.mktemp("instruct")
    data = root / "data.json"
    data.write_text(json.dumps(RECORDS))
    texts = [t.format_example(r)[0] + r["output"] for r in RECORDS for t in (ALPACA, PHI3)]
    tok = train_bpe(texts, 300, progress=False)
    torch.manual_seed(0)
    model = GPTModel(preset_config("nano", vocab_size=tok.vocab_size, context_length=128))
    save_model(root / "base", model, tok)
    return Toy(data, root / "base")


def _cfg(toy: Toy, out: Path, **kw) -> InstructConfig:
    settings_ = dict(
        data=str(toy.data),
        val_data=str(toy.data),
        model=str(toy.base),
        out_dir=str(out),
        batch_size=8,
        epochs=60,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=5,
        eval_every=60,
        device="cpu",
        precision="fp32",
        progress=False,
        sample_count=2,
        sample_tokens=16,
    )
    settings_.update(kw)
    return InstructConfig(**settings_)


# ----------------------------------------------------------------------------------------------
# records and splits


def test_json_and_jsonl_give_the_same_records(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(RECORDS, indent=2))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "\n")
    assert (
        load_instruction_data(tmp_path / "a.json") == RECORDS == load_instruction_data(tmp_path / "a.jsonl")
    )


@pytest.mark.parametrize(
    "name, text, match",
    [
        (
            "x.json",
            '[{"instruction": "a", "output": "b"}, {"instruction": "c"}]',
            r'x\.json, record \[1\]: "output" must be a string \(missing\)',
        ),
        (
            "x.json",
            '[{"instruction": "", "output": "b"}]',
            r'record \[0\]: "instruction" must be a non-empty string',
        ),
        (
            "x.json",
            '[["a", "b"]]',
            r"record \[0\]: expected a JSON object, got list",
        ),
        (
            "x.json",
            '[{"instruction": "a", "input": 3, "output": "b"}]',
            r'record \[0\]: "input" must be a string',
        ),
        (
            "x.json",
            '{"instruction": "a", "output": "b"}\n{"instruction": "b"}',
            r'x\.json, line 2: "output" must',
        ),
        ("x.json", "[1, 2", r"x\.json: not valid JSON"),
        (
            "x.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 7}\n',
            r'x\.jsonl, line 2: "output" must be a string \(int\)',
        ),
        ("x.jsonl", '{"instruction": "a", "output": "b"}\n{oops}\n', r"x\.jsonl, line 2: not valid JSON"),
        ("x.json", "[]", "no records"),
        (  # a pretty-printed object: valid JSON, but not records (it said "line 1: not valid JSON")
            "x.json",
            '{\n  "data": [{"instruction": "a", "output": "b"}]\n}',
            r"x\.json: one JSON object \(keys \['data'\]\), not a list of records; write a \[\.\.\.\] list",
        ),
    ],
)
def test_malformed_records_are_errors_that_name_the_record(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ScratchLLMError, match=match):
        load_instruction_data(path)


def test_records_to_answer_need_no_output(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"instruction": "a", "id": 7}\n')
    assert load_instruction_data(path, require_output=False) == [{"instruction": "a", "id": 7}]
    with pytest.raises(ScratchLLMError, match="not found"):
        load_instruction_data(tmp_path / "missing.json")


def test_split_in_file_order_is_the_books_split():
    data = [{"instruction": str(i), "input": "", "output": str(i)} for i in range(1100)]
    train, val, test = split_data(data, seed=None)
    # the book: train_portion = int(len(data) * 0.85), test_portion = int(len(data) * 0.1), val = the rest
    assert (train, test, val) == (data[:935], data[935:1045], data[1045:])


def test_seeded_split_is_a_reproducible_partition():
    data = [{"instruction": str(i), "output": ""} for i in range(200)]
    train, val, test = split_data(data, 0.05, 0.1, seed=7)
    assert (len(train), len(val), len(test)) == (170, 10, 20)
    assert sorted(int(r["instruction"]) for r in train + val + test) == list(range(200))
    assert split_data(data, 0.05, 0.1, seed=7) == (train, val, test)
    assert split_data(data, 0.05, 0.1, seed=8)[0] != train and train != data[:170]
    with pytest.raises(ScratchLLMError, match="leaves 10 for training and 0 for validation"):
        split_data(data[:10], 0.05, 0.0)


# ----------------------------------------------------------------------------------------------
# dataset and collate against the book


def test_dataset_tokenizes_like_the_books_and_knows_the_prompt_length():
    from scratchllm.text.gpt2 import load_gpt2_files

    tok = load_gpt2_files(shared_file("encoder.json").parent)
    data = json.loads(shared_file("instruction-data.json").read_text())
    ours = InstructionDataset(data, tok, "alpaca")
    assert ours.encoded_texts == BookInstructionDataset(data, tok).encoded_texts
    for entry, ids, n in zip(data, ours.encoded_texts, ours.prompt_lengths):
        assert tok.decode(ids[:n]) == ALPACA.format_example(entry)[0]


batches = st.lists(st.lists(st.integers(0, 50255), min_size=1, max_size=20), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(batches, st.one_of(st.none(), st.integers(1, 25)))
def test_collate_equals_the_books_custom_collate_fn(batch, allowed_max_length):
    inputs, targets = custom_collate_fn(batch, allowed_max_length=allowed_max_length)
    book_inputs, book_targets = book_collate(batch, allowed_max_length=allowed_max_length)
    assert torch.equal(inputs, book_inputs) and torch.equal(targets, book_targets)


def test_collate_by_hand_and_with_the_prompt_masked():
    eot = 99
    batch = [[1, 2, 3, 4, 5], [6, 7]]
    inputs, targets = custom_collate_fn(batch, pad_token_id=eot)
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [6, 7, eot, eot, eot]]
    assert targets.tolist() == [[2, 3, 4, 5, eot], [7, eot, -100, -100, -100]]
    # prompt lengths 3 and 1: targets predicting prompt tokens (positions < length - 1) do not count
    _, masked = custom_collate_fn(batch, pad_token_id=eot, prompt_lengths=[3, 1])
    assert masked.tolist() == [[-100, -100, 4, 5, eot], [7, eot, -100, -100, -100]]
    _, cut = custom_collate_fn(batch, pad_token_id=eot, allowed_max_length=2, prompt_lengths=[3, 1])
    assert cut.tolist() == [[-100, -100], [7, eot]]


# ----------------------------------------------------------------------------------------------
# the task


def _task(toy: Toy, **kw) -> InstructionTask:
    loaded = load_model(toy.base)
    ds = InstructionDataset(RECORDS, loaded.tokenizer)
    args = dict(batch_size=4, eot_id=loaded.tokenizer.eot_id, seed=3, epochs=2, context_length=128)
    args.update(kw)
    return InstructionTask(ds, ds, **args)


def _rows(batch) -> list[tuple[int, ...]]:
    inputs, targets = batch
    return [tuple(t for t in row.tolist() if t != IGNORE_INDEX) for row in targets]


def test_training_batches_are_a_pure_function_of_the_index_and_cover_each_epoch(toy):
    task = _task(toy)
    assert task.batches_per_epoch == 4  # 16 examples, 4 per batch
    every = {tuple(ids[1:]) + (task.eot_id,) for ids in task.train.encoded_texts}
    epoch0 = [r for i in range(4) for r in _rows(task.train_batch(i))]
    epoch1 = [r for i in range(4, 8) for r in _rows(task.train_batch(i))]
    assert sorted(epoch0) == sorted(every) == sorted(epoch1) and epoch0 != epoch1  # reshuffled per epoch
    again = _task(toy)  # a fresh task (as after a resume) gives the same batch for the same index
    assert all(torch.equal(a, b) for i in (6, 1) for a, b in zip(again.train_batch(i), task.train_batch(i)))
    # two processes split the same epoch between them
    split = [r for i in range(2) for rank in range(2) for r in _rows(task.train_batch(i, rank, 2))]
    assert split == epoch0
    assert task.default_steps(InstructConfig(grad_accum=1), 1) == 8
    assert task.default_steps(InstructConfig(grad_accum=3), 1) == 3


# ----------------------------------------------------------------------------------------------
# end to end: finetune, save, reload, respond


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """Finetune the toy model (Phi-3 template, prompt masked); also the loss before, for comparison."""
    loaded = load_model(toy.base)
    val = InstructionDataset(RECORDS, loaded.tokenizer, PHI3)
    task = InstructionTask(val, val, batch_size=8, eot_id=loaded.tokenizer.eot_id, mask_prompt=True)
    before = task.dataset_loss(loaded.model, val, len(val), contextlib.nullcontext)
    torch.manual_seed(0)
    result = finetune_instruct(
        _cfg(toy, tmp_path_factory.mktemp("run") / "run", template="phi3", mask_prompt=True)
    )
    return result, before


def test_finetuning_learns_the_instructions(trained):
    result, before = trained
    assert result.stopped == "done" and result.steps == 120  # 60 epochs x 2 batches of 8
    assert result.metrics["val_loss"] < 0.25 * before
    evals = [r for r in result.history if r["kind"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["samples"]


def test_the_assistant_is_a_model_directory_that_remembers_its_template(trained):
    result, _ = trained
    for name in ("model", "best"):
        cfg, extra = read_config(result.out_dir / name)
        assert extra[TEMPLATE_KEY] == "phi3" and extra["trained_by"] == "scratchllm finetune instruct"
        assert template_for_model(extra) is PHI3
    split = {
        n: json.loads((result.out_dir / "data" / f"{n}.json").read_text()) for n in ("train", "val", "test")
    }
    assert split["train"] == RECORDS and split["val"] == RECORDS and split["test"] == []


def test_respond_answers_with_the_models_template_in_batches(trained, tmp_path):
    result, _ = trained
    out = tmp_path / "responses.json"
    answered = respond(str(result.out_dir / "model"), _questions(tmp_path), out, batch_size=5, progress=False)
    assert json.loads(out.read_text()) == answered
    assert [a["id"] for a in answered] == list(range(len(RECORDS)))  # file order kept, extra fields kept
    right = sum(a["model_response"] == r["output"] for a, r in zip(answered, RECORDS))
    assert right >= len(RECORDS) - 1, answered
    # batching and the length sort change nothing (greedy); another template gives other answers
    one_by_one = respond(
        str(result.out_dir / "model"), _questions(tmp_path), None, batch_size=1, progress=False
    )
    assert [a["model_response"] for a in one_by_one] == [a["model_response"] for a in answered]
    wrong = respond(
        str(result.out_dir / "model"),
        _questions(tmp_path),
        tmp_path / "r.jsonl",
        template="alpaca",
        progress=False,
    )
    assert sum(a["model_response"] == r["output"] for a, r in zip(wrong, RECORDS)) < right
    assert [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()] == wrong


def _questions(tmp_path: Path) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": i, "instruction": r["instruction"], "input": r["input"]}) + "\n"
            for i, r in enumerate(RECORDS)
        )
    )
    return path


def test_lora_trains_only_adapters_and_saves_a_plain_model(toy, tmp_path):
    out = tmp_path / "lora"
    result = finetune_instruct(
        _cfg(toy, out, lora=True, lora_rank=4, lora_alpha=8, epochs=5, lr=1e-2, eval_every=0, sample_tokens=0)
    )
    doc = json.loads((out / "model" / "config.json").read_text())
    assert "lora" not in doc and "lora" not in json.loads((out / "best" / "config.json").read_text())
    ckpt = list_checkpoints(out)[-1]
    assert ckpt.name == f"step-{result.steps:06d}"
    assert json.loads((ckpt / "config.json").read_text())["lora"]["rank"] == 4
    base = load_model(toy.base).model.state_dict()
    adapted = load_model(ckpt).model
    frozen = {k: v for k, v in adapted.state_dict().items() if ".lora." not in k}
    assert frozen.keys() == base.keys() and all(torch.equal(frozen[k], base[k]) for k in base)
    assert any(v.abs().sum() > 0 for k, v in adapted.state_dict().items() if k.endswith("lora.B"))
    merged = load_model(out / "model").model
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(x), load_model(toy.base).model(x), atol=1e-4)
    # that checkpoint (adapters unmerged) finetuned again with LoRA: they fold in, new ones train
    again = finetune_instruct(
        _cfg(
            toy,
            tmp_path / "again",
            model=str(ckpt),
            lora=True,
            lora_rank=4,
            max_steps=2,
            eval_every=0,
            sample_tokens=0,
        )
    )
    assert again.steps == 2


# ----------------------------------------------------------------------------------------------
# command line


def test_cli_finetune_instruct_then_respond(toy, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "finetune",
            "instruct",
            "--model",
            str(toy.base),
            "--data",
            str(toy.data),
            "--out",
            str(out),
            "--val-fraction",
            "0.25",
            "--test-fraction",
            "0.25",
            "--max-steps",
            "4",
            "--device",
            "cpu",
            "--progress",
            "false",
            "--sample-tokens",
            "0",
            "--template",
            "phi3",
        ]
    )
    assert code == 0
    assert f"next: {scratchllm_command()} respond --model {out / 'model'}" in capsys.readouterr().out
    test = json.loads((out / "data" / "test.json").read_text())
    # a bare --resume continues with the run's settings (it took the defaults: gpt2-medium, no data)
    assert main(["finetune", "instruct", "--out", str(out), "--resume", "--max-steps", "5"]) == 0
    assert f"resuming with the settings of {out / 'config.toml'}" in capsys.readouterr().out
    assert json.loads((out / "data" / "test.json").read_text()) == test  # the same split
    assert len(test) == 4 and all(r in RECORDS for r in test)
    code = main(
        [
            "respond",
            "--model",
            str(out / "model"),
            "--data",
            str(out / "data" / "test.json"),
            "--out",
            str(tmp_path / "r.json"),
            "--max-new-tokens",
            "5",
            "--quiet",
        ]
    )
    assert code == 0
    answered = json.loads((tmp_path / "r.json").read_text())
    assert [{k: v for k, v in a.items() if k != "model_response"} for a in answered] == test
    assert all(isinstance(a["model_response"], str) for a in answered)
    if not int4_supported():  # torch < 2.6: the one-line error instead
        return
    code = main(
        [
            "respond",
            "--model",
            str(out / "model"),
            "--data",
            str(out / "data" / "test.json"),
            "--out",
            str(tmp_path / "q.json"),
            "--max-new-tokens",
            "5",
            "--quiet",
            "--device",
            "cpu",
            "--quantize",
            "int4",
        ]
    )
    assert code == 0 and len(json.loads((tmp_path / "q.json").read_text())) == 4


def test_cli_bad_record_is_one_line_and_exit_2(toy, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([RECORDS[0], {"instruction": "x", "output": None}]))
    code = main(
        ["finetune", "instruct", "--model", str(toy.base), "--data", str(bad), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and 'record [1]: "output" must be a string' in err
    code = main(["finetune", "instruct", "--model", str(toy.base), "--data", str(bad), "--lora-rank", "4"])
    assert code == 2 and capsys.readouterr().err.strip() == "scratchllm: error: --lora-rank needs --lora true"
    (tmp_path / "m" / "data" / "val.json").mkdir(parents=True)  # refused before the data and the model load
    code = main(
        ["finetune", "instruct", "--model", str(toy.base), "--data", str(bad), "--out", str(tmp_path / "m")]
    )
    assert (
        code == 2 and "m/data/val.json is a directory, where the run writes a file" in capsys.readouterr().err
    )


def test_mask_prompt_with_prompts_that_fill_the_context_is_an_error(toy, tmp_path):
    with pytest.raises(
        ScratchLLMError, match="no training example has a response token within the context of 8"
    ):
        finetune_instruct(_cfg(toy, tmp_path / "x", mask_prompt=True, context_length=8))


def test_a_byte_order_mark_is_not_part_of_the_json(tmp_path):
    records = [{"instruction": "a", "input": "", "output": "b"}]
    for name, body in (("bom.json", json.dumps(records)), ("bom.jsonl", json.dumps(records[0]))):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + body.encode())
        assert load_instruction_data(tmp_path / name) == records


@pytest.fixture
def unwritable(tmp_path):
    """A directory this process cannot create files in: read-only for a user; for root, who writes
    through file modes, a pseudo-filesystem."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        for place in (folder, Path("/sys")):
            try:
                with tempfile.TemporaryFile(dir=place):
                    pass
            except OSError:
                yield place
                return
        pytest.skip("no directory here that this user cannot write")
    finally:
        folder.chmod(0o755)


def test_respond_checks_its_output_file_before_loading_the_model(
    toy, tmp_path, unwritable, monkeypatch, capsys
):
    import scratchllm.finetune.respond

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before --out was checked")

    monkeypatch.setattr(scratchllm.finetune.respond, "load_model", no_load)
    questions = _questions(tmp_path)
    (tmp_path / "a-file").write_text("x")
    for out, message in [
        (
            unwritable / "responses.json",
            f"--out {unwritable / 'responses.json'}: cannot create a file in {unwritable}",
        ),
        (tmp_path, f"--out {tmp_path} is a directory"),
        (tmp_path / "a-file" / "responses.json", "is a file, not a directory"),
    ]:
        with pytest.raises(ScratchLLMError, match=re.escape(message)):
            respond(str(toy.base), questions, out, progress=False)
    code = main(
        [
            "respond",
            "--model",
            str(toy.base),
            "--data",
            str(questions),
            "--out",
            str(unwritable / "responses.json"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "choose a writable location" in err


# ----------------------------------------------------------------------------------------------
# the command table (scratchllm/cli.py): respond's settings, finetune instruct's new names


def respond_settings_of(argv: list[str], config: str | None = None) -> RespondSettings:
    args = table.build_parser(table.COMMANDS["respond"]).parse_args(["respond", *argv])
    return load_config(RespondSettings, config, overrides_from_args(args))


def test_respond_flags_become_settings(tmp_path):
    required = ["--model", "m", "--data", "d.json", "--out", "o.json"]
    s = respond_settings_of(required)
    assert (s.model, s.data, s.out, s.template, s.batch_size, s.quiet) == (
        "m",
        "d.json",
        "o.json",
        None,
        8,
        False,
    )
    assert s.sampling == GenerationConfig(max_new_tokens=256) and s.runtime == RuntimeSettings()
    s = respond_settings_of(
        [
            *required,
            "--template",
            "phi3",
            "--max-new-tokens",
            "7",
            "--batch-size",
            "3",
            "--temperature",
            "0.8",
            "--top-k",
            "5",
            "--top-p",
            "0.9",
            "--seed",
            "2",
            "--repetition-penalty",
            "1.2",
            "--presence-penalty",
            "0.5",
            "--frequency-penalty",
            "0.25",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--quantize",
            "int4",
            "--quiet",
        ]
    )
    assert s.sampling == GenerationConfig(
        max_new_tokens=7,
        temperature=0.8,
        top_k=5,
        top_p=0.9,
        seed=2,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=0.25,
    )
    assert s.runtime == RuntimeSettings(device="cpu", dtype="fp32", quantize="int4")
    assert (s.template, s.batch_size, s.quiet) == ("phi3", 3, True)
    parser = table.build_parser(table.COMMANDS["respond"])
    for flag in ("--stop", "--compile", "--ignore-eos"):  # respond never took these
        with pytest.raises(SystemExit):
            parser.parse_args(["respond", *required, flag, "x"])
    toml = tmp_path / "respond.toml"
    toml.write_text("[sampling]\ntemperature = 0.5\n[generation]\nbatch_size = 2\n")
    s = respond_settings_of([*required, "--batch-size", "4"], str(toml))
    assert (s.sampling.temperature, s.batch_size) == (0.5, 4)  # the flag wins over the file


def test_respond_through_the_command_table_answers_as_the_api_does(trained, tmp_path, capsys, monkeypatch):
    result, _ = trained
    model, questions = str(result.out_dir / "model"), _questions(tmp_path)
    expected = respond(model, questions, None, batch_size=5, progress=False)
    out = tmp_path / "r.jsonl"
    argv = ["respond", "--model", model, "--data", str(questions), "--out", str(out), "--device", "cpu"]
    assert table.main([*argv, "--batch-size", "5", "--dtype", "fp32"]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == expected
    assert f"{len(RECORDS)} responses" in capsys.readouterr().out  # the summary, without --quiet
    sampled = respond(
        model, questions, None, config=GenerationConfig(temperature=1.0, seed=3), progress=False
    )
    assert table.main([*argv, "--temperature", "1", "--seed", "3", "--quiet"]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == sampled
    assert capsys.readouterr().out == ""
    import scratchllm.finetune.respond as module

    monkeypatch.setattr(module, "load_model", lambda *a, **kw: pytest.fail("the model loaded"))
    assert table.main([*argv, "--repetition-penalty", "0"]) == 2  # checked before the model loads
    assert "repetition_penalty must be a number > 0" in capsys.readouterr().err


def test_finetune_instruct_through_the_command_table(toy, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "instruct", "--model", str(toy.base), "--data", str(toy.data), "--out", str(out)]
    fast = [
        "--val-fraction",
        "0.25",
        "--max-steps",
        "2",
        "--device",
        "cpu",
        "--progress",
        "false",
        "--sample-tokens",
        "0",
    ]
    assert table.main([*argv, *fast]) == 0
    assert f"next: {scratchllm_command()} respond --model {out / 'model'}" in capsys.readouterr().out
    assert table.main(["finetune", "instruct", "--out", str(out), "--resume", "--max-steps", "3"]) == 0
    assert f"resuming with the settings of {out / 'config.toml'}" in capsys.readouterr().out


def test_the_old_name_instruct_finetune_warns_and_runs_finetune_instruct(monkeypatch):
    import scratchllm.finetune.instruct as module

    seen = []
    monkeypatch.setattr(module, "finetune_instruct", lambda *a: seen.append(a) or "result")
    cfg = InstructConfig()
    with pytest.warns(FutureWarning, match="instruct_finetune is now finetune_instruct"):
        assert module.instruct_finetune(cfg, "latest") == "result"
    assert seen == [(cfg, "latest", None)]
