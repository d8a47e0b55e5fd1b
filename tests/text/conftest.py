"""Fixtures for the text tests."""

from __future__ import annotations

import pytest
import tiktoken

from scratchllm.text import gpt2


@pytest.fixture
def no_gpt2_download(monkeypatch, tmp_path):
    """GPT-2's tokenizer as on an offline machine with no files: tiktoken.get_encoding fails,
    $SCRATCHLLM_GPT2_TOKENIZER is unset and the home (~/.cache/scratchllm) is an empty temp dir."""

    def no_network(name):
        raise ConnectionError(f"test: no network for {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    monkeypatch.delenv(gpt2.ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
