"""Continuous batching (generation/batcher.py, serve/scheduler.py's ContinuousScheduler): requests that
join and leave a running batch get what each gets served alone, slots are reused, cancelled rows free
theirs, and a long prompt is read in chunks between the running rows' tokens."""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from scratchllm.generation import Engine, GenerationConfig
from scratchllm.generation.batcher import Batcher
from scratchllm.model import registry
from scratchllm.serve.app import create_app
from scratchllm.serve.chat import load_chat_model
from scratchllm.serve.scheduler import ContinuousScheduler, Scheduler, make_scheduler
from tests.generation.helpers import ByteTokenizer, prompts_of, tiny_model
from tests.serve.helpers import BackgroundServer

CTX = 96


def family_model(arch: str) -> torch.nn.Module:
    """A tiny model of a family in eval mode, with clear next-token choices (gemma3: a window of 8)."""
    if arch == "gpt2":
        return tiny_model(ctx=CTX)
    torch.manual_seed(0)
    extra = {"sliding_window": 8} if arch == "gemma3" else {}
    cfg = registry.preset_config("nano", arch, vocab_size=257, context_length=CTX, **extra)
    model = registry.build_model(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(10)
    return model


def mixed_requests(n: int, seed: int = 0) -> list[tuple[list[int], GenerationConfig, bool]]:
    """Prompts of 1 to 40 tokens with their own lengths (1 to 30 new tokens), settings, stop strings;
    some streamed."""
    rnd = random.Random(seed)
    lengths = [rnd.randint(1, 40) for _ in range(n)]
    out = []
    for i, prompt in enumerate(prompts_of(lengths, seed=seed)):
        n_new = rnd.randint(1, 30)
        settings = [
            dict(),
            dict(temperature=0.9, top_k=20, seed=i),
            dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2, logprobs=2),
            dict(temperature=0.7, top_p=0.8, seed=5, stop=("a", "e")),
            dict(stop=("o",), logprobs=0),
        ][i % 5]
        out.append((prompt, GenerationConfig(max_new_tokens=n_new, **settings), i % 3 == 0))
    return out


def assert_same(got, expected) -> None:
    assert got.token_ids == expected.token_ids
    assert (got.text, got.finish_reason, got.stop) == (expected.text, expected.finish_reason, expected.stop)
    if expected.logprobs is not None:
        assert [lp.token_id for lp in got.logprobs] == [lp.token_id for lp in expected.logprobs]
        for a, b in zip(got.logprobs, expected.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def run_all(batcher: Batcher) -> int:
    steps = 0
    while batcher.busy:
        batcher.step()
        steps += 1
    return steps


@pytest.mark.parametrize("arch", ["gpt2", "qwen3", "gemma3"])  # llama3: the chunked-prefill test
def test_many_requests_with_their_own_settings_equal_each_alone(arch):
    engine = Engine(family_model(arch), ByteTokenizer())
    requests = mixed_requests(10)
    batcher = Batcher(engine, max_batch_size=4, prefill_chunk=16)
    rows = [batcher.add(p, cfg, incremental=stream) for p, cfg, stream in requests]
    run_all(batcher)
    for (prompt, cfg, stream), row in zip(requests, rows):
        alone = engine.generate([prompt], cfg)[0]
        assert_same(row.completion, alone)
        if stream:  # the pieces spell the text, and carry every logprob once
            pieces = row.take_pieces()
            assert "".join(p for p, _ in pieces) == alone.text
            carried = [lp for _, lps in pieces for lp in lps] + row.rest_logprobs
            assert cfg.logprobs is None or len(carried) == len(alone.logprobs)


def test_requests_join_mid_flight_and_finished_rows_free_their_slots():
    engine = Engine(family_model("gpt2"), ByteTokenizer())
    long_prompt, short = prompts_of([5], seed=1)[0], prompts_of([3, 7, 2, 9, 4], seed=2)
    batcher = Batcher(engine, max_batch_size=2, prefill_chunk=8)
    batcher.cache = engine.model.new_slot_cache(2, capacity=4)  # it grows as the stream does
    greedy = GenerationConfig(max_new_tokens=80, ignore_eos=True)
    stream = batcher.add(long_prompt, greedy, incremental=True)
    batcher.step()
    joined, slots, finished_while_streaming = [], [], 0
    for step in range(70):
        if step % 10 == 5 and len(joined) < len(short):  # short requests come and go
            joined.append(batcher.add(short[len(joined)], GenerationConfig(max_new_tokens=3 + step % 4)))
        batcher.step()
        slots += [r.slot for r in joined if r.slot is not None]
        finished_while_streaming = sum(r.completion is not None for r in joined)
        assert stream.completion is None and batcher.decoding <= 2
    assert finished_while_streaming == len(short)
    assert set(slots) == {1}  # the stream keeps slot 0; each short one reuses the slot the last freed
    run_all(batcher)
    assert batcher.cache.capacity == CTX  # 4, 8, ..., 64, then the context length
    assert_same(stream.completion, engine.generate([long_prompt], greedy)[0])
    for prompt, row in zip(short, joined):
        assert_same(row.completion, engine.generate([prompt], row.cfg)[0])


def test_waiting_requests_take_the_slots_that_finishing_and_cancelled_rows_free():
    engine = Engine(family_model("qwen3"), ByteTokenizer())
    prompts = prompts_of([6, 4, 8, 5], seed=3)
    cfgs = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in (40, 3, 5, 4)]
    batcher = Batcher(engine, max_batch_size=2, prefill_chunk=64)
    rows = [batcher.add(p, c) for p, c in zip(prompts, cfgs)]
    batcher.step()
    assert [r.slot for r in rows] == [0, 1, None, None] and batcher.waiting == 2
    while rows[1].completion is None:
        batcher.step()
    batcher.step()  # the third takes the freed slot
    assert rows[2].slot is not None and rows[3].slot is None
    batcher.cancel(rows[0])  # a client that went away: its slot goes to the last one
    batcher.step()
    assert rows[0].slot is None and rows[3].slot is not None and batcher.waiting == 0
    run_all(batcher)
    assert rows[0].completion is None
    for prompt, cfg, row in zip(prompts[1:], cfgs[1:], rows[1:]):
        assert_same(row.completion, engine.generate([prompt], cfg)[0])


