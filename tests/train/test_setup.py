"""`setup_model` (train/setup.py): the one way every stage sets a model up for training, and the LoRA
settings the finetunes share."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from scratchllm import checkpoint
from scratchllm.errors import ScratchLLMError
from scratchllm.finetune.classify import ClassifyConfig, add_classifier_head
from scratchllm.finetune.instruct import InstructConfig
from scratchllm.model.gpt import GPTConfig, GPTModel
from scratchllm.model.lora import DEFAULT_TARGETS, apply_lora, lora_layers
from scratchllm.text.char import CharTokenizer
from scratchllm.train.setup import LORA_ALPHA, LORA_RANK, LoRASettings, LoRASpec, setup_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1)


def tiny_model(**changes) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(GPTConfig(**{**TINY, **changes})).eval()


@pytest.fixture
def model_dir(tmp_path):
    tok = CharTokenizer.from_corpus(["the quick brown fox jumps over the lazy dog"])
    return checkpoint.save_model(tmp_path / "m", tiny_model(), tok)


def tokens() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(3))


def test_weights_are_fp32_whatever_was_stored(tmp_path):
    stored = checkpoint.save_model(tmp_path / "bf16", tiny_model().to(torch.bfloat16))
    loaded = setup_model(stored, require_tokenizer=False)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert all(p.requires_grad for p in loaded.model.parameters())  # without LoRA everything learns


def test_checks_name_the_flag_and_the_model(model_dir, tmp_path):
    clf = tiny_model()
    add_classifier_head(clf, 2)
    clf_dir = checkpoint.save_model(tmp_path / "clf", clf)
    with pytest.raises(
        ScratchLLMError, match=rf"^--init-from {clf_dir} is a classifier, not a language model$"
    ):
        setup_model(clf_dir, require_tokenizer=False, flag="--init-from")
    assert setup_model(clf_dir, require_tokenizer=False, allow_classifier=True).config.n_classes == 2
    with pytest.raises(ScratchLLMError, match=rf"^--model {clf_dir} has no tokenizer files"):
        setup_model(clf_dir, allow_classifier=True)
    with pytest.raises(
        ScratchLLMError, match=rf"^--max-length 17 exceeds the context length of --model {model_dir} \(16\)"
    ):
        setup_model(model_dir, context_length=17, context_flag="--max-length")
    assert setup_model(model_dir, context_length=16).model.cfg.context_length == 16


def test_drop_rate_reaches_every_dropout(model_dir):
    model = setup_model(model_dir, drop_rate=0.25).model
    assert model.cfg.drop_rate == 0.25
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.25 for m in dropouts)
    rates = [m.dropout for m in model.modules() if isinstance(getattr(m, "dropout", None), float)]
    assert all(r == 0.25 for r in rates)
    assert setup_model(model_dir).model.cfg.drop_rate == TINY["drop_rate"]  # None keeps the model's


def test_lora_folds_old_adapters_then_only_new_ones_learn(tmp_path):
    adapted = tiny_model()
    apply_lora(adapted, rank=2, alpha=4)
    with torch.no_grad():
        for layer in lora_layers(adapted).values():
            layer.lora.B.normal_(std=0.1)  # a trained adapter
    expected = adapted(tokens())
    saved = checkpoint.save_model(tmp_path / "lora", adapted)
    loaded = setup_model(saved, require_tokenizer=False, lora=LoRASpec(rank=3, alpha=6))
    model = loaded.model.eval()
    layers = lora_layers(model)
    assert len(layers) == 4 * TINY["n_layers"]  # GPT-2's four linear layers per block (qkv, out, MLP)
    assert {(m.lora.rank, m.lora.alpha) for m in layers.values()} == {(3, 6.0)}  # new ones only
    torch.testing.assert_close(model(tokens()), expected)  # folded in, and a new adapter adds nothing yet
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora." in n for n in trained)


def test_prepare_comes_before_the_adapters(model_dir):
    """A stage's own change (a new head) is made first: the adapters can wrap it, and its random
    initialization comes before theirs, whatever the adapters."""
    seen = []

    def new_head(loaded):
        seen.append(bool(lora_layers(loaded.model)))
        torch.manual_seed(5)
        add_classifier_head(loaded.model, 3)

    lora = LoRASpec(rank=2, targets=(*DEFAULT_TARGETS, "out_head"))
    model = setup_model(model_dir, lora=lora, also_trained=("out_head",), prepare=new_head).model
    assert seen == [False] and "out_head" in lora_layers(model)
    assert model.out_head.weight.requires_grad and model.out_head.lora.A.requires_grad
    other = tiny_model()
    torch.manual_seed(5)
    head = add_classifier_head(other, 3).out_head
    assert torch.equal(model.out_head.weight, head.weight)


def test_a_model_loaded_already(model_dir):
    loaded = checkpoint.load_model(model_dir, dtype="bf16")
    same = setup_model(loaded, lora=LoRASpec(rank=2))
    assert same is loaded and {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert lora_layers(loaded.model)


def test_both_finetunes_share_the_lora_settings_and_defaults():
    shared = {f.name: f.default for f in dataclasses.fields(LoRASettings)}
    for cls in (ClassifyConfig, InstructConfig):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert all(fields[name].metadata["group"] == "lora" for name in shared)
        cfg = cls()
        assert (cfg.lora, cfg.lora_rank, cfg.lora_alpha) == (False, LORA_RANK, LORA_ALPHA)
        assert cfg.lora_targets == list(DEFAULT_TARGETS) and cfg.lora_dropout == 0.0
        assert cfg.lora_spec() is None
    spec = InstructConfig(lora=True, lora_rank=4, lora_targets=["qkv"]).lora_spec()
    assert spec == LoRASpec(rank=4, alpha=LORA_ALPHA, targets=("qkv",), dropout=0.0)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lora_rank": 0}, "lora_rank must be >= 1 and lora_alpha > 0, got 0, 16.0"),
        ({"lora_alpha": 0.0}, "lora_rank must be >= 1 and lora_alpha > 0, got 16, 0.0"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\), got 1.0"),
        ({"lora_targets": []}, "lora_targets is empty"),
    ],
)
def test_lora_settings_that_cannot_work(changes, message):
    with pytest.raises(ScratchLLMError, match=f"^finetune settings: {message}"):
        LoRASettings(lora=True, **changes).check_lora("finetune settings")
    LoRASettings(lora=False, **changes).check_lora("finetune settings")  # unused: not checked
