"""Speculative decoding (generation/speculative.py): greedy decoding gives the target's own tokens (stops,
limits, penalties and logprobs included, for GPT-2, Qwen3 and Gemma 3's sliding windows), sampling keeps
the target's distribution (a chi-square test against the exact one), and --draft-model runs through
generate, chat and serve."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch
import uvicorn

from scratchllm import native
from scratchllm.checkpoint import save_model
from scratchllm.cli import main
from scratchllm.errors import ScratchLLMError
from scratchllm.generation import Engine, GenerationConfig, RuntimeSettings, kernels
from scratchllm.generation.config import DRAFT_CONFIDENCE, DRAFT_SCHEDULES, DRAFT_TOKENS
from scratchllm.generation.sampling import sampling_probs
from scratchllm.generation.speculative import (
    DRAFT_START,
    MAX_DRAFT_PAUSE,
    DraftSchedule,
    SpeculativeDecoder,
    _CachedModel,
    check_draft,
)
from scratchllm.model import registry
from scratchllm.model.attention import KVCache
from scratchllm.model.gpt import GPTConfig, GPTModel
from scratchllm.serve.chat import load_chat_model
from scratchllm.text.bpe import BPETokenizer
from tests.conftest import single_thread

from .helpers import ByteTokenizer

VOCAB = 257


def lm(seed: int, arch: str = "gpt2", vocab: int = VOCAB, ctx: int = 64, **changes) -> torch.nn.Module:
    """A random model whose next tokens vary (an untied, sharpened head: a random tied model mostly
    repeats its last token)."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPTConfig(
            vocab_size=vocab,
            context_length=ctx,
            emb_dim=32,
            n_heads=4,
            n_layers=2,
            drop_rate=0.0,
            tie_weights=False,
        )
        model = GPTModel(cfg.replace(**changes))
    else:
        cfg = registry.preset_config(
            "nano", arch, vocab_size=vocab, context_length=ctx, tie_weights=False, **changes
        )
        model = registry.build_model(cfg)
    with torch.no_grad():
        model.out_head.weight.mul_(30)
    return model.eval()