def test_a_long_prompt_is_read_in_chunks_between_a_running_streams_tokens():
    engine = Engine(family_model("llama3"), ByteTokenizer())
    short, long_prompt = prompts_of([4, 70], seed=4)
    batcher = Batcher(engine, max_batch_size=2, prefill_chunk=16)
    stream = batcher.add(short, GenerationConfig(max_new_tokens=40, ignore_eos=True), incremental=True)
    batcher.step()
    long = batcher.add(long_prompt, GenerationConfig(max_new_tokens=5))
    read, tokens = [], []
    while long.remaining:
        batcher.step()
        read.append(long.fed)
        tokens.append(len(stream.text.token_ids))
    assert read == [16, 32, 48, 64, 70]  # five chunks of at most 16 tokens
    assert tokens == list(range(tokens[0], tokens[0] + 5))  # and a stream token with each
    run_all(batcher)
    assert_same(long.completion, engine.generate([long_prompt], long.cfg)[0])
    assert_same(stream.completion, engine.generate([short], stream.cfg)[0])


def test_seeded_rows_repeat_whatever_shares_their_batch():
    engine = Engine(family_model("gpt2"), ByteTokenizer())
    prompt = prompts_of([6], seed=5)[0]
    seeded = GenerationConfig(max_new_tokens=30, temperature=1.0, seed=11)

    def sample(companions: int) -> list[int]:
        batcher = Batcher(engine, max_batch_size=4, prefill_chunk=8)
        others = [GenerationConfig(max_new_tokens=20, temperature=1.0) for _ in range(companions)]
        for i, cfg in enumerate(others):  # unseeded samplers around it
            batcher.add(prompts_of([3 + i], seed=i)[0], cfg)
        row = batcher.add(prompt, seeded)
        run_all(batcher)
        return row.completion.token_ids

    assert sample(0) == sample(3) == engine.generate([prompt], seeded)[0].token_ids
    unseeded = GenerationConfig(max_new_tokens=30, temperature=1.0)
    batcher = Batcher(engine, max_batch_size=2)
    a, b = batcher.add(prompt, unseeded), batcher.add(prompt, unseeded)
    run_all(batcher)
    assert a.completion.token_ids != b.completion.token_ids


