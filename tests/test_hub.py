"""GPT-2 weights in and out: Hugging Face format <-> model directories, offline (no network in tests:
the download is replaced by a local directory where it matters)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import huggingface_hub
import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scratchllm import hub
from scratchllm.checkpoint import WEIGHTS_FILE, save_model
from scratchllm.cli import main
from scratchllm.cli import main as table_main
from scratchllm.errors import ScratchLLMError
from scratchllm.fileio import directory_kind
from scratchllm.generation import Engine
from scratchllm.hub import convert as hub_convert
from scratchllm.hub import export as hub_export
from scratchllm.hub import fetch as hub_fetch
from scratchllm.hub import load_model
from scratchllm.model.gpt import GPTConfig, GPTModel, preset_config
from scratchllm.model.gpt2_hf import HF_PREFIX
from scratchllm.model.lora import apply_lora, lora_layers
from scratchllm.text.bpe import train_bpe
from scratchllm.text.char import CharTokenizer
from scratchllm.text.gpt2 import load_gpt2_files
from scratchllm.text.simple import SimpleTokenizer

from .conftest import require_transformers, shared_file

transformers = require_transformers()

# (n_embd, n_layer, n_head, vocab_size, n_positions)
SHAPES = [(32, 2, 4, 100, 64), (48, 3, 6, 257, 32), (64, 1, 1, 50, 16)]


def random_hf_model(
    n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, tie=True, activation="gelu_new"
):
    """A GPT2LMHeadModel with every tensor random (norms and biases too), in eval mode."""
    cfg = transformers.GPT2Config(
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        vocab_size=vocab_size,
        n_positions=n_positions,
        tie_word_embeddings=tie,
        activation_function=activation,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def random_model(**overrides) -> GPTModel:
    cfg = GPTConfig(
        **{**dict(vocab_size=100, context_length=64, emb_dim=32, n_heads=4, n_layers=2), **overrides}
    )
    model = GPTModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


def our_logits(model, x):
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------------------------
# Hugging Face -> ours -> Hugging Face


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_hf_to_ours_same_logits(tmp_path, shape, tie):
    *_, vocab, n_pos = shape
    hf = random_hf_model(*shape, tie=tie)
    hf.save_pretrained(tmp_path / "hf")
    out = hub.convert_hf_dir(tmp_path / "hf", tmp_path / "ours")
    loaded = load_model(out)
    cfg = loaded.config
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.context_length) == shape
    assert cfg.tie_weights == tie == loaded.model.weights_tied
    x = torch.randint(0, vocab, (2, n_pos))
    torch.testing.assert_close(our_logits(loaded.model, x), hf_logits(hf, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "gelu_python"])
def test_hf_gelu_forms(tmp_path, activation):
    """GPT-2's tanh GELU under each of its transformers names, and the exact (erf) GELU, convert to the
    matching `gelu` setting: same logits."""
    hf = random_hf_model(activation=activation)
    hf.save_pretrained(tmp_path / "hf")
    loaded = load_model(hub.convert_hf_dir(tmp_path / "hf", tmp_path / "ours"))
    assert loaded.config.gelu == ("exact" if activation in ("gelu", "gelu_python") else "tanh")
    x = torch.randint(0, 100, (2, 64))
    # tight: with these small weights the other GELU would be ~1e-6 off; the same one is within 4e-8
    torch.testing.assert_close(our_logits(loaded.model, x), hf_logits(hf, x), atol=2e-7, rtol=0)


@pytest.mark.parametrize("gelu", ["tanh", "exact"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["qkv-bias", "no-qkv-bias"])
def test_ours_to_hf_same_logits(tmp_path, tie, qkv_bias, gelu):
    model = random_model(tie_weights=tie, qkv_bias=qkv_bias, emb_dim=48, n_heads=3, n_layers=3, gelu=gelu)
    save_model(tmp_path / "ours", model)
    hub.export_hf(tmp_path / "ours", tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.activation_function == {"tanh": "gelu_new", "exact": "gelu"}[gelu]
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == tie
    x = torch.randint(0, 100, (3, 64))
    torch.testing.assert_close(hf_logits(hf, x), our_logits(model, x), atol=1e-4, rtol=0)
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert ("lm_head.weight" in tensors) == (not tie)
    if not qkv_bias:  # exported as zero biases
        assert not tensors["transformer.h.0.attn.c_attn.bias"].any()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_a_model_with_lora_adapters_exports_what_it_computes(tmp_path, tie):
    """GPT-2 has no place for adapters: export folds them into the weights (of a copy), so
    transformers computes what the adapted model does, and the loaded model keeps its adapters."""

    model = random_model(tie_weights=tie, emb_dim=48, n_heads=3)
    apply_lora(model, rank=4, alpha=2.0, targets=("qkv", "out_proj", "ff") + (() if tie else ("out_head",)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.normal_(0.0, 0.1)  # adapters that change the function
    save_model(tmp_path / "ours", model)
    loaded = load_model(tmp_path / "ours")
    hub.export_hf(loaded, tmp_path / "hf")
    assert len(lora_layers(loaded.model)) == len(lora_layers(model)) > 0  # not merged in place
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 100, (2, 64))
    torch.testing.assert_close(hf_logits(hf, x), our_logits(model, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("penalty", [1.2, 2.0])
def test_repetition_penalty_gives_transformers_tokens(tmp_path, penalty):
    """Greedy decoding with `repetition_penalty` picks the tokens transformers' `generate` picks
    with the same weights (and differs from plain greedy decoding, so the penalty is at work)."""

    hf = random_hf_model(n_embd=48, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    hf.save_pretrained(tmp_path / "hf")
    model = load_model(hub.convert_hf_dir(tmp_path / "hf", tmp_path / "ours")).model
    engine = Engine(model)
    changed = 0
    for seed in range(3):
        prompt = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            out = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=30,
                do_sample=False,
                repetition_penalty=penalty,
                pad_token_id=0,
                eos_token_id=None,
            )
        expected = out[0, prompt.shape[1] :].tolist()
        [ours] = engine.generate(
            prompt[0].tolist(), max_new_tokens=30, repetition_penalty=penalty, ignore_eos=True
        )
        assert ours.token_ids == expected
        [plain] = engine.generate(prompt[0].tolist(), max_new_tokens=30, ignore_eos=True)
        changed += plain.token_ids != expected
    assert changed == 3


def test_prompt_and_generation_logprobs_equal_transformers(tmp_path):
    """`prompt_logprobs` (the server's echo + logprobs) and the generated tokens' logprobs are
    transformers' log-softmax scores for the same weights and tokens."""

    hf = random_hf_model(n_embd=48, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    hf.save_pretrained(tmp_path / "hf")
    engine = Engine(load_model(hub.convert_hf_dir(tmp_path / "hf", tmp_path / "ours")).model)
    ids = torch.randint(0, 100, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.log_softmax(hf(ids).logits[0, :-1], -1)
    scored = engine.prompt_logprobs(ids[0].tolist(), top=5)
    assert scored[0] is None
    got = torch.tensor([s.logprob for s in scored[1:]])
    torch.testing.assert_close(got, expected.gather(1, ids[0, 1:, None])[:, 0], atol=1e-4, rtol=0)
    assert [[i for i, _ in s.top] for s in scored[1:]] == expected.topk(5).indices.tolist()

    with torch.no_grad():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
    [c] = engine.generate(ids[0].tolist(), max_new_tokens=8, ignore_eos=True, logprobs=1)
    assert c.token_ids == out.sequences[0, 20:].tolist()
    hf_logprobs = [torch.log_softmax(score[0], -1)[t].item() for score, t in zip(out.scores, c.token_ids)]
    assert [lp.logprob for lp in c.logprobs] == pytest.approx(hf_logprobs, abs=1e-4)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_round_trip_gives_identical_tensors(tmp_path, tie):
    model = random_model(tie_weights=tie)
    save_model(tmp_path / "a", model)
    hub.export_hf(tmp_path / "a", tmp_path / "hf")
    hub.convert_hf_dir(tmp_path / "hf", tmp_path / "b")
    assert (
        load_file(str(tmp_path / "a" / WEIGHTS_FILE)).keys()
        == load_file(str(tmp_path / "b" / WEIGHTS_FILE)).keys()
    )
    for k, v in load_file(str(tmp_path / "a" / WEIGHTS_FILE)).items():
        assert torch.equal(v, load_file(str(tmp_path / "b" / WEIGHTS_FILE))[k]), k
    # and the other way: HF -> ours -> HF gives HF's tensors back
    hf = random_hf_model(tie=tie)
    hf.save_pretrained(tmp_path / "hf2")
    hub.convert_hf_dir(tmp_path / "hf2", tmp_path / "c")
    hub.export_hf(tmp_path / "c", tmp_path / "hf3")
    theirs = {k: v for k, v in hf.state_dict().items() if tie is False or k != "lm_head.weight"}
    back = load_file(str(tmp_path / "hf3" / "model.safetensors"))
    assert back.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(back[k], theirs[k]), k


def test_hub_layout_without_prefix_and_with_mask_buffers(tmp_path):
    """OpenAI's files on the hub: names without `transformer.`, causal-mask buffers `h.N.attn.bias`."""
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    model, tok = hub.load_hf_dir(tmp_path / "hf")
    assert tok is None
    x = torch.randint(0, 100, (1, 20))
    torch.testing.assert_close(our_logits(model, x), hf_logits(hf, x), atol=1e-4, rtol=0)


def test_sharded_hf_weights(tmp_path):
    hf = random_hf_model(n_embd=64, n_layer=3, n_head=4)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model, _ = hub.load_hf_dir(tmp_path / "hf")
    x = torch.randint(0, 100, (2, 10))
    torch.testing.assert_close(our_logits(model, x), hf_logits(hf, x), atol=1e-4, rtol=0)


def test_tied_head_that_differs_is_refused(tmp_path):
    hf = random_hf_model(tie=False)
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ScratchLLMError, match=r"lm_head\.weight differs from wte\.weight"):
        hub.load_hf_dir(tmp_path / "hf")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(model_type="mistral"), "model_type is .mistral.; only GPT-2 .* converts"),
        (dict(activation_function="relu"), "activation_function 'relu'"),
        (dict(n_inner=100), "n_inner 100"),
        (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (dict(n_embd=None), "missing or bad GPT-2 setting"),
        (dict(layer_norm_epsilon=None), "layer_norm_epsilon None"),
        (dict(layer_norm_epsilon="x"), "layer_norm_epsilon 'x'"),
        (dict(resid_pdrop="high"), r"hf/config.json: .*high"),
        (dict(n_head=5), r"hf/config.json: .*5"),  # does not divide n_embd
    ],
)
def test_hf_configs_we_cannot_represent(tmp_path, change, message):
    random_hf_model().save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ScratchLLMError, match=message):
        hub.load_hf_dir(tmp_path / "hf")


