"""Model directories: round trips, atomic writes, and a clear error for every way a directory can be
broken."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from scratchllm import checkpoint
from scratchllm.checkpoint import (
    WEIGHTS_FILE,
    load_model,
    load_state_dict_strict,
    read_config,
    save_model,
)
from scratchllm.cli import main
from scratchllm.cli import main as table_main
from scratchllm.config import load_config
from scratchllm.errors import ScratchLLMError
from scratchllm.fileio import CONFIG_FILE
from scratchllm.hub import info as hub_info
from scratchllm.hub import model_info
from scratchllm.model.gpt import GPTConfig, GPTModel
from scratchllm.model.registry import preset_names
from scratchllm.text.simple import SimpleTokenizer
from scratchllm.train.pretrain import PretrainConfig
from tests.conftest import exit_code

TINY = dict(vocab_size=60, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


def tiny_model(**overrides) -> GPTModel:
    model = GPTModel(GPTConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # norms and biases away from their 1/0 init, so a swap would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    """A saved tied model directory and its model."""
    model = tiny_model()
    return save_model(tmp_path / "model", model), model


def assert_same_model(a: GPTModel, b: GPTModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = torch.randint(0, a.cfg.vocab_size, (2, 9))
    assert torch.equal(a(x), b(x))


# ----------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(tie_weights=False), dict(qkv_bias=False), dict(n_classes=3), dict(drop_rate=0.1)],
    ids=["tied", "untied", "no-qkv-bias", "classifier", "dropout"],
)
def test_round_trip(tmp_path, overrides):
    model = tiny_model(**overrides)
    path = save_model(tmp_path / "m", model, extra={"labels": ["ham", "spam"], "template": "{x}"})
    loaded = load_model(path)
    assert loaded.path == path
    assert loaded.config == model.cfg
    assert loaded.extra == {"labels": ["ham", "spam"], "template": "{x}"}
    assert loaded.tokenizer is None
    assert not loaded.model.training
    assert loaded.model.weights_tied == model.weights_tied
    assert_same_model(loaded.model, model)
    assert all(p.requires_grad for p in loaded.model.parameters())  # ready to finetune


def test_directory_layout_is_readable(saved):
    path, model = saved
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    doc = json.loads((path / CONFIG_FILE).read_text())
    assert doc["format"] == "scratchllm-model" and doc["version"] == 1
    assert doc["model"] == model.cfg.to_dict()
    assert doc["extra"] == {}
    assert doc["info"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert doc["info"]["dtype"] == "float32"
    with safe_open(str(path / WEIGHTS_FILE), "pt") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    # the tied head is stored once, under the embedding's name
    assert "tok_emb.weight" in names and "out_head.weight" not in names
    assert len(names) == len(list(model.parameters()))
    # the parent holds nothing but the directory: no temporary leftovers
    assert [p.name for p in path.parent.iterdir()] == ["model"]


def test_tokenizer_is_saved_and_loaded(tmp_path):
    tok = SimpleTokenizer.from_corpus("the cat sat on the mat . a dog ran !")
    model = tiny_model()
    path = save_model(tmp_path / "m", model, tok)
    loaded = load_model(path)
    assert loaded.tokenizer is not None
    assert loaded.tokenizer.fingerprint() == tok.fingerprint()
    assert loaded.tokenizer.encode("the dog sat") == tok.encode("the dog sat")


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    tok = SimpleTokenizer.from_corpus(" ".join(f"w{i}" for i in range(100)))
    with pytest.raises(ScratchLLMError, match="102 ids but the model's vocab_size is 60"):
        save_model(tmp_path / "m", tiny_model(), tok)
    assert not (tmp_path / "m").exists()


def test_dtype_choices(tmp_path):
    model = tiny_model()
    path = save_model(tmp_path / "m", model)
    assert load_model(path).model.tok_emb.weight.dtype == torch.float32
    bf16 = load_model(path, dtype="bf16").model
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.weights_tied
    # a bf16 model stays bf16 by default, and loads as fp32 on request
    path16 = save_model(tmp_path / "m16", model.to(torch.bfloat16))
    assert json.loads((path16 / CONFIG_FILE).read_text())["info"]["dtype"] == "bfloat16"
    assert load_model(path16).model.tok_emb.weight.dtype == torch.bfloat16
    assert load_model(path16, dtype=torch.float32).model.tok_emb.weight.dtype == torch.float32
    with pytest.raises(ScratchLLMError, match="unknown dtype 'int3'"):
        load_model(path, dtype="int3")


def test_weights_of_mixed_or_integer_dtypes(saved):
    """A file that mixes float dtypes loads as the dtype most numbers have (a forward pass cannot mix
    them); an integer tensor is no model's weights: a one-line error, also from the CLI."""
    path, model = saved
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({**tensors, "final_norm.scale": tensors["final_norm.scale"].half()}, str(weights))
    loaded = load_model(path).model
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    x = torch.randint(0, 60, (2, 9))
    torch.testing.assert_close(loaded(x), model(x), atol=1e-2, rtol=0)  # the norm's scale rounded to fp16
    save_file({**tensors, "tok_emb.weight": tensors["tok_emb.weight"].long()}, str(weights))
    for dtype in (None, "fp32"):  # the CLI always gives one
        with pytest.raises(
            ScratchLLMError, match=r"tensor 'tok_emb.weight' holds int64 numbers, not floating"
        ):
            load_model(path, dtype=dtype)


