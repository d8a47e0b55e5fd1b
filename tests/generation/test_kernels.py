"""The CPU decode kernels (prepacked weights) and bf16 weights."""

from __future__ import annotations

import pytest
import torch

from scratchllm import native
from scratchllm.errors import ScratchLLMError
from scratchllm.generation import Engine, GenerationConfig, PackedLinears, fused, kernels, resolve_dtype
from scratchllm.generation.kernels import ONE_ROW_KERNELS, _probe, one_row_kernel
from tests.generation.helpers import ByteTokenizer, book_greedy, prompts_of, tiny_model


def test_the_weight_probe_reads_inside_big_weights():
    """Float32 positions rounded past the end of a weight above 2**24 values (GPT-2's 38.6M-value
    head): every generation with prepacked weights on the 124M model raised IndexError."""
    weight = torch.zeros(768 * 50257, dtype=torch.uint8)
    weight[-1] = 9
    probe = _probe(weight)
    assert len(probe) == 8 and probe[-1] == 9  # the last value, not one past it


def test_prepacked_kernels_give_the_same_tokens_and_follow_weight_changes():
    if not PackedLinears.supported(tiny_model()):
        pytest.skip("oneDNN's prepacked linear is not available here")
    model = tiny_model(seed=5)
    packed, plain = Engine(model, ByteTokenizer()), Engine(model, ByteTokenizer(), prepack=False)
    assert packed.kernels is not None and plain.kernels is None
    prompts = prompts_of([3, 12], seed=6)
    cfg = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    assert [c.token_ids for c in packed.generate(prompts, cfg)] == [
        c.token_ids for c in plain.generate(prompts, cfg)
    ]
    assert all("forward" not in m.__dict__ for m in model.modules())  # the layers are restored afterwards
    with torch.no_grad():  # training between generations: the packed copies must follow
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert [c.token_ids for c in packed.generate(prompts, cfg)] == [
        c.token_ids for c in plain.generate(prompts, cfg)
    ]
    # weights copied in through .data (no version bump) or loaded under inference mode (no counter)
    for other_seed in (7, 8):
        other = tiny_model(seed=other_seed)
        if other_seed == 7:
            for p, q in zip(model.parameters(), other.parameters()):
                p.data.copy_(q.data)
        else:
            with torch.inference_mode():
                model.load_state_dict(other.state_dict())
        assert [c.token_ids for c in packed.generate(prompts, cfg)] == [
            c.token_ids for c in Engine(other, ByteTokenizer(), prepack=False).generate(prompts, cfg)
        ]


def test_warm_up_packs_the_weights_before_the_first_generation(monkeypatch):
    """`generate`'s summary times decoding only: packing, the kernel probe and native's first build
    happen in `warm_up`, before its clock starts, for the model and its draft."""
    model, draft = tiny_model(seed=3), tiny_model(seed=4)
    engine = Engine(model, ByteTokenizer(), draft=draft, draft_tokens=2)
    if engine.kernels is None or engine.draft_kernels is None:
        pytest.skip("no prepacked CPU kernels here")
    assert engine.warm_up() == []

    def refuse(*args):
        raise AssertionError("the weights were packed again inside the generation")

    monkeypatch.setattr(kernels, "one_row_kernel", refuse)
    monkeypatch.setattr(kernels, "few_rows_kernel", refuse)
    cfg = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    [out] = engine.generate([[5, 9, 2]], cfg)
    assert out.token_ids == book_greedy(model, [5, 9, 2], 6)


