"""The OpenAI-compatible server, called with the official `openai` client on a real uvicorn server
on a free loopback port: answers equal the engine's, streaming equals non-streaming, bad requests get
OpenAI-shaped 4xx errors, the API key is enforced, 50 concurrent requests are all answered."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import scratchllm.generation as gen
from scratchllm.cli import main
from scratchllm.errors import ScratchLLMError
from scratchllm.generation import GenerationConfig, TokenLogprob
from scratchllm.serve.app import create_app
from scratchllm.serve.chat import load_chat_model
from scratchllm.serve.openai_format import ChatTokens, TextOffsets, chat_logprobs, merge_logprobs, token_text
from scratchllm.serve.scheduler import Job, Scheduler
from scratchllm.serve.server import bind_socket, served_model_name
from scratchllm.text.bpe import BPETokenizer
from tests.serve.helpers import BackgroundServer

openai = pytest.importorskip("openai")

KEY = "sk-test-key"
MODEL = "tiny"


@pytest.fixture(scope="module")
def chat(model_dir: Path):
    return load_chat_model(str(model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def server(chat):
    app = create_app(chat, model_name=MODEL, api_key=KEY, max_batch_size=8)
    with BackgroundServer(app) as running:
        running.app = app
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference(chat, prompt, **settings) -> object:
    """What the engine itself answers (greedy unless told otherwise)."""
    ids = chat.engine.encode(prompt) if isinstance(prompt, str) else prompt
    return chat.engine.generate([ids], GenerationConfig(**settings))[0]


def chat_reference(chat, messages, max_tokens, stop=()) -> object:
    return reference(
        chat, chat.encode_chat(messages), max_new_tokens=max_tokens, stop=chat.stop_strings(stop)
    )


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three primary colors."},
    {"role": "assistant", "content": "red, blue and yellow"},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_models_and_completions_equal_the_engine(client, chat):
    [card] = client.models.list().data
    assert card.id == MODEL and card.owned_by == "scratchllm"
    assert card.max_model_len == chat.context_length == 256  # vLLM's field: what a prompt may take
    assert client.models.retrieve(MODEL).id == MODEL

    r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0)
    expected = reference(chat, "The quick brown fox", max_new_tokens=12)
    assert r.choices[0].text == expected.text and expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
        expected.prompt_tokens,
        expected.completion_tokens,
    )
    assert r.usage.total_tokens == expected.total_tokens and r.object == "text_completion"

    # several prompts (strings and token ids) in one request, and echo
    ids = chat.engine.encode("Paris is")
    r = client.completions.create(
        model=MODEL, prompt=["The cat sat", "Convert 45"], max_tokens=5, temperature=0
    )
    assert [c.text for c in r.choices] == [
        reference(chat, p, max_new_tokens=5).text for p in ["The cat sat", "Convert 45"]
    ]
    assert [c.index for c in r.choices] == [0, 1]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text == "Paris is" + reference(chat, ids, max_new_tokens=5).text

    # the default max_tokens is OpenAI's 16
    r = client.completions.create(model=MODEL, prompt="The cat", temperature=0)
    assert r.usage.completion_tokens <= 16


def test_completion_stream_equals_the_non_streamed_text(client, server, chat):
    expected = reference(chat, "Write a response", max_new_tokens=20)
    stream = client.completions.create(
        model=MODEL,
        prompt="Write a response",
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens and not chunks[-1].choices

    # the raw event stream: `data: {json}` events ending with `data: [DONE]`
    body = {"model": MODEL, "prompt": "Write", "max_tokens": 3, "stream": True, "temperature": 0}
    raw = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e.removeprefix("data: "))["object"] == "text_completion" for e in events[:-1])


def test_chat_renders_the_template_and_streams_the_same_text(client, chat):
    assert chat.template_is_default and chat.template.name == "alpaca"  # a plain model: the default template
    expected = chat_reference(chat, MESSAGES, 24)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text.strip() and r.choices[0].message.content
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(chat.encode_chat(MESSAGES))

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens

    # content parts and the `developer` role (OpenAI's newer name for system) are understood
    parts = [
        {"role": "developer", "content": "You are terse."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Name three "}, {"type": "text", "text": "primary colors."}],
        },
    ]
    r2 = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=8, temperature=0)
    assert r2.choices[0].message.content == chat_reference(chat, MESSAGES[:2], 8).text.strip()


def test_stop_strings_seeds_and_the_chat_default_max_tokens(client, chat):
    text = reference(chat, "The cat sat", max_new_tokens=20).text
    stop = text[5:8]
    assert stop and stop not in text[:7]
    r = client.completions.create(
        model=MODEL, prompt="The cat sat", max_tokens=20, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == text[: text.index(stop)] and r.choices[0].finish_reason == "stop"

    sample = dict(model=MODEL, prompt="The cat", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    a, b = (client.completions.create(**sample).choices[0].text for _ in range(2))
    assert a == b == reference(chat, "The cat", max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7).text

    # chat without max_tokens may fill the rest of the context window
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES[1:2], temperature=0)
    assert r.usage.total_tokens <= chat.context_length
    assert r.choices[0].finish_reason == "stop" or r.usage.total_tokens == chat.context_length


def _post(server, path, body, key=KEY, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(
            server.url + path, content=raw, headers={**headers, "Content-Type": "application/json"}
        )
    return httpx.post(server.url + path, json=body, headers=headers)


CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


BAD_REQUESTS = [
    (CHAT, {"model": MODEL}, 400, "messages", "missing required parameter 'messages'"),
    (CHAT, {"model": MODEL, "messages": []}, 400, "messages", "at least 1"),
    (
        CHAT,
        {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages.0.role",
        "role",
    ),
    (CHAT, {"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages.0.content", "content is missing"),
    (CHAT, {"model": MODEL, "messages": "hello"}, 400, "messages", "valid list"),
    (
        CHAT,
        {"model": MODEL, "messages": [{"role": "system", "content": "x"}]},
        400,
        "messages",
        "user message",
    ),
    (
        CHAT,
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages.0.content",
        "only text",
    ),
    (
        CHAT,
        {"model": MODEL, "messages": USER, "temperature": 2.5},
        400,
        "temperature",
        "less than or equal to 2",
    ),
    (
        CHAT,
        {"model": MODEL, "messages": USER, "temperature": -1},
        400,
        "temperature",
        "greater than or equal",
    ),
    (CHAT, {"model": MODEL, "messages": USER, "top_p": 0}, 400, "top_p", "greater than 0"),
    (CHAT, {"model": MODEL, "messages": USER, "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    (CHAT, {"model": MODEL, "messages": USER, "n": 2}, 400, "n", "n > 1 is not supported"),
    (
        CHAT,
        {"model": MODEL, "messages": USER, "max_tokens": 10_000},
        400,
        "max_tokens",
        "maximum context length is 256",
    ),
    (
        CHAT,
        {"model": MODEL, "messages": USER, "max_tokens": -3},
        400,
        "max_tokens",
        "greater than or equal to 0",
    ),
    (CHAT, {"model": MODEL, "messages": USER, "max_tokens": "many"}, 400, "max_tokens", "valid integer"),
    (CHAT, {"model": MODEL, "messages": USER, "stop": [""]}, 400, "stop", "non-empty"),
    (
        CHAT,
        {"model": MODEL, "messages": USER, "tools": [{"type": "function"}]},
        400,
        "tools",
        "not supported",
    ),
    (
        CHAT,
        {"model": MODEL, "messages": USER, "presence_penalty": 2.5},
        400,
        "presence_penalty",
        "less than or equal to 2",
    ),
    (
        COMP,
        {"model": MODEL, "prompt": "hi", "frequency_penalty": -3},
        400,
        "frequency_penalty",
        "greater than or equal to -2",
    ),
    (
        COMP,
        {"model": MODEL, "prompt": "hi", "repetition_penalty": 0},
        400,
        "repetition_penalty",
        "greater than 0",
    ),
    (CHAT, {"model": "gpt-4o", "messages": USER}, 404, "model", "serves 'tiny'"),
    (COMP, {"model": MODEL, "prompt": ""}, 400, "prompt", "empty"),
    (COMP, {"model": MODEL, "prompt": [5, 99999]}, 400, "prompt", "outside the vocabulary"),
    (COMP, {"model": MODEL, "prompt": "x" * 2000}, 400, "prompt", "leaving no room"),
    (COMP, {"model": MODEL, "prompt": "hi", "logprobs": 6}, 400, "logprobs", "less than or equal to 5"),
    (
        CHAT,
        {"model": MODEL, "messages": USER, "top_logprobs": 2},
        400,
        "top_logprobs",
        "needs logprobs: true",
    ),
    (
        CHAT,
        {"model": MODEL, "messages": USER, "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
        "less than or equal to 20",
    ),
    (COMP, {"model": MODEL, "prompt": ["a", "b"], "stream": True}, 400, "stream", "one by one"),
    (COMP, {"prompt": "hi"}, 400, "model", "missing required parameter 'model'"),
    (
        COMP,
        {"model": MODEL, "prompt": "hi", "temperature": 1, "seed": 10**23},
        400,
        None,
        "seed must be an integer",
    ),
    (
        COMP,
        {"model": MODEL, "prompt": "hi", "seed": 10**23, "stream": True},
        400,
        None,
        "seed must be an integer",
    ),
    (
        COMP,
        {"model": MODEL, "prompt": "hi", "temperature": 0, "seed": 10**23},
        400,
        None,
        "seed must be an integer",
    ),
]


@pytest.mark.parametrize("path, body, status, param, words", BAD_REQUESTS)
def test_bad_requests_get_openai_shaped_errors(server, path, body, status, param, words):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_penalties_reach_the_engine(client, chat):
    """OpenAI's presence and frequency penalties, and the repetition_penalty extension (sent as an extra
    body field, as to vLLM), give the engine's tokens with the same settings. (Negative and < 1: this
    random model seldom repeats a token, so only penalties that favour repetition change its text.)"""
    prompt = "The quick brown fox"
    for settings, extra in [
        (dict(presence_penalty=-2.0, frequency_penalty=-0.5), {}),
        (dict(repetition_penalty=0.3), {"repetition_penalty": 0.3}),
    ]:
        openai_settings = {k: v for k, v in settings.items() if k != "repetition_penalty"}
        r = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=20, temperature=0, extra_body=extra, **openai_settings
        )
        expected = reference(chat, prompt, max_new_tokens=20, **settings)
        assert r.choices[0].text == expected.text
        assert expected.token_ids != reference(chat, prompt, max_new_tokens=20).token_ids


def test_logprobs_of_completions_chat_and_echoed_prompts(client, chat, server):
    """The logprobs objects of both APIs carry the engine's numbers, and lm-evaluation-harness's
    log-likelihood request (token ids, echo, logprobs 1, max_tokens 1) scores the prompt's tokens."""

    engine, tok = chat.engine, chat.engine.tokenizer

    def text(t):
        return token_text(tok.decode_bytes([t]))

    r = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0, logprobs=2
    )
    expected = reference(chat, "The quick brown fox", max_new_tokens=6, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == [text(t) for t in expected.token_ids]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in expected.logprobs], abs=1e-6)
    assert lp.top_logprobs == [  # the 2 most likely tokens, and the chosen one (OpenAI: "up to logprobs+1")
        {text(i): pytest.approx(v, abs=1e-6) for i, v in [*t.top, (t.token_id, t.logprob)]}
        for t in expected.logprobs
    ]
    zero = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=2, temperature=0, logprobs=0
    )
    assert [list(top) for top in zero.choices[0].logprobs.top_logprobs] == [
        [t] for t in zero.choices[0].logprobs.tokens
    ]
    assert r.choices[0].text == expected.text
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert token.startswith("bytes:") or expected.text[offset:].startswith(token)

    ids = engine.encode("Hello world, this is a test")
    body = {"model": MODEL, "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    lp = _post(server, COMP, body).json()["choices"][0]["logprobs"]
    scored = engine.prompt_logprobs(ids, 1)
    assert len(lp["tokens"]) == len(ids) + 1 and lp["tokens"][: len(ids)] == [text(t) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx([s.logprob for s in scored[1:]], abs=1e-6)
    [generated] = reference(chat, ids, max_new_tokens=1, logprobs=1).logprobs
    assert lp["token_logprobs"][-1] == pytest.approx(generated.logprob, abs=1e-6)
    lp = _post(server, COMP, {**body, "max_tokens": 0}).json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids)  # the prompt alone
    # several prompts in one request (as lm-eval batches them) are scored together, each as alone
    many = [ids, ids[:3], engine.encode("The cat sat on the mat"), ids[:1]]
    choices = _post(server, COMP, {**body, "prompt": many, "max_tokens": 0}).json()["choices"]
    for prompt, choice in zip(many, choices, strict=True):
        alone = engine.prompt_logprobs(prompt, 1)
        assert choice["logprobs"]["token_logprobs"][0] is None and len(choice["logprobs"]["tokens"]) == len(
            prompt
        )
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
            [s.logprob for s in alone[1:]], abs=1e-5
        )

    messages = [{"role": "user", "content": "Name a color."}]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    expected = reference(
        chat, chat.encode_chat(messages), max_new_tokens=5, stop=chat.stop_strings(()), logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [text(t) for t in expected.token_ids]
    assert [bytes(c.bytes) for c in content] == [tok.decode_bytes([t]) for t in expected.token_ids]
    assert [c.logprob for c in content] == pytest.approx([t.logprob for t in expected.logprobs], abs=1e-6)
    assert [[a.logprob for a in c.top_logprobs] for c in content] == [
        pytest.approx([v for _, v in t.top], abs=1e-6) for t in expected.logprobs
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=3, temperature=0, logprobs=True
    )
    assert all(c.top_logprobs == [] for c in r.choices[0].logprobs.content)
    assert (
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3).choices[0].logprobs
        is None
    )