def test_save_overwrites_atomically(tmp_path, monkeypatch):
    first = tiny_model()
    path = save_model(tmp_path / "m", first)
    save_model(path, tiny_model())  # a complete replacement works
    save_model(path, first)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(
        ScratchLLMError, match=r"cannot write the model directory .*m \(disk full; is the disk"
    ):
        save_model(path, tiny_model(n_layers=1))
    # the old directory is intact and nothing half-written is left beside it
    assert_same_model(load_model(path).model, first)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_save_refuses_a_model_that_does_not_match_its_config(tmp_path):
    # a classifier head swapped in without updating the config: load_model could not rebuild it
    model = tiny_model(tie_weights=False)
    model.out_head = torch.nn.Linear(32, 2)
    with pytest.raises(
        ScratchLLMError, match=r"out_head\.weight has shape \(2, 32\) but the model config needs \(60, 32\)"
    ):
        save_model(tmp_path / "m", model)
    model = tiny_model(tie_weights=True)
    model.out_head = torch.nn.Linear(32, 60, bias=False)  # untied by hand, config still says tied
    with pytest.raises(ScratchLLMError, match=r"unexpected out_head\.weight: the model ties it to tok_emb"):
        save_model(tmp_path / "m", model)
    assert not (tmp_path / "m").exists()


def test_save_unwraps_compiled_models(tmp_path):
    model = tiny_model()
    wrapped = torch.nn.Module()
    wrapped._orig_mod = model  # what torch.compile's wrapper holds
    assert_same_model(load_model(save_model(tmp_path / "m", wrapped)).model, model)


def test_extra_must_be_json(tmp_path):
    with pytest.raises(ScratchLLMError, match="JSON values"):
        save_model(tmp_path / "m", tiny_model(), extra={"f": object()})


def test_trainer_files_beside_the_model_are_ignored(saved):
    path, model = saved
    (path / "training_state.json").write_text("{}")
    save_file({"step": torch.tensor(3)}, str(path / "optimizer.safetensors"))
    assert_same_model(load_model(path).model, model)


# ----------------------------------------------------------------------------------------------
# Broken directories: each a ScratchLLMError that names the problem


def rewrite_weights(path, change) -> None:
    tensors = load_file(str(path / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})


def rewrite_config(path, change) -> None:
    doc = json.loads((path / CONFIG_FILE).read_text())
    change(doc)
    (path / CONFIG_FILE).write_text(json.dumps(doc))


def test_missing_directory(tmp_path):
    with pytest.raises(ScratchLLMError, match=r"model '.*nowhere' not found: give a model directory"):
        load_model(tmp_path / "nowhere")


def test_a_file_is_not_a_model(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ScratchLLMError, match="is a file"):
        load_model(tmp_path / "f.txt")


def test_missing_config(saved):
    path, _ = saved
    (path / CONFIG_FILE).unlink()
    with pytest.raises(ScratchLLMError, match=r"not a model directory: config\.json is missing.*--from DIR"):
        load_model(path)


def test_hugging_face_directory_gets_a_hint(saved):
    path, _ = saved
    (path / CONFIG_FILE).write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
    with pytest.raises(ScratchLLMError, match=r"not a scratchllm model config.*download gpt2 --from DIR"):
        load_model(path)


def test_a_run_directory_points_to_its_model(saved, tmp_path):
    path, _ = saved
    run = tmp_path / "run"
    run.mkdir()
    path.rename(run / "model")
    with pytest.raises(ScratchLLMError, match=r"looks like a training run: its final model is .*run/model"):
        load_model(run)


