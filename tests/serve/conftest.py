"""Tiny models for the chat, server and judge tests: a BPE tokenizer trained here on a few
sentences and a random 2-layer GPT, saved as a model directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from scratchllm.checkpoint import save_model
from scratchllm.model.gpt import GPTModel
from scratchllm.text.bpe import BPETokenizer, train_bpe
from tests.generation.helpers import tiny_model

TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request. The quick brown fox jumps over the lazy dog. Name three primary colors: red, blue and "
    "yellow. Rewrite the sentence in passive voice. The cat sat on the mat. What is the capital of "
    "France? Paris is the capital of France. Convert 45 kilometers to meters: 45000 meters. "
) * 3


@pytest.fixture(scope="session")
def bpe() -> BPETokenizer:
    return train_bpe([TEXT], vocab_size=320, progress=False)


def tiny_gpt(vocab: int, ctx: int = 256, seed: int = 0) -> GPTModel:
    # untied: a random tied model mostly repeats its last token, so replies would be empty or dull
    return tiny_model(seed=seed, ctx=ctx, vocab=vocab, tie_weights=False)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, bpe: BPETokenizer) -> Path:
    """A random tiny model with a trained BPE tokenizer and no stored prompt template."""
    return save_model(tmp_path_factory.mktemp("models") / "tiny", tiny_gpt(bpe.vocab_size), bpe)
