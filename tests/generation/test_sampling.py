"""Sampling: the book's loops, top-k/top-p, seeds, penalties against repetition, log-probabilities."""

from __future__ import annotations

import pytest
import torch

from scratchllm.errors import ScratchLLMError
from scratchllm.generation import (
    Engine,
    GenerationConfig,
    apply_penalties,
    generate,
    generate_text_simple,
    sample_next_token,
)
from scratchllm.model.gpt import GPTModel
from tests.generation.helpers import (
    CTX,
    ByteTokenizer,
    book_greedy,
    decode_all,
    prompts_of,
    static_engine,
    tiny_model,
)


def test_teaching_functions_equal_the_books():
    book4 = pytest.importorskip("llms_from_scratch.ch04")
    book5 = pytest.importorskip("llms_from_scratch.ch05")
    model = tiny_model()
    idx = torch.tensor(prompts_of([5, 5]))
    torch.testing.assert_close(
        generate_text_simple(model, idx, 30, CTX), book4.generate_text_simple(model, idx, 30, CTX)
    )
    for kw in (dict(temperature=0.0), dict(temperature=1.3, top_k=5), dict(temperature=0.7)):
        torch.manual_seed(3)
        ours = generate(model, idx[:1], 30, CTX, **kw)
        torch.manual_seed(3)
        theirs = book5.generate(model, idx[:1], 30, CTX, **kw)
        torch.testing.assert_close(ours, theirs)
    # eos stops before appending it (one row, as in the book)
    out = generate(model, idx[:1], 30, CTX)
    eos = out[0, 8].item()
    first = out[0, 5:].tolist().index(eos)
    assert generate(model, idx[:1], 30, CTX, eos_id=eos).shape[1] == 5 + first


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny_model(seed=2)
    prompts = prompts_of([4, 7], seed=2)
    greedy = decode_all(model, prompts, 20)
    assert decode_all(model, prompts, 20, temperature=1.5, top_k=1, seed=1) == greedy
    assert decode_all(model, prompts, 20, temperature=1.5, top_p=1e-6, seed=1) == greedy


def test_seed_reproduces_samples_and_different_seeds_differ():
    model = tiny_model(seed=3)
    prompts = prompts_of([4, 7], seed=3)
    a = decode_all(model, prompts, 25, temperature=1.0, seed=11)
    b = decode_all(model, prompts, 25, temperature=1.0, seed=11)
    c = decode_all(model, prompts, 25, temperature=1.0, seed=12)
    assert a == b and a != c
    # the seed also holds through the engine, with top-k and top-p together
    engine = Engine(model, ByteTokenizer())
    cfg = GenerationConfig(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=4, ignore_eos=True)
    assert engine.generate(prompts, cfg) == engine.generate(prompts, cfg)


def test_sampling_leaves_the_global_random_state_alone():
    model = tiny_model(seed=4)
    state = torch.get_rng_state()
    decode_all(model, prompts_of([5]), 10, temperature=1.0, seed=1)
    decode_all(model, prompts_of([5]), 10, temperature=1.0)  # unseeded too
    assert torch.equal(state, torch.get_rng_state())