def test_config_not_json(saved):
    path, _ = saved
    (path / CONFIG_FILE).write_text('{"format": "scratchllm-model", ')
    with pytest.raises(ScratchLLMError, match=r"config\.json: not valid JSON"):
        load_model(path)


def test_config_from_a_newer_version(saved):
    path, _ = saved
    rewrite_config(path, lambda d: d.update(version=2))
    with pytest.raises(ScratchLLMError, match="format version 2 is not supported"):
        load_model(path)


def test_unknown_config_keys(saved):
    path, _ = saved
    rewrite_config(path, lambda d: d.update(adapters={}))
    with pytest.raises(ScratchLLMError, match=r"config.json: unknown keys \['adapters'\]"):
        load_model(path)
    rewrite_config(path, lambda d: (d.pop("adapters"), d["model"].update(n_experts=8)))
    with pytest.raises(ScratchLLMError, match=r"config.json: model config: unknown keys \['n_experts'\]"):
        load_model(path)


def test_bad_config_value(saved):
    path, _ = saved
    rewrite_config(path, lambda d: d["model"].update(n_heads=5))
    with pytest.raises(ScratchLLMError, match=r"config.json: model config: emb_dim \(32\) must be divisible"):
        load_model(path)


def test_missing_weights_file(saved):
    path, _ = saved
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(ScratchLLMError, match=r"model\.safetensors is missing"):
        load_model(path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 10, 0], ids=["half", "last-byte", "header", "empty"])
def test_truncated_weights(saved, keep):
    path, _ = saved
    data = (path / WEIGHTS_FILE).read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    (path / WEIGHTS_FILE).write_bytes(data[:n])
    with pytest.raises(
        ScratchLLMError, match=r"model\.safetensors: not a readable safetensors file, probably truncated"
    ):
        load_model(path)


def test_corrupt_weights(saved):
    path, _ = saved
    (path / WEIGHTS_FILE).write_bytes(b"\x00" * 8 + b"this is not a safetensors header" * 10)
    with pytest.raises(ScratchLLMError, match="probably truncated or corrupt"):
        load_model(path)


def test_missing_tensor(saved):
    path, _ = saved
    rewrite_weights(path, lambda t: t.pop("trf_blocks.1.att.qkv.bias"))
    with pytest.raises(
        ScratchLLMError, match=r"missing tensor trf_blocks\.1\.att\.qkv\.bias \(shape \(96,\)\)"
    ):
        load_model(path)


def test_unexpected_tensor(saved):
    path, _ = saved
    rewrite_weights(path, lambda t: t.update({"trf_blocks.0.att.lora_A": torch.zeros(4, 32)}))
    with pytest.raises(ScratchLLMError, match=r"unexpected tensor trf_blocks\.0\.att\.lora_A"):
        load_model(path)


def test_wrong_shape_names_tensor_and_both_shapes(saved):
    path, _ = saved
    rewrite_weights(path, lambda t: t.update({"trf_blocks.0.ff.layers.0.weight": torch.zeros(100, 32)}))
    with pytest.raises(
        ScratchLLMError,
        match=r"tensor trf_blocks\.0\.ff\.layers\.0\.weight has shape \(100, 32\) but the model config needs "
        r"\(128, 32\)",
    ):
        load_model(path)


def test_config_and_weights_disagree(saved):
    path, _ = saved
    rewrite_config(path, lambda d: d["model"].update(n_layers=3))
    with pytest.raises(
        ScratchLLMError, match=r"do not match the model config: missing tensors trf_blocks\.2\."
    ):
        load_model(path)
    rewrite_config(path, lambda d: d["model"].update(n_layers=2, vocab_size=70))
    with pytest.raises(
        ScratchLLMError, match=r"tok_emb\.weight has shape \(60, 32\) but the model config needs \(70, 32\)"
    ):
        load_model(path)


def test_tied_config_with_separate_head(tmp_path):
    path = save_model(tmp_path / "m", tiny_model(tie_weights=False))
    rewrite_config(path, lambda d: d["model"].update(tie_weights=True))
    with pytest.raises(
        ScratchLLMError, match=r"unexpected out_head\.weight: the model ties it to tok_emb\.weight"
    ):
        load_model(path)
    rewrite_config(path, lambda d: d["model"].update(tie_weights=False))
    load_model(path)
    path = save_model(tmp_path / "t", tiny_model(tie_weights=True))
    rewrite_config(path, lambda d: d["model"].update(tie_weights=False))
    with pytest.raises(ScratchLLMError, match=r"missing tensor out_head\.weight \(shape \(60, 32\)\)"):
        load_model(path)


