"""A decode step's fused parts (scratchllm/native/decode.cpp, generation/fused.py) against the modules'
own forwards: the same attention, the same cache contents, the same tokens."""

from __future__ import annotations

import pytest
import torch

from scratchllm import native
from scratchllm.generation import Engine, GenerationConfig, PackedLinears, fused
from scratchllm.model import registry
from scratchllm.model.attention import CausalSelfAttention, KVCache, SlotKVCache, step_inputs
from scratchllm.model.gqa import GroupedQueryAttention, window_mask
from scratchllm.model.parts import rope_inverse_frequencies, rope_tables
from scratchllm.model.quantize import Int4Linear, Int8Linear, quantize_model
from tests.generation.helpers import ByteTokenizer

pytestmark = pytest.mark.skipif(
    not native.available(),
    reason=f"scratchllm's kernels are not available here: {native.unavailable_reason()}",
)

EMB, D = 96, 32
# (n_heads, n_kv_groups, QK-norm, Gemma's unit-offset norms and query scale); None: GPT-2's attention
SHAPES = {
    "qwen3": (8, 4, True, False),
    "llama3": (8, 2, False, False),
    "gemma3": (4, 1, True, True),
    "gpt2": None,
}


def _attention(kind: str, dtype: torch.dtype, seed: int = 0) -> tuple[torch.nn.Module, int, int]:
    torch.manual_seed(seed)
    if SHAPES[kind] is None:
        att = CausalSelfAttention(4 * D, 4 * D, 4, qkv_bias=True)  # GPT-2's: as wide as the model
        with torch.no_grad():
            att.qkv.bias.normal_()
        return att.to(dtype).eval(), 4, 4
    heads, groups, qk_norm, gemma = SHAPES[kind]
    att = GroupedQueryAttention(
        EMB, heads, groups, D, qk_norm=qk_norm, norm_unit_offset=gemma, scale=20.0**-0.5 if gemma else None
    )
    if qk_norm:
        with torch.no_grad():
            att.q_norm.weight.normal_(0.0 if gemma else 1.0, 0.3)
            att.k_norm.weight.normal_(0.0 if gemma else 1.0, 0.3)
    return att.to(dtype).eval(), heads, groups