def test_sample_next_token_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next_token(logits).item() == 1
    draws = {sample_next_token(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    # top_p: the two best carry about 0.66 of the mass, the third brings it to 0.9
    draws = {sample_next_token(logits, 1.0, top_p=0.6, generator=g).item() for _ in range(300)}
    assert draws == {1, 2}
    draws = {sample_next_token(logits, 1.0, top_p=0.95, generator=g).item() for _ in range(300)}
    assert draws == {1, 2, 4}


def test_a_tiny_temperature_samples_the_most_likely_token_instead_of_failing():
    """logits / 1e-45 overflowed to inf, and the softmax to NaN: torch.multinomial raised."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [-5.0, -7.0, -6.0]])
    for temperature in (1e-45, 1e-30, 1e-3):
        generator = torch.Generator().manual_seed(0)
        assert sample_next_token(logits, temperature, generator=generator).tolist() == [1, 0]
    engine = Engine(tiny_model(), ByteTokenizer())
    greedy = engine.generate([[1, 2]], max_new_tokens=4, ignore_eos=True)
    assert engine.generate([[1, 2]], max_new_tokens=4, ignore_eos=True, temperature=1e-45, seed=0) == greedy


def penalized_greedy(
    model: GPTModel,
    prompt: list[int],
    n: int,
    repetition: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
) -> list[int]:
    """The penalties written out on the book's uncached loop: Hugging Face's rule over every token so
    far (prompt included), OpenAI's formula over the generated tokens."""
    ctx = model.cfg.context_length
    ids, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids[-ctx:]]))[0, -1].float()
        for t in set(ids):
            logits[t] = logits[t] * repetition if logits[t] < 0 else logits[t] / repetition
        for t in set(out):
            logits[t] -= frequency * out.count(t) + presence
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


@pytest.mark.parametrize(
    "penalties",
    [
        dict(repetition=3.0),  # strong: this model's best logit leads the next by ~3.5
        dict(presence=4.0),
        dict(frequency=0.5),
        dict(repetition=1.5, presence=1.0, frequency=0.3),
    ],
)
def test_penalties_equal_their_rules_written_out(penalties):
    model = tiny_model(seed=5)
    prompts = prompts_of([3, 8, 5], seed=5)  # a batch with left padding; 30 tokens pass the 24-token window
    expected = [penalized_greedy(model, p, 30, **penalties) for p in prompts]
    assert expected != [book_greedy(model, p, 30) for p in prompts]  # the penalties change the tokens
    names = dict(repetition="repetition_penalty", presence="presence_penalty", frequency="frequency_penalty")
    settings = {names[k]: v for k, v in penalties.items()}
    assert decode_all(model, prompts, 30, **settings) == expected
    assert decode_all(model, prompts, 30, use_cache=False, **settings) == expected
    cfg = GenerationConfig(max_new_tokens=30, ignore_eos=True, **settings)
    assert [c.token_ids for c in Engine(model, ByteTokenizer()).generate(prompts, cfg)] == expected
    assert [c.token_ids for c in static_engine(model).generate(prompts, cfg)] == expected  # fixed shapes


def test_apply_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    counts = torch.tensor([[0.0, 0.0, 3.0, 1.0]])
    assert apply_penalties(logits, seen, counts).equal(logits)  # penalties 1 and 0: unchanged
    out = apply_penalties(
        logits, seen, counts, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25
    )
    assert out.tolist() == [[1.0, -4.0, 1.0 - 0.75 - 0.5, 0.5 - 0.25 - 0.5]]
    # negative OpenAI penalties favour repetition
    assert apply_penalties(logits, None, counts, presence_penalty=-1.0).tolist() == [[2.0, -2.0, 2.0, 1.5]]


def test_penalized_sampling_is_reproducible_and_the_settings_are_checked():
    model = tiny_model(seed=6)
    prompts = prompts_of([4, 9], seed=6)
    cfg = GenerationConfig(
        max_new_tokens=25,
        temperature=0.9,
        seed=7,
        ignore_eos=True,
        repetition_penalty=1.2,
        frequency_penalty=0.3,
    )
    engine = Engine(model, ByteTokenizer())
    assert engine.generate(prompts, cfg) == engine.generate(prompts, cfg)
    assert engine.generate(prompts, cfg) == static_engine(model).generate(prompts, cfg)
    bad = [
        (dict(repetition_penalty=0), "repetition_penalty must be a number > 0"),
        (dict(presence_penalty=float("inf")), "presence_penalty must be a finite number"),
        (dict(frequency_penalty="x"), "frequency_penalty must be a finite number"),
    ]
    for settings, match in bad:
        with pytest.raises(ScratchLLMError, match=match):
            engine.generate("abc", **settings)