def test_loading_never_unpickles(saved, monkeypatch):
    path, model = saved

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    assert_same_model(load_model(path).model, model)


# ----------------------------------------------------------------------------------------------
# load_state_dict_strict, the helper finetuning and LoRA build on


def test_strict_load_swapping_the_head():
    lm = tiny_model()
    clf = GPTModel(GPTConfig(**TINY, n_classes=2))
    new_head = clf.out_head.weight.detach().clone()
    with pytest.raises(
        ScratchLLMError, match=r"tensor out_head\.weight has shape \(60, 32\).*needs \(2, 32\)"
    ):
        load_state_dict_strict(clf, lm.state_dict(), source="gpt2")
    body = {k: v for k, v in lm.state_dict().items() if not k.startswith("out_head.")}
    load_state_dict_strict(clf, body, source="gpt2", allow_missing=["out_head.*"])
    assert torch.equal(clf.tok_emb.weight, lm.tok_emb.weight)
    assert torch.equal(clf.out_head.weight, new_head)  # left as it was


def test_strict_load_keeps_tying_and_allows_extra_names():
    src = tiny_model()
    dst = GPTModel(GPTConfig(**TINY))
    sd = {**src.state_dict(), "lora.extra": torch.zeros(1)}  # out_head.weight is in it too, tied
    with pytest.raises(ScratchLLMError, match=r"unexpected tensor lora\.extra"):
        load_state_dict_strict(dst, sd)
    load_state_dict_strict(dst, sd, allow_unexpected=["lora.*"])
    assert dst.weights_tied
    assert_same_model(dst, src)


def test_meta_model_left_incomplete_is_an_error():
    model = checkpoint.meta_model(GPTConfig(**TINY))
    sd = {k: v for k, v in tiny_model().state_dict().items() if k != "pos_emb.weight"}
    with pytest.raises(ScratchLLMError, match=r"pos_emb\.weight: they are still uninitialized"):
        load_state_dict_strict(model, sd, allow_missing=["pos_emb.*"], assign=True)


# ----------------------------------------------------------------------------------------------
# scratchllm info


def test_info_numbers_for_a_model_dir(saved):
    path, model = saved
    info = model_info(model=path)
    n = sum(p.numel() for p in model.parameters())
    assert info["source"] == str(path)
    assert info["parameters"] == info["parameters_tied"] == n
    assert info["parameters_untied"] == n + 60 * 32
    assert info["bytes_fp32"] == 4 * n and info["bytes_bf16"] == 2 * n
    assert read_config(path)[0].to_dict() == info["config"]


def test_info_for_untied_and_classifier_models(tmp_path):
    untied = model_info(model=save_model(tmp_path / "u", tiny_model(tie_weights=False)))
    assert untied["parameters"] == untied["parameters_untied"] == untied["parameters_tied"] + 60 * 32
    clf = model_info(model=save_model(tmp_path / "c", tiny_model(n_classes=2)))
    assert clf["parameters"] == clf["parameters_tied"] == clf["parameters_untied"]


@pytest.mark.parametrize(
    ("preset", "tied", "untied", "mb32", "mb16"),
    [
        ("gpt2-small", "124,439,808", "163,037,184", "497.8 MB", "248.9 MB"),
        ("gpt2-medium", "354,823,168", "406,286,336", "1,419.3 MB", "709.6 MB"),
        ("gpt2-large", "774,030,080", "838,359,040", "3,096.1 MB", "1,548.1 MB"),
        ("gpt2-xl", "1,557,611,200", "1,638,022,400", "6,230.4 MB", "3,115.2 MB"),
    ],
)
def test_info_cli_for_gpt2_presets(capsys, preset, tied, untied, mb32, mb16):
    assert main(["info", "--preset", preset]) == 0
    out = capsys.readouterr().out
    assert f"parameters       {tied}" in out
    assert f"without tying    {untied}" in out
    assert f"{mb32} at fp32, {mb16} at bf16" in out
    assert "forward FLOPs" in out and "context length   1,024 tokens" in out and "50,257 tokens" in out


