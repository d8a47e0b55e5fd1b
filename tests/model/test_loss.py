"""The fused, chunked head + cross-entropy against PyTorch's own `F.cross_entropy` of the logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from scratchllm.model import loss as loss_module
from scratchllm.model.gpt import GPTConfig, GPTModel
from scratchllm.model.loss import chunk_rows_for, linear_cross_entropy


def _reference(h, w, t, ignore_index=-100):
    return F.cross_entropy((h @ w.T).float().flatten(0, -2), t.flatten(), ignore_index=ignore_index)


@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_loss_and_gradients_equal_cross_entropy_of_the_logits(rows):
    torch.manual_seed(0)
    h = torch.randn(3, 50, 16, requires_grad=True)
    w = torch.randn(97, 16, requires_grad=True)
    t = torch.randint(0, 97, (3, 50))
    t[0, ::5] = -100  # ignored positions (padding, masked prompts)
    ref = _reference(h, w, t)
    gh, gw = torch.autograd.grad(ref * 2.5, (h, w))
    loss = linear_cross_entropy(h, w, t, chunk_rows=rows)
    dh, dw = torch.autograd.grad(loss * 2.5, (h, w))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(dh, gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dw, gw, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_matches_the_autocast_reference_within_bf16_tolerance():
    torch.manual_seed(1)
    h = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(300, 32, requires_grad=True)
    t = torch.randint(0, 300, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy((h @ w.T).float(), t)
        loss = linear_cross_entropy(h, w, t, chunk_rows=16)
    gh, gw = torch.autograd.grad(ref, (h, w))
    dh, dw = torch.autograd.grad(loss, (h, w))
    assert loss.dtype == torch.float32 and dh.dtype == h.dtype and dw.dtype == w.dtype
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3)
    torch.testing.assert_close(dh, gh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(dw, gw, rtol=2e-2, atol=2e-3)


def test_all_targets_ignored_is_nan_like_cross_entropy_and_no_grad_skips_gradients():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    t = torch.full((4,), -100)
    assert math.isnan(linear_cross_entropy(h, w, t).item()) and math.isnan(_reference(h, w, t).item())
    with torch.no_grad():
        t = torch.randint(0, 10, (4,))
        assert linear_cross_entropy(h, w, t).item() == pytest.approx(_reference(h, w, t).item(), rel=1e-6)


def test_model_targets_give_the_loss_of_its_logits_tied_or_not():
    for tie in (True, False):
        torch.manual_seed(2)
        model = GPTModel(
            GPTConfig(
                vocab_size=61,
                context_length=16,
                emb_dim=32,
                n_layers=2,
                n_heads=4,
                drop_rate=0.0,
                tie_weights=tie,
            )
        )
        x, y = torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16))
        ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        ref_grads = torch.autograd.grad(ref, list(model.parameters()))
        loss = model(x, targets=y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_chunk_sizes_fit_a_cpu_cache_and_fill_a_gpu():
    assert chunk_rows_for("cpu", 50257) == 128
    assert chunk_rows_for("cpu", 50257, grad=False) == 2048  # evaluation: no gradient buffer to bound
    assert chunk_rows_for("cuda", 50257) == 2048
    assert chunk_rows_for("cpu", 10**9) == 16  # never fewer rows than that, whatever the vocabulary
    h, w = torch.randn(300, 8, requires_grad=True), torch.randn(50257, 8, requires_grad=True)
    t = torch.randint(0, 50257, (300,))
    assert linear_cross_entropy(h, w, t).item() == pytest.approx(_reference(h, w, t).item(), rel=1e-6)


def test_under_torch_compile_the_model_takes_the_plain_loss(monkeypatch):
    """The compiler fuses the plain head + cross-entropy itself, better than it compiles the hand-fused
    loss's chunk loop; the model must pick the plain path while compiling, with the same loss."""

    torch.manual_seed(3)
    model = GPTModel(
        GPTConfig(vocab_size=61, context_length=16, emb_dim=32, n_layers=1, n_heads=4, drop_rate=0.0)
    )
    x, y = torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16))
    eager = model(x, targets=y)

    def fused_not_allowed(*args, **kwargs):
        raise AssertionError("the hand-fused loss ran while compiling")

    monkeypatch.setattr(loss_module, "linear_cross_entropy", fused_not_allowed)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert model(x, targets=y).item() == pytest.approx(eager.item(), rel=1e-6)