def _stream(server, path, body) -> list[dict]:
    """The JSON events of a streamed response (without the final [DONE])."""
    r = _post(server, path, {**body, "stream": True})
    assert r.status_code == 200, r.text
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streamed_logprobs_equal_the_non_streamed_ones(server, chat):
    """Each chunk carries the logprobs of the tokens that begin in its text; together the chunks' logprobs
    are the non-streamed answer's, for completions (with a stop string, with echo scoring the prompt)
    and chat (top alternatives, the reply's surrounding whitespace left out alike)."""
    text = reference(chat, "The cat sat", max_new_tokens=16).text
    stop = text[6:9]
    assert stop and stop not in text[:8]
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    for extra in (
        {},
        {"stop": [stop]},
        {"echo": True},
        {"echo": True, "max_tokens": 0},
        {"prompt": [5, 9, 3]},
    ):
        body = {
            "model": MODEL,
            "prompt": "The cat sat",
            "max_tokens": 16,
            "temperature": 0,
            "logprobs": 2,
            **extra,
        }
        whole = _post(server, COMP, body).json()["choices"][0]
        chunks = [e["choices"][0] for e in _stream(server, COMP, body)]
        assert "".join(c["text"] for c in chunks) == whole["text"] and whole["logprobs"]["tokens"]
        assert {k: [v for c in chunks for v in c["logprobs"][k]] for k in keys} == whole["logprobs"]
        written = 0
        for c in chunks:  # a chunk's tokens begin in its own text
            assert all(written <= o < written + len(c["text"]) for o in c["logprobs"]["text_offset"]) or (
                c["finish_reason"] and c["text"] == ""
            )
            written += len(c["text"])
        if "stop" in extra:
            assert chunks[-1]["finish_reason"] == "stop" and stop not in whole["text"]

    messages = [{"role": "user", "content": "Name three primary colors."}]
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    whole = _post(server, CHAT, body).json()["choices"][0]
    chunks = [e["choices"][0] for e in _stream(server, CHAT, body)]
    assert "".join(c["delta"].get("content") or "" for c in chunks) == whole["message"]["content"]
    assert [t for c in chunks if c["logprobs"] for t in c["logprobs"]["content"]] == whole["logprobs"][
        "content"
    ]
    assert len(whole["logprobs"]["content"]) > 2 and all(
        len(t["top_logprobs"]) == 3 for t in whole["logprobs"]["content"]
    )
    plain = _stream(server, CHAT, {**body, "logprobs": False, "top_logprobs": None})
    assert all(e["choices"][0]["logprobs"] is None for e in plain)