def test_info_cli_json_and_hub_name_without_download(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLLM_HOME", str(tmp_path))
    assert main(["info", "--model", "gpt2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 124_439_808 and info["flops_per_token"] == 284_812_800
    assert "not downloaded" in info["source"]
    assert not (tmp_path / "models").exists()  # nothing was fetched


def test_info_cli_lists_the_presets(capsys):
    assert main(["info", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert list(rows) == preset_names()
    assert rows["gpt2-small"][1:8] == ["gpt2", "12", "12", "12", "768", "1024", "124.4M"]
    assert main(["info", "--list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpt2-xl"]["parameters"] == 1_557_611_200


def test_training_help_shows_the_defaults_that_apply(capsys):
    """`demo --help` shows the demo preset's values; a help text that says what an empty default
    means is not followed by a second, literal default."""

    demo = load_config(PretrainConfig, "demo")
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert (
        f"--max-steps INT optimizer steps (0: the task decides, e.g. from epochs) (default: {demo.max_steps})"
        in text
    )
    assert f"(default: {demo.out_dir!r})" in text and demo.out_dir != PretrainConfig().out_dir
    assert "(default: the preset's) (default:" not in text
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "tokens per training sequence (default: the preset's) --emb-dim" in text
    assert "(default: 'runs/run')" in text and "see `scratchllm info --list`" in text


def test_info_cli_errors(capsys, tmp_path):
    assert main(["info", "--preset", "gpt5"]) == 2
    assert "unknown model preset 'gpt5'" in capsys.readouterr().err
    assert main(["info", "--model", str(tmp_path / "none")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["info", "--model", str(tmp_path / "empty")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert exit_code(main, ["info"]) == 2  # neither --preset nor --model


def test_info_flags_become_settings(monkeypatch):
    seen = []
    monkeypatch.setattr(hub_info, "info_command", seen.append)
    for argv in (["--list"], ["--list", "--json"], ["--preset", "nano"], ["--model", "runs/m", "--json"]):
        assert table_main(["info", *argv]) == 0
    assert seen == [
        hub_info.InfoSettings(list_presets=True),
        hub_info.InfoSettings(list_presets=True, json=True),
        hub_info.InfoSettings(preset="nano"),
        hub_info.InfoSettings(model="runs/m", json=True),
    ]
    for argv in ([], ["--preset", "nano", "--model", "m"], ["--list", "--preset", "nano"]):
        assert exit_code(table_main, ["info", *argv]) == 2  # one of --list, --preset, --model


def test_info_through_the_table(capsys, saved):
    assert table_main(["info", "--preset", "gpt2-small"]) == 0
    assert "parameters       124,439,808" in capsys.readouterr().out
    assert table_main(["info", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == preset_names()
    assert table_main(["info", "--list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpt2-xl"]["parameters"] == 1_557_611_200
    path, model = saved
    assert table_main(["info", "--model", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == sum(p.numel() for p in model.parameters())
    assert table_main(["info", "--preset", "gpt5"]) == 2
    assert "unknown model preset 'gpt5'" in capsys.readouterr().err
    assert table_main(["info", "--list", "false"]) == 2  # given, yet nothing asked
    assert "required: --list or --preset or --model" in capsys.readouterr().err


def test_info_cli_process_exit_code(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "scratchllm", "info", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("scratchllm: error:") and r.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------------------
# A full disk while writing the weights


ENOSPC_MESSAGE = "Error while serializing: I/O error: No space left on device (os error 28)"


def fill_the_disk(monkeypatch, when=lambda path: True) -> None:
    """safetensors' save_file writes part of the file, then fails as it does on a full disk, for the
    paths `when` accepts."""

    def failing_save_file(tensors, filename, metadata=None):
        if not when(str(filename)):
            return save_file(tensors, filename, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # what the disk took before it was full
        raise SafetensorError(ENOSPC_MESSAGE)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)


def test_a_full_disk_while_writing_the_weights_keeps_the_old_directory(tmp_path, monkeypatch):
    first = tiny_model()
    path = save_model(tmp_path / "m", first, SimpleTokenizer.from_corpus("a b c"))
    fill_the_disk(monkeypatch)
    with pytest.raises(ScratchLLMError) as e:
        save_model(path, tiny_model(n_layers=1))
    message = str(e.value)
    assert message == (
        f"cannot write the model directory {path} ([Errno 28] No space left on device: 'model.safetensors'; "
        "is the disk full or read-only?); the model directory there is unchanged"
    )
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == 28
    assert_same_model(load_model(path).model, first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directory left beside it
    # a new directory is not created at all
    with pytest.raises(ScratchLLMError, match=r"No space left on device.*; nothing was written$"):
        save_model(tmp_path / "new", first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_write_weights_raises_only_failed_writes_as_os_errors(tmp_path, monkeypatch):
    def not_io(tensors, filename, metadata=None):
        raise SafetensorError("You are trying to save a non contiguous tensor")

    monkeypatch.setattr(safetensors.torch, "save_file", not_io)
    with pytest.raises(SafetensorError, match="non contiguous"):  # a bug, not the machine's state
        checkpoint.write_weights({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
    fill_the_disk(monkeypatch)
    with pytest.raises(OSError, match=r"\[Errno 28\] No space left on device: 'w.safetensors'"):
        checkpoint.write_weights({"a": torch.zeros(2)}, tmp_path / "w.safetensors")


def test_a_full_disk_during_training_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat and ran. " * 200, encoding="utf-8")
    out = tmp_path / "run"
    args = [
        "pretrain",
        "--corpus",
        str(corpus),
        "--tokenizer",
        "char",
        "--model",
        "nano",
        "--context-length",
        "16",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--checkpoint-every",
        "1",
        "--eval-every",
        "0",
        "--eval-batches",
        "1",
        "--warmup-steps",
        "1",
        "--sample-tokens",
        "0",
        "--progress",
        "false",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--out-dir",
        str(out),
    ]
    # the second checkpoint's weights do not fit: the first one stays the run's last
    fill_the_disk(monkeypatch, when=lambda path: ".step-000002." in path)
    assert main(args) == 2
    err = capsys.readouterr().err
    step1 = out / "checkpoints" / "step-000001"
    assert err == (
        f"scratchllm: error: cannot write the checkpoint {out / 'checkpoints' / 'step-000002'} ([Errno 28] "
        "No space left on device: 'model.safetensors'; is the disk full or read-only?); the last checkpoint "
        f"is {step1}\n"
    )
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    assert load_model(step1).config.n_layers > 0
    # the final model directory: the checkpoints fit, the model does not; nothing half-written is left
    fill_the_disk(monkeypatch, when=lambda path: str(out / ".model.") in path)
    assert main([*args, "--overwrite", "true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"scratchllm: error: cannot write the model directory {out / 'model'} ([Errno 28]")
    assert err.endswith("; nothing was written\n") and err.count("\n") == 1
    assert not (out / "model").exists() and not [p for p in out.iterdir() if p.name.startswith(".model")]


# ----------------------------------------------------------------------------------------------
# Weights that are not numbers


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_with_nan_or_infinity_are_refused_naming_the_tensor(tmp_path, bad):
    path = save_model(tmp_path / "m", tiny_model(), SimpleTokenizer.from_corpus("a b c"))
    rewrite_weights(
        path,
        lambda t: t["trf_blocks.1.ff.layers.0.weight"].view(-1).index_fill_(0, torch.tensor([3, 7]), bad),
    )
    kind = "NaN" if bad != bad else "infinite"
    with pytest.raises(ScratchLLMError) as e:
        load_model(path)
    assert str(e.value) == (
        f"{path / WEIGHTS_FILE}: tensor 'trf_blocks.1.ff.layers.0.weight' is not finite: 2 {kind} of its "
        "4,096 values, so every output would be NaN; the model is broken (a diverged training run?): use an "
        "earlier checkpoint, or save or download the model again"
    )


def test_non_finite_weights_exit_2_from_generate_and_evaluate(tmp_path, capsys):
    path = save_model(tmp_path / "m", tiny_model(), SimpleTokenizer.from_corpus("a b c"))
    rewrite_weights(path, lambda t: t["final_norm.scale"].fill_(float("nan")))
    (tmp_path / "text.txt").write_text("a b c a b c a b c a b c a b c a b c a b c\n")
    for argv in (
        ["generate", "--model", str(path), "--prompt", "a", "--max-new-tokens", "2"],
        ["perplexity", "--model", str(path), "--corpus", str(tmp_path / "text.txt")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert (
            err.count("\n") == 1 and "tensor 'final_norm.scale' is not finite: 32 NaN of its 32 values" in err
        ), argv


def test_weights_beyond_float16_are_refused_when_loaded_as_fp16(tmp_path):
    path = save_model(tmp_path / "m", tiny_model())
    rewrite_weights(path, lambda t: t["pos_emb.weight"].view(-1)[0].fill_(1e6))
    with pytest.raises(
        ScratchLLMError, match=r"tensor 'pos_emb.weight' overflows float16: 1 infinite of its"
    ):
        load_model(path, dtype="fp16")
    assert load_model(path, dtype="bf16").model.pos_emb.weight.isfinite().all()  # bf16 has fp32's range
