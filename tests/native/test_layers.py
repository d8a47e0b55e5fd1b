"""A decode step's layers in one native call (scratchllm/native/layers.cpp; `fused.gpt_model_forward`,
`fused.transformer_model_forward`) against the blocks' own fused forwards through the same kernels: the
same hidden states and caches, bit for bit, the same tokens, and the model's own forward wherever the
call does not compute the same thing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from scratchllm import native
from scratchllm.generation import Engine, GenerationConfig, PackedLinears, kernels
from scratchllm.generation.batcher import Batcher
from scratchllm.model import registry
from scratchllm.model.attention import SlotKVCache
from scratchllm.model.gpt import GPTModel
from scratchllm.model.quantize import Int4Linear, Int8Linear, quantize_model
from tests.generation.helpers import ByteTokenizer

pytestmark = pytest.mark.skipif(
    not native.available(),
    reason=f"scratchllm's kernels are not available here: {native.unavailable_reason()}",
)


@pytest.fixture
def native_rows(monkeypatch):
    """Linear layers take native's product for a step's rows, as on CPUs where the probe picks it."""
    monkeypatch.setattr(kernels, "one_row_kernel", lambda dtype: "native")
    monkeypatch.setattr(kernels, "few_rows_kernel", lambda dtype: "native")


@pytest.fixture
def calls(monkeypatch):
    """The token shapes the layers' calls (either one) were made with."""
    seen: list[tuple[int, ...]] = []
    for name in ("gpt_layers", "transformer_layers"):
        layers = getattr(native, name)

        def counting(x, *args, layers=layers, **kwargs):
            seen.append(tuple(x.shape))
            return layers(x, *args, **kwargs)

        monkeypatch.setattr(native, name, counting)
    return seen