def _rope(t: int, pos: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    tables = rope_tables(rope_inverse_frequencies(D, 10_000.0), torch.arange(pos, pos + t))
    return tuple(r.to(dtype) for r in tables)


def _fused(att, kind, qkv, cache, pos):
    """native.decode_attention for the tokens of `qkv` at `pos` on: attention's output, before out_proj."""
    gqa = kind != "gpt2"
    norms = (att.q_norm, att.k_norm) if gqa and att.q_norm is not None else (None, None)
    return native.decode_attention(
        qkv,
        att.n_heads,
        att.n_kv_groups if gqa else att.n_heads,
        None if norms[0] is None else norms[0].weight,
        None if norms[1] is None else norms[1].weight,
        1e-6,
        bool(norms[0] is not None and norms[0].unit_offset),
        *(_rope(qkv.shape[1], pos, qkv.dtype) if gqa else (None, None)),
        cache.k[0],
        cache.v[0],
        pos,
        att.scale if gqa and att.scale is not None else D**-0.5,
    )


def _step(att, kind, x, cache, pos, fused: bool):
    """One token at `pos` through `att`: its own forward, or native.decode_attention."""
    cache.pos = pos
    with torch.inference_mode():
        if not fused:
            return (
                att(x, kv_cache=cache) if kind == "gpt2" else att(x, _rope(1, pos, x.dtype), kv_cache=cache)
            )
        return att.out_proj(_fused(att, kind, att.qkv(x), cache, pos))


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize(
    ("dtype", "cache_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
)
@pytest.mark.parametrize("pos", [0, 29])
def test_decode_attention_is_the_modules_forward(kind, dtype, cache_dtype, pos):
    att, heads, groups = _attention(kind, dtype)
    caches = [KVCache(1, 2, groups, D, 40, dtype=cache_dtype) for _ in range(2)]
    torch.manual_seed(1)
    for name in ("k", "v"):
        filled = torch.randn(2, groups, 40, D).to(cache_dtype)
        for cache in caches:
            getattr(cache, name)[0].copy_(filled)
    x = torch.randn(2, 1, att.qkv.in_features).to(dtype)
    want = _step(att, kind, x, caches[0], pos, fused=False)
    got = _step(att, kind, x, caches[1], pos, fused=True)
    assert got.shape == want.shape == x.shape and got.dtype == dtype
    assert torch.equal(caches[1].v[0], caches[0].v[0])
    if dtype == torch.bfloat16 and cache_dtype == torch.float32:
        # PyTorch's roundings, sums in another order: the same value, or one bf16 step away
        assert (got == want).float().mean() > 0.95
        torch.testing.assert_close(got, want, rtol=2**-7, atol=2**-9)
        torch.testing.assert_close(caches[1].k[0], caches[0].k[0], rtol=2**-8, atol=0.0)
    else:  # fp32 sums in another order; a bf16 cache's attention rounds inside PyTorch's kernel
        tol = 1e-5 if cache_dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        torch.testing.assert_close(caches[1].k[0], caches[0].k[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["qwen3", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_few_tokens_at_once_get_each_tokens_own_result(kind, dtype):
    att, heads, groups = _attention(kind, dtype)
    torch.manual_seed(6)
    x = torch.randn(2, 5, att.qkv.in_features).to(dtype)
    caches = [KVCache(1, 2, groups, D, 40) for _ in range(3)]
    for cache in caches:
        torch.manual_seed(7)
        cache.k[0].normal_(), cache.v[0].normal_()
    with torch.inference_mode():
        qkv = att.qkv(x)
        together = _fused(att, kind, qkv, caches[0], 20)
        alone = torch.cat(
            [_fused(att, kind, qkv[:, i : i + 1].contiguous(), caches[1], 20 + i) for i in range(5)], 1
        )
        assert torch.equal(together, alone) and torch.equal(caches[0].k[0], caches[1].k[0])
        # the module's own forward, with the causal mask that a step over a filled cache gets
        caches[2].pos = 20
        mask = step_inputs(5, x.device, 64, caches[2])[1]
        if kind == "gpt2":
            want = att(x, mask=mask, kv_cache=caches[2])
        else:
            want = att(x, _rope(5, 20, dtype), mask=mask, kv_cache=caches[2])
        got = att.out_proj(together)
    if dtype == torch.bfloat16:  # as above: the same, or one bf16 step away
        torch.testing.assert_close(got, want, rtol=2**-7, atol=2**-9)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_a_nan_in_the_cache_comes_out_where_pytorchs_attention_puts_it(cache_dtype):
    att, heads, groups = _attention("llama3", torch.float32)
    caches = [KVCache(1, 1, groups, D, 40, dtype=cache_dtype) for _ in range(2)]
    torch.manual_seed(4)
    filled = [torch.randn(1, groups, 40, D).to(cache_dtype) for _ in range(2)]
    filled[0][0, 1, 7, 3] = float("nan")  # a key that the second group's heads see
    for cache in caches:
        cache.k[0].copy_(filled[0]), cache.v[0].copy_(filled[1])
    x = torch.randn(1, 1, EMB)
    want = _step(att, "llama3", x, caches[0], 20, fused=False)
    got = _step(att, "llama3", x, caches[1], 20, fused=True)
    assert want.isnan().all() and got.isnan().all()  # out_proj mixes the heads: NaN everywhere
    with torch.inference_mode():
        mine = _fused(att, "llama3", att.qkv(x), caches[1], 20).view(heads, D).isnan().all(dim=1)
    assert mine.tolist() == [g == 1 for g in range(groups) for _ in range(heads // groups)]


def test_a_long_context_splits_between_threads_with_the_same_result():
    att, heads, groups = _attention("llama3", torch.float32)
    x = torch.randn(1, 1, EMB)
    results = []
    for threads in (1, 2):
        cache = KVCache(1, 1, groups, D, 1200)
        torch.manual_seed(2)
        cache.k[0].normal_(), cache.v[0].normal_()
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append(_step(att, "llama3", x, cache, 1100, fused=True))
        finally:
            torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])  # each head's sums are one task's, whatever the split


def test_decode_attention_refuses_what_it_cannot_compute():
    cache = KVCache(1, 1, 2, D, 8)
    qkv = torch.randn(1, 1, (4 + 4) * D)

    def call(qkv=qkv, n_kv_heads=2, norm=None, pos=0):
        native.decode_attention(
            qkv, 4, n_kv_heads, norm, norm, 1e-6, False, None, None, *cache.k, *cache.v, pos, 1.0
        )

    call()
    with pytest.raises(RuntimeError, match="outside the cache"):
        call(pos=8)
    with pytest.raises(RuntimeError, match="new tokens"):
        call(qkv=qkv[..., :-1])
    with pytest.raises(RuntimeError, match="n_kv_heads must divide"):
        call(n_kv_heads=3)
    with pytest.raises(RuntimeError, match="qkv's type"):
        call(norm=torch.ones(D, dtype=torch.bfloat16))


def _model(arch: str, dtype: torch.dtype, **overrides):
    cfg = registry.preset_config("nano", arch, vocab_size=256, context_length=64, **overrides)
    torch.manual_seed(3)
    return registry.build_model(cfg).eval().to(dtype)


FAMILIES = [
    ("gpt2", {}),
    ("llama3", {}),
    ("qwen3", {}),
    ("qwen3-moe", {}),
    ("gemma3", {"sliding_window": 6}),  # its sliding layers' cache becomes a ring of 6 columns
]


@pytest.mark.parametrize(("arch", "overrides"), FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_takes_the_fused_attention_and_keeps_the_tokens(monkeypatch, arch, overrides, dtype):
    model = _model(arch, dtype, **overrides)
    # the layers in one call are test_layers.py's: here each layer's attention
    monkeypatch.setattr(fused, "gpt_model_forward", lambda model: None)
    monkeypatch.setattr(fused, "transformer_model_forward", lambda model: None)
    calls: list[int] = []
    fused_attention = native.decode_attention

    def counting(qkv, *args):
        calls.append(args[10])  # the position written (pos)
        return fused_attention(qkv, *args)

    monkeypatch.setattr(native, "decode_attention", counting)
    prompts = [[5, 9, 14, 2, 7, 30, 1]]
    settings = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    engine = Engine(model, ByteTokenizer())
    got = [c.token_ids for c in engine.generate(prompts, settings)]
    n_layers = model.cfg.n_layers
    windows = model.cache_windows() if hasattr(model, "cache_windows") else [0] * n_layers
    rings = sum(1 for w in windows if 0 < w < 7 + 12)
    # the 7-token prompt at position 0 (not on a ring: one token at a time there), then each new token
    # but the last
    assert len(calls) == 12 * n_layers - rings and sorted(set(calls)) == [0, *range(7, 18)]
    assert all("forward" not in m.__dict__ for m in model.modules())  # restored afterwards
    plain = Engine(model, ByteTokenizer(), prepack=False).generate(prompts, settings)
    assert got == [c.token_ids for c in plain]
    # a batch with left padding masks its attention: the modules' own forward
    calls.clear()
    batch = engine.generate([[5, 9, 14], [5, 9, 14, 2, 7, 30, 1]], settings)
    assert not calls and all(len(c.token_ids) == 12 for c in batch)


@pytest.mark.parametrize("arch", ["gpt2", "gemma3", "qwen3-moe"])
def test_the_installed_block_forward_is_the_blocks_own(arch):
    model = _model(arch, torch.float32, drop_rate=0.1)
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    kernels, without_blocks = PackedLinears(model), PackedLinears(model)
    assert kernels.refresh() and without_blocks.refresh()
    without_blocks._routes = [(m, f) for m, f in without_blocks._routes if "Block" not in type(m).__name__]
    with torch.inference_mode():
        with without_blocks.installed():
            want = model(tokens)
        with kernels.installed():
            assert "forward" in model.trf_blocks[0].__dict__
            got = model(tokens)
    assert torch.equal(got, want)  # the same operations, minus the identity ones
    model.train()
    with torch.inference_mode():
        torch.manual_seed(5)
        with without_blocks.installed():
            want = model(tokens)
        torch.manual_seed(5)
        with kernels.installed():
            got = model(tokens)  # training: dropout applies, through the block's own forward
        assert torch.equal(got, want) and not torch.equal(got, model.eval()(tokens))


def test_blocks_with_hooks_keep_their_forward():
    model = _model("llama3", torch.float32)
    seen = []
    model.trf_blocks[0].ff.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    kernels = PackedLinears(model)
    assert kernels.refresh()
    with torch.inference_mode(), kernels.installed():
        assert "forward" not in model.trf_blocks[0].__dict__
        model(torch.tensor([[1, 2, 3]]))
    assert seen == [(1, 3, model.cfg.emb_dim)]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_layers_go_straight_to_their_kernel(monkeypatch, mode):
    model = _model("qwen3", torch.bfloat16)
    quantize_model(model, mode)
    layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    for m in layers:  # the route where the CPU would not pick native's kernel too (its portable loops)
        m._native = True
    own_forward = type(layers[0]).forward
    calls: list[int] = []

    def counting(self, x):
        calls.append(x.numel() // x.shape[-1])
        return own_forward(self, x)

    monkeypatch.setattr(type(layers[0]), "forward", counting)
    prompts, settings = [[5, 9, 14, 2, 7, 30, 1]], GenerationConfig(max_new_tokens=12, ignore_eos=True)
    routed = Engine(model, ByteTokenizer()).generate(prompts, settings)
    # the prompt's 7 rows only (the head sees its last row alone): single rows went straight through
    assert calls == [7] * (len(layers) - 1)
    calls.clear()
    own = Engine(model, ByteTokenizer(), prepack=False).generate(prompts, settings)
    assert len(calls) == 12 * len(layers)
    assert [c.token_ids for c in routed] == [c.token_ids for c in own]


FALLBACKS = [
    "padding",
    "ring",
    "static",
    "rope dtype",
    "dropout",
    "gradients",
    "overflow",
    "no mask on a filled cache",
]


@pytest.mark.parametrize("case", FALLBACKS)
def test_the_fused_attention_leaves_what_it_does_not_compute_to_the_module(monkeypatch, case):
    att, heads, groups = _attention("qwen3", torch.float32)
    windows = [4] if case == "ring" else None
    caches = [KVCache(1, 1, groups, D, 16, windows=windows) for _ in range(2)]
    t, pos, mask, rope_dtype = 1, 5, None, torch.float32
    if case == "padding":
        mask = torch.ones(1, 1, 1, pos + 1, dtype=torch.bool)
        mask[..., 0] = False
    if case == "overflow":
        pos = 16
    if case == "no mask on a filled cache":
        t = 2
    if case == "rope dtype":
        rope_dtype = torch.bfloat16
    if case == "dropout":
        att.train()
        att.dropout = 0.5
    x = torch.randn(1, t, EMB, requires_grad=case == "gradients")
    for cache in caches:
        cache.pos = min(pos, 15)
        torch.manual_seed(8)
        cache.k[0].normal_(), cache.v[0].normal_()
        cache.pos = pos
        if case == "static":
            cache.freeze()
    if case == "static":
        mask = caches[0].static_step_inputs()[1]
        caches[1].static_step_inputs()
    rope = _rope(t, min(pos, 15), rope_dtype)
    monkeypatch.setattr(native, "decode_attention", lambda *a: pytest.fail("took the fused attention"))
    fused_forward = fused.attention_forward(att)
    results = []
    for forward, cache in ((fused_forward, caches[0]), (att.forward, caches[1])):
        torch.manual_seed(9)
        try:
            results.append(forward(x, rope, mask, cache, 0))
        except (RuntimeError, ValueError) as e:
            results.append(type(e))
    if isinstance(results[1], type):
        assert results[0] is results[1]  # the module's own refusal
    else:
        assert torch.equal(results[0], results[1]) and torch.equal(caches[0].k[0], caches[1].k[0])


def test_hooks_added_after_a_generation_are_called_in_the_next():
    model = _model("llama3", torch.float32)
    engine = Engine(model, ByteTokenizer())
    settings = GenerationConfig(max_new_tokens=3, ignore_eos=True)
    engine.generate([[1, 2, 3]], settings)
    seen: list[tuple[int, ...]] = []
    model.trf_blocks[0].ff.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    engine.generate([[1, 2, 3]], settings)
    assert len(seen) == 3  # the prompt and two steps: the blocks took their own forward


@pytest.mark.parametrize("kind", ["qwen3", "gpt2"])
@pytest.mark.parametrize("t", [1, 3])
def test_a_slot_cache_takes_the_fused_attention_row_by_row(monkeypatch, kind, t):
    """Continuous batching: rows of their own lengths, in slots out of order, the shorter ones padded on
    the right; each real token's result and every real key as the module's forward gives them."""
    att, heads, groups = _attention(kind, torch.bfloat16)
    caches = [SlotKVCache(1, 3, groups, D, 32, capacity=8) for _ in range(2)]
    for cache in caches:
        torch.manual_seed(10)
        cache.k[0].normal_(), cache.v[0].normal_()
        cache.lengths = [5, 0, 2]
        cache.use([2, 0], [t, 1])  # slot 2 (2 cached) takes t tokens, slot 0 (5 cached) one and padding
    x = torch.randn(2, t, att.qkv.in_features).to(torch.bfloat16)
    outs = []
    calls = []
    real = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a: calls.append(1) or real(*a))
    for forward, cache in ((fused.attention_forward(att), caches[0]), (att.forward, caches[1])):
        positions, mask = cache.step_inputs(t)
        tables = rope_tables(rope_inverse_frequencies(D, 10_000.0), positions)
        rope = tuple(r.to(torch.bfloat16) for r in tables)
        with torch.inference_mode():
            outs.append(forward(x, mask, cache, 0) if kind == "gpt2" else forward(x, rope, mask, cache, 0))
    assert len(calls) == 1  # the fused forward took the kernel; the module's own did not
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=2**-7, atol=2**-9)  # slot 2: every token real
    torch.testing.assert_close(outs[0][1, :1], outs[1][1, :1], rtol=2**-7, atol=2**-9)  # slot 0: its first
    for slot, n in ((2, 2 + t), (0, 6)):  # the real columns of both rows
        torch.testing.assert_close(
            caches[0].k[0][slot, :, :n], caches[1].k[0][slot, :, :n], rtol=2**-8, atol=0.0
        )
        assert torch.equal(caches[0].v[0][slot, :, :n], caches[1].v[0][slot, :, :n])


@pytest.mark.parametrize(("ring", "t"), [(False, 1), (False, 3), (True, 1)])
def test_a_sliding_window_takes_the_fused_attention(monkeypatch, ring, t):
    """Gemma 3's local layers: each token sees the window's latest positions, from a cache that keeps
    them all or from a ring of `window` columns."""
    window, pos = 8, 29
    att, heads, groups = _attention("gemma3", torch.bfloat16)
    caches = [KVCache(1, 1, groups, D, 40, windows=[window] if ring else None) for _ in range(2)]
    for cache in caches:
        torch.manual_seed(11)
        cache.k[0].normal_(), cache.v[0].normal_()
        cache.pos = pos
    x = torch.randn(1, t, EMB).to(torch.bfloat16)
    _, mask = step_inputs(t, x.device, 64, caches[0])
    mask = window_mask(mask, t, window, x.device, caches[0])
    rope = _rope(t, pos, torch.bfloat16)
    calls = []
    real = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a: calls.append(a[-2:]) or real(*a))
    with torch.inference_mode():
        got = fused.attention_forward(att, window)(x, rope, mask, caches[0], 0)
        want = att(x, rope, mask, caches[1], 0)
    assert calls == [(window, ring)]
    torch.testing.assert_close(got, want, rtol=2**-7, atol=2**-9)
    torch.testing.assert_close(caches[0].k[0], caches[1].k[0], rtol=2**-8, atol=0.0)
    assert torch.equal(caches[0].v[0], caches[1].v[0])
