"""Muon (train/muon.py): Newton-Schulz against an SVD and against torch's own Muon, the AdamW groups
against torch.optim.AdamW, the parameter split, and `--optimizer muon` in the trainer (learning, exact
resume, clear errors)."""

from __future__ import annotations

import json

import pytest
import torch

from scratchllm.errors import ScratchLLMError
from scratchllm.model.gpt import GPTModel, preset_config
from scratchllm.model.lora import apply_lora, mark_only_lora_trainable
from scratchllm.train.muon import Muon, muon_param_groups, muon_scale, newton_schulz
from scratchllm.train.optim import param_groups
from scratchllm.train.rundir import list_checkpoints
from scratchllm.train.trainer import Trainer
from scratchllm.train.trainer_config import TrainerConfig

from .test_trainer import VOCAB, _setup


def _torch_muon():
    """torch's own Muon (torch >= 2.9), or skip."""
    try:
        from torch.optim import _muon
    except ImportError:
        pytest.skip("this torch has no torch.optim.Muon (added in 2.9)")
    return _muon


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32), (3, 64, 24)])
def test_newton_schulz_orthogonalizes(shape):
    """The singular values of the result land near 1 (in about [0.7, 1.2]; exactly 1 is not the aim)
    and its singular vectors are the input's: it is close to U V^T, for tall, wide, square and batched."""
    torch.manual_seed(0)
    g = torch.randn(*shape, dtype=torch.float64)
    out = newton_schulz(g)
    assert out.shape == g.shape and out.dtype == g.dtype
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.6 and s.max() < 1.25
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    target = u @ vh
    cos = (out * target).sum((-2, -1)) / (out.norm(dim=(-2, -1)) * target.norm(dim=(-2, -1)))
    assert (cos > 0.97).all()
    if g.dim() == 3:  # a batch gives what each matrix gives alone
        for i in range(g.shape[0]):
            assert torch.allclose(out[i], newton_schulz(g[i]))


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (4, 24, 96), (20, 20)])
def test_gram_steps_are_the_same_steps(shape):
    """Newton-Schulz on the Gram matrix is the same map: equal in fp64 to rounding; in fp32 as close to
    the fp64 result as the plain steps (thanks to the restart); chosen by default in fp32 where it is
    cheaper, never in bf16."""
    torch.manual_seed(2)
    # like a momentum matrix: a few strong directions and a weak rest
    low = torch.randn(*shape[:-1], 4, dtype=torch.float64) @ torch.randn(
        *shape[:-2], 4, shape[-1], dtype=torch.float64
    )
    g = low + 0.05 * torch.randn(*shape, dtype=torch.float64)
    exact = newton_schulz(g, gram=False)
    assert torch.allclose(newton_schulz(g, gram=True), exact, atol=1e-12, rtol=0)
    g32 = g.float()
    assert (newton_schulz(g32, gram=True) - exact).abs().max() < 2e-5
    assert (newton_schulz(g32, gram=False) - exact).abs().max() < 2e-5
    wide = max(shape[-2:]) > 2 * min(shape[-2:])
    assert torch.equal(newton_schulz(g32), newton_schulz(g32, gram=wide))
    assert torch.equal(newton_schulz(g32.bfloat16()), newton_schulz(g32.bfloat16(), gram=False))
    # no steps: the normalized input, by either form
    assert torch.equal(newton_schulz(g32, steps=0, gram=True), newton_schulz(g32, steps=0, gram=False))


def test_newton_schulz_in_bfloat16_is_torchs():
    muon = _torch_muon()
    torch.manual_seed(1)
    for shape in [(96, 32), (32, 96)]:
        g = torch.randn(shape)
        ours = newton_schulz(g.bfloat16())
        coefficients = (muon.DEFAULT_A, muon.DEFAULT_B, muon.DEFAULT_C)
        theirs = muon._zeropower_via_newtonschulz(g, coefficients, 5, 1e-7)
        assert torch.equal(ours, theirs)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s)) for s in [(24, 8), (8, 24), (24, 8), (16, 16)]]


def _steps(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], n: int = 5) -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_steps_equal_torchs_muon(monkeypatch, nesterov):
    """Momentum, Nesterov, the 0.2 sqrt(max(m, n)) scale and decoupled weight decay as torch's Muon
    (`adjust_lr_fn="match_rms_adamw"`), given torch the same fp32 Newton-Schulz."""
    muon = _torch_muon()
    monkeypatch.setattr(
        muon, "_zeropower_via_newtonschulz", lambda g, coefficients, steps, eps: newton_schulz(g, steps, eps)
    )
    ours, theirs = _params(), _params()
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    _steps(Muon(ours, ns_dtype=torch.float32, **settings), ours)
    _steps(torch.optim.Muon(theirs, adjust_lr_fn="match_rms_adamw", **settings), theirs)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-6)
    assert muon_scale(torch.Size([24, 8])) == pytest.approx(0.2 * 24**0.5)