def testchat_logprobs_in_parts_leave_out_the_whitespace_around_the_reply():
    """`ChatTokens` fed a reply in parts gives what it gives fed the whole reply: whitespace-only
    tokens (or byte tokens of a whitespace character) at either end left out, held back in the
    middle until a token with text follows: the kept tokens spell the stripped reply."""

    tok = BPETokenizer({bytes([b]): b for b in range(256)})
    # byte tokens: an ideographic space (U+3000, 3 bytes) and a no-break space (2 bytes) are
    # whitespace that str.strip() removes from the reply, so their byte tokens go too; an "é" stays
    text = "\n\u3000 a \u00a0é b \u3000\n\u00a0"
    reply = [TokenLogprob(t, -0.5) for t in text.encode()]
    whole = [e["bytes"] for e in ChatTokens(tok).feed(reply, final=True)]
    assert bytes(b for e in whole for b in e).decode() == text.strip() == "a \u00a0é b"
    for cut in range(len(reply) + 1):
        tokens = ChatTokens(tok)
        first = [e["bytes"] for e in tokens.feed(reply[:cut])]
        assert first + [e["bytes"] for e in tokens.feed(reply[cut:], final=True)] == whole
        assert first == whole[: len(first)]
    broken = [TokenLogprob(t, -0.5) for t in b"ok \xe3\x80"]  # a reply that ends inside a character
    assert [e["token"] for e in ChatTokens(tok).feed(broken, final=True)] == [
        "o",
        "k",
        " ",
        "bytes:\\xe3",
        "bytes:\\x80",
    ]


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.sampled_from([0x20, 0x0A, 0x61, 0xE3, 0x80, 0xC2, 0xA0, 0xF0, 0x9F, 0xFF]), max_size=12),
    cut=st.integers(0, 12),
)
def testchat_logprobs_spell_the_stripped_reply(data, cut):
    """Whatever the bytes (broken characters, whitespace of 1-3 bytes, invalid bytes), the kept byte
    tokens spell exactly the reply's content, fed whole or in two parts."""

    tok = BPETokenizer({bytes([b]): b for b in range(256)})
    reply = [TokenLogprob(t, -0.5) for t in data]
    content = bytes(data).decode("utf-8", "replace").strip()
    tokens = ChatTokens(tok)
    kept = tokens.feed(reply[:cut]) + tokens.feed(reply[cut:], final=True)
    assert bytes(b for e in kept for b in e["bytes"]).decode("utf-8", "replace") == content


