"""Attention step by step: every teaching variant equals the production path given the same weights;
the book's own classes agree; causality, batches, length-1 inputs; GPTModel's LayerNorm/GELU
against the book's formulas, and its KV cache and padding paths against plain forward passes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from scratchllm.model.attention import (
    CausalAttention,
    CausalSelfAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention_v0,
    SelfAttention_v1,
    SelfAttention_v2,
    simple_self_attention,
)
from scratchllm.model.gpt import GPTConfig, GPTModel
from scratchllm.model.parts import GELU, LayerNorm

book3 = pytest.importorskip("llms_from_scratch.ch03")
book4 = pytest.importorskip("llms_from_scratch.ch04")

ATOL = 1e-5

# The book's running example: "Your journey starts with one step", 3-d embeddings.
INPUTS = torch.tensor(
    [
        [0.43, 0.15, 0.89],  # Your
        [0.55, 0.87, 0.66],  # journey
        [0.57, 0.85, 0.64],  # starts
        [0.22, 0.58, 0.33],  # with
        [0.77, 0.25, 0.10],  # one
        [0.05, 0.80, 0.55],  # step
    ]
)


# ---------------------------------------------------------------------------------------------
# Weight copying between the variants


def _fused(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.cat([m.weight for m in linears], dim=0)
    b = torch.cat([m.bias for m in linears], dim=0) if linears[0].bias is not None else None
    return w, b


@torch.no_grad()
def load_into_production(
    csa: CausalSelfAttention,
    queries: list[nn.Linear],
    keys: list[nn.Linear],
    values: list[nn.Linear],
    out_proj: nn.Linear | None,
) -> CausalSelfAttention:
    """Copy separate q/k/v projections (one per head, or one for all heads) into the fused `qkv`:
    its rows are [W_query; W_key; W_value], each with the heads stacked in order. Without an
    `out_proj` the production one becomes the identity, so both compute the concatenated heads."""
    for i, group in enumerate((queries, keys, values)):
        w, b = _fused(group)
        csa.qkv.weight[i * csa.d_out : (i + 1) * csa.d_out] = w
        if b is not None:
            csa.qkv.bias[i * csa.d_out : (i + 1) * csa.d_out] = b
    if out_proj is None:
        csa.out_proj.weight.copy_(torch.eye(csa.d_out))
        csa.out_proj.bias.zero_()
    else:
        csa.out_proj.load_state_dict(out_proj.state_dict())
    return csa


def production_like(module: nn.Module, d_in: int, qkv_bias: bool) -> CausalSelfAttention:
    """A `CausalSelfAttention` computing exactly what `module` (a causal teaching variant) does."""
    if isinstance(module, MultiHeadAttention):
        csa = CausalSelfAttention(d_in, module.d_out, module.num_heads, qkv_bias=qkv_bias)
        return load_into_production(csa, [module.W_query], [module.W_key], [module.W_value], module.out_proj)
    if isinstance(module, MultiHeadAttentionWrapper):
        heads = list(module.heads)
        csa = CausalSelfAttention(d_in, heads[0].d_out * len(heads), len(heads), qkv_bias=qkv_bias)
        return load_into_production(
            csa, [h.W_query for h in heads], [h.W_key for h in heads], [h.W_value for h in heads], None
        )
    if isinstance(module, CausalAttention):
        csa = CausalSelfAttention(d_in, module.d_out, 1, qkv_bias=qkv_bias)
        return load_into_production(csa, [module.W_query], [module.W_key], [module.W_value], None)
    raise TypeError(type(module))


def causal_variants(d_in: int, d_out: int, heads: int, ctx: int, qkv_bias: bool) -> dict[str, nn.Module]:
    return {
        "CausalAttention": CausalAttention(d_in, d_out, ctx, 0.0, qkv_bias),
        "MultiHeadAttentionWrapper": MultiHeadAttentionWrapper(
            d_in, d_out // heads, ctx, 0.0, heads, qkv_bias
        ),
        "MultiHeadAttention": MultiHeadAttention(d_in, d_out, ctx, 0.0, heads, qkv_bias),
    }


# ---------------------------------------------------------------------------------------------
# The first steps


def test_simplified_self_attention_matches_the_book_numbers():
    # the book's context vector for "journey" (section 3.3.1)
    out = simple_self_attention(INPUTS)
    torch.testing.assert_close(out[1], torch.tensor([0.4419, 0.6515, 0.5683]), atol=1e-4, rtol=0)
    # written out with loops: weights = softmax of the dot products, output = weighted sum of inputs
    for i in range(len(INPUTS)):
        w = torch.softmax(torch.stack([INPUTS[i] @ x for x in INPUTS]), dim=0)
        torch.testing.assert_close(out[i], sum(w[j] * INPUTS[j] for j in range(len(INPUTS))))
    assert list(SelfAttention_v0().parameters()) == []
    torch.testing.assert_close(SelfAttention_v0()(INPUTS[None])[0], out)


def test_v1_and_v2_agree_with_the_same_weights_and_with_the_book():
    v2 = SelfAttention_v2(3, 2)
    v1 = SelfAttention_v1(3, 2)
    with torch.no_grad():  # nn.Linear stores W transposed
        v1.W_query.copy_(v2.W_query.weight.T)
        v1.W_key.copy_(v2.W_key.weight.T)
        v1.W_value.copy_(v2.W_value.weight.T)
    torch.testing.assert_close(v1(INPUTS), v2(INPUTS), atol=ATOL, rtol=0)
    # batched input gives each batch row's own result
    batch = torch.stack([INPUTS, INPUTS.flip(0)])
    torch.testing.assert_close(v2(batch)[1], v2(INPUTS.flip(0)), atol=ATOL, rtol=0)

    b1, b2 = book3.SelfAttention_v1(3, 2), book3.SelfAttention_v2(3, 2)
    b1.load_state_dict(v1.state_dict())
    b2.load_state_dict(v2.state_dict())
    torch.testing.assert_close(v1(INPUTS), b1(INPUTS))
    torch.testing.assert_close(v2(INPUTS), b2(INPUTS))


# ---------------------------------------------------------------------------------------------
# The causal variants against the production path


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("name", ["CausalAttention", "MultiHeadAttentionWrapper", "MultiHeadAttention"])
@pytest.mark.parametrize("shape", [(2, 7), (1, 1), (3, 1), (1, 16)])
def test_causal_variants_equal_production(name, qkv_bias, shape):
    d_in, d_out, heads, ctx = 12, 8, 2, 16
    module = causal_variants(d_in, d_out, heads, ctx, qkv_bias)[name].eval()
    csa = production_like(module, d_in, qkv_bias).eval()
    x = torch.randn(*shape, d_in)
    torch.testing.assert_close(module(x), csa(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_multihead_attention_equals_the_books(qkv_bias):
    ours = MultiHeadAttention(12, 8, 10, 0.0, 4, qkv_bias).eval()
    book = book3.MultiHeadAttention(12, 8, 10, 0.0, 4, qkv_bias).eval()
    book.load_state_dict(ours.state_dict())  # same names, the mask buffer included
    x = torch.randn(3, 10, 12)
    torch.testing.assert_close(ours(x), book(x), atol=1e-6, rtol=0)
    wrapper = MultiHeadAttentionWrapper(12, 4, 10, 0.0, 2, qkv_bias).eval()
    book_wrapper = book3.MultiHeadAttentionWrapper(12, 4, 10, 0.0, 2, qkv_bias).eval()
    book_wrapper.load_state_dict(wrapper.state_dict())
    torch.testing.assert_close(wrapper(x), book_wrapper(x), atol=1e-6, rtol=0)
    single = CausalAttention(12, 4, 10, 0.0, qkv_bias).eval()
    book_single = book3.CausalAttention(12, 4, 10, 0.0, qkv_bias).eval()
    book_single.load_state_dict(single.state_dict())
    torch.testing.assert_close(single(x), book_single(x), atol=1e-6, rtol=0)


def test_production_equals_the_books_multihead_attention():
    book = book3.MultiHeadAttention(16, 16, 9, 0.0, 4, qkv_bias=True).eval()
    csa = CausalSelfAttention(16, 16, 4, qkv_bias=True).eval()
    load_into_production(csa, [book.W_query], [book.W_key], [book.W_value], book.out_proj)
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(csa(x), book(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "name", ["CausalAttention", "MultiHeadAttentionWrapper", "MultiHeadAttention", "production"]
)
def test_future_tokens_never_change_earlier_outputs(name):
    d_in, ctx = 12, 10
    if name == "production":
        module: nn.Module = CausalSelfAttention(d_in, 8, 2).eval()
    else:
        module = causal_variants(d_in, 8, 2, ctx, True)[name].eval()
    x = torch.randn(2, ctx, d_in)
    for cut in (1, 4, ctx - 1):
        changed = x.clone()
        changed[:, cut:] = torch.randn_like(changed[:, cut:])
        torch.testing.assert_close(module(changed)[:, :cut], module(x)[:, :cut], atol=1e-6, rtol=0)
        # and a prefix alone gives the same outputs as inside the longer sequence
        torch.testing.assert_close(module(x[:, :cut]), module(x)[:, :cut], atol=ATOL, rtol=0)


def test_dropout_acts_on_attention_weights_only_while_training():
    torch.manual_seed(1)
    module = CausalAttention(6, 4, 8, dropout=0.5)
    x = torch.randn(2, 8, 6)
    module.train()
    a, b = module(x), module(x)
    assert not torch.allclose(a, b)
    module.eval()
    torch.testing.assert_close(module(x), module(x))
    csa = CausalSelfAttention(6, 4, 2, dropout=0.5).train()
    assert not torch.allclose(csa(x), csa(x))


def test_too_long_inputs_and_bad_head_counts_are_errors():
    with pytest.raises(ValueError, match="context_length"):
        CausalAttention(4, 4, 3, 0.0)(torch.randn(1, 4, 4))
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(4, 6, 3, 0.0, 4)
    with pytest.raises(ValueError, match="divisible"):
        CausalSelfAttention(4, 6, 4)


# ---------------------------------------------------------------------------------------------
# GPTModel's layers against the book's formulas


def test_layer_norm_and_gelu_equal_the_books_formulas():
    x = torch.randn(4, 5, 32) * 3 + 1
    ours, book = LayerNorm(32), book4.LayerNorm(32)
    with torch.no_grad():
        ours.scale.copy_(torch.randn(32))
        ours.shift.copy_(torch.randn(32))
    book.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), book(x), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(GELU()(x), book4.GELU()(x), atol=ATOL, rtol=1e-5)
    # the exact form: x Phi(x), with the normal CDF from erf (nanoGPT's nn.GELU())
    exact = x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    torch.testing.assert_close(GELU("exact")(x), exact, atol=ATOL, rtol=1e-5)
    assert (GELU("exact")(x) - GELU()(x)).abs().max() > 1e-4  # the two forms differ
    with pytest.raises(ValueError, match="GELU form must be tanh or exact"):
        GELU("none")


def _book_cfg(cfg: GPTConfig) -> dict:
    return dict(
        vocab_size=cfg.vocab_size,
        context_length=cfg.context_length,
        emb_dim=cfg.emb_dim,
        n_heads=cfg.n_heads,
        n_layers=cfg.n_layers,
        drop_rate=cfg.drop_rate,
        qkv_bias=cfg.qkv_bias,
    )


def test_gpt_model_equals_the_books_gpt_model():
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    ours = GPTModel(cfg).eval()
    book = book4.GPTModel(_book_cfg(cfg)).eval()
    with torch.no_grad():
        sd = {}
        for name, t in ours.state_dict().items():
            if ".att.qkv." in name:
                q, k, v = t.chunk(3, dim=0)
                for part, tensor in (("W_query", q), ("W_key", k), ("W_value", v)):
                    sd[name.replace("qkv", part)] = tensor
            else:
                sd[name.replace("drop_shortcut", "drop_resid")] = t
        for name, t in book.state_dict().items():
            if name.endswith(".att.mask"):
                sd[name] = t
        book.load_state_dict(sd)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.testing.assert_close(ours(idx), book(idx), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# GPTModel's KV cache and padding paths


@pytest.fixture
def tiny_model() -> GPTModel:
    cfg = GPTConfig(vocab_size=101, context_length=24, emb_dim=32, n_heads=4, n_layers=3, drop_rate=0.0)
    return GPTModel(cfg).eval()


@torch.no_grad()
def test_kv_cache_token_by_token_and_in_chunks_equals_full_forward(tiny_model):
    idx = torch.randint(0, 101, (2, 20))
    full = tiny_model(idx)
    cache = tiny_model.new_kv_cache(2)
    steps = [tiny_model(idx[:, i : i + 1], kv_cache=cache) for i in range(20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    assert cache.pos == 20
    for chunks in ([7, 13], [1, 5, 14], [20]):  # prefill, then multi-token steps on a filled cache
        cache = tiny_model.new_kv_cache(2, max_len=20)
        out, start = [], 0
        for n in chunks:
            out.append(tiny_model(idx[:, start : start + n], kv_cache=cache))
            start += n
        torch.testing.assert_close(torch.cat(out, dim=1), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padding_masks_padding_and_counts_positions_from_the_first_real_token(tiny_model):
    a = torch.randint(0, 101, (9,))
    b = torch.randint(0, 101, (4,))
    idx = torch.zeros((2, 9), dtype=torch.long)
    idx[0], idx[1, 5:] = a, b
    pad = torch.ones((2, 9), dtype=torch.bool)
    pad[1, :5] = False
    out = tiny_model(idx, padding_mask=pad)
    torch.testing.assert_close(out[0], tiny_model(a[None])[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1, 5:], tiny_model(b[None])[0], atol=ATOL, rtol=0)
    assert torch.isfinite(out).all()  # padded queries see themselves: no all-masked row, no NaN

    # the same with a cache: prefill the padded batch, then decode token by token
    extra = torch.randint(0, 101, (2, 6))
    cache = tiny_model.new_kv_cache(2, max_len=15)
    full_pad = torch.cat([pad, torch.ones((2, 6), dtype=torch.bool)], dim=1)
    tiny_model(idx, kv_cache=cache, padding_mask=pad)
    steps = [
        tiny_model(extra[:, i : i + 1], kv_cache=cache, padding_mask=full_pad[:, : 10 + i])[:, -1]
        for i in range(6)
    ]
    ref_a = tiny_model(torch.cat([a, extra[0]])[None])[0, 9:]
    ref_b = tiny_model(torch.cat([b, extra[1]])[None])[0, 4:]
    torch.testing.assert_close(torch.stack(steps, dim=1)[0], ref_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(steps, dim=1)[1], ref_b, atol=ATOL, rtol=0)


@torch.no_grad()
def test_kv_cache_after_dropping_rows(tiny_model):
    idx = torch.randint(0, 101, (3, 10))
    cache = tiny_model.new_kv_cache(3, max_len=12)
    tiny_model(idx[:, :8], kv_cache=cache)
    cache.select(torch.tensor([0, 2]))
    out = tiny_model(idx[[0, 2], 8:], kv_cache=cache)
    torch.testing.assert_close(out, tiny_model(idx[[0, 2]])[:, 8:], atol=ATOL, rtol=0)


def test_sequences_longer_than_the_context_are_errors(tiny_model):
    with pytest.raises(ValueError, match="context length"):
        tiny_model(torch.zeros((1, 25), dtype=torch.long))
    cache = tiny_model.new_kv_cache(1)
    with torch.no_grad():
        tiny_model(torch.zeros((1, 24), dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="context length"):
            tiny_model(torch.zeros((1, 1), dtype=torch.long), kv_cache=cache)
