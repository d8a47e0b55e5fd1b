"""LoRA (model/lora.py): the book's layer, parameter counts, merging, freezing, and model directories."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchllm import checkpoint
from scratchllm.errors import ScratchLLMError
from scratchllm.model.gpt import GPTConfig, GPTModel
from scratchllm.model.lora import (
    DEFAULT_TARGETS,
    LinearWithLoRA,
    apply_lora,
    count_trainable,
    lora_config,
    lora_layers,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
)

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=3, drop_rate=0.0)


def tiny_model(**changes) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(GPTConfig(**{**TINY, **changes})).eval()


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    """A trained adapter: B != 0 (a fresh one has B = 0 and changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=g) * 0.05)


def tokens(batch: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, t), generator=torch.Generator().manual_seed(7))


def test_matches_the_books_linear_with_lora():
    from llms_from_scratch.appendix_e import LinearWithLoRA as BookLinearWithLoRA

    torch.manual_seed(0)
    linear = nn.Linear(12, 20)
    book = BookLinearWithLoRA(linear, rank=3, alpha=4.0)
    ours = LinearWithLoRA(linear, rank=3, alpha=4.0)
    with torch.no_grad():
        book.lora.B.normal_()
        ours.lora.A.copy_(book.lora.A)
        ours.lora.B.copy_(book.lora.B)
    x = torch.randn(5, 7, 12)
    torch.testing.assert_close(ours(x), book(x), rtol=0, atol=1e-6)
    assert ours.weight is linear.weight and ours.bias is linear.bias  # the original tensors, shared


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_adds_exactly_rank_times_in_plus_out_per_layer(rank):
    model = tiny_model()
    before = sum(p.numel() for p in model.parameters())
    d = TINY["emb_dim"]
    # per block: qkv (d -> 3d), out_proj (d -> d), ff.layers.0 (d -> 4d), ff.layers.2 (4d -> d)
    expected = TINY["n_layers"] * rank * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    added = apply_lora(model, rank=rank, alpha=2 * rank)
    assert added == expected
    assert sum(p.numel() for p in model.parameters()) - before == expected
    mark_only_lora_trainable(model)
    assert count_trainable(model) == expected
    assert len(lora_layers(model)) == 4 * TINY["n_layers"]


def test_targets_by_name_ending_or_full_name_and_the_head():
    model = tiny_model(n_classes=3)
    added = apply_lora(model, rank=2, alpha=1, targets=("trf_blocks.1.att.qkv", "out_head"))
    assert sorted(lora_layers(model)) == ["out_head", "trf_blocks.1.att.qkv"]
    d = TINY["emb_dim"]
    assert added == 2 * (d + 3 * d) + 2 * (d + 3)


def test_fresh_adapters_change_nothing_and_state_dict_names_are_kept():
    model = tiny_model()
    names = set(model.state_dict())
    x = tokens()
    ref = model(x)
    apply_lora(model, rank=4, alpha=8)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    new = set(model.state_dict())
    assert names <= new
    assert {n for n in new - names} == set(lora_state_dict(model))
    assert all(n.endswith((".lora.A", ".lora.B")) for n in lora_state_dict(model))


def test_merged_outputs_equal_unmerged():
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8)
    randomize_b(model)
    x = tokens()
    unmerged = model(x)
    assert merge_lora(model) == 4 * TINY["n_layers"]
    assert not lora_layers(model) and all(
        type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear)
    )
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)
    # the merged model is a plain GPTModel again: its state dict fits a fresh one exactly
    fresh = GPTModel(model.cfg)
    fresh.load_state_dict(model.state_dict(), strict=True)


@settings(max_examples=25, deadline=None)
@given(
    in_dim=st.integers(1, 24),
    out_dim=st.integers(1, 24),
    rank=st.integers(1, 6),
    alpha=st.floats(0.1, 32.0),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_merge_is_exact_for_any_layer(in_dim, out_dim, rank, alpha, bias, seed):
    torch.manual_seed(seed)
    layer = LinearWithLoRA(nn.Linear(in_dim, out_dim, bias=bias), rank, alpha)
    with torch.no_grad():
        layer.lora.B.normal_(std=0.1)
    x = torch.randn(3, in_dim)
    merged = layer.merged_linear()
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)


def test_mark_only_lora_trainable_keeps_named_modules():
    model = tiny_model(n_classes=2)
    apply_lora(model, rank=2, alpha=2)
    mark_only_lora_trainable(model, also=("out_head",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) | {"out_head.weight", "out_head.bias"}


def test_only_adapters_change_when_training():
    model = tiny_model()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=2, alpha=4)
    mark_only_lora_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = tokens()
    for _ in range(3):
        model(x[:, :-1]).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    state = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(state[k], v), k
    assert any(
        not torch.equal(lay.lora.B, torch.zeros_like(lay.lora.B)) for lay in lora_layers(model).values()
    )


def test_errors_are_clear():
    model = tiny_model()
    with pytest.raises(ScratchLLMError, match="match no linear layer"):
        apply_lora(model, rank=2, alpha=2, targets=("nothing",))
    with pytest.raises(ScratchLLMError, match="tied"):
        apply_lora(model, rank=2, alpha=2, targets=("out_head",))  # the LM head shares tok_emb.weight
    with pytest.raises(ScratchLLMError, match="rank must be >= 1"):
        apply_lora(model, rank=0, alpha=2)
    apply_lora(model, rank=2, alpha=2, targets=("qkv",))
    with pytest.raises(ScratchLLMError, match="already has an adapter"):
        apply_lora(model, rank=2, alpha=2, targets=("qkv",))


def test_model_directory_keeps_unmerged_adapters(tmp_path):
    model = tiny_model(n_classes=2)
    apply_lora(model, rank=3, alpha=6, targets=(*DEFAULT_TARGETS, "out_head"), dropout=0.1)
    randomize_b(model)
    path = checkpoint.save_model(tmp_path / "m", model)
    doc = json.loads((path / "config.json").read_text())
    assert doc["lora"] == {**lora_config(model), "alpha": 6.0}
    assert doc["lora"]["rank"] == 3 and "out_head" in doc["lora"]["layers"]

    loaded = checkpoint.load_model(path).model
    assert sorted(lora_layers(loaded)) == sorted(lora_layers(model))
    assert lora_layers(loaded)["out_head"].lora.dropout.p == 0.1
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = tokens()
    model.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    merge_lora(loaded)
    plain = checkpoint.save_model(tmp_path / "merged", loaded)
    assert "lora" not in json.loads((plain / "config.json").read_text())
    torch.testing.assert_close(checkpoint.load_model(plain).model(x), model(x), rtol=0, atol=1e-5)


def test_model_directory_with_a_bad_lora_section_is_refused(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=2, alpha=2, targets=("qkv",))
    path = checkpoint.save_model(tmp_path / "m", model)
    doc = json.loads((path / "config.json").read_text())
    doc["lora"]["layers"] = ["trf_blocks.0.att.nope"]
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ScratchLLMError, match=r"m/config.json: LoRA layers .* not linear layers"):
        checkpoint.load_model(path)
    doc["lora"] = {"rank": 0, "alpha": 2, "layers": ["trf_blocks.0.att.W_query"]}
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ScratchLLMError, match=r"m/config.json: the \"lora\" section needs .*rank 0"):
        checkpoint.load_model(path)
    doc["lora"] = {"rank": 2, "alpha": 2, "layers": ["trf_blocks.0.att.qkv"]}
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ScratchLLMError, match="unexpected"):  # adapters of 3 layers stored, 1 declared
        checkpoint.load_model(path)