def test_a_default_max_tokens_below_1_is_refused_at_start(chat, capsys):
    with pytest.raises(ScratchLLMError, match="--default-max-tokens must be >= 1"):
        create_app(chat, default_max_tokens=0)

    assert main(["serve", "--model", "unused", "--default-max-tokens", "-1", "--port", "0"]) == 2
    assert (
        "--default-max-tokens must be >= 1 (or left out: the rest of the context), got -1"
        in capsys.readouterr().err
    )


def test_malformed_bodies_unknown_paths_and_the_openai_client_errors(server, client):
    r = _post(server, CHAT, None, raw=b'{"model": "tiny", "messages": [')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = _post(server, CHAT, None, raw=b"[1, 2]")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = _post(server, COMP, None, raw=b"")
    assert r.status_code == 400 and "the request has no body" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + CHAT, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json()

    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5000)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="hi", temperature=9)


def test_the_api_key_is_required(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # health needs no key
    for key in (None, "wrong"):  # the key is checked before the body: a bad body still gets 401
        for r in (
            httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {}),
            _post(server, CHAT, {"model": MODEL, "messages": USER}, key=key),
            _post(server, CHAT, {"model": MODEL}, key=key),
        ):
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_50_concurrent_requests_are_all_answered(server, client, chat):
    prompts = [f"The cat sat {i}" for i in range(50)]

    def call(i: int) -> str:
        if i % 5 == 0:  # some streamed chats among them
            stream = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": prompts[i]}],
                max_tokens=4,
                temperature=0,
                stream=True,
            )
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return (
            client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=4, temperature=0)
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(call, range(50)))
    for i, answer in enumerate(answers):
        if i % 5 == 0:
            expected = chat_reference(chat, [{"role": "user", "content": prompts[i]}], 4).text.strip()
        else:
            expected = reference(chat, prompts[i], max_new_tokens=4).text
        assert answer == expected, i
    assert server.app.state.scheduler.waiting == 0