def test_broken_hf_directories(tmp_path):
    with pytest.raises(ScratchLLMError, match="is not a directory"):
        hub.load_hf_dir(tmp_path / "none")
    hf = tmp_path / "hf"
    random_hf_model().save_pretrained(hf)
    tensors = load_file(str(hf / "model.safetensors"))
    # an extra tensor that is not GPT-2 (say, a classifier's `score`)
    save_file(
        {**tensors, "score.weight": torch.zeros(2, 32)},
        str(hf / "model.safetensors"),
        metadata={"format": "pt"},
    )
    with pytest.raises(ScratchLLMError, match=r"not part of a GPT-2 language model: score\.weight"):
        hub.load_hf_dir(hf)
    # a missing one, reported by our name
    tensors.pop("transformer.h.1.mlp.c_fc.bias")
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ScratchLLMError, match=r"missing tensor trf_blocks\.1\.ff\.layers\.0\.bias"):
        hub.load_hf_dir(hf)
    # truncated
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ScratchLLMError, match="probably truncated or corrupt"):
        hub.load_hf_dir(hf)
    # only a pickle: never loaded
    (hf / "model.safetensors").unlink()
    (hf / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ScratchLLMError, match=r"no model.safetensors \(found pytorch_model.bin: pickled"):
        hub.load_hf_dir(hf)
    (hf / "config.json").unlink()
    with pytest.raises(ScratchLLMError, match=r"config\.json is missing"):
        hub.load_hf_dir(hf)


