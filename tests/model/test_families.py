"""Llama 3, Qwen3 (dense and MoE) and Gemma 3 against `transformers`: random small models saved by
transformers, converted here, give the same logits; exported back, transformers loads them and agrees;
the KV cache, left padding and the sliding window give what full recomputation gives."""

from __future__ import annotations

import json

import pytest
import torch

from scratchllm import hub
from scratchllm.checkpoint import save_model
from scratchllm.errors import ScratchLLMError
from scratchllm.model import registry
from scratchllm.model.gpt import count_parameters
from scratchllm.model.moe import MoEFeedForward
from scratchllm.model.parts import RMSNorm, rope_inverse_frequencies
from scratchllm.model.transformer import Transformer
from tests.conftest import require_transformers

transformers = require_transformers()

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def hf_llama(tied: bool = True):
    scaling = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
    )
    cfg = transformers.LlamaConfig(
        **COMMON, rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=tied, rms_norm_eps=1e-5
    )
    return transformers.LlamaForCausalLM(cfg)


def hf_qwen3(tied: bool = False):
    cfg = transformers.Qwen3Config(**COMMON, head_dim=16, rope_theta=1e6, tie_word_embeddings=tied)
    return transformers.Qwen3ForCausalLM(cfg)


def hf_qwen3_moe():
    cfg = transformers.Qwen3MoeConfig(
        **COMMON,
        head_dim=8,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    )
    return transformers.Qwen3MoeForCausalLM(cfg)


def hf_gemma3():
    cfg = transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 4},
        head_dim=16,
        sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=16,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        rope_local_base_freq=10000.0,
    )
    return transformers.Gemma3ForCausalLM(cfg)


FAMILIES = {
    "llama3": hf_llama,
    "llama3-untied": lambda: hf_llama(tied=False),
    "qwen3": hf_qwen3,
    "qwen3-tied": lambda: hf_qwen3(tied=True),
    "qwen3-moe": hf_qwen3_moe,
    "gemma3": hf_gemma3,
}


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere, norms included (transformers initializes norms to 1 or 0, which would
    hide a norm applied at the wrong place)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(params=list(FAMILIES), scope="module")
def pair(request, tmp_path_factory):
    """(transformers model, ours converted from its saved directory)."""
    hf = randomize(FAMILIES[request.param]())
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours, _ = hub.load_hf_dir(path)
    return hf, ours.float().eval()


def tokens(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed))


def test_converted_models_give_transformers_logits(pair):
    hf, ours = pair
    ids = tokens(20)  # longer than Gemma's window of 6, and than Llama's original context of 16
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_exported_models_load_in_transformers_and_agree(pair, tmp_path):
    hf, ours = pair
    save_model(tmp_path / "ours", ours, None)
    with pytest.warns(UserWarning, match="no tokenizer"):
        hub.export_hf(tmp_path / "ours", tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = tokens(20)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
    again, _ = hub.load_hf_dir(tmp_path / "hf")
    assert again.cfg == ours.cfg
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_cached_decoding_matches_recomputing_everything(pair):
    _, ours = pair
    ids = tokens(5, batch=1)
    with torch.no_grad():
        full = ids
        for _ in range(12):  # past Gemma's window
            nxt = ours(full)[:, -1].argmax(-1, keepdim=True)
            full = torch.cat([full, nxt], dim=1)
        cache = ours.new_kv_cache(1)
        logits = ours(ids, kv_cache=cache)
        cached = ids
        for _ in range(12):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            cached = torch.cat([cached, nxt], dim=1)
            logits = ours(nxt, kv_cache=cache)
    assert cached.tolist() == full.tolist()


def test_cached_logits_match_and_the_cache_holds_kv_heads_only(pair):
    _, ours = pair
    ids = tokens(14, batch=2)
    cache = ours.new_kv_cache(2)
    assert cache.k[0].shape[1] == ours.cfg.n_kv_groups < ours.cfg.n_heads
    with torch.no_grad():
        want = ours(ids)
        first = ours(ids[:, :9], kv_cache=cache)
        rest = ours(ids[:, 9:], kv_cache=cache)  # a multi-token step on a filled cache
    torch.testing.assert_close(torch.cat([first, rest], dim=1), want, atol=1e-5, rtol=1e-5)


def test_left_padding_gives_each_row_its_own_logits(pair):
    _, ours = pair
    short, long = tokens(5, batch=1, seed=2)[0], tokens(11, batch=1, seed=3)[0]
    batch = torch.zeros(2, 11, dtype=torch.long)
    batch[0, 6:], batch[1] = short, long
    mask = batch != 0
    mask[0, :6] = False
    mask[1] = True
    with torch.no_grad():
        together = ours(batch, padding_mask=mask)
        alone = ours(short[None]), ours(long[None])
    torch.testing.assert_close(together[0, 6:], alone[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1], alone[1][0], atol=1e-5, rtol=1e-5)


def test_the_mixture_of_experts_batched_path_equals_the_reference_loop():
    torch.manual_seed(0)
    for norm in (True, False):
        moe = MoEFeedForward(16, 24, n_experts=5, n_experts_per_tok=2, norm_topk_prob=norm)
        x = torch.randn(3, 7, 16)
        torch.testing.assert_close(moe(x), moe.forward_reference(x), atol=1e-6, rtol=1e-5)


def test_rms_norm_and_llama3_rope_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    x = torch.randn(2, 5, 16) * 3
    ours = RMSNorm(16, eps=1e-5)
    theirs = transformers.models.llama.modeling_llama.LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(16))
        theirs.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)
    scaling = dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    cfg = transformers.LlamaConfig(
        hidden_size=2048, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling
    )
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    got = rope_inverse_frequencies(
        64,
        500000.0,
        {
            **{k: v for k, v in scaling.items() if k != "rope_type"},
            "type": "llama3",
            "original_context_length": 8192,
        },
    )
    torch.testing.assert_close(got, want, atol=0, rtol=1e-6)