@pytest.mark.filterwarnings("ignore:prompt 0 has")  # the engine crops the prompt
def test_requests_that_do_not_fit_are_refused_or_served_alone(model_dir: Path):
    engine = Engine(family_model("gpt2"), ByteTokenizer())
    batcher = Batcher(engine, max_batch_size=2)
    assert not batcher.accepts(CTX, GenerationConfig(max_new_tokens=1))
    assert not batcher.accepts(5, GenerationConfig(max_new_tokens=5, use_cache=False))
    with pytest.raises(Exception, match="context window"):
        batcher.add([1] * 90, GenerationConfig(max_new_tokens=10))
    # the scheduler runs them alone, as the static one does: the engine crops the prompt
    chat = load_chat_model(str(model_dir), device="cpu", dtype="fp32")
    ctx = chat.context_length
    too_long = chat.engine.encode("The cat sat on the mat. " * 40)[: ctx + 5]
    cfg = GenerationConfig(max_new_tokens=4)

    async def main():
        scheduler = make_scheduler(chat, "continuous", max_batch_size=2)
        try:
            [got], _ = await scheduler.run([too_long], cfg)
        finally:
            scheduler.close()
        return got

    assert not batcher.accepts(len(too_long), cfg)
    assert_same(asyncio.run(main()), chat.engine.generate([too_long], cfg)[0])


def test_scheduler_streams_while_short_jobs_come_and_go_and_a_cancelled_stream_frees_its_slot(
    model_dir: Path,
):
    chat = load_chat_model(str(model_dir), device="cpu", dtype="fp32")
    engine = chat.engine
    ids = [engine.encode(t) for t in ["The cat", "Paris is the capital", "Name three", "What is"]]
    long_cfg = GenerationConfig(max_new_tokens=150, ignore_eos=True)
    short_cfg = GenerationConfig(max_new_tokens=3)

    async def main():
        scheduler = make_scheduler(chat, "continuous", max_batch_size=2, prefill_chunk=4)
        assert isinstance(scheduler, ContinuousScheduler)
        stream = scheduler.stream(ids[0], long_cfg)
        pieces, answers = [], []
        async for _kind, value in stream:
            pieces.append(value)
            if len(pieces) == 3:  # short jobs join the running stream and leave before it ends
                answers = await asyncio.gather(*(scheduler.run([i], short_cfg) for i in ids[1:]))
                break
        await stream.aclose()  # the client goes away
        await asyncio.sleep(0.2)
        batcher = scheduler._batcher
        freed = batcher.decoding == 0 and not batcher.prefilling
        [after], _ = await scheduler.run([ids[1]], short_cfg)
        scheduler.close()
        return [a[0][0] for a in answers], after, freed, scheduler.batches_run

    answers, after, freed, finished = asyncio.run(main())
    for prompt, got in zip(ids[1:], answers):
        assert_same(got, engine.generate([prompt], short_cfg)[0])
    assert_same(after, engine.generate([ids[1]], short_cfg)[0])
    assert freed and finished == 4  # the cancelled stream never ran to its end


@pytest.mark.parametrize("kind", ["continuous", "static"])
def test_concurrent_http_requests_equal_each_alone(model_dir: Path, kind):
    openai = pytest.importorskip("openai")
    chat = load_chat_model(str(model_dir), device="cpu", dtype="fp32")
    app = create_app(chat, model_name="tiny", max_batch_size=4, scheduler=kind, prefill_chunk=8)
    assert isinstance(app.state.scheduler, ContinuousScheduler) == (kind == "continuous")
    assert isinstance(app.state.scheduler, Scheduler)
    texts = ["The cat sat", "Paris is", "Name three primary colors:", "Convert 45 kilometers to meters"]
    bodies = [
        dict(prompt=texts[i % 4] * (1 + i % 3), max_tokens=2 + (i * 7) % 20, temperature=0)
        | ([dict(stop=["e"]), dict(seed=i, temperature=0.8), dict(frequency_penalty=0.5), {}][i % 4])
        for i in range(16)
    ]

    def reference(body: dict) -> str:
        cfg = GenerationConfig(
            max_new_tokens=body["max_tokens"],
            temperature=body["temperature"],
            seed=body.get("seed"),
            stop=tuple(body.get("stop", ())),
            frequency_penalty=body.get("frequency_penalty", 0.0),
        )
        return chat.engine.generate([chat.engine.encode(body["prompt"])], cfg)[0].text

    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)

        def call(i: int) -> str:
            if i % 3 == 0:
                chunks = client.completions.create(model="tiny", stream=True, **bodies[i])
                return "".join(c.choices[0].text for c in chunks if c.choices)
            return client.completions.create(model="tiny", **bodies[i]).choices[0].text

        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(call, range(16)))
        assert app.state.scheduler.waiting == 0
    assert answers == [reference(b) for b in bodies]
