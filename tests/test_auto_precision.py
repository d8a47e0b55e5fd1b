"""Every path the `auto` precision choices can take, on every machine: the CPU's bf16 detection is forced
both ways (`auto_picks_bf16`), so an AVX2 machine runs the bf16 paths an AVX-512 BF16 one picks, and back."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

import scratchllm.train.muon as muon
import scratchllm.train.optim as optim
import scratchllm.train.trainer as trainer
from scratchllm.cli import main
from scratchllm.device import resolve_precision
from scratchllm.errors import ScratchLLMError
from scratchllm.generation import resolve_dtype
from scratchllm.model.gpt import GPTConfig, GPTModel, preset_config
from scratchllm.model.quantize import int4_supported
from scratchllm.text.bpe import BPETokenizer
from scratchllm.train.trainer_config import TrainerConfig

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A small model directory with a byte tokenizer, with sharp next-token distributions."""
    from scratchllm.checkpoint import save_model

    tok = BPETokenizer({bytes([b]): b for b in range(256)})
    cfg = GPTConfig(
        vocab_size=tok.vocab_size,
        context_length=256,
        emb_dim=64,
        n_heads=4,
        n_layers=2,
        drop_rate=0.0,
        qkv_bias=True,
    )
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(10)
    path = tmp_path_factory.mktemp("auto") / "m"
    save_model(path, model, tok)
    return path


def test_the_auto_choices_follow_the_detection(auto_picks_bf16):
    assert resolve_dtype("auto", CPU) == (torch.bfloat16 if auto_picks_bf16 else torch.float32)
    assert resolve_precision("auto", CPU) == ("bf16" if auto_picks_bf16 else "fp32")
    assert muon._fast_dtype(CPU, torch.float32) == (torch.bfloat16 if auto_picks_bf16 else torch.float32)


def test_a_bad_override_is_one_line(monkeypatch):
    monkeypatch.setenv("SCRATCHLLM_CPU_BF16", "yes")
    with pytest.raises(ScratchLLMError, match="SCRATCHLLM_CPU_BF16 must be 0 or 1"):
        resolve_precision("auto", CPU)


@pytest.mark.parametrize(
    "quantize",
    [
        [],
        pytest.param(
            ["--quantize", "int4"],
            marks=pytest.mark.skipif(not int4_supported(), reason="this PyTorch lacks the int4 CPU kernel"),
        ),
    ],
    ids=["dense", "int4"],
)
def test_generate_a_batch_down_every_auto_path(byte_model, auto_picks_bf16, quantize, capsys):
    """A batch of prompts of different lengths (left-padded, the last position sliced per row) with the
    `auto` dtype, as `generate`, `respond` and the server run it: the same text as the dtype named."""
    settings = shlex.split("--device cpu --prompt The --prompt 'A list of' --max-new-tokens 8 --quiet")
    args = ["generate", "--model", str(byte_model), *settings, *quantize]
    assert main([*args, "--dtype", "auto"]) == 0
    auto = capsys.readouterr().out
    assert main([*args, "--dtype", "bf16" if auto_picks_bf16 else "fp32"]) == 0
    assert capsys.readouterr().out == auto
    assert auto.count("\n") >= 2


def test_respond_with_int4_down_every_auto_path(byte_model, auto_picks_bf16, tmp_path):
    if not int4_supported():
        pytest.skip("this PyTorch lacks the int4 CPU kernel")
    data = tmp_path / "test.json"
    records = [
        {"instruction": "Name a color.", "input": "", "output": "Red."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    ]
    data.write_text(json.dumps(records))
    out = tmp_path / "r.json"
    settings = shlex.split("--max-new-tokens 4 --quiet --device cpu --quantize int4")
    code = main(["respond", "--model", str(byte_model), "--data", str(data), "--out", str(out), *settings])
    assert code == 0
    assert [r["instruction"] for r in json.loads(out.read_text())] == [r["instruction"] for r in records]


def test_evaluate_down_every_auto_path(byte_model, auto_picks_bf16, tmp_path, capsys):
    corpus = tmp_path / "text.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    losses = {}
    for precision in ("auto", "bf16" if auto_picks_bf16 else "fp32"):
        args = ["perplexity", "--model", str(byte_model), "--corpus", str(corpus), "--device", "cpu"]
        assert main([*args, "--precision", precision, "--json"]) == 0
        losses[precision] = json.loads(capsys.readouterr().out)["loss"]
    assert len(set(losses.values())) == 1


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_pretrain_down_every_auto_path(auto_picks_bf16, optimizer, tmp_path, monkeypatch):
    """`--precision auto` trains under bf16 autocast where the CPU is fast at it; Muon's Newton-Schulz
    products follow, except under `--precision fp32`, which keeps every product in fp32."""
    used, ns_dtypes = [], set()
    autocast, newton_schulz = trainer.autocast, muon.newton_schulz
    monkeypatch.setattr(trainer, "autocast", lambda device, p: used.append(p) or autocast(device, p))
    monkeypatch.setattr(muon, "newton_schulz", lambda g, *a: ns_dtypes.add(g.dtype) or newton_schulz(g, *a))
    corpus = tmp_path / "c.txt"
    corpus.write_text("one two three four five six seven eight " * 300)
    settings = shlex.split(
        "--vocab-size 300 --model nano --context-length 16 --max-steps 2 --eval-every 0 --batch-size 2 "
        "--progress false --sample-tokens 0 --device cpu --workers 1"
    )
    for precision in ("auto", "fp32"):
        out = tmp_path / precision
        choices = ["--precision", precision, "--optimizer", optimizer, "--out-dir", str(out)]
        code = main(["pretrain", "--corpus", str(corpus), *settings, *choices])
        assert code == 0
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["kind"] == "train")
        picked = "bf16" if auto_picks_bf16 and precision == "auto" else "fp32"
        assert set(used) == {picked}
        if optimizer == "muon":
            assert ns_dtypes == {torch.bfloat16 if picked == "bf16" else torch.float32}
        used.clear()
        ns_dtypes.clear()


def test_make_optimizer_keeps_muon_in_fp32_for_fp32_training(monkeypatch):
    monkeypatch.setenv("SCRATCHLLM_CPU_BF16", "1")
    model = GPTModel(preset_config("nano", vocab_size=64, context_length=16))
    cfg = TrainerConfig(optimizer="muon")
    assert optim.make_optimizer(model, cfg, CPU, "fp32").ns_dtype == torch.float32
    assert optim.make_optimizer(model, cfg, CPU, "bf16").ns_dtype is None  # bf16 where fast