def test_muon_in_bfloat16_steps_like_torchs_own():
    """With Newton-Schulz in bf16 (what it uses on GPUs and bf16 CPUs) the steps are torch's Muon's
    as it ships (bf16 inside): bit for bit here, up to the rounding of batching the products elsewhere."""
    _torch_muon()
    ours, theirs = _params(), _params()
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.95)
    _steps(Muon(ours, ns_dtype=torch.bfloat16, **settings), ours)
    _steps(torch.optim.Muon(theirs, adjust_lr_fn="match_rms_adamw", **settings), theirs)
    for a, b in zip(ours, theirs):  # fp32 Newton-Schulz would part from torch's by far more than atol
        assert torch.allclose(a, b, atol=1e-5, rtol=0) and a.dtype == torch.float32


def test_adamw_groups_equal_torchs_adamw():
    """The groups marked `muon: False` take torch.optim.AdamW's steps, bias correction and decoupled
    weight decay included."""
    ours, theirs = _params(), _params()
    settings = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1)
    _steps(Muon([{"params": ours, "muon": False}], **settings), ours, n=8)
    _steps(torch.optim.AdamW(theirs, foreach=False, **settings), theirs, n=8)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPTModel(preset_config("nano", vocab_size=VOCAB))
    groups = muon_param_groups(model, param_groups(model, 0.1))
    hidden = {id(m.weight) for b in model.trf_blocks for m in b.modules() if isinstance(m, torch.nn.Linear)}
    assert [g["muon"] for g in groups] == [True, False, False]
    assert {id(p) for p in groups[0]["params"]} == hidden and len(hidden) == 4 * model.cfg.n_layers
    assert [id(p) for p in groups[1]["params"]] == [id(model.tok_emb.weight), id(model.pos_emb.weight)]
    assert groups[1]["weight_decay"] == 0.1 and groups[2]["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in groups[2]["params"])
    ids = [id(p) for g in groups for p in g["params"]]  # the tied head once
    assert len(ids) == len(set(ids)) and sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )
    apply_lora(model, rank=2, alpha=4)  # LoRA: the frozen base weights out, the adapters with AdamW
    mark_only_lora_trainable(model)
    groups = muon_param_groups(model, param_groups(model, 0.1))
    assert [g["muon"] for g in groups] == [False] and all(p.requires_grad for p in groups[0]["params"])
    with pytest.raises(ValueError, match="trf_blocks"):
        muon_param_groups(torch.nn.Linear(3, 3), param_groups(torch.nn.Linear(3, 3), 0.0))


def _losses(run) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_trainer_with_muon_learns_and_resumes_exactly(tmp_path):
    settings = dict(
        drop_rate=0.0, optimizer="muon", max_steps=40, eval_every=0, checkpoint_every=20, keep_last=5
    )
    model, task, cfg = _setup(tmp_path / "a", **settings)
    trainer = Trainer(model, task, cfg)
    assert isinstance(trainer.optimizer, Muon)
    trainer.fit()
    full = _losses(tmp_path / "a" / "run")
    assert full[-1] < full[0] - 1.0
    adamw_model, adamw_task, adamw_cfg = _setup(tmp_path / "b", drop_rate=0.0, max_steps=40, eval_every=0)
    Trainer(adamw_model, adamw_task, adamw_cfg).fit()
    assert _losses(tmp_path / "b" / "run") != full  # a different optimizer, not AdamW under another name

    first = list_checkpoints(tmp_path / "a" / "run")[0]
    assert first.name == "step-000020"
    model2, task2, cfg2 = _setup(tmp_path / "c", drop_rate=0.0, optimizer="muon", max_steps=40, eval_every=0)
    Trainer(model2, task2, cfg2).fit(resume=str(first))
    assert _losses(tmp_path / "c" / "run") == full[20:]  # momentum buffers and Adam moments restored exactly
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)

    model3, task3, cfg3 = _setup(tmp_path / "d", drop_rate=0.0, max_steps=40, eval_every=0)
    with pytest.raises(
        ScratchLLMError, match="written with --optimizer muon, this run has --optimizer adamw"
    ):
        Trainer(model3, task3, cfg3).fit(resume=str(first))


def test_muon_says_when_nothing_is_left_for_it(tmp_path):
    """LoRA (or frozen blocks) leave no block matrix to train: the run is AdamW's, and says so."""
    model, task, cfg = _setup(tmp_path, optimizer="muon", max_steps=2, eval_every=0)
    apply_lora(model, rank=2, alpha=4)
    mark_only_lora_trainable(model)
    logged: list[str] = []
    trainer = Trainer(model, task, cfg, log=logged.append)
    assert not any(g["muon"] for g in trainer.optimizer.param_groups)
    assert any("no matrix of the transformer blocks is trained here" in line for line in logged)


def test_muon_settings_are_checked():
    with pytest.raises(ScratchLLMError, match="optimizer must be one of adamw, muon, got 'sgd'"):
        TrainerConfig(optimizer="sgd").validate()
    with pytest.raises(ScratchLLMError, match=r"muon_momentum must be in \[0, 1\), got 1.0"):
        TrainerConfig(muon_momentum=1.0).validate()


def test_muon_with_fsdp_is_refused(tmp_path):
    model, task, cfg = _setup(tmp_path, optimizer="muon", fsdp=True)
    with pytest.raises(ScratchLLMError, match="--optimizer muon does not work with --fsdp"):
        Trainer(model, task, cfg)
