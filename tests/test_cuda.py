"""The GPU paths: training, generation, checkpoints and the CLI on CUDA. Skipped without a CUDA device
(as on CI); run on a GPU machine with `pytest tests/test_cuda.py`. The rest of the suite also runs there,
where `--device auto` picks the GPU."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch

from scratchllm.checkpoint import load_model, save_model
from scratchllm.cli import main
from scratchllm.generation import Engine, GenerationConfig
from scratchllm.model.gpt import GPTModel, preset_config
from scratchllm.text.bpe import BPETokenizer
from scratchllm.train.trainer import Trainer
from tests.conftest import has_fully_shard
from tests.train.test_trainer import VOCAB, _setup  # the same nano run, moved to the GPU

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _trainer(tmp_path, name: str = "run", **overrides) -> Trainer:
    """test_trainer's nano run moved to the GPU, with the default precision; it writes to
    tmp_path/name/run."""
    settings = dict(
        max_steps=40, eval_every=20, checkpoint_every=20, device="cuda", precision="auto", batch_size=8
    )
    model, task, cfg = _setup(tmp_path / name, drop_rate=0.0, **{**settings, **overrides})
    return Trainer(model, task, cfg)


def _losses(run) -> list[float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_training_on_cuda_defaults_to_bf16_and_fused_adamw_and_learns(tmp_path):
    trainer = _trainer(tmp_path)
    assert trainer.device.type == "cuda"
    assert trainer.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert trainer.optimizer.defaults.get("fused") is True
    trainer.fit()
    losses = _losses(tmp_path / "run" / "run")
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    # the saved weights are plain fp32 tensors that load on the CPU and give the GPU's logits
    on_cpu = load_model(tmp_path / "run" / "run" / "model", device="cpu").model.eval()
    x = torch.randint(0, VOCAB, (2, 32))
    trainer.model.eval()
    with torch.no_grad():
        gpu_logits = trainer.model(x.cuda()).float().cpu()
        torch.testing.assert_close(on_cpu(x), gpu_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_fp16_with_grad_scaling_and_fp32_train_on_cuda(tmp_path, precision):
    trainer = _trainer(tmp_path, precision=precision, max_steps=30, eval_every=0, checkpoint_every=0)
    assert (trainer.scaler is not None) == (precision == "fp16")
    trainer.fit()
    losses = _losses(tmp_path / "run" / "run")
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_resume_on_cuda_continues_the_same_run(tmp_path):
    """Bitwise equality is promised on CPU; on a GPU, atomics in some backward kernels may reorder
    sums, so the resumed losses must match closely, not bit for bit."""
    _trainer(tmp_path, "full", precision="fp32").fit()
    _trainer(tmp_path, "resumed", precision="fp32").fit(
        str(tmp_path / "full" / "run" / "checkpoints" / "step-000020")
    )
    full, resumed = _losses(tmp_path / "full" / "run"), _losses(tmp_path / "resumed" / "run")
    assert len(full) == 40 and len(resumed) == 20
    np.testing.assert_allclose(resumed, full[20:], rtol=1e-4, atol=1e-4)


def test_the_same_weights_give_the_same_logits_on_cpu_and_cuda():
    model = GPTModel(preset_config("nano", vocab_size=300, context_length=64, drop_rate=0.0)).eval()
    x = torch.randint(0, 300, (3, 64))
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


def test_generation_on_cuda_cached_equals_uncached_and_batched_equals_single():
    torch.manual_seed(0)
    model = GPTModel(preset_config("nano", vocab_size=300, context_length=48, drop_rate=0.0)).cuda()
    engine = Engine(model)
    assert engine.kernels is None  # oneDNN packing is a CPU path
    prompts = [[5, 6, 7, 8, 9, 10, 11], [42], [1, 2, 3]]
    greedy = GenerationConfig(max_new_tokens=60, ignore_eos=True)  # runs past the 48-token window
    cached = [c.token_ids for c in engine.generate(prompts, greedy)]
    uncached = [c.token_ids for c in engine.generate(prompts, greedy.replace(use_cache=False))]
    single = [engine.generate([p], greedy)[0].token_ids for p in prompts]
    assert cached == uncached == single
    # a seed reproduces samples; top-k 1 is greedy
    sample = GenerationConfig(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    assert engine.generate(prompts, sample)[0].token_ids == engine.generate(prompts, sample)[0].token_ids
    topk1 = GenerationConfig(max_new_tokens=20, temperature=1.0, top_k=1, seed=3, ignore_eos=True)
    assert engine.generate(prompts[:1], topk1)[0].token_ids == cached[0][:20]


def test_compiled_decoding_with_cuda_graphs_equals_eager():
    torch.manual_seed(0)
    model = GPTModel(preset_config("mini", vocab_size=300, context_length=64, drop_rate=0.0)).cuda()
    with torch.no_grad():
        model.tok_emb.weight.mul_(10)  # sharper distributions: no near-ties between fp32 paths
    prompts = [[5, 6, 7, 8, 9, 10, 11], [42], [1, 2, 3]]
    greedy = GenerationConfig(max_new_tokens=80, ignore_eos=True)  # past the 64-token window
    eager, compiled = Engine(model), Engine(model, compile=True)
    expected = [c.token_ids for c in eager.generate(prompts, greedy)]
    assert [c.token_ids for c in compiled.generate(prompts, greedy)] == expected  # compiles and records
    assert [c.token_ids for c in compiled.generate(prompts, greedy)] == expected  # replays
    sample = GenerationConfig(max_new_tokens=40, temperature=1.0, top_k=50, seed=7, ignore_eos=True)
    assert compiled.generate(prompts, sample) == eager.generate(prompts, sample)
    [alone] = compiled.generate(prompts[:1], greedy)  # another batch size
    assert alone.token_ids == expected[0]


def test_cli_pretrain_generate_and_evaluate_on_cuda(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "the", "cat", "sat", "on", "mat"]
    rng = np.random.default_rng(0)
    for i in range(8):
        (corpus / f"d{i}.txt").write_text(
            " ".join(words[j] for j in rng.integers(0, 9, 800)), encoding="utf-8"
        )
    out = tmp_path / "run"
    settings = shlex.split(
        "--vocab-size 280 --model nano --context-length 32 --batch-size 8 --max-steps 30 --eval-every 15 "
        "--progress false --sample-tokens 8 --workers 1"
    )
    assert main(["pretrain", "--corpus", str(corpus), *settings, "--out-dir", str(out)]) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["kind"] == "eval" and np.isfinite(record["val_loss"])
    capsys.readouterr()
    generate = shlex.split("generate --prompt 'the cat' --max-new-tokens 10 --device cuda --quiet")
    assert main([*generate, "--model", str(out / "model")]) == 0
    assert capsys.readouterr().out.endswith("\n")
    perplexity = ["perplexity", "--model", str(out / "model"), "--corpus", str(corpus / "d0.txt")]
    assert main([*perplexity, "--device", "cuda", "--json"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["loss"])


def test_bf16_model_directory_loads_on_cuda_and_generates(tmp_path):
    tok = BPETokenizer({bytes([b]): b for b in range(256)})
    model = GPTModel(preset_config("nano", vocab_size=tok.vocab_size, context_length=32, drop_rate=0.0))
    save_model(tmp_path / "m", model, tok)
    engine = Engine.load(str(tmp_path / "m"), device="cuda", dtype="bf16")
    assert engine.model.tok_emb.weight.dtype == torch.bfloat16 and engine.model.tok_emb.weight.is_cuda
    text = engine.generate("Hello", max_new_tokens=8)[0]
    assert len(text.token_ids) == 8


@pytest.mark.parametrize(
    "mode",
    [
        "ddp",
        pytest.param(
            "fsdp", marks=pytest.mark.skipif(not has_fully_shard(), reason="--fsdp needs torch >= 2.6")
        ),
    ],
)
def test_torchrun_on_cuda(tmp_path, mode):
    """Two processes: with two GPUs, nccl + DDP/FSDP2 follow the plain run with the same global batch;
    with one GPU, the second rank has no device and the run stops with a clear message."""
    import subprocess
    import sys

    corpus = tmp_path / "corpus.txt"
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    rng = np.random.default_rng(1)
    corpus.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 20_000)), encoding="utf-8")

    settings = shlex.split(
        "--vocab-size 270 --model nano --context-length 32 --max-steps 12 --eval-every 6 --eval-batches 2 "
        "--drop-rate 0 --progress false --sample-tokens 0 --warmup-steps 2 --workers 1 --device cuda "
        "--precision fp32"
    )

    def args(out, batch):
        paths = ["--corpus", str(corpus), "--out-dir", str(out)]
        return ["pretrain", *paths, *settings, "--batch-size", str(batch)]

    extra = ["--fsdp", "true"] if mode == "fsdp" else []
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, "-m", "scratchllm", *args(tmp_path / mode, 4), *extra]
    launched = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if torch.cuda.device_count() < 2:
        assert launched.returncode != 0 and "local rank 1 has no GPU" in launched.stderr
        return
    assert launched.returncode == 0, launched.stderr[-3000:]
    command = [sys.executable, "-m", "scratchllm", *args(tmp_path / "plain", 8)]
    plain = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    np.testing.assert_allclose(_losses(tmp_path / mode), _losses(tmp_path / "plain"), rtol=1e-4, atol=1e-4)