def test_scheduler_batches_waiting_requests_with_equal_settings(chat):
    greedy = GenerationConfig(max_new_tokens=3)
    seeded = GenerationConfig(max_new_tokens=3, temperature=1.0, seed=1)
    greedy_seeded = GenerationConfig(
        max_new_tokens=3, seed=9
    )  # a seed changes nothing when greedy (lm-eval sends one)
    ids = [chat.engine.encode(t) for t in ["The cat", "Paris is the", "Name"]]

    async def main():
        loop = asyncio.get_running_loop()
        scheduler = Scheduler(chat, max_batch_size=8)
        jobs = [
            Job([ids[0]], greedy, loop),
            Job([ids[1], ids[2]], greedy, loop),
            Job([ids[0]], seeded, loop),
            Job([ids[1]], greedy, loop, stream=True),
            Job([ids[2]], greedy_seeded, loop),
        ]
        for job in jobs:  # all queued before the worker starts
            scheduler._jobs.append(job)
        scheduler.start()
        results = [await job.future for job in jobs if not job.stream]
        events = []
        while not events or events[-1][0] != "done":
            events.append(await jobs[3].events.get())
        scheduler.close()
        return scheduler.batches_run, results, events

    batches, results, events = asyncio.run(main())
    # the four greedy prompts together (one seeded), the seeded sample alone, the stream alone
    assert batches == 3
    assert [c.text for c in results[0] + results[1] + results[3]] == [
        chat.engine.generate([i], greedy)[0].text for i in [ids[0], ids[1], ids[2], ids[2]]
    ]
    assert results[2][0].text == chat.engine.generate([ids[0]], seeded)[0].text
    assert "".join(v[0] for k, v in events if k == "piece") == events[-1][1][0].text