def test_export_refuses_a_classifier(tmp_path):
    save_model(tmp_path / "clf", random_model(n_classes=2))
    with pytest.raises(ScratchLLMError, match=r"classifier .* not a language model"):
        hub.export_hf(tmp_path / "clf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_replaces_only_a_directory_it_wrote(tmp_path):
    """Another Hugging Face model in the way (the user's own download, a Llama) is not replaced."""
    save_model(tmp_path / "m", random_model())
    hub.export_hf(tmp_path / "m", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["exported_by"].startswith("scratchllm ")
    hub.export_hf(tmp_path / "m", tmp_path / "hf")  # again: its own export is replaced
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (other / "README.md").write_text("my model")
    with pytest.raises(
        ScratchLLMError, match=r"llama is a Hugging Face model directory that this export-hf did not"
    ):
        hub.export_hf(tmp_path / "m", other)
    assert (other / "README.md").read_text() == "my model"


def test_hf_config_fields(tmp_path):
    save_model(tmp_path / "m", random_model(drop_rate=0.0))
    hub.export_hf(tmp_path / "m", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["activation_function"] == "gelu_new"
    assert (cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_positions"], cfg["vocab_size"]) == (
        32,
        2,
        4,
        64,
        100,
    )
    assert cfg["layer_norm_epsilon"] == 1e-5 and cfg["tie_word_embeddings"] is True
    assert hub.config_from_hf(cfg) == GPTConfig(
        vocab_size=100, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0
    )


# ----------------------------------------------------------------------------------------------
# Tokenizers: vocab.json + merges.txt are OpenAI's encoder.json + vocab.bpe under other names


def gpt2_tokenizer():
    shared_file("encoder.json")
    return load_gpt2_files(shared_file("encoder.json").parent)


TEXT = "Hello, world! It's 2024:  naïve café, 日本語\ttabs\nand newlines   x"


def test_export_writes_a_tokenizer_hf_loads(tmp_path):
    tok = gpt2_tokenizer()
    save_model(tmp_path / "m", random_model(vocab_size=50257, emb_dim=16, n_heads=2, n_layers=1), tok)
    hub.export_hf(tmp_path / "m", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(TEXT)["input_ids"] == tok.encode(TEXT)
    with_eot = TEXT + "<|endoftext|>" + TEXT
    assert hf_tok(with_eot)["input_ids"] == tok.encode(with_eot, allowed_special="all")
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == 50256
    fast = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "hf")
    assert fast(TEXT)["input_ids"] == tok.encode(TEXT)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == 50256


def test_hf_tokenizer_files_load_as_gpt2(tmp_path):
    tok = gpt2_tokenizer()
    save_model(tmp_path / "m", random_model(vocab_size=50257, emb_dim=16, n_heads=2, n_layers=1), tok)
    hub.export_hf(tmp_path / "m", tmp_path / "hf")
    back = hub.load_hf_tokenizer(tmp_path / "hf")
    assert back.fingerprint() == tok.fingerprint()
    assert back.encode(TEXT) == tok.encode(TEXT) and back.eot_id == 50256
    # and through a full conversion, into the model directory
    hub.convert_hf_dir(tmp_path / "hf", tmp_path / "back")
    assert load_model(tmp_path / "back").tokenizer.fingerprint() == tok.fingerprint()
    assert back.name == "gpt2"


def test_a_smaller_bpe_comes_back_from_hugging_face_under_its_size(tmp_path):
    """Another GPT-2-style BPE (one trained here and exported) is not called gpt2 when it comes back."""

    tok = train_bpe([TEXT * 20], vocab_size=300, progress=False)
    save_model(tmp_path / "m", random_model(vocab_size=300), tok)
    hub.export_hf(tmp_path / "m", tmp_path / "hf")
    back = hub.load_hf_tokenizer(tmp_path / "hf")
    assert back.fingerprint() == tok.fingerprint() and back.name == f"bpe-{tok.vocab_size}"


def test_non_gpt2_tokenizers_are_not_exported(tmp_path):
    tok = SimpleTokenizer.from_corpus("a b c")
    save_model(tmp_path / "m", random_model(), tok)
    hub.export_hf(tmp_path / "m", tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]


# ----------------------------------------------------------------------------------------------
# Hub names, the cache and the (mocked) download


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """snapshot_download replaced by a local HF directory holding a small model; gpt2-small's
    preset shrunk to its shape so the shape check passes. Records the calls."""

    src = tmp_path / "snapshot"
    hf = random_hf_model()
    hf.save_pretrained(src)
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(src)

    small = dict(vocab_size=100, context_length=64, emb_dim=32, n_heads=4, n_layers=2)
    real_preset = hub_convert.preset_config
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub_convert, "preset_config", lambda name, **kw: real_preset(name, **{**small, **kw}))
    return hf, calls


def test_hub_names():
    assert hub.canonical_name("gpt2") == hub.canonical_name("124M") == "gpt2-small"
    assert hub.canonical_name("1558M") == "gpt2-xl"
    assert all(hub.is_hub_name(n) for n in ("gpt2", "gpt2-medium", "355M"))
    assert not hub.is_hub_name("nano")
    assert all(hub.is_hub_name(n) for n in ("llama3.2-1b", "qwen3-0.6b", "qwen3-30b-a3b", "gemma3-270m"))
    with pytest.raises(ScratchLLMError, match="unknown model 'gpt3' on the Hugging Face hub"):
        hub.canonical_name("gpt3")


def test_cache_location(home, monkeypatch):
    assert hub.cache_dir("124M") == home / "models" / "gpt2-small"
    monkeypatch.delenv("SCRATCHLLM_HOME")
    assert hub.cache_dir("gpt2").parts[-4:] == (".cache", "scratchllm", "models", "gpt2-small")


def test_load_model_downloads_once_then_uses_the_cache(home, fake_hub):
    hf, calls = fake_hub
    loaded = load_model("gpt2")
    assert len(calls) == 1
    repo, kwargs = calls[0]
    assert repo == "openai-community/gpt2"
    assert "model.safetensors" in kwargs["allow_patterns"] and "vocab.json" in kwargs["allow_patterns"]
    assert loaded.path == home / "models" / "gpt2-small"
    x = torch.randint(0, 100, (1, 12))
    torch.testing.assert_close(our_logits(loaded.model, x), hf_logits(hf, x), atol=1e-4, rtol=0)
    again = load_model("124M")  # an alias of the same model: from the cache
    assert again.path == loaded.path and len(calls) == 1


def test_download_cli(home, fake_hub, tmp_path, capsys):
    _, calls = fake_hub
    assert main(["download", "gpt2", "--size", "355M", "--out", str(tmp_path / "med"), "--quiet"]) == 0
    assert calls[-1][0] == "openai-community/gpt2-medium"
    assert load_model(tmp_path / "med").config.n_layers == 2
    assert main(["download", "gpt2-large", "--out", str(tmp_path / "large")]) == 0
    assert calls[-1][0] == "openai-community/gpt2-large"
    assert main(["download", "gpt2-medium", "--size", "124M"]) == 2
    assert "gpt2-medium is not the 124M model" in capsys.readouterr().err


def test_download_failure_is_a_clear_error(home, monkeypatch):
    def no_network(repo_id, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(
        ScratchLLMError, match=r"cannot download openai-community/gpt2 .*ConnectionError.*--from DIR"
    ):
        load_model("gpt2")
    assert not (home / "models" / "gpt2-small").exists()


def test_offline_mode_is_passed_to_the_hub_client(home, monkeypatch):
    seen = {}

    def snapshot_download(repo_id, **kwargs):
        seen.update(kwargs)
        raise FileNotFoundError("not in cache")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(
        ScratchLLMError,
        match=r"HF_HUB_OFFLINE is set and it is not in the Hugging Face cache\). To fix: unset "
        r"HF_HUB_OFFLINE, connect .* `scratchllm download gpt2-xl --from DIR`",
    ):
        hub.fetch_model("gpt2-xl")
    assert seen["local_files_only"] is True


def test_a_cache_with_part_of_the_repository_says_so(home, tmp_path, monkeypatch):
    """Offline, the hub client returns a snapshot that holds only what was fetched (say a config)."""

    part = tmp_path / "snapshot"
    part.mkdir()
    (part / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(part))
    with pytest.raises(
        ScratchLLMError,
        match=r"holds only part of openai-community/gpt2-medium .*unset HF_HUB_"
        r"OFFLINE, connect to the network and run `scratchllm download gpt2-medium` again",
    ):
        hub.fetch_model("gpt2-medium")


def test_offline_cli_without_cache_exits_2(tmp_path):
    """The real client, no mocks: HF_HUB_OFFLINE=1 and empty caches never touch the network."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "SCRATCHLLM_HOME": str(tmp_path / "s"),
    }
    r = subprocess.run(
        [sys.executable, "-m", "scratchllm", "download", "gpt2", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2, r.stderr
    assert "HF_HUB_OFFLINE is set" in r.stderr and "scratchllm download gpt2 --from DIR" in r.stderr
    assert r.stderr.count("\n") == 1


def test_download_from_local_dir(home, tmp_path, capsys):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["download", "gpt2", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 0
    assert "saved the model directory" in capsys.readouterr().out
    x = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(
        our_logits(load_model(tmp_path / "out").model, x), hf_logits(hf, x), atol=1e-4, rtol=0
    )
    # into the cache the shape must be the named model's
    assert main(["download", "gpt2", "--from", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "does not hold gpt2-small: vocab_size 100 (expected 50257)" in err and "--size" in err
    # GPT-2's shape with the exact GELU is another model too (config only: the check comes first)
    (tmp_path / "gpt2-exact").mkdir()
    config = {**hub.hf_config(preset_config("gpt2-small")), "activation_function": "gelu"}
    (tmp_path / "gpt2-exact" / "config.json").write_text(json.dumps(config))
    assert main(["download", "gpt2", "--from", str(tmp_path / "gpt2-exact")]) == 2
    assert "does not hold gpt2-small: gelu exact (expected tanh)" in capsys.readouterr().err
    assert not (home / "models").exists() or not any((home / "models").iterdir())
    assert main(["download", "gpt2", "--from", str(tmp_path / "nothing")]) == 2


def test_export_cli(tmp_path, capsys):
    model = random_model()
    save_model(tmp_path / "m", model)
    assert main(["export-hf", str(tmp_path / "m"), str(tmp_path / "hf")]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(hf_logits(hf, x), our_logits(model, x), atol=1e-4, rtol=0)
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "missing"), str(tmp_path / "hf2")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists()


def test_outputs_never_replace_a_directory_of_something_else(tmp_path, capsys):
    """Outputs replace their directory as a whole, so they refuse one that is not theirs: the run
    directory holding the model (the case that once wiped a run), the source itself, the cwd."""
    run = tmp_path / "run"
    save_model(run / "model", random_model())
    (run / "metrics.jsonl").write_text("{}\n")
    assert main(["export-hf", str(run / "model"), str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds" in err and "which this writes from" in err and len(err.splitlines()) == 1
    assert main(["export-hf", str(run / "model"), str(run / "model")]) == 2
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    assert main(["export-hf", str(run / "model"), str(tmp_path / "notes")]) == 2
    assert "is not a Hugging Face model directory (it has no config.json)" in capsys.readouterr().err
    assert (
        sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "model"]
        and (tmp_path / "notes" / "a.txt").exists()
    )
    with pytest.raises(ScratchLLMError, match="is not a model directory"):
        save_model(tmp_path / "notes", random_model())
    # an earlier export, or a model directory, is replaced
    assert main(["export-hf", str(run / "model"), str(tmp_path / "hf")]) == 0
    assert main(["export-hf", str(run / "model"), str(tmp_path / "hf")]) == 0
    save_model(run / "model", random_model(n_layers=1))  # a model directory: replaced
    # converting a Hugging Face directory onto itself would delete the source
    assert main(["download", "gpt2", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "hf")]) == 2
    assert "which this writes from" in capsys.readouterr().err and (tmp_path / "hf" / "config.json").exists()


def test_one_kind_of_output_never_replaces_another(tmp_path, capsys):
    """A model directory holds tokenizer files, an exported Hugging Face directory a config.json: the
    markers alone would let a tokenizer replace a model, an export replace a model (and back), and a
    run spread over a model or prepared data. Each is refused with one line, and nothing changes."""

    tok = train_bpe(["the cat sat on the mat " * 20], vocab_size=260, progress=False)
    model = save_model(tmp_path / "model", random_model(vocab_size=tok.vocab_size), tok)
    assert main(["export-hf", str(model), str(tmp_path / "hf")]) == 0
    hf = tmp_path / "hf"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 50)
    assert (
        main(["prepare", "--corpus", str(corpus), "--tokenizer", str(model), "--out", str(tmp_path / "data")])
        == 0
    )
    kinds = {
        p.name: directory_kind(p) for p in (model, hf, tmp_path / "data", tmp_path / "data" / "tokenizer")
    }
    assert kinds == {
        "model": "model directory",
        "hf": "Hugging Face model directory",
        "data": "prepared data directory",
        "tokenizer": "tokenizer directory",
    }
    before = {p: sorted(q.name for q in p.iterdir()) for p in (model, hf, tmp_path / "data")}
    capsys.readouterr()
    for argv, message in [
        (
            ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "260", "--out", str(model)],
            "is a model directory, not a tokenizer directory",
        ),
        (["export-hf", str(model), str(model)], "which this writes from"),
        (
            ["export-hf", str(tmp_path / "model"), str(tmp_path / "data")],
            "is a prepared data directory, not a Hugging",
        ),
        (["download", "gpt2", "--from", str(hf), "--out", str(model)], None),  # a model directory: replaced
        (
            ["download", "gpt2", "--from", str(hf), "--out", str(tmp_path / "data")],
            "is a prepared data directory",
        ),
        (
            ["pretrain", "--corpus", str(corpus), "--out-dir", str(tmp_path / "data")],
            "--out-dir " + str(tmp_path / "data") + " is a prepared data directory, not a run directory",
        ),
        (
            ["pretrain", "--corpus", str(corpus), "--out-dir", str(hf)],
            "is a Hugging Face model directory, not a run",
        ),
    ]:
        assert main(argv) == (0 if message is None else 2), argv
        err = capsys.readouterr().err.strip()
        assert message is None or (message in err and len(err.splitlines()) == 1), err
    cp = tmp_path / "hf-copy"
    assert main(["export-hf", str(model), str(cp)]) == 0
    assert main(["download", "gpt2", "--from", str(cp), "--out", str(hf)]) == 2
    assert "is a Hugging Face model directory, not a model directory" in capsys.readouterr().err
    assert main(["export-hf", str(model), str(model)]) == 2
    assert {p: sorted(q.name for q in p.iterdir()) for p in (model, hf, tmp_path / "data")} == before
    capsys.readouterr()
    assert main(["download", "gpt2", "--from", str(model), "--out", str(tmp_path / "new")]) == 2
    assert "is a scratchllm model directory already, nothing to convert" in capsys.readouterr().err


def test_export_of_a_tokenizer_without_a_gpt2_form_says_what_is_missing(tmp_path):
    """A char (or no) tokenizer cannot be written as GPT-2's: the export says so instead of leaving a
    directory whose AutoTokenizer encodes every text to nothing."""

    tok = CharTokenizer.from_corpus("the cat sat on the mat")
    save_model(tmp_path / "char", random_model(vocab_size=tok.vocab_size), tok)
    with pytest.warns(UserWarning, match=r"weights and config only \(its char tokenizer has no GPT-2 form\)"):
        assert main(["export-hf", str(tmp_path / "char"), str(tmp_path / "hf")]) == 0
    assert not (tmp_path / "hf" / "vocab.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()


def test_hf_weights_with_nan_are_refused_at_conversion(home, tmp_path, capsys):
    save_model(tmp_path / "m", random_model())
    with pytest.warns(UserWarning, match="weights and config only"):
        hub.export_hf(tmp_path / "m", tmp_path / "hf")
    weights = tmp_path / "hf" / hub.HF_WEIGHTS_FILE
    tensors = load_file(str(weights))
    name = f"{HF_PREFIX}h.1.mlp.c_proj.weight"
    tensors[name].view(-1)[5] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(
        ScratchLLMError, match=rf"^{weights}: tensor '{name}' is not finite: 1 NaN of its 4,096 values"
    ):
        hub.convert_hf_dir(tmp_path / "hf", tmp_path / "out")
    assert main(["download", "gpt2", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and f"tensor '{name}' is not finite: 1 NaN of its" in err and str(weights) in err
    )
    assert not (tmp_path / "out").exists()


def test_a_full_disk_during_export_is_one_line_and_keeps_the_old_export(tmp_path, monkeypatch, capsys):
    save_model(tmp_path / "m", random_model())
    assert main(["export-hf", str(tmp_path / "m"), str(tmp_path / "hf")]) == 0
    before = load_file(str(tmp_path / "hf" / hub.HF_WEIGHTS_FILE))

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 64)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "m"), str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == (
        f"scratchllm: error: cannot write the Hugging Face model directory {tmp_path / 'hf'} ([Errno 28] No "
        "space left on device: 'model.safetensors'; is the disk full or read-only?); the Hugging Face model "
        "directory there is unchanged\n"
    )
    after = load_file(str(tmp_path / "hf" / hub.HF_WEIGHTS_FILE))
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m"]


# ----------------------------------------------------------------------------------------------
# download and export-hf through the command table: flags -> settings, then the commands


def test_download_and_export_flags_become_settings(monkeypatch):
    seen = []
    monkeypatch.setattr(hub_fetch, "download_command", seen.append)
    monkeypatch.setattr(hub_export, "export_hf_command", seen.append)
    assert table_main(["download"]) == 0
    assert table_main(["download", "gpt2-medium", "--out", "o", "--from", "hf", "--quiet"]) == 0
    assert table_main(["download", "--size", "774M"]) == 0
    assert table_main(["export-hf", "runs/m", "out"]) == 0
    assert seen == [
        hub_fetch.DownloadSettings(),
        hub_fetch.DownloadSettings("gpt2-medium", None, "o", "hf", True),
        hub_fetch.DownloadSettings(size="774M"),
        hub_export.ExportHFSettings("runs/m", "out"),
    ]
    assert seen[0].name == "gpt2" and seen[0].quiet is False
    for argv in (["download", "gpt5"], ["download", "--size", "7B"], ["export-hf", "runs/m"]):
        with pytest.raises(SystemExit) as e:
            table_main(argv)
        assert e.value.code == 2


def test_download_and_export_through_the_table(home, fake_hub, tmp_path, capsys):
    _, calls = fake_hub
    assert table_main(["download", "gpt2", "--size", "355M", "--out", str(tmp_path / "med"), "--quiet"]) == 0
    assert calls[-1][0] == "openai-community/gpt2-medium"
    assert f"saved the model directory {tmp_path / 'med'}" in capsys.readouterr().out
    assert table_main(["download", "gpt2-medium", "--size", "124M"]) == 2
    assert "gpt2-medium is not the 124M model" in capsys.readouterr().err

    assert table_main(["export-hf", str(tmp_path / "med"), str(tmp_path / "hf")]) == 0
    assert f"wrote a Hugging Face directory to {tmp_path / 'hf'}" in capsys.readouterr().out
    assert (
        table_main(["download", "gpt2", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    )
    x = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(
        our_logits(load_model(tmp_path / "back").model, x),
        our_logits(load_model(tmp_path / "med").model, x),
        atol=1e-5,
        rtol=0,
    )
    assert table_main(["export-hf", str(tmp_path / "missing"), str(tmp_path / "hf2")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "hf2").exists()


def test_a_gated_repository_says_to_accept_its_license_and_give_hf_token(home, monkeypatch, capsys):
    from huggingface_hub.errors import GatedRepoError

    class Gated(GatedRepoError):
        def __init__(self):  # the real one wants an HTTP response
            Exception.__init__(self, "403 Client Error: access to this model is restricted")

    def snapshot_download(repo_id, **kwargs):
        raise Gated()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert table_main(["download", "llama3.2-1b"]) == 2
    err = capsys.readouterr().err
    assert "meta-llama/Llama-3.2-1B is a gated model" in err and "HF_TOKEN" in err
    assert "https://huggingface.co/meta-llama/Llama-3.2-1B" in err and "--from DIR" in err