def _model(arch: str = "gpt2", dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    cfg = registry.preset_config("nano", arch, vocab_size=256, context_length=64, **overrides)
    torch.manual_seed(3)
    return registry.build_model(cfg).eval().to(dtype)


def _gpt(dtype: torch.dtype = torch.float32, **overrides) -> GPTModel:
    return _model("gpt2", dtype, **overrides)


FAMILIES = {  # Gemma 3: sliding layers (their window past the prompt) and its norms, scales and GELU
    "gpt2": {},
    "llama3": {},
    "qwen3": {},
    "gemma3": {"sliding_window": 6},
}


def _run(model: torch.nn.Module, routes: PackedLinears, chunks: list[torch.Tensor], whole: bool):
    """Logits of `chunks` fed one after another through one cache (keeping every position), with the
    model's fused forward (`whole`) or its blocks' fused forwards; and the cache."""
    cache = model.new_kv_cache(chunks[0].shape[0], 64, bounded=False)
    with torch.inference_mode(), routes.installed():
        if not whole:
            del model.__dict__["forward"]
        out = torch.cat([model(c, kv_cache=cache) for c in chunks], dim=1)
    return out, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        *FAMILIES.items(),
        *(("gpt2", {"qkv_bias": False}), ("gpt2", {"gelu": "exact"}), ("qwen3", {"qkv_bias": True})),
    ],
    ids=[*FAMILIES, "gpt2 without qkv bias", "gpt2 exact gelu", "qwen3 with qkv bias"],
)
def test_the_layers_in_one_call_are_the_blocks_fused_forwards(native_rows, calls, dtype, arch, overrides):
    model = _model(arch, dtype, **overrides)
    routes = PackedLinears(model)
    assert routes.refresh() and model in dict(routes._routes)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    # two rows: a prompt, single tokens, then a few at once (a draft's tokens checked)
    chunks = [tokens[:, :4], tokens[:, 4:5], tokens[:, 5:6], tokens[:, 6:9], tokens[:, 9:12]]
    got, cache = _run(model, routes, chunks, whole=True)
    assert calls == [tuple(c.shape) + (model.cfg.emb_dim,) for c in chunks]
    want, own_cache = _run(model, routes, chunks, whole=False)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v, own_cache.k + own_cache.v))
    assert cache.pos == own_cache.pos == 12
    with torch.inference_mode():
        plain = model(tokens)  # the modules' own forward, without any route
    tol = 1e-4 if dtype == torch.float32 else 0.15
    torch.testing.assert_close(got.float(), plain.float(), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_decoding_takes_the_layers_call_and_keeps_the_tokens(native_rows, calls, dtype, arch):
    model = _model(arch, dtype, **FAMILIES[arch])
    prompts, settings = [[5, 9, 14, 2, 7, 30, 1]], GenerationConfig(max_new_tokens=12, ignore_eos=True)
    got = Engine(model, ByteTokenizer()).generate(prompts, settings)
    steps = [(1, 1, model.cfg.emb_dim)] * 11
    # Gemma's sliding layers keep a ring of 6 columns, which takes one token at a time: its prompt goes
    # through the model's own forward
    assert calls == ([] if arch == "gemma3" else [(1, 7, model.cfg.emb_dim)]) + steps
    assert all("forward" not in m.__dict__ for m in model.modules())  # restored afterwards
    plain = Engine(model, ByteTokenizer(), prepack=False).generate(prompts, settings)
    assert [c.token_ids for c in got] == [c.token_ids for c in plain]


def test_what_the_call_does_not_compute_takes_the_models_forward(native_rows, calls):
    model = _gpt()
    engine, settings = Engine(model, ByteTokenizer()), GenerationConfig(max_new_tokens=4, ignore_eos=True)
    engine.generate([[5, 9, 14], [5, 9, 14, 2, 7]], settings)  # left padding: masked attention
    engine.generate([list(range(1, 20))], settings.replace(max_new_tokens=1))  # a prompt past 8 rows
    routes = PackedLinears(model)
    assert routes.refresh()
    tokens = torch.tensor([[1, 2, 3]])
    with torch.inference_mode(), routes.installed():
        loss = model(tokens, targets=tokens)
        cache = model.new_kv_cache(1, 16)
        model(tokens, kv_cache=cache)  # this one takes the call
        model.trf_blocks[1].train()  # one block with dropout
        one_training = model(tokens[:, :1], kv_cache=cache)
        model.train()
        train_step = model(tokens[:, :1], kv_cache=cache)
    model.eval()
    with torch.enable_grad(), routes.installed():  # gradients: autograd through the blocks
        with_grad = model(tokens, kv_cache=model.new_kv_cache(1, 16))
    assert calls == [(1, 3, model.cfg.emb_dim)] and loss.ndim == 0
    assert one_training.shape == train_step.shape == (1, 1, 256) and with_grad.shape == (1, 3, 256)


def test_models_with_other_parts_keep_their_blocks(native_rows):
    model = _gpt()
    hooked = _gpt()
    hooked.trf_blocks[1].ff.register_forward_hook(lambda *args: None)
    lora = _gpt()

    class Adapted(nn.Linear):  # a LoRA-like subclass keeps its own forward
        pass

    fc = lora.trf_blocks[0].ff.layers[0]
    adapted = Adapted(fc.in_features, fc.out_features)
    adapted.load_state_dict(fc.state_dict())
    lora.trf_blocks[0].ff.layers[0] = adapted
    moe = _model("qwen3-moe")
    biased = _model("llama3")  # a gated MLP with biases: the call has none
    ff = biased.trf_blocks[0].ff
    ff.up = nn.Linear(ff.up.in_features, ff.up.out_features)
    for m, routed in ((model, True), (hooked, False), (lora, False), (moe, False), (biased, False)):
        routes = PackedLinears(m)
        assert routes.refresh()
        assert (m in dict(routes._routes)) is routed


def test_the_probes_choice_of_other_kernels_keeps_the_blocks(monkeypatch):
    monkeypatch.setattr(kernels, "one_row_kernel", lambda dtype: "packed")
    monkeypatch.setattr(kernels, "few_rows_kernel", lambda dtype: "packed")
    model = _gpt()
    routes = PackedLinears(model)
    assert routes.refresh() and model not in dict(routes._routes)


def test_a_replaced_norm_rebuilds_the_routes(native_rows):
    model = _gpt()
    routes, tokens = PackedLinears(model), torch.tensor([[1, 2, 3]])

    def step() -> torch.Tensor:
        assert routes.refresh()
        with torch.inference_mode(), routes.installed():
            return model(tokens, kv_cache=model.new_kv_cache(1, 8))

    step()
    with torch.no_grad():
        model.trf_blocks[0].norm2.shift = nn.Parameter(torch.randn(model.cfg.emb_dim))
    with torch.inference_mode():
        want = model(tokens)
    torch.testing.assert_close(step(), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_a_slot_cache_takes_the_layers_call_row_by_row(native_rows, calls, arch):
    model = _model(arch)
    engine = Engine(model, ByteTokenizer())
    prompts = [[5, 9, 14, 2], [7, 7, 1], [3, 1, 4, 1, 5, 9]]
    settings = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    batcher = Batcher(engine, max_batch_size=3, prefill_chunk=4)
    rows = [batcher.add(p, settings) for p in prompts]
    while batcher.busy:
        batcher.step()
    assert isinstance(batcher.cache, SlotKVCache) and any(shape[0] > 1 for shape in calls)
    for prompt, row in zip(prompts, rows):
        alone = Engine(model, ByteTokenizer(), prepack=False).generate([prompt], settings)[0]
        assert row.completion.token_ids == alone.token_ids


@pytest.mark.parametrize(("arch", "mode"), [("qwen3", "int8"), ("qwen3", "int4"), ("gpt2", "int8")])
def test_quantized_layers_go_into_the_call_one_row_at_a_time(native_rows, calls, arch, mode):
    model = _model(arch, torch.bfloat16)
    quantize_model(model, mode)
    for m in model.modules():  # native's kernels where the CPU would not pick them too (portable loops)
        if isinstance(m, (Int8Linear, Int4Linear)):
            m._native = True
    routes = PackedLinears(model)
    assert routes.refresh() and model in dict(routes._routes)
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    chunks = [tokens[:, :5], *(tokens[:, i : i + 1] for i in range(5, 9))]  # the prompt: the blocks
    got, cache = _run(model, routes, chunks, whole=True)
    assert calls == [(1, 1, model.cfg.emb_dim)] * 4
    want, own_cache = _run(model, routes, chunks, whole=False)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(cache.k + cache.v, own_cache.k + own_cache.v))
    calls.clear()
    prompts, settings = [[5, 9, 14, 2, 7, 30, 1]], GenerationConfig(max_new_tokens=10, ignore_eos=True)
    routed = Engine(model, ByteTokenizer()).generate(prompts, settings)
    assert calls == [(1, 1, model.cfg.emb_dim)] * 9
    own = Engine(model, ByteTokenizer(), prepack=False).generate(prompts, settings)
    assert [c.token_ids for c in routed] == [c.token_ids for c in own]


def test_quantized_layers_leave_batches_and_other_kernels_to_the_blocks(native_rows, calls):
    model = _model("qwen3", torch.bfloat16)
    quantize_model(model, "int8")
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    for m in layers:
        m._native = True
    settings = GenerationConfig(max_new_tokens=4, ignore_eos=True)
    prompts = [[5, 9, 14], [2, 7, 30]]  # two rows: their layers' one-row kernels do not take them
    got = Engine(model, ByteTokenizer()).generate(prompts, settings)
    own = Engine(model, ByteTokenizer(), prepack=False).generate(prompts, settings)
    assert not calls and [c.token_ids for c in got] == [c.token_ids for c in own]
    layers[3]._native = False  # a layer on PyTorch's kernel: no call at all
    routes = PackedLinears(model)
    assert routes.refresh() and model not in dict(routes._routes)
