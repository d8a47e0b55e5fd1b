"""The model registry: a new family is a module plus a registry entry, and model directories, presets and
`scratchllm info` work for it with no other edit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn as nn

from scratchllm.checkpoint import load_model, read_config, save_model
from scratchllm.errors import ScratchLLMError
from scratchllm.fileio import CONFIG_FILE
from scratchllm.hub import model_info
from scratchllm.model import registry
from scratchllm.model.gpt import GPTConfig, GPTModel, flops_per_token
from scratchllm.model.registry import Architecture


@dataclasses.dataclass
class ToyConfig(GPTConfig):
    """GPT-2's shape with one setting of its own."""

    logit_scale: float = 0.5
    architecture: str = "toy"


class ToyModel(GPTModel):
    """GPT-2 whose logits are scaled: enough to tell the families apart."""

    def forward(self, in_idx: torch.Tensor, **kwargs) -> torch.Tensor:
        out = super().forward(in_idx, **kwargs)
        plain = not kwargs.get("return_hidden") and kwargs.get("targets") is None
        return out * self.cfg.logit_scale if plain else out


TOY = Architecture(
    name="toy",
    model_class=ToyModel,
    config_class=ToyConfig,
    presets={"toy-nano": dict(vocab_size=50, context_length=16, emb_dim=16, n_heads=2, n_layers=1)},
    flops_per_token=flops_per_token,
)


@pytest.fixture
def toy():
    registry.register(TOY)
    yield TOY
    registry.ARCHITECTURES.pop(TOY.name)


def test_a_registered_family_round_trips_through_a_model_directory(toy, tmp_path):
    cfg = registry.preset_config("toy-nano", logit_scale=0.25)
    assert isinstance(cfg, ToyConfig) and cfg.architecture == "toy"
    torch.manual_seed(0)
    model = registry.build_model(cfg).eval()
    assert type(model) is ToyModel and model.weights_tied
    path = save_model(tmp_path / "toy", model)

    doc = json.loads((path / CONFIG_FILE).read_text())
    assert next(iter(doc["model"])) == "architecture" and doc["model"]["logit_scale"] == 0.25
    assert read_config(path)[0] == cfg
    loaded = load_model(path)
    assert type(loaded.model) is ToyModel and loaded.model.weights_tied and loaded.config == cfg
    x = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.model(x), GPTModel.forward(loaded.model, x) * 0.25)
    info = model_info(model=path)
    assert info["config"]["architecture"] == "toy" and info["parameters"] == sum(
        p.numel() for p in model.parameters()
    )


def test_presets_and_names_of_families_do_not_collide(toy):
    assert "toy-nano" in registry.preset_names() and "gpt2-small" in registry.preset_names()
    assert registry.preset_config("gpt2").architecture == "gpt2"  # an alias of another family's preset
    with pytest.raises(ValueError, match="registered already"):
        registry.register(TOY)
    with pytest.raises(ValueError, match=r"preset names \['toy-nano'\] are taken"):
        registry.register(dataclasses.replace(TOY, name="toy2"))


def test_a_config_without_architecture_is_gpt2_and_an_unknown_one_is_named(tmp_path):
    model = GPTModel(GPTConfig(vocab_size=30, context_length=8, emb_dim=8, n_heads=2, n_layers=1))
    path = save_model(tmp_path / "m", model)
    doc = json.loads((path / CONFIG_FILE).read_text())
    assert doc["model"]["architecture"] == "gpt2"
    del doc["model"]["architecture"]  # written before configs named their family
    (path / CONFIG_FILE).write_text(json.dumps(doc))
    assert type(load_model(path).model) is GPTModel
    doc["model"]["architecture"] = "llama9"
    (path / CONFIG_FILE).write_text(json.dumps(doc))
    with pytest.raises(ScratchLLMError, match=r"config\.json: unknown model architecture 'llama9'; .* gpt2"):
        read_config(path)


def test_only_models_of_registered_families_are_saved(tmp_path):
    class Stranger(nn.Module):
        cfg = GPTConfig()

    with pytest.raises(TypeError, match="save_model: expected a model of a registered architecture"):
        save_model(tmp_path / "m", Stranger())