def near(model: torch.nn.Module, noise: float, seed: int = 1) -> torch.nn.Module:
    """A copy of `model` whose head is perturbed: a draft that agrees with it often, not always."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = draft.out_head.weight
        w.add_(noise * w.std() * torch.randn(w.shape, generator=g))
    return draft


def greedy_pairs(target, drafts, prompts, k, schedule="adaptive", **settings):
    """(plain, speculative) completions of every prompt, and the acceptance rate of each draft."""
    plain = Engine(target, ByteTokenizer())
    rates = []
    for draft in drafts:
        engine = Engine(target, ByteTokenizer(), draft=draft, draft_tokens=k, draft_schedule=schedule)
        proposed = accepted = 0
        for prompt in prompts:
            [want] = plain.generate(prompt, **settings)
            [got] = engine.generate(prompt, **settings)
            assert got == want, (prompt, k)
            proposed += engine.last_speculation.proposed
            accepted += engine.last_speculation.accepted
        rates.append(accepted / proposed)
    return rates


def assert_same_logprobs(got, want) -> None:
    """Equal tokens and alternatives, log-probabilities equal up to rounding (one pass scores k + 1)."""
    assert (got is None) == (want is None)
    for a, b in zip(got or [], want or [], strict=True):
        assert a.token_id == b.token_id and math.isclose(a.logprob, b.logprob, abs_tol=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


PROMPTS = [[1, 2, 3], [200], list(range(40, 70))]


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_greedy_gives_the_targets_own_tokens_whatever_the_draft(arch):
    target = lm(0, arch)
    drafts = [target, near(target, 0.2), lm(5, arch)]
    with single_thread():
        for k, schedule in itertools.product((1, 4, 7), DRAFT_SCHEDULES):
            same, close, other = greedy_pairs(
                target, drafts, PROMPTS, k, schedule, max_new_tokens=30, ignore_eos=True
            )
            assert same == 1.0 and 0.2 < close < 0.9 and other < 0.1, (k, schedule, same, close, other)


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_bf16_checks_score_each_position_bitwise_as_decoding_one_at_a_time(arch, monkeypatch):
    if not native.available():
        pytest.skip(
            f"checking k + 1 positions bitwise as one needs native's kernels: {native.unavailable_reason()}"
        )
    # native's product for one row and a few, as the probe picks them on CPUs with AVX-512 BF16
    monkeypatch.setattr(kernels, "one_row_kernel", lambda dtype: "native")
    monkeypatch.setattr(kernels, "few_rows_kernel", lambda dtype: "native")
    # wide enough that PyTorch's many-row kernels round otherwise than a row alone
    target = lm(0, arch, emb_dim=256, n_heads=4).to(torch.bfloat16)
    draft = near(target, 0.2)
    plain = Engine(target, ByteTokenizer())
    for k, schedule in ((2, "fixed"), (7, "fixed"), (7, "adaptive")):
        engine = Engine(target, ByteTokenizer(), draft=draft, draft_tokens=k, draft_schedule=schedule)
        for prompt in [*PROMPTS, list(range(90, 96))]:
            settings = dict(max_new_tokens=30, ignore_eos=True, logprobs=3)
            [want], [got] = plain.generate(prompt, **settings), engine.generate(prompt, **settings)
            assert got.token_ids == want.token_ids and got.logprobs == want.logprobs, (prompt, k, schedule)
            assert engine.last_speculation.accepted > 0


def test_an_unsure_draft_stops_proposing_early():
    """With `draft_confidence` the draft proposes only tokens it is sure enough of: the same text, fewer
    proposals, more of them kept."""
    target = lm(0)
    draft = near(target, 0.3)
    plain = Engine(target, ByteTokenizer())
    counts = {}
    with single_thread():
        for confidence in (0.0, 0.6):
            engine = Engine(
                target,
                ByteTokenizer(),
                draft=draft,
                draft_tokens=6,
                draft_confidence=confidence,
                draft_schedule="fixed",
            )
            proposed = accepted = rounds = 0
            for prompt in PROMPTS:
                [want] = plain.generate(prompt, max_new_tokens=40, ignore_eos=True)
                assert engine.generate(prompt, max_new_tokens=40, ignore_eos=True) == [want]
                stats = engine.last_speculation
                proposed, accepted, rounds = (
                    proposed + stats.proposed,
                    accepted + stats.accepted,
                    rounds + stats.rounds,
                )
            counts[confidence] = (proposed, accepted, rounds)
    (p0, a0, _), (p1, a1, r1) = counts[0.0], counts[0.6]
    assert 0 < p1 < p0 and a1 / p1 > a0 / p0, counts
    assert p1 < 0.9 * 6 * r1, counts  # rounds that stopped early, often
    with pytest.raises(ScratchLLMError, match="draft_confidence"):
        Engine(target, ByteTokenizer(), draft=draft, draft_confidence=1.0)


def test_the_next_rounds_length_follows_the_last_ones_verdicts():
    def after(*kept_counts, most=5):  # each round proposes what `next()` allows and keeps the count given
        schedule = DraftSchedule(most)
        lengths = []
        for kept in kept_counts:
            lengths.append(schedule.next())
            schedule.update(lengths[-1], kept if lengths[-1] else 0)
        return lengths, schedule.next()

    assert after(3, 4, 5, 5) == ([3, 4, 5, 5], 5)  # all kept: one more a round, up to the most
    assert after(1, 0, 1) == ([3, 2, 1], 2)  # a rejection: one fewer (whatever was kept before it)
    # a rejected single guess pauses the draft for 1, 2, 4, ... rounds; a kept one starts over at 1
    lengths, _ = after(*[0] * 12, 1, 0, 0, 0)
    assert lengths == [3, 2, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 2, 1, 0], lengths
    schedule = DraftSchedule(5)
    for _ in range(200):  # never more than the longest pause in a row
        length = schedule.next()
        schedule.update(length, 0)
    assert schedule.backoff == MAX_DRAFT_PAUSE
    schedule = DraftSchedule(7)
    schedule.update(2, 2)  # a round cut short (a stop, a limit), all kept: the same length
    assert schedule.next() == 3
    fixed = DraftSchedule(4, adaptive=False)
    for proposed, kept in ((4, 0), (4, 4), (1, 0)):
        assert fixed.next() == 4
        fixed.update(proposed, kept)


def test_adaptive_rounds_grow_with_a_draft_that_follows_and_shrink_with_one_that_does_not():
    """The same text either way; a draft that is the target itself proposes ever longer rounds, up to
    draft_tokens, and a draft that never agrees soon proposes one token a round, then rests for
    ever longer pauses, where the fixed schedule keeps proposing draft_tokens."""
    target = lm(0)
    plain = Engine(target, ByteTokenizer())
    settings = dict(max_new_tokens=60, ignore_eos=True)
    [want] = plain.generate([1, 2, 3], **settings)
    stats = {}
    with single_thread():
        for name, draft in (("same", target), ("other", lm(5))):
            for schedule in DRAFT_SCHEDULES:
                engine = Engine(target, ByteTokenizer(), draft=draft, draft_tokens=7, draft_schedule=schedule)
                dec = engine._decoder([[1, 2, 3]], GenerationConfig(**settings))
                dec._propose = counted(dec._propose, rounds := [])
                tokens = [dec.step()[0] for _ in range(60)]
                assert tokens == want.token_ids, (name, schedule)
                lengths = [allowed for allowed, _ in rounds]
                stats[name, schedule] = (lengths, dec.stats)
    lengths, same = stats["same", "adaptive"]
    assert lengths[:6] == [DRAFT_START, 4, 5, 6, 7, 7] and same.acceptance_rate == 1.0
    assert stats["same", "fixed"][0][:3] == [7, 7, 7]
    lengths, other = stats["other", "adaptive"]
    assert lengths[:3] == [DRAFT_START, 2, 1] and set(lengths[3:]) == {1}, lengths
    fixed = stats["other", "fixed"][1]
    assert other.acceptance_rate < 0.1 and other.proposed < fixed.proposed / 4, (other, fixed)
    assert other.rounds > 2 * len(lengths), (other, lengths)  # most rounds without the draft


def test_stop_tokens_stop_strings_and_limits_end_a_row_inside_a_round():
    target = lm(0)
    plain = Engine(target, ByteTokenizer())
    engine = Engine(target, ByteTokenizer(), draft=target, draft_tokens=4)  # every round: 5 tokens
    prompt = "Once upon"
    [full] = plain.generate(prompt, max_new_tokens=30, ignore_eos=True)
    tokens, text = full.token_ids, full.text
    stop_id = next(t for i, t in enumerate(tokens) if i % 5 and t not in tokens[:i])  # not a round's first
    limits = [dict(max_new_tokens=n, ignore_eos=True) for n in (1, 2, 5, 7, 13)]
    stops = [
        dict(max_new_tokens=30, stop_token_ids=[stop_id]),
        dict(max_new_tokens=30, stop=[text[8:10]], ignore_eos=True),
        dict(max_new_tokens=30, stop=[text[11:13], "never"], logprobs=2, ignore_eos=True),
    ]
    with single_thread():
        for settings in limits + stops:
            [want] = plain.generate(prompt, **settings)
            [got] = engine.generate(prompt, **settings)
            assert want.finish_reason == ("stop" if settings in stops else "length"), settings
            assert got.token_ids == want.token_ids and got.text == want.text, settings
            assert (got.finish_reason, got.stop) == (want.finish_reason, want.stop), settings
            assert_same_logprobs(got.logprobs, want.logprobs)
            assert list(engine.stream(prompt, **settings)) == list(plain.stream(prompt, **settings)), settings
    assert engine.last_speculation.acceptance_rate == 1.0


def test_penalties_and_logprobs_are_the_targets_own():
    target = lm(0)
    engine = Engine(target, ByteTokenizer(), draft=near(target, 0.6), draft_tokens=3)
    plain = Engine(target, ByteTokenizer())
    settings = dict(
        max_new_tokens=40,
        ignore_eos=True,
        logprobs=3,
        repetition_penalty=1.3,
        presence_penalty=0.4,
        frequency_penalty=0.3,
    )
    with single_thread():
        [want] = plain.generate([5, 6, 7, 5, 6], **settings)
        [got] = engine.generate([5, 6, 7, 5, 6], **settings)
    assert got.token_ids == want.token_ids
    stats = engine.last_speculation
    assert 0 < stats.accepted < stats.proposed  # both paths: accepted and rejected proposals
    assert_same_logprobs(got.logprobs, want.logprobs)


def test_windows_full_or_short_and_sliding_windows():
    target = lm(0, ctx=24)
    plain = Engine(target, ByteTokenizer())
    with single_thread():
        # the text outgrows the target's window (then one token at a time); a draft of a shorter window crops
        for draft in (near(target, 0.5), lm(3, ctx=6)):
            engine = Engine(target, ByteTokenizer(), draft=draft, draft_tokens=4)
            for prompt in ([9] * 3, list(range(100, 118)), list(range(24))):
                [want] = plain.generate(prompt, max_new_tokens=30, ignore_eos=True)
                assert engine.generate(prompt, max_new_tokens=30, ignore_eos=True) == [want]
        # a prompt longer than the window, or a batch: decoded without the draft
        with pytest.warns(UserWarning, match="more than the context window"):
            assert engine.generate(list(range(30)), max_new_tokens=5) == plain.generate(
                list(range(30)), max_new_tokens=5
            )
        assert engine.last_speculation is None
        assert engine.generate([[1], [2, 3]], max_new_tokens=5) == plain.generate(
            [[1], [2, 3]], max_new_tokens=5
        )
        assert engine.last_speculation is None
        # Gemma 3: sliding-window layers keep every position in the speculative caches
        gemma = lm(0, "gemma3", sliding_window=6)
        engine = Engine(gemma, ByteTokenizer(), draft=near(gemma, 0.5), draft_tokens=3)
        [want] = Engine(gemma, ByteTokenizer()).generate(
            list(range(10, 20)), max_new_tokens=30, ignore_eos=True
        )
        assert engine.generate(list(range(10, 20)), max_new_tokens=30, ignore_eos=True) == [want]
        assert 0 < engine.last_speculation.accepted < engine.last_speculation.proposed


def exact_distribution(model, prompt: list[int], n: int, **sampling) -> dict[tuple[int, ...], float]:
    """The probability of every continuation of `n` tokens, by enumeration (no KV cache)."""
    vocab = model.cfg.vocab_size
    seqs = list(itertools.product(range(vocab), repeat=n))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + list(s[:-1]) for s in seqs]))[:, len(prompt) - 1 :]
    probs = sampling_probs(logits.reshape(-1, vocab), **sampling).reshape(len(seqs), n, vocab)
    out = {}
    for i, s in enumerate(seqs):
        out[s] = math.prod(probs[i, j, t].item() for j, t in enumerate(s))
    return out


def chi_square_p(counts: dict, expected: dict[tuple, float], total: int) -> float:
    """The p-value of observed `counts` against the distribution `expected` (cells expected fewer than
    5 times pooled): the chi-square survival function as the regularized upper incomplete gamma."""
    cells, pooled = [], [0, 0.0]
    for s, p in expected.items():
        if p * total >= 5:
            cells.append((counts.get(s, 0), p * total))
        else:
            pooled[0] += counts.get(s, 0)
            pooled[1] += p * total
    if pooled[1] > 0:
        cells.append(tuple(pooled))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    df = len(cells) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)).item()


def counted(propose, rounds: list[tuple[int, int]]):
    """`SpeculativeDecoder._propose`, noting (proposals allowed, proposals made) of each round."""

    def wrapped(k: int):
        out = propose(k)
        rounds.append((k, len(out[0])))
        return out

    return wrapped


@pytest.mark.parametrize(
    "k, sampling, confidence, schedule",
    [
        (1, dict(temperature=0.9, top_k=3), 0.0, "fixed"),
        (2, dict(temperature=1.2, top_p=0.9), 0.0, "fixed"),
        (2, dict(temperature=1.0), 0.75, "fixed"),
        (2, dict(temperature=1.1, top_k=3), 0.0, "adaptive"),
    ],
)
def test_sampling_keeps_the_targets_distribution(k, sampling, confidence, schedule):
    """The first two tokens of speculative samples against the target's exact distribution: a chi-square
    test that also rejects the draft's own. k = 1 draws the second token as the bonus or after a new
    proposal; k = 2 keeps or rejects two proposals in a row; with a confidence, some rounds propose
    fewer (or none); adaptive, a round after a rejection proposes fewer."""
    target, draft = lm(0, vocab=4, ctx=8, n_layers=1), lm(1, vocab=4, ctx=8, n_layers=1)
    prompt, n, samples = [1, 2], 2, 1500
    exact = exact_distribution(target, prompt, n, **sampling)
    counts: dict[tuple[int, ...], int] = {}
    proposed = accepted = 0
    rounds: list[tuple[int, int]] = []  # (proposals allowed, made) of each round
    with single_thread(), torch.inference_mode():
        for seed in range(samples):
            cfg = GenerationConfig(max_new_tokens=n + k, seed=seed, **sampling)  # no limit cuts 2 rounds
            dec = SpeculativeDecoder(
                target,
                draft,
                prompt,
                cfg,
                draft_tokens=k,
                draft_confidence=confidence,
                draft_schedule=schedule,
            )
            dec._propose = counted(dec._propose, rounds)
            s = tuple(dec.step()[0] for _ in range(n))
            counts[s] = counts.get(s, 0) + 1
            proposed, accepted = proposed + dec.stats.proposed, accepted + dec.stats.accepted
    assert 0.3 < accepted / proposed < 0.9, accepted / proposed  # proposals kept and rejected, often
    stopped = sum(made < allowed for allowed, made in rounds)
    assert (stopped > 0.1 * len(rounds)) if confidence else stopped == 0, (stopped, len(rounds))
    shorter = sum(allowed < k for allowed, _ in rounds)
    assert (shorter > 0.1 * len(rounds)) if schedule == "adaptive" else shorter == 0, (shorter, len(rounds))
    assert chi_square_p(counts, exact, samples) > 1e-3
    assert chi_square_p(counts, exact_distribution(draft, prompt, n, **sampling), samples) < 1e-6


def test_kv_cache_truncate_forgets_positions_and_refuses_rings():
    cache = KVCache(1, 1, 2, 4, max_len=8)
    cache.pos = 5
    cache.truncate(3)
    assert cache.pos == 3
    with pytest.raises(ValueError):
        cache.truncate(4)
    ring = KVCache(2, 1, 2, 4, max_len=8, windows=[0, 4])
    with pytest.raises(RuntimeError, match="keeps every position"):
        ring.truncate(0)


def test_drafts_that_cannot_serve_are_refused():
    target = lm(0)
    with pytest.raises(ScratchLLMError, match="its vocabulary has 300 ids, the target's 257"):
        Engine(target, ByteTokenizer(), draft=lm(1, vocab=300))
    with pytest.raises(ScratchLLMError, match="does not combine with compile"):
        Engine(target, ByteTokenizer(), draft=target, compile=True)
    with pytest.raises(ScratchLLMError, match="draft_tokens must be an integer from 1 to 32"):
        Engine(target, ByteTokenizer(), draft=target, draft_tokens=0)
    shifted = BPETokenizer({bytes([b]): (b + 1) % 256 for b in range(256)})
    same = BPETokenizer({bytes([b]): b for b in range(256)})
    with pytest.raises(ScratchLLMError, match="splits 'Hello, world! The qu' into other ids"):
        check_draft(target, target, same, shifted, "d")
    check_draft(target, target, same, BPETokenizer({bytes([b]): b for b in range(256)}))


@pytest.fixture
def model_dirs(tmp_path):
    """A target, a draft with its tokenizer, and a draft with another tokenizer, saved."""
    tok = BPETokenizer({bytes([b]): b for b in range(256)})
    target = lm(0, vocab=tok.vocab_size)
    save_model(tmp_path / "target", target, tok)
    save_model(tmp_path / "draft", near(target, 0.6), tok)
    shifted = BPETokenizer({bytes([b]): (b + 1) % 256 for b in range(256)})
    save_model(tmp_path / "other", lm(2, vocab=shifted.vocab_size), shifted)
    return tmp_path, Engine(target, tok)


def test_generate_chat_and_serve_take_a_draft_model(model_dirs, capsys, monkeypatch):
    path, engine = model_dirs
    expected = engine.generate("Hello", max_new_tokens=12)[0].text
    hello = ["generate", "--model", str(path / "target"), "--prompt", "Hello", "--max-new-tokens", "12"]
    hello += [
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--draft-model",
        str(path / "draft"),
        "--draft-tokens",
        "3",
    ]
    assert main(hello) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n"
    assert "finish: length; cpu, float32; draft: " in err and "tokens per target pass]" in err

    assert main([*hello[:-4], "--draft-model", str(path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "draft model" in err and "the target's tokenizer" in err
    assert main([*hello, "--draft-confidence", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "draft_confidence must be a number from 0 up to" in err
    with pytest.raises(SystemExit) as e:
        main([*hello, "--draft-schedule", "sometimes"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--draft-schedule" in err and "adaptive" in err

    chat = load_chat_model(str(path / "target"), device="cpu", dtype="fp32", draft_model=str(path / "draft"))
    assert chat.engine.draft is not None and chat.engine.draft_tokens == DRAFT_TOKENS
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there\n/exit\n"))
    argv = [
        "chat",
        "--model",
        str(path / "target"),
        "--max-new-tokens",
        "10",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
    ]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there\n/exit\n"))
    assert main([*argv, "--draft-model", str(path / "draft")]) == 0
    assert capsys.readouterr().out == plain

    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: started.append(self.config.app))
    serve = ["serve", "--model", str(path / "target"), "--port", "0", "--device", "cpu", "--dtype", "fp32"]
    draft = ["--draft-model", str(path / "draft"), "--draft-tokens", "2", "--draft-confidence", "0.4"]
    assert main([*serve, *draft, "--draft-schedule", "fixed"]) == 0
    [app] = started
    assert app.state.chat.engine.draft is not None and app.state.chat.engine.draft_tokens == 2
    assert app.state.chat.engine.draft_confidence == 0.4 and app.state.chat.engine.draft_schedule == "fixed"
    assert app.state.scheduler.max_batch_size == 1 and "one request at a time" in capsys.readouterr().out
    assert main([*serve, "--draft-model", str(path / "other")]) == 2
    assert "draft model" in capsys.readouterr().err


def test_runtime_settings_hold_the_draft():
    settings = RuntimeSettings()
    assert (settings.draft_model, settings.draft_tokens, settings.draft_confidence) == (
        None,
        DRAFT_TOKENS,
        DRAFT_CONFIDENCE,
    )
    assert settings.draft_schedule == "adaptive"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gpt2_drafts_proposals_in_one_native_call_are_its_own_steps(dtype, monkeypatch):
    """Greedy proposals of a GPT-2 draft run in one native call where its steps take the fused forward:
    the same tokens, confidence stops and KV cache as its steps one at a time; what the call does not
    take (a long text to feed, no room left) falls back to the steps."""
    if not native.available():
        pytest.skip(f"the draft's native call needs native's kernels: {native.unavailable_reason()}")
    monkeypatch.setattr(kernels, "one_row_kernel", lambda dtype: "native")
    monkeypatch.setattr(kernels, "few_rows_kernel", lambda dtype: "native")
    draft = near(lm(0, ctx=128, emb_dim=64), 0.5).to(dtype)
    packed = kernels.PackedLinears(draft)
    fast, steps = _CachedModel(draft, packed, None, 128), _CachedModel(draft, packed, None, 128)
    assert fast.greedy is not None
    text = list(range(30, 50))
    taken = 0
    with torch.inference_mode(), packed.installed():
        assert fast.greedy(text, fast.cache, 3, 0.0) is None  # 20 tokens to feed: the steps' prefill
        for cached in (fast, steps):
            cached.logits(text)
            cached.keep(len(text) - 1)
        for k, confidence, kept in itertools.product((1, 3, 6), (0.0, 0.5, 0.9), (0, 1, 2)):
            got = fast.greedy(text[fast.offset + fast.cache.pos :], fast.cache, k, confidence)
            want: list[int] = []
            for _ in range(k):
                logits = steps.logits(text, want)
                if confidence and float(torch.softmax(logits, -1).max()) < confidence:
                    break
                want.append(int(logits.argmax()))
            assert got == want and fast.cache.pos == steps.cache.pos, (k, confidence)
            for a, b in zip(fast.cache.k + fast.cache.v, steps.cache.k + steps.cache.v):
                assert torch.equal(a[:, :, : fast.cache.pos], b[:, :, : steps.cache.pos])
            taken += len(got) < k
            text += want[:kept] + [text[-1] % 7]  # some proposals kept, then the target's token
            for cached in (fast, steps):
                cached.keep(len(text) - 1)
        assert taken > 3  # confidence stopped some rounds early
        assert fast.greedy(text[-1:], fast.cache, 128 - len(text) + 2, 0.0) is None  # no room for k
