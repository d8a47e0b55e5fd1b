"""GenerationConfig: every setting checked with an error that names it; help text for every field."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from scratchllm.errors import ScratchLLMError
from scratchllm.generation import Engine, GenerationConfig
from tests.generation.helpers import ByteTokenizer, tiny_model


@pytest.mark.parametrize(
    "settings,match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(stop=[""]), "stop"),
        (dict(stop=5), "stop must be a string or a list"),
        (dict(temperature="hot"), "temperature must be a number"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p="x"), "top_p must be a number"),
        (dict(top_k=2.5), "top_k"),
        (dict(seed=2**64), "seed must be an integer from"),
        (dict(seed="1"), "seed"),
        (dict(stop_token_ids=5), "stop_token_ids must be a list of token ids, got 5"),
        (dict(stop_token_ids=["a"]), r"stop_token_ids must be token ids \(integers >= 0\), got \('a',\)"),
        (dict(stop_token_ids=[-1]), "stop_token_ids must be token ids"),
        (dict(eos_id="x"), "eos_id must be token ids"),
        (dict(eos_id=-5), "eos_id must be token ids"),
    ],
)
def test_out_of_range_settings_are_errors(settings, match):
    with pytest.raises(ScratchLLMError, match=match):
        GenerationConfig(**settings)
    engine = Engine(tiny_model(), ByteTokenizer())
    with pytest.raises(ScratchLLMError, match=match):
        engine.generate("abc", **settings)


def test_none_for_stop_lists_means_none_and_numpy_ids_are_ids():
    cfg = GenerationConfig(stop=None, stop_token_ids=None)
    assert cfg.stop == () and cfg.stop_token_ids == ()
    assert GenerationConfig(stop_token_ids=np.array([3, 4])).stop_token_ids == (3, 4)


def test_every_setting_has_help_text():
    """The command-line flags of generate, chat, serve and respond are made from these fields."""
    for f in dataclasses.fields(GenerationConfig):
        assert f.metadata.get("help"), f"GenerationConfig.{f.name} has no help text"