@pytest.mark.parametrize("one_row", ONE_ROW_KERNELS)
def test_one_row_takes_the_kernel_the_probe_found_fastest(monkeypatch, one_row):
    if not PackedLinears.supported(tiny_model()):
        pytest.skip("oneDNN's prepacked linear is not available here")
    if one_row == "native" and not native.available():
        pytest.skip(f"scratchllm's kernels are not available here: {native.unavailable_reason()}")
    assert {one_row_kernel(torch.float32), one_row_kernel(torch.bfloat16)} <= set(ONE_ROW_KERNELS)
    monkeypatch.setattr(kernels, "one_row_kernel", lambda dtype: one_row)
    monkeypatch.setattr(kernels, "few_rows_kernel", lambda dtype: "packed")
    rows = {"plain": [], "native": []}
    default_linear, native_linear = torch.nn.functional.linear, native.few_rows_linear

    def counting(kind, kernel):
        def count(x, weight, bias=None):
            rows[kind].append(x.numel() // x.shape[-1])
            return kernel(x, weight, bias)

        return count

    model = tiny_model(seed=3)
    packed, plain = Engine(model, ByteTokenizer()), Engine(model, ByteTokenizer(), prepack=False)
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    for prompts in (prompts_of([5], seed=1), prompts_of([4, 9], seed=2)):
        with monkeypatch.context() as patch:
            patch.setattr(torch.nn.functional, "linear", counting("plain", default_linear))
            patch.setattr(native, "few_rows_linear", counting("native", native_linear))
            got = [c.token_ids for c in packed.generate(prompts, cfg)]
        assert got == [c.token_ids for c in plain.generate(prompts, cfg)]
    for kind, counted in rows.items():  # the single prompt's decode steps, one row each; batches stay packed
        assert set(counted) == ({1} if kind == one_row else set())


def test_a_few_rows_take_native_where_the_probe_says_so(monkeypatch):
    if not PackedLinears.supported(tiny_model()) or not native.available():
        pytest.skip("needs oneDNN's prepacked linear and scratchllm's kernels")
    monkeypatch.setattr(kernels, "few_rows_kernel", lambda dtype: "native")
    # the layers in one call (tests/native/test_layers.py) would take the products past this counter
    monkeypatch.setattr(fused, "gpt_model_forward", lambda model: None)
    rows: list[int] = []
    native_linear = native.few_rows_linear

    def counting(x, weight, bias=None):
        rows.append(x.numel() // x.shape[-1])
        return native_linear(x, weight, bias)

    model = tiny_model(seed=4)
    prompts, cfg = prompts_of([4, 9, 6], seed=5), GenerationConfig(max_new_tokens=10, ignore_eos=True)
    with monkeypatch.context() as patch:
        patch.setattr(native, "few_rows_linear", counting)
        got = [c.token_ids for c in Engine(model, ByteTokenizer()).generate(prompts, cfg)]
    assert 3 in rows and max(rows) <= kernels.FEW_ROWS  # the batch's decode steps; its prompt stays packed
    assert got == [c.token_ids for c in Engine(model, ByteTokenizer(), prepack=False).generate(prompts, cfg)]


def test_the_probe_leaves_the_random_state_alone():
    if not PackedLinears.supported(tiny_model()):
        pytest.skip("oneDNN's prepacked linear is not available here")
    state = torch.random.get_rng_state()
    for dtype in (torch.float32, torch.bfloat16):
        one, few = kernels._time_kernels.__wrapped__(dtype, torch.get_num_threads(), native.available())
        assert one in ONE_ROW_KERNELS and few in ("native", "packed")
        assert few == "native" or one != "native"  # rows alone on native: a few together too
    assert torch.equal(torch.random.get_rng_state(), state)


def test_linear_subclasses_keep_their_own_forward():
    if not PackedLinears.supported(tiny_model()):
        pytest.skip("oneDNN's prepacked linear is not available here")

    class Shifted(torch.nn.Linear):  # like a LoRA layer: an nn.Linear with extra work in forward
        def forward(self, x):
            return super().forward(x) + 0.5

    model = tiny_model(seed=7)
    old = model.trf_blocks[0].ff.layers[0]
    new = Shifted(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    model.trf_blocks[0].ff.layers[0] = new
    prompts = prompts_of([5], seed=8)
    cfg = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    a = Engine(model, ByteTokenizer()).generate(prompts, cfg)
    assert a == Engine(model, ByteTokenizer(), prepack=False).generate(prompts, cfg)
    assert [c.token_ids for c in a] == [book_greedy(model, p, 20) for p in prompts]


def test_bf16_weights_generate():
    model = tiny_model(seed=8).to(torch.bfloat16)
    [c] = Engine(model, ByteTokenizer()).generate([[1, 2, 3]], max_new_tokens=10, ignore_eos=True)
    assert len(c.token_ids) == 10
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) in (torch.float32, torch.bfloat16)
    with pytest.raises(ScratchLLMError, match="fp16"):
        resolve_dtype("fp16", torch.device("cpu"))