def test_penalties_follow_each_row_when_rows_finish_early():
    """A row that ends early (a stop token) leaves the batch; the others keep their own penalty tables:
    every row equals its prompt decoded alone, on the default and the fixed-shape paths."""
    model = tiny_model(seed=5)
    prompts = prompts_of([3, 8, 5], seed=5)
    engine = Engine(model, ByteTokenizer())
    settings = dict(max_new_tokens=30, ignore_eos=True, repetition_penalty=3.0, presence_penalty=1.0)
    first = engine.generate([prompts[0]], **settings)[0].token_ids
    cfg = GenerationConfig(stop_token_ids=[first[4]], **settings)  # the first row stops at its 5th token
    alone = [engine.generate([p], cfg)[0] for p in prompts]
    assert alone[0].finish_reason == "stop" and len(alone[0].token_ids) < 30
    assert engine.generate(prompts, cfg) == alone
    assert static_engine(model).generate(prompts, cfg) == alone


def test_logprobs_are_the_models_own_at_each_step():
    """Each generated token's log-probability and its top alternatives are the log-softmax of the book's
    uncached loop's logits at that step (batched with padding, past the context window), before any
    penalty or temperature; a full forward pass over prompt + text (`prompt_logprobs`) agrees."""
    model = tiny_model(seed=7)
    prompts = prompts_of([3, 9], seed=7)
    engine = Engine(model, ByteTokenizer())
    for extra in ({}, dict(temperature=1.3, seed=2, presence_penalty=2.0, top_k=5)):
        cfg = GenerationConfig(max_new_tokens=30, ignore_eos=True, logprobs=3, **extra)
        for prompt, c in zip(prompts, engine.generate(prompts, cfg)):
            assert len(c.logprobs) == len(c.token_ids) == 30
            ids = list(prompt)
            for t, lp in zip(c.token_ids, c.logprobs):
                with torch.no_grad():
                    ref = torch.log_softmax(model(torch.tensor([ids[-CTX:]]))[0, -1], -1)
                top = ref.topk(3)
                assert lp.token_id == t and lp.logprob == pytest.approx(ref[t].item(), abs=1e-5)
                assert [i for i, _ in lp.top] == top.indices.tolist()
                assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-5)
                ids.append(t)
    [c] = engine.generate(prompts[1], max_new_tokens=10, ignore_eos=True, logprobs=0)
    assert all(lp.top == () for lp in c.logprobs)
    [greedy] = engine.generate(prompts[1], max_new_tokens=10, ignore_eos=True, logprobs=1)
    assert greedy.token_ids == c.token_ids and all(lp.token_id == lp.top[0][0] for lp in greedy.logprobs)
    scored = engine.prompt_logprobs(prompts[1] + c.token_ids, top=2)
    assert scored[0] is None and len(scored) == 9 + 10
    assert [s.logprob for s in scored[9:]] == pytest.approx([lp.logprob for lp in c.logprobs], abs=1e-5)
    assert [s.token_id for s in scored[1:]] == (prompts[1] + c.token_ids)[1:]
    assert engine.generate(prompts, max_new_tokens=3)[0].logprobs is None  # not asked for
    small = Engine(tiny_model(vocab=10))  # more alternatives asked for than the vocabulary has
    [c] = small.generate([[1, 2]], max_new_tokens=2, logprobs=15, ignore_eos=True)
    assert len(c.logprobs[0].top) == 10 and len(small.prompt_logprobs([1, 2, 3], 15)[1].top) == 10
    with pytest.raises(ScratchLLMError, match="logprobs must be None or an integer from 0 to 20"):
        engine.generate(prompts, logprobs=21)
    with pytest.raises(ScratchLLMError, match="one context window"):
        engine.prompt_logprobs(list(range(CTX + 1)))
