"""GPTModel: presets and their known sizes, shapes, weight tying, and equality with the book's model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scratchllm.checkpoint import load_state_dict_strict, meta_model
from scratchllm.errors import ScratchLLMError
from scratchllm.model.gpt import (
    PRESETS,
    GPTConfig,
    GPTModel,
    count_parameters,
    flops_per_token,
    from_book_state_dict,
    model_size_bytes,
    preset_config,
)

TINY = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)

# (preset, parameters with the head tied, without tying): OpenAI's published sizes 124M/355M/774M/1558M,
# and the exact counts transformers' GPT2LMHeadModel reports for them
GPT2_SIZES = [
    ("gpt2-small", 124_439_808, 163_037_184),
    ("gpt2-medium", 354_823_168, 406_286_336),
    ("gpt2-large", 774_030_080, 838_359_040),
    ("gpt2-xl", 1_557_611_200, 1_638_022_400),
]


@pytest.mark.parametrize(("name", "tied", "untied"), GPT2_SIZES)
def test_gpt2_preset_parameter_counts(name, tied, untied):
    model = meta_model(preset_config(name))  # shapes only: no memory, instant
    assert count_parameters(model) == tied
    assert count_parameters(model, count_tied_twice=True) == untied
    assert (
        round(tied / 1e6) == {"gpt2-small": 124, "gpt2-medium": 355, "gpt2-large": 774, "gpt2-xl": 1558}[name]
    )
    assert model_size_bytes(model) == 4 * tied
    assert model_size_bytes(model, torch.bfloat16) == 2 * tied
    untied_model = meta_model(preset_config(name, tie_weights=False))
    assert count_parameters(untied_model) == untied


@pytest.mark.parametrize(("name", "tied", "untied"), GPT2_SIZES)
def test_flops_per_token_formula(name, tied, untied):
    # independent count: 2 FLOPs per multiply-add; per layer 4 d^2 (q, k, v, out) + 8 d^2 (MLP),
    # the head d * V, and attention's q.k and weights.v over the full context, 2 * T * d per layer
    cfg = preset_config(name)
    d, n, v, t = cfg.emb_dim, cfg.n_layers, cfg.vocab_size, cfg.context_length
    assert flops_per_token(cfg) == 2 * (n * 12 * d * d + d * v) + 2 * n * 2 * t * d
    # the usual estimate 2 N (N without the position embedding) plus attention, within 1%
    n_matmul = tied - t * d
    assert flops_per_token(cfg) == pytest.approx(2 * n_matmul + 4 * n * t * d, rel=0.01)
    assert flops_per_token(cfg, seq_len=1) < flops_per_token(cfg)


def test_gpt2_small_flops_value():
    assert flops_per_token(preset_config("gpt2-small")) == 284_812_800


def test_presets_and_aliases():
    for alias, name in [
        ("gpt2", "gpt2-small"),
        ("124M", "gpt2-small"),
        ("355M", "gpt2-medium"),
        ("774M", "gpt2-large"),
        ("1558M", "gpt2-xl"),
    ]:
        assert preset_config(alias) == preset_config(name)
    for name in ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        cfg = preset_config(name)
        assert (cfg.vocab_size, cfg.context_length, cfg.qkv_bias, cfg.tie_weights) == (
            50257,
            1024,
            True,
            True,
        )
    for name in PRESETS:
        cfg = preset_config(name)
        assert cfg.emb_dim % cfg.n_heads == 0
    assert preset_config("nano", n_layers=3).n_layers == 3
    with pytest.raises(ScratchLLMError, match="unknown model preset 'gpt5'"):
        preset_config("gpt5")


@pytest.mark.parametrize(
    "bad",
    [
        dict(emb_dim=30, n_heads=4),
        dict(n_layers=0),
        dict(drop_rate=1.0),
        dict(n_classes=-1),
        dict(emb_dim="big"),
        dict(n_layers=2.5),
        dict(qkv_bias="yes"),
        dict(drop_rate="0.1"),
        dict(vocab_size=True),
        dict(gelu="none"),
        dict(gelu=None),
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ScratchLLMError, match="model config"):
        GPTConfig(**{**TINY, **bad})


def test_model_takes_the_books_config_dict():
    book_style = {
        "vocab_size": 100,
        "context_length": 16,
        "emb_dim": 32,
        "n_heads": 4,
        "n_layers": 2,
        "drop_rate": 0.0,
        "qkv_bias": False,
    }
    model = GPTModel(book_style)
    assert model.cfg == GPTConfig(**book_style)

    assert GPTConfig(**{**TINY, "qkv_bias": np.bool_(True), "tie_weights": 0}).qkv_bias is True
    with pytest.raises(ScratchLLMError, match="GPTConfig or a dict"):
        GPTModel(["not", "a", "config"])


def test_config_dict_round_trip_and_unknown_key():
    cfg = GPTConfig(**TINY)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    exact = cfg.replace(gelu="exact")
    assert GPTConfig.from_dict(exact.to_dict()) == exact and exact != cfg
    # config.json files written before the setting existed load as GPT-2's tanh GELU
    assert GPTConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "gelu"}).gelu == "tanh"
    with pytest.raises(ScratchLLMError, match=r"unknown keys \['hidden'\]"):
        GPTConfig.from_dict({**cfg.to_dict(), "hidden": 3})
    # the GPT-2/HF spellings are the usual slip: the error names the key meant, for presets too
    with pytest.raises(ScratchLLMError, match=r"unknown keys \['n_head'\] \(did you mean n_heads\?\)"):
        preset_config("nano", n_head=3)
    with pytest.raises(
        ScratchLLMError, match=r"\['n_embd', 'n_positions'\] \(did you mean emb_dim, context_length\?\)"
    ):
        preset_config("nano", n_embd=64, n_positions=32)


def test_the_model_takes_a_batch_of_ids_and_says_so_otherwise():
    model = GPTModel(GPTConfig(**TINY)).eval()
    for bad, got in [
        (torch.tensor([1, 2, 3]), r"shape \(3,\)"),
        ([[1, 2, 3]], "list"),
        (torch.zeros(1, 2, 3), "shape"),
    ]:
        with pytest.raises(ScratchLLMError, match=f"token ids of shape \\(batch, T\\), got {got}"):
            model(bad)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 97)


def test_output_shapes():
    model = GPTModel(GPTConfig(**TINY)).eval()
    x = torch.randint(0, 97, (3, 10))
    assert model(x).shape == (3, 10, 97)
    assert model(x, return_hidden=True).shape == (3, 10, 32)
    clf = GPTModel(GPTConfig(**TINY, n_classes=2)).eval()
    assert clf(x).shape == (3, 10, 2)
    assert clf.out_head.bias is not None and not clf.weights_tied
    with pytest.raises(ValueError, match="exceeds the context length"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_weight_tying_shares_memory():
    model = GPTModel(GPTConfig(**TINY, tie_weights=True))
    assert model.weights_tied
    assert model.out_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    # one parameter, so one optimizer step changes both views
    names = [n for n, _ in model.named_parameters()]
    assert "tok_emb.weight" in names and "out_head.weight" not in names
    before = model.tok_emb.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(torch.randint(0, 97, (2, 8))).sum().backward()
    opt.step()
    assert not torch.equal(model.tok_emb.weight, before)
    assert model.out_head.weight is model.tok_emb.weight

    untied = GPTModel(GPTConfig(**TINY, tie_weights=False))
    assert not untied.weights_tied
    assert untied.out_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert count_parameters(untied) == count_parameters(model) + 97 * 32


def test_qkv_bias_flag():
    with_bias = GPTModel(GPTConfig(**TINY, qkv_bias=True))
    without = GPTModel(GPTConfig(**TINY, qkv_bias=False))
    assert with_bias.trf_blocks[0].att.qkv.bias.shape == (96,)
    assert without.trf_blocks[0].att.qkv.bias is None
    assert count_parameters(with_bias) - count_parameters(without) == 2 * 96


# ----------------------------------------------------------------------------------------------
# Against the book's GPTModel (llms_from_scratch.ch04) with the same weights


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize(("emb_dim", "n_heads", "n_layers"), [(32, 4, 2), (48, 3, 3)])
def test_same_logits_as_the_book(qkv_bias, emb_dim, n_heads, n_layers):
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    book_cfg = dict(
        vocab_size=101,
        context_length=24,
        emb_dim=emb_dim,
        n_heads=n_heads,
        n_layers=n_layers,
        drop_rate=0.0,
        qkv_bias=qkv_bias,
    )
    book = ch04.GPTModel(book_cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up of any of them shows
        for name, p in book.named_parameters():
            if name.endswith(("scale", "shift", "bias")):
                p.add_(torch.randn_like(p) * 0.1)

    ours = GPTModel(GPTConfig(**book_cfg, tie_weights=False)).eval()
    load_state_dict_strict(ours, from_book_state_dict(book.state_dict()), source="book")
    x = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        expected, got = book(x), ours(x)
    assert got.shape == expected.shape == (2, 24, 101)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # shorter inputs too (the book slices its mask; we use is_causal)
    torch.testing.assert_close(ours(x[:, :5]), book(x[:, :5]), atol=1e-5, rtol=0)


def test_book_converter_fuses_qkv_in_order():
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    cfg = dict(
        vocab_size=11, context_length=4, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0, qkv_bias=True
    )
    book = ch04.GPTModel(cfg)
    sd = from_book_state_dict(book.state_dict())
    att = book.trf_blocks[0].att
    assert torch.equal(sd["trf_blocks.0.att.qkv.weight"][:8], att.W_query.weight)
    assert torch.equal(sd["trf_blocks.0.att.qkv.weight"][8:16], att.W_key.weight)
    assert torch.equal(sd["trf_blocks.0.att.qkv.bias"][16:], att.W_value.bias)
    assert not any(k.endswith(".mask") or "W_" in k for k in sd)


def test_hidden_at_gathers_each_sequences_positions_from_one_padded_batch():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**TINY)).eval()
    seqs = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    positions = [range(2, 5), [], [0, 2]]
    with torch.no_grad():
        got = model.hidden_at(seqs, positions)
        want = torch.cat(
            [model(torch.tensor([s]), return_hidden=True)[0, list(p)] for s, p in zip(seqs, positions)]
        )
    assert got.shape == (5, TINY["emb_dim"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for bad in ([], [[1], []]):
        with pytest.raises(ValueError, match="one position list per sequence"):
            model.hidden_at(bad, [[0]] * len(bad))
