"""Fixtures of the generation tests."""

from __future__ import annotations

import pytest
import torch

from scratchllm.generation import decoder


@pytest.fixture
def scripted(monkeypatch):
    """Make every row of the decoder emit the given token sequence (the model runs, the tokens are chosen)."""

    def install(tokens: list[int]):
        counter = {"i": 0}

        def fake(logits, *args, **kwargs):
            i = counter["i"]
            counter["i"] += 1
            t = tokens[i] if i < len(tokens) else ord(".")
            return torch.full((logits.shape[0],), t, dtype=torch.long)

        monkeypatch.setattr(decoder, "sample_next_token", fake)

    return install
