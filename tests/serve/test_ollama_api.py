"""Ollama's native API (/api/...), called with the official `ollama` client and the book's chapter 7
`query_model` on a real uvicorn server: greedy answers equal the OpenAI routes', streams equal
non-streamed answers, options work as Ollama's do, errors come as `{"error": ...}` with Ollama's
statuses, and the API key is required when the server has one."""

from __future__ import annotations

import json
import urllib.request  # the book's ch07 does `import urllib` and uses urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from scratchllm.serve.app import create_app
from scratchllm.serve.chat import load_chat_model
from scratchllm.serve.ollama_format import human_number
from scratchllm.serve.ollama_schemas import FILL_CONTEXT, OllamaError, Options
from tests.serve.helpers import BackgroundServer

ollama = pytest.importorskip("ollama")

MODEL = "tiny"
KEY = "sk-ollama-test"
DEFAULT_MAX_TOKENS = 12  # the server's cap for replies without num_predict: keeps the book's judge quick
QUESTION = [{"role": "user", "content": "Name three primary colors."}]
GREEDY = {"temperature": 0, "num_predict": 6}


@pytest.fixture(scope="module")
def chat(model_dir: Path):
    return load_chat_model(str(model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def server(chat):
    app = create_app(chat, model_name=MODEL, default_max_tokens=DEFAULT_MAX_TOKENS)
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=60)


def openai_post(server, path: str, body: dict) -> dict:
    r = httpx.post(f"{server.url}/v1/{path}", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def rfc3339(text: str) -> datetime:
    assert text.endswith("Z")
    return datetime.fromisoformat(text[:-1] + "+00:00")


# ----------------------------------------------------------------------------------------------
# Generation


def test_chat_equals_the_openai_route_streamed_or_not(client, server):
    messages = [{"role": "system", "content": "You are terse."}, *QUESTION]
    expected = openai_post(
        server, "chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0}
    )
    r = client.chat(model=MODEL, messages=messages, options=GREEDY, stream=False)
    assert r.message.role == "assistant" and r.message.content == expected["choices"][0]["message"]["content"]
    assert r.message.content and r.done and r.done_reason == expected["choices"][0]["finish_reason"]
    assert r.prompt_eval_count == expected["usage"]["prompt_tokens"]
    assert r.eval_count == expected["usage"]["completion_tokens"]
    assert r.total_duration >= r.eval_duration > 0 and r.load_duration == 0
    assert r.model == MODEL and rfc3339(r.created_at)

    parts = list(client.chat(model=MODEL + ":latest", messages=messages, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == r.message.content
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].message.content == ""
    last = parts[-1]
    assert (last.done_reason, last.prompt_eval_count, last.eval_count) == (
        r.done_reason,
        r.prompt_eval_count,
        r.eval_count,
    )
    assert last.total_duration >= last.prompt_eval_duration + last.eval_duration - 1
    assert last.model == MODEL + ":latest"  # the name as the client sent it, as Ollama answers


def test_generate_raw_equals_completions_and_templated_equals_chat(client, server):
    expected = openai_post(
        server, "completions", {"prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0}
    )
    r = client.generate(model=MODEL, prompt="The quick brown fox", raw=True, options=GREEDY, stream=False)
    assert r.response == expected["choices"][0]["text"] and r.response
    assert r.context is None  # Ollama returns no context in raw mode
    parts = list(
        client.generate(model=MODEL, prompt="The quick brown fox", raw=True, options=GREEDY, stream=True)
    )
    assert "".join(p.response for p in parts) == r.response and parts[-1].done

    # without raw: the prompt is one user message (after `system`), as a chat with those messages
    g = client.generate(model=MODEL, prompt=QUESTION[0]["content"], system="Be brief.", options=GREEDY)
    c = client.chat(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."}, *QUESTION], options=GREEDY
    )
    assert g.response == c.message.content and g.eval_count == c.eval_count
    assert len(g.context) == g.prompt_eval_count + g.eval_count  # the prompt's ids and the reply's
    # an earlier answer's context goes first
    again = client.generate(
        model=MODEL, prompt="Why?", context=g.context, options={**GREEDY, "num_predict": 2}
    )
    assert again.prompt_eval_count > len(g.context)


def test_the_http_stream_is_newline_delimited_json_by_default(server):
    body = {"model": MODEL, "messages": QUESTION, "options": {"temperature": 0, "num_predict": 4}}
    with httpx.stream("POST", server.url + "/api/chat", json=body, timeout=60) as r:  # no "stream": streamed
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        objects = [json.loads(line) for line in r.iter_lines() if line]
    assert [o["done"] for o in objects] == [False] * (len(objects) - 1) + [True]
    last = objects[-1]
    assert last["done_reason"] in ("stop", "length") and last["message"] == {
        "role": "assistant",
        "content": "",
    }
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration", "eval_count"):
        assert isinstance(last[key], int) and last[key] >= 0
    assert last["eval_count"] <= 4 and all(rfc3339(o["created_at"]) for o in objects)

    # no messages (or no prompt): Ollama's answer to a request that loads the model
    r = httpx.post(server.url + "/api/generate", json={"model": MODEL})
    assert r.json()["done"] and r.json()["done_reason"] == "load" and r.json()["response"] == ""


def test_options_num_predict_stop_seed_num_ctx(client, chat):
    r = client.generate(
        model=MODEL, prompt="The cat sat", raw=True, options={"temperature": 0, "num_predict": 3}
    )
    assert r.eval_count == 3 and r.done_reason == "length"
    full = client.generate(
        model=MODEL, prompt="The cat sat", raw=True, options={"temperature": 0, "num_predict": 12}
    )
    stop = full.response[5:8]
    assert stop and stop not in full.response[:7]
    cut = client.generate(
        model=MODEL, prompt="The cat sat", raw=True, options={"temperature": 0, "stop": [stop]}
    )
    assert cut.response == full.response[: full.response.index(stop)] and cut.done_reason == "stop"

    sampled = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_predict": 6}
    a, b, other = (
        client.generate(model=MODEL, prompt="The cat", raw=True, options={**sampled, "seed": seed}).response
        for seed in (7, 7, 8)
    )
    assert a == b != other

    # num_ctx narrows the context window: the reply stops at its end; a prompt that fills it is an error
    prompt_tokens = len(chat.engine.encode("The cat sat"))
    r = client.generate(
        model=MODEL,
        prompt="The cat sat",
        raw=True,
        options={"temperature": 0, "num_predict": 50, "num_ctx": prompt_tokens + 2},
    )
    assert r.eval_count <= 2 and (r.eval_count == 2 or r.done_reason == "stop")
    with pytest.raises(ollama.ResponseError, match="num_ctx") as e:
        client.generate(model=MODEL, prompt="The cat sat", raw=True, options={"num_ctx": 2})
    assert e.value.status_code == 400

    # unknown options are ignored, as Ollama ignores them; known ones with no effect here are accepted
    r = client.generate(
        model=MODEL,
        prompt="The cat",
        raw=True,
        options={**GREEDY, "num_predict": 2, "no_such": 1, "num_gpu": 1, "min_p": 0},
    )
    assert r.eval_count == 2


def test_concurrent_requests_answer_as_each_alone(client):
    prompts, options = ["The cat sat", "Paris is", "Convert 45"], {"temperature": 0, "num_predict": 4}
    alone = [client.generate(model=MODEL, prompt=p, raw=True, options=options).response for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(
            pool.map(
                lambda p: client.generate(model=MODEL, prompt=p, raw=True, options=options).response, prompts
            )
        )
    assert together == alone  # decoded together by the scheduler, as each alone
    r = client.generate(model=MODEL, prompt="The cat", raw=True, options={"num_predict": 0})
    assert r.response == "" and r.eval_count == 0 and r.done_reason == "length"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_predict": "x"}, 'option "num_predict" must be of type integer'),
        ({"seed": 1.5}, 'option "seed" must be of type integer'),
        ({"temperature": True}, 'option "temperature" must be of type number'),
        ({"stop": "###"}, 'option "stop" must be of type array of strings'),
        ({"temperature": -1}, 'option "temperature" must be >= 0'),
        ({"top_p": 0}, 'option "top_p" must be in (0, 1]'),
        ({"repeat_penalty": 0}, 'option "repeat_penalty" must be > 0'),
        ({"stop": [""]}, 'option "stop" must be non-empty strings'),
        ({"mirostat": 2}, 'option "mirostat" is not supported'),
    ],
)
def test_bad_options_are_400s_with_ollamas_message(client, options, message):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model=MODEL, messages=QUESTION, options=options)
    assert e.value.status_code == 400 and message in e.value.error


def test_the_books_chapter_7_query_model(server, client):
    ch07 = pytest.importorskip("llms_from_scratch.ch07")
    prompt = "What is the capital of France?"
    # its exact request: urllib, the default stream, options seed 123, temperature 0, num_ctx 2048
    answer = ch07.query_model(prompt, model=MODEL, url=server.url + "/api/chat")
    options = {"seed": 123, "temperature": 0, "num_ctx": 2048}
    expected = client.chat(model=MODEL, messages=[{"role": "user", "content": prompt}], options=options)
    assert answer == expected.message.content and answer
    assert expected.eval_count <= DEFAULT_MAX_TOKENS  # no num_predict: the server's default cap
    assert isinstance(urllib.request.Request, type)


# ----------------------------------------------------------------------------------------------
# The model's description


def test_list_show_ps_and_version(client, server, chat):
    [listed] = client.list().models
    assert listed.model == MODEL + ":latest" and len(listed.digest) == 64
    assert listed.size > 0 and listed.modified_at.tzinfo is not None
    details = listed.details
    assert (details.family, details.format, details.quantization_level) == ("gpt2", "safetensors", "F32")
    assert details.parameter_size == human_number(sum(p.numel() for p in chat.engine.model.parameters()))
    assert httpx.get(server.url + "/api/tags").json()["models"][0]["name"] == MODEL + ":latest"

    shown = client.show(MODEL)
    assert shown.modelinfo["general.architecture"] == "gpt2"
    assert shown.modelinfo["gpt2.context_length"] == chat.context_length == 256
    assert shown.modelinfo["gpt2.vocab_size"] == chat.vocab_size
    assert "{{ .Prompt }}" in shown.template and "### Response:" in shown.template  # the alpaca layout
    assert 'stop "### Instruction:"' in shown.parameters and shown.capabilities == ["completion"]
    assert shown.details == details

    [running] = client.ps().models
    assert running.model == MODEL + ":latest" and running.context_length == 256 and running.size_vram == 0
    assert running.expires_at.year > 2300  # loaded until the server stops, as Ollama's keep_alive -1
    assert httpx.get(server.url + "/api/version").json() == {"version": __import__("scratchllm").__version__}


def test_human_number_as_ollama():
    assert [
        human_number(n) for n in (8_030_261_248, 3_000_000_000, 494_032_768, 137_000_000, 54_144, 999)
    ] == [
        "8.0B",
        "3B",
        "494.03M",
        "137M",
        "54K",
        "999",
    ]


# ----------------------------------------------------------------------------------------------
# Errors and the API key


def test_errors_are_ollama_shaped(client, server):
    for call in (
        lambda: client.chat(model="llama3", messages=QUESTION),
        lambda: client.generate(model="tiny:7b", prompt="x"),
        lambda: client.show("llama3"),
    ):
        with pytest.raises(ollama.ResponseError, match=r'model "(llama3|tiny:7b)" not found') as e:
            call()
        assert e.value.status_code == 404

    def post(body: dict, path: str = "/api/chat") -> httpx.Response:
        return httpx.post(server.url + path, json={"model": MODEL, **body})

    cases = [
        ({"model": "", "messages": QUESTION}, "model is required"),
        ({"messages": QUESTION, "format": "json", "stream": False}, "format (JSON output) is not supported"),
        ({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images are not supported"),
        ({"messages": QUESTION, "tools": [{"type": "function"}]}, "tools (function calling)"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role must be system, user or assistant"),
        ({"messages": "hello"}, "invalid request: messages"),
        ({"messages": QUESTION, "keep_alive": "soon"}, "invalid duration"),
        ({"messages": [{"role": "system", "content": "x"}]}, "need at least one user message"),
    ]
    for body, message in cases:
        r = post(body)
        assert r.status_code == 400 and message in r.json()["error"], (body, r.text)
    r = post({"prompt": "x", "template": "{{ .Prompt }}"}, "/api/generate")
    assert r.status_code == 400 and "template is not supported" in r.json()["error"]
    r = post({"prompt": "x", "context": [10**6]}, "/api/generate")
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]
    # keep_alive and think are accepted (the model stays loaded; no thinking models here)
    r = post(
        {
            "messages": QUESTION,
            "keep_alive": "5m",
            "think": True,
            "stream": False,
            "options": {"num_predict": 1},
        }
    )
    assert r.status_code == 200 and r.json()["eval_count"] == 1


def test_the_api_key_guards_api_too(chat, monkeypatch):
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    app = create_app(chat, model_name=MODEL, api_key=KEY)
    with BackgroundServer(app) as keyed:
        for path in ("/api/tags", "/api/version"):
            r = httpx.get(keyed.url + path)
            assert r.status_code == 401 and "API key" in r.json()["error"]
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=keyed.url).chat(model=MODEL, messages=QUESTION)
        assert e.value.status_code == 401
        with pytest.raises(ollama.ResponseError):
            ollama.Client(host=keyed.url, headers={"Authorization": "Bearer wrong"}).list()

        with_key = ollama.Client(host=keyed.url, headers={"Authorization": f"Bearer {KEY}"})
        assert with_key.list().models[0].model == MODEL + ":latest"
        assert with_key.chat(model=MODEL, messages=QUESTION, options={"num_predict": 2}).eval_count == 2
        monkeypatch.setenv("OLLAMA_API_KEY", KEY)  # the client sends it by itself
        assert ollama.Client(host=keyed.url).show(MODEL).modelinfo["gpt2.block_count"] == 2


# ----------------------------------------------------------------------------------------------
# Options, without a server


def test_options_defaults_and_ollamas_special_values():
    default = Options.parse(None)
    assert (default.temperature, default.top_k, default.top_p, default.repeat_penalty) == (0.8, 40, 0.9, 1.0)
    parsed = Options.parse({"top_k": 0, "seed": -1, "num_predict": -1, "num_ctx": 64.0, "temperature": None})
    assert (
        parsed.top_k is None and parsed.seed is None and parsed.num_predict is None and parsed.num_ctx == 64
    )
    assert Options.parse({"num_predict": -2}).num_predict == FILL_CONTEXT
    cfg = Options.parse({"repeat_penalty": 1.2, "stop": ["a"]}).generation_config(5, ["a", "b"])
    assert cfg.repetition_penalty == 1.2 and cfg.stop == ("a", "b") and cfg.max_new_tokens == 5

    # the tokens to generate: the server's default, num_predict cut at the window's end, -2 fills it
    assert Options.parse({}).max_tokens(256, 100, 12) == 12
    assert Options.parse({}).max_tokens(256, 250, 12) == 6
    assert Options.parse({"num_predict": 500}).max_tokens(256, 100, 12) == 156
    assert Options.parse({"num_predict": -2}).max_tokens(256, 100, 12) == 156
    assert Options.parse({"num_ctx": 110}).max_tokens(256, 100, 12) == 10
    with pytest.raises(OllamaError, match="shorten the prompt"):
        Options.parse({}).max_tokens(256, 256, None)
