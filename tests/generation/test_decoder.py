"""The Decoder: cached == uncached == the book's loop, for batches (left padding) and past the
context window; long prompts cropped with one warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from scratchllm.generation import Engine
from scratchllm.model.gpt import GPTConfig, GPTModel
from tests.generation.helpers import ByteTokenizer, book_greedy, decode_all, prompts_of, tiny_model


@pytest.mark.parametrize(
    "lengths,n",
    [
        ([5], 10),  # short
        ([3], 40),  # runs past the context window (24)
        ([24], 5),  # starts with a full window
        ([4, 4, 4], 12),  # equal lengths, no padding
        ([2, 9, 17], 15),  # different lengths: left padding, rows leave the window at different steps
        ([1, 20], 30),
    ],
)
def test_cached_and_uncached_greedy_equal_the_book_per_prompt(lengths, n):
    model = tiny_model()
    prompts = prompts_of(lengths, seed=len(lengths) + n)
    expected = [book_greedy(model, p, n) for p in prompts]
    assert decode_all(model, prompts, n, use_cache=True) == expected
    assert decode_all(model, prompts, n, use_cache=False) == expected


def test_default_cache_equals_no_cache_on_a_gpt2_shaped_model():
    # a deeper model, several heads, bias terms: the production decode path against the uncached one
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=300, context_length=40, emb_dim=64, n_heads=8, n_layers=4, drop_rate=0.0)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(10)
    prompts = prompts_of([7, 30, 12], seed=9, vocab=300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached = decode_all(model, prompts, 45)
    assert cached == decode_all(model, prompts, 45, use_cache=False)
    assert cached == [book_greedy(model, p, 45) for p in prompts]


def test_long_prompts_are_cropped_from_the_left_with_a_warning():
    model = tiny_model()
    [prompt] = prompts_of([40])
    with pytest.warns(UserWarning, match="last 24 tokens"):
        out = decode_all(model, [prompt], 8)
    assert out[0] == book_greedy(model, prompt, 8)
    with pytest.warns(UserWarning):
        [c] = Engine(model, ByteTokenizer()).generate([prompt], max_new_tokens=3, ignore_eos=True)
    assert c.prompt_tokens == 40 and c.completion_tokens == 3


def test_a_batch_of_long_prompts_gives_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode_all(tiny_model(), prompts_of([40, 30, 5]), 2)
    assert [str(w.message) for w in caught] == [
        "2 of 3 prompts have more tokens than the context window of 24 (the longest 40); "
        "using the last 24 tokens of each"
    ]