def test_an_end_of_text_token_is_listed_when_it_ends_an_echoed_completion(server, chat, monkeypatch):
    """lm-evaluation-harness takes the last entry of an echo + logprobs answer as the generated token:
    when the model ends the text there, that entry is the end-of-text token with its logprob."""
    eot = chat.engine.tokenizer.eot_id

    def always_eot(logits, *args, **kwargs):
        return torch.full((logits.shape[0],), eot)

    sampler = gen.sample_next_token
    for name, module in list(sys.modules.items()):  # wherever the generation package binds the sampler
        if name.startswith(gen.__name__) and getattr(module, "sample_next_token", None) is sampler:
            monkeypatch.setattr(module, "sample_next_token", always_eot)
    ids = chat.engine.encode("Hello world")
    body = {"model": MODEL, "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    choice = _post(server, COMP, body).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 1 and lp["tokens"][-1] == "<|endoftext|>"
    expected = chat.engine.prompt_logprobs([*ids, eot])[-1].logprob
    assert lp["token_logprobs"][-1] == pytest.approx(expected, abs=1e-5)


def test_logprobs_objects_name_byte_fragments_and_follow_the_text():
    """Pieces of a multi-byte character get distinct names ("bytes:\\xc3"), offsets point into the
    decoded text, and chat's tokens follow the stripped reply."""

    tok = BPETokenizer({bytes([b]): b for b in range(256)})
    text = "café au lait"
    ids = list(text.encode())
    lp = TextOffsets(tok).add([TokenLogprob(t, -1.0, ((0xC3, -1.0), (0xA9, -2.0))) for t in ids])
    assert lp["tokens"][3:5] == ["bytes:\\xc3", "bytes:\\xa9"] and lp["tokens"][5] == " "
    assert lp["top_logprobs"][0] == {
        "bytes:\\xc3": -1.0,
        "bytes:\\xa9": -2.0,
        "c": -1.0,
    }  # + the chosen token
    assert lp["text_offset"] == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        assert token.startswith("bytes:") or text[offset:].startswith(token)
    broken = b"\xdcab"  # a character's first byte, then no continuation: "\ufffdab"
    assert TextOffsets(tok).add([TokenLogprob(t, -1.0) for t in broken])["text_offset"] == [0, 1, 2]
    # echo: the prompt's text and the completion's are decoded apart, so a character cut between them is
    # U+FFFD on each side: "ab\ufffd" + "\ufffd\ufffdxy"
    prompt, completion = b"ab\xe6", b"\x97\xa5xy"
    echoed = prompt.decode("utf-8", "replace") + completion.decode("utf-8", "replace")
    offsets = TextOffsets(tok)
    lp = merge_logprobs(
        offsets.prompt(list(prompt), [None] * len(prompt)),
        offsets.add([TokenLogprob(t, -1.0) for t in completion]),
    )
    assert lp["text_offset"] == [0, 1, 2, 3, 4, 5, 6] and echoed[5:] == "xy"
    reply = [TokenLogprob(t, -0.5) for t in b"  hi\n\n"]
    content = chat_logprobs(tok, reply)
    assert [c["token"] for c in content["content"]] == ["h", "i"] and content["refusal"] is None
    assert content["content"][0]["bytes"] == [ord("h")]


def test_the_port_accepts_connections_before_the_server_starts():
    """`serve` prints its URL once the socket listens: a client connecting right away waits in the
    backlog for the server to start instead of being refused."""

    sock = bind_socket("127.0.0.1", 0)
    try:
        socket.create_connection(sock.getsockname(), timeout=5).close()
    finally:
        sock.close()


@pytest.mark.slow  # a fresh Python process imports torch and loads the model
def test_cli_serve_starts_answers_and_reports_a_busy_port(model_dir, tmp_path, capsys):

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", str(model_dir), "--port", str(port)]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--port", "99999"]) == 2
    assert "--port 99999 is out of range" in capsys.readouterr().err

    env = {**os.environ, "SCRATCHLLM_API_KEY": "env-key"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scratchllm",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            "0",
            "--dtype",
            "fp32",
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert "serving 'tiny'" in line and "no prompt template" in line, line + proc.stderr.read()
        base = line.split(" at ")[-1].strip()
        cli_client = openai.OpenAI(base_url=base, api_key="env-key", max_retries=0)
        r = cli_client.chat.completions.create(model="tiny", messages=USER, max_tokens=3, temperature=0)
        assert r.usage.completion_tokens <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_a_client_that_disconnects_mid_stream_frees_the_model(server, client):
    scheduler = server.app.state.scheduler
    before = scheduler.batches_run
    body = {"model": MODEL, "prompt": "The", "max_tokens": 250, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + COMP, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert next(r.iter_lines()).startswith("data: ")
    # the next request is answered, and the abandoned stream never ran to its end
    r = client.completions.create(model=MODEL, prompt="The", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens <= 2
    assert scheduler.batches_run == before + 1


def test_served_model_name_is_the_run_for_a_runs_model_directory(model_dir, tmp_path):

    for name in ("model", "best"):
        (tmp_path / "runs" / "assistant" / name).mkdir(parents=True)
        assert served_model_name(str(tmp_path / "runs" / "assistant" / name)) == "assistant"
        assert served_model_name(str(tmp_path / "runs" / "assistant" / name) + "/") == "assistant"
    assert served_model_name(str(model_dir)) == model_dir.name == "tiny"
    assert served_model_name("gpt2") == "gpt2" and served_model_name("gpt2-medium") == "gpt2-medium"


def test_serve_names_the_model_after_its_run_unless_told(model_dir, tmp_path, monkeypatch, capsys):
    """`scratchllm serve --model runs/assistant/model` serves "assistant" (not "model", the name of
    every run's final model); --model-name still wins. Asked with the openai client."""

    run_model = tmp_path / "assistant" / "model"
    shutil.copytree(model_dir, run_model)
    serve_forever = uvicorn.Server.run
    seen: list[list[str]] = []

    def serve_and_ask(self, sockets=None):
        thread = threading.Thread(
            target=serve_forever, args=(self,), kwargs={"sockets": sockets}, daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 30
        while not self.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            port = sockets[0].getsockname()[1]
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            ids = [m.id for m in client.models.list().data]
            r = client.chat.completions.create(model=ids[0], messages=USER, max_tokens=2, temperature=0)
            seen.append([*ids, r.model])
        finally:
            self.should_exit = True
            thread.join(timeout=30)

    monkeypatch.setattr(uvicorn.Server, "run", serve_and_ask)
    monkeypatch.delenv("SCRATCHLLM_API_KEY", raising=False)
    common = ["--port", "0", "--device", "cpu", "--dtype", "fp32", "--log-level", "warning"]
    assert main(["serve", "--model", str(run_model), *common]) == 0
    assert main(["serve", "--model", str(run_model), "--model-name", "mine", *common]) == 0
    assert seen == [["assistant", "assistant"], ["mine", "mine"]]
    out = capsys.readouterr().out
    assert "serving 'assistant'" in out and "serving 'mine'" in out