@pytest.mark.parametrize(
    "name, billions",
    [
        ("llama3.2-1b", 1.24),
        ("llama3.2-3b", 3.21),
        ("llama3.1-8b", 8.03),
        ("qwen3-0.6b", 0.60),
        ("qwen3-1.7b", 1.72),
        ("qwen3-4b", 4.02),
        ("qwen3-8b", 8.19),
        ("qwen3-30b-a3b", 30.53),
        ("gemma3-270m", 0.268),
        ("gemma3-1b", 1.00),
    ],
)
def test_presets_have_the_real_parameter_counts(name, billions):
    with torch.device("meta"):
        model = registry.build_model(registry.preset_config(name))
    assert count_parameters(model) / 1e9 == pytest.approx(billions, rel=0.01)


@pytest.mark.parametrize("arch", ["gpt2", "llama3", "qwen3", "qwen3-moe", "gemma3"])
def test_every_family_has_small_sizes_that_train(arch):
    cfg = registry.preset_config("nano", arch, vocab_size=50)
    model = registry.build_model(cfg)
    ids = tokens(16, batch=2) % 50
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    assert loss.item() == pytest.approx(torch.log(torch.tensor(50.0)).item(), rel=0.1)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_configs_round_trip_and_bad_ones_are_refused():
    for name in ("llama3.2-1b", "qwen3-30b-a3b", "gemma3-1b"):
        cfg = registry.preset_config(name)
        assert registry.config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ScratchLLMError, match="n_kv_groups"):
        registry.preset_config("qwen3-0.6b", n_kv_groups=3)
    with pytest.raises(ScratchLLMError, match="rope_scaling"):
        registry.preset_config("llama3.2-1b", rope_scaling={"type": "yarn", "factor": 2})
    with pytest.raises(ScratchLLMError, match="did you mean n_kv_groups"):
        registry.config_from_dict({"architecture": "qwen3", "num_kv_groups": 2})
    with pytest.raises(ScratchLLMError, match="is a qwen3 model, not llama3"):
        registry.preset_config("qwen3-0.6b", "llama3")


def test_unsupported_hf_settings_are_named(tmp_path):
    hf = hf_qwen3()
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(ScratchLLMError, match="hidden_act 'relu'"):
        hub.load_hf_dir(tmp_path)


def test_a_transformer_is_a_registered_model():
    model = registry.build_model(registry.preset_config("nano", "gemma3"))
    assert isinstance(model, Transformer)
    assert registry.architecture_of(model).name == "gemma3"
    assert model.cfg.layer_types == ["sliding", "full"]


def test_the_cache_of_sliding_layers_holds_their_window_only(pair):
    _, ours = pair
    cache = ours.new_kv_cache(2, 40)
    lengths = [k.shape[2] for k in cache.k]
    windows = ours.cache_windows()
    assert lengths == [w or 40 for w in windows]
    if any(windows):  # Gemma: a padded batch, a long prompt, then steps one token at a time
        ids = tokens(30, batch=2, seed=4)
        mask = torch.ones(2, 30, dtype=torch.bool)
        mask[0, :7] = False
        with torch.no_grad():
            want = ours(ids, padding_mask=mask)
            got = [ours(ids[:, :17], kv_cache=cache, padding_mask=mask[:, :17])]
            for i in range(17, 30):
                got.append(ours(ids[:, i : i + 1], kv_cache=cache, padding_mask=mask[:, : i + 1]))
        torch.testing.assert_close(torch.cat(got, dim=1)[0, 7:], want[0, 7:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat(got, dim=1)[1], want[1], atol=1e-5, rtol=1e-5)


def test_in_training_every_expert_gets_a_gradient_even_when_no_token_chose_it():
    moe = MoEFeedForward(8, 16, n_experts=6, n_experts_per_tok=1)
    moe(torch.randn(1, 2, 8)).sum().backward()  # two tokens choose at most two of the six experts
    grads = [p.grad for p in moe.parameters()]
    assert all(g is not None for g in grads)  # else DDP and FSDP processes would exchange different sets
    assert sum(bool(g.abs().sum()) for g in grads) < len(grads)  # the unchosen ones' are zero
