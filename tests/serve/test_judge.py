"""The LLM judge: the book's prompt (checked against the book's own code), a parser for chatty
answers, retries/timeouts/fatal errors against a flaky fake server, and the whole command end to
end against a real `scratchllm serve` app whose hand-built model always answers "Score: 85"."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from scratchllm.checkpoint import save_model
from scratchllm.cli import main
from scratchllm.errors import ScratchLLMError
from scratchllm.evals import judge as judge_module
from scratchllm.evals import judge_client
from scratchllm.evals.judge import SAME_FAILURES_FATAL, judge_entries, judge_prompt, read_responses
from scratchllm.evals.judge_client import FOLLOW_UP, JudgeClient, JudgeFatalError, chat_url, parse_score
from scratchllm.model.gpt import GPTConfig, GPTModel
from scratchllm.serve.app import create_app
from scratchllm.serve.chat import load_chat_model
from scratchllm.text.templates import get_template
from tests.serve.helpers import BackgroundServer

ENTRIES = [
    {
        "instruction": "Rewrite the sentence using a simile.",
        "input": "The car is very fast.",
        "output": "The car is as fast as lightning.",
        "model_response": "The car is as fast as a bullet.",
    },
    {
        "instruction": "What type of cloud is typically associated with thunderstorms?",
        "input": "",
        "output": "The type of cloud typically associated with thunderstorms is cumulonimbus.",
        "model_response": "The type of cloud associated with thunderstorms is a cumulus cloud.",
    },
    {
        "instruction": "Name the author of 'Pride and Prejudice'.",
        "input": "",
        "output": "Jane Austen wrote 'Pride and Prejudice'.",
        "model_response": "The author is Jane Austen.",
    },
]


@pytest.mark.parametrize(
    "reply, score",
    [
        ("85", 85),
        (" 85.\n", 85),
        ("**72**", 72),
        ("100", 100),
        ("0", 0),
        ("Score: 85", 85),
        ("I would rate this response 72 out of 100.", 72),
        ("The response is mostly correct (2 small errors). Score: 90/100", 90),
        ("In 2023 terms the answer deserves 95", 95),
        ("8/10", 80),
        ("I'd give it a 7 out of 10.", 70),
        ("85.5", 86),
        ("Rating: 60%", 60),
        ("150", None),
        ("-10", None),
        ("Rating: 4/5", 80),
        ("I would rate this response 2 out of 5.", 40),
        ("1. Accuracy: correct. 2. Clarity: good. Overall: 90", 90),
        ("The response covers 3 of the 4 points, so 75.", None),  # ambiguous: the follow-up asks
        ("Score: 85 (the 2 typos cost 15)", 85),
        # replies with a rubric: the score word's number wins over the parts' fractions
        ("Accuracy: 4/5\nCompleteness: 3/5\nOverall score: 75/100", 75),
        ("Accuracy: 9/10, clarity 6/10. Final score: 70/100", 70),
        ("Score: 85\n(Accuracy 9/10, style 7/10)", 85),
        ("The model got 4/5 facts right. Score: 70", 70),
        ("Score: 90. (For reference, 2/5 would be poor.)", 90),
        ("Overall it misses 2 key facts. Score: 60", 60),
        ("Score (0-100): 85", 85),
        ("**Score:** 90", 90),
        ("Overall score: 75 out of 100", 75),
        ("The answer is 100% correct. Score: 95", 95),
        ("Accuracy 4/5, clarity 3/5.", None),  # two fractions, no score: the follow-up asks
        ("The response is good.", None),
        ("", None),
    ],
)
def test_parse_score_reads_chatty_answers(reply, score):
    assert parse_score(reply) == score


def test_the_prompt_is_the_books(monkeypatch):
    ch07 = pytest.importorskip("llms_from_scratch.ch07")
    seen: list[str] = []
    monkeypatch.setattr(ch07, "query_model", lambda prompt, model="llama3", **kw: seen.append(prompt) or "85")
    monkeypatch.setattr(ch07, "tqdm", lambda it, **kw: it)
    assert ch07.generate_model_scores(ENTRIES, "model_response") == [85, 85, 85]
    assert [judge_prompt(e) for e in ENTRIES] == seen
    assert judge_prompt(ENTRIES[0], template="phi3").startswith("Given the input `<|user|>\nRewrite")


def test_chat_url_accepts_base_urls():
    assert chat_url("http://localhost:11434/v1/") == "http://localhost:11434/v1/chat/completions"
    assert chat_url("http://localhost:11434") == "http://localhost:11434/v1/chat/completions"
    assert chat_url("https://x.org/v1/chat/completions") == "https://x.org/v1/chat/completions"
    with pytest.raises(Exception, match="must start with http"):
        chat_url("localhost:11434")
    with pytest.raises(ScratchLLMError, match="is not a valid URL"):
        chat_url("http://[::1")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--timeout", "-1"], "--timeout must be a number of seconds > 0, got -1.0"),
        (["--retries", "-1"], "--retries must be >= 0, got -1"),
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--max-tokens", "-1"], "--max-tokens must be >= 1, got -1"),
        (["--judge-url", "http://[::1"], "is not a valid URL"),
    ],
)
def test_bad_judge_settings_are_one_line_errors(flags, message, tmp_path, capsys):

    path = tmp_path / "r.json"
    path.write_text(json.dumps(ENTRIES))
    argv = ["judge", "--responses", str(path), "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m"]
    assert main([*argv, *flags, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# a flaky fake judge


class FakeJudge:
    """An OpenAI-style chat endpoint that follows a script: an int answers with that HTTP status,
    {"status", "error"} with that status and error object, "close" drops the connection,
    ("slow", seconds, text) answers late, a string answers it."""

    def __init__(self, script: list):
        self.script = list(script)
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                step = fake.script.pop(0) if len(fake.script) > 1 else fake.script[0]
                if step == "close":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if isinstance(step, tuple):
                    time.sleep(step[1])
                    step = step[2]
                if isinstance(step, int):
                    self.reply(step, {"error": {"message": f"scripted {step}", "type": "x"}})
                elif isinstance(step, dict):  # an error answer as given: {"status": ..., "error": {...}}
                    self.reply(step["status"], {"error": step["error"]})
                else:
                    self.reply(
                        200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": step}}]}
                    )

            def reply(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that timed out leaves a broken pipe behind: expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def make(script):
        servers.append(FakeJudge(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def client_for(judge, **kw):
    return JudgeClient(judge.url, "llama3", backoff=0.01, **kw)


def test_transient_failures_are_retried_and_the_request_is_the_books(fake):
    judge = fake([503, 429, "close", 500, "I'd rate it 90/100."])
    with client_for(judge, api_key="k") as client:
        assert client.ask("prompt") == (90, "I'd rate it 90/100.", 5)
    request = judge.requests[-1]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer k"
    assert request["model"] == "llama3" and request["messages"] == [{"role": "user", "content": "prompt"}]
    assert (request["temperature"], request["seed"], request["max_tokens"]) == (
        0.0,
        123,
        256,
    )  # the book's options


def test_timeouts_are_retried(fake):
    judge = fake([("slow", 1.0, "12"), "77"])
    with client_for(judge, timeout=0.2) as client:
        assert client.ask("p") == (77, "77", 2)


def test_failing_items_are_reported_not_dropped(fake):
    judge = fake([503])
    with client_for(judge, retries=2) as client:
        [item] = judge_entries(ENTRIES[:1], client)
    assert item["score"] is None and item["attempts"] == 3 and "failed 3 times" in item["error"]
    assert "HTTP 503: scripted 503" in item["error"] and item["instruction"] == ENTRIES[0]["instruction"]
    assert len(judge.requests) == 3

    judge = fake([400])  # a rejected request is not retried
    with client_for(judge) as client:
        [item] = judge_entries(ENTRIES[:1], client)
    assert item["score"] is None and item["attempts"] == 1 and "HTTP 400" in item["error"]


def test_a_chatty_judge_is_asked_again_for_the_number(fake):
    judge = fake(["The response is quite good, but not perfect.", "Fine: 75"])
    with client_for(judge) as client:
        score, reply, attempts = client.ask("p")
    assert (score, attempts) == (75, 2) and reply.endswith("[follow-up] Fine: 75")
    assert [m["role"] for m in judge.requests[1]["messages"]] == ["user", "assistant", "user"]
    assert judge.requests[1]["messages"][2]["content"] == FOLLOW_UP

    judge = fake(["no idea", "still no idea"])
    with client_for(judge) as client:
        [item] = judge_entries(ENTRIES[:1], client)
    assert item["score"] is None and "no score" in item["error"] and "still no idea" in item["judge_reply"]


@pytest.mark.parametrize("status", [401, 404])
def test_a_wrong_key_url_or_model_stops_the_run(fake, status):
    judge = fake([status])
    with client_for(judge) as client, pytest.raises(JudgeFatalError, match=str(status)):
        judge_entries(ENTRIES, client, workers=2)
    assert len(judge.requests) <= 2


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_judge_stops_at_once_with_one_line(tmp_path, monkeypatch, capsys):

    sleeps: list[float] = []
    monkeypatch.setattr(judge_client.time, "sleep", sleeps.append)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(ENTRIES))
    out = tmp_path / "scores.json"
    url = f"http://127.0.0.1:{unused_port()}/v1"
    argv = ["judge", "--responses", str(path), "--judge-url", url, "--judge-model", "m", "--out", str(out)]
    assert main([*argv, "--workers", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"cannot reach the judge at {url}/chat/completions (Connection refused)" in err
    assert "is the server running?" in err and "ollama serve" in err and "scratchllm serve" in err
    assert sleeps == [] and not out.exists()  # no retries, and no empty result file


def test_a_judge_that_goes_away_mid_run_is_still_retried(fake, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(judge_client.time, "sleep", sleeps.append)
    judge = fake(["85"])
    with client_for(judge, retries=2) as client:
        assert client.ask("p") == (85, "85", 1)
        judge.close()  # the server went away after answering: connection refused from now on
        [item] = judge_entries(ENTRIES[:1], client)
    assert item["score"] is None and item["attempts"] == 3 and len(sleeps) == 2
    assert "failed 3 times" in item["error"] and "ConnectError" in item["error"]


def judge_run(judge, entries, tmp_path):
    """`scratchllm judge` arguments for `entries` against `judge`, and the result file's path."""
    path = tmp_path / "r.json"
    path.write_text(json.dumps(entries))
    out = tmp_path / "scores.json"
    return [
        "judge",
        "--responses",
        str(path),
        "--judge-url",
        judge.url,
        "--judge-model",
        "m",
        "--out",
        str(out),
    ], out


def test_a_run_stopped_by_a_fatal_error_keeps_what_it_scored(fake, tmp_path, capsys):

    judge = fake(["85", 404])
    argv, out = judge_run(judge, ENTRIES, tmp_path)
    assert main([*argv, "--quiet"]) == 2
    assert "answered 404" in capsys.readouterr().err
    result = json.loads(out.read_text())
    assert not result["complete"] and (result["count"], result["scored"]) == (1, 1)
    assert result["items"] == [{**ENTRIES[0], "score": 85, "judge_reply": "85", "attempts": 1, "error": None}]


def test_read_responses_checks_the_records(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in ENTRIES) + "\n")
    assert read_responses(path) == ENTRIES
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"instruction": "x", "output": "y", "response": "z"}]))
    with pytest.raises(Exception, match=r"r.json, record \[0\]: no string 'model_response'.*--response-key"):
        read_responses(path)
    assert read_responses(path, response_key="response")[0]["response"] == "z"
    # a byte-order mark, a judge result file (scored again), .ndjson lines: read as finetune reads them
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ENTRIES).encode())
    assert read_responses(path) == ENTRIES
    path.write_text(json.dumps({"complete": True, "items": ENTRIES}, indent=2))
    assert read_responses(path) == ENTRIES
    (tmp_path / "r.ndjson").write_text("\n".join(json.dumps(e) for e in ENTRIES))
    assert read_responses(tmp_path / "r.ndjson") == ENTRIES
    path.write_text(json.dumps({"entries": ENTRIES}, indent=2))
    with pytest.raises(ScratchLLMError, match=r"r.json: one JSON object \(keys \['entries'\]\), not a list"):
        read_responses(path)
    path.write_bytes(b"\xff\xfe[]")
    with pytest.raises(ScratchLLMError, match="not UTF-8 text"):
        read_responses(path)
    with pytest.raises(ScratchLLMError, match="is a directory"):
        read_responses(tmp_path)


# ----------------------------------------------------------------------------------------------
# end to end: `scratchllm judge` against a real server


def scoring_model(tokenizer, reply: str = "Score: 85", context_length: int = 512) -> GPTModel:
    """A GPT whose greedy answer to any alpaca-style prompt is `reply`: the blocks are zeroed so
    each position sees only its own token, and the embedding and output head form a chain
    (last prompt token -> first reply token -> ... -> end of text)."""
    cfg = GPTConfig(
        vocab_size=tokenizer.vocab_size,
        context_length=context_length,
        emb_dim=32,
        n_heads=4,
        n_layers=1,
        drop_rate=0.0,
        tie_weights=False,
    )
    model = GPTModel(cfg)
    start = tokenizer.encode(get_template("alpaca").assistant_header)[-1]
    chain = [start, *tokenizer.encode(reply), tokenizer.eot_id]
    assert len(set(chain)) == len(chain) <= cfg.emb_dim
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.final_norm.scale.fill_(1.0)
        for k, (token, following) in enumerate(itertools.pairwise(chain)):
            model.tok_emb.weight[token, k] = 1.0
            model.out_head.weight[following, k] = 10.0
    return model.eval()


def test_judge_end_to_end_against_scratchllm_serve(tmp_path, bpe, monkeypatch, capsys):

    judge_dir = save_model(tmp_path / "judge", scoring_model(bpe), bpe)
    app = create_app(load_chat_model(str(judge_dir), device="cpu", dtype="fp32"), api_key="judge-key")
    long_entry = {**ENTRIES[0], "model_response": "fast " * 600}  # too long for the judge's context window
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps([*ENTRIES, long_entry]))
    out = tmp_path / "scores.json"
    monkeypatch.setenv("SCRATCHLLM_JUDGE_API_KEY", "judge-key")

    with BackgroundServer(app) as server:
        args = [
            "judge",
            "--responses",
            str(responses),
            "--judge-url",
            server.url + "/v1",
            "--judge-model",
            "judge",
            "--out",
            str(out),
            "--max-tokens",
            "16",
            "--workers",
            "2",
            "--quiet",
        ]
        assert main(args) == 1  # one item failed
        captured = capsys.readouterr()
        assert "average score 85.00 over 3/4 responses" in captured.out
        assert (
            "1 responses got no score (items 3)" in captured.err and "maximum context length" in captured.err
        )

        result = json.loads(out.read_text())
        assert result["complete"] and result["judge"]["model"] == "judge"
        assert (result["count"], result["scored"], result["failed"], result["average"]) == (4, 3, 1, 85.0)
        assert result["failed_items"] == [3]
        for entry, item in zip(ENTRIES, result["items"]):
            assert item == {**entry, "score": 85, "judge_reply": "Score: 85", "attempts": 1, "error": None}
        assert result["items"][3]["score"] is None and "HTTP 400" in result["items"][3]["error"]

        # --resume keeps the scores: only the failed item is asked again
        batches = app.state.scheduler.batches_run
        assert main([*args, "--resume"]) == 1
        assert app.state.scheduler.batches_run == batches
        assert json.loads(out.read_text())["items"][:3] == result["items"][:3]

        # a wrong model name or key stops at once with one line
        assert main([*args[:6], "other", *args[7:]]) == 2
        assert "404" in capsys.readouterr().err
        monkeypatch.setenv("SCRATCHLLM_JUDGE_API_KEY", "wrong")
        assert main(args) == 2
        assert "refused the API key" in capsys.readouterr().err


def test_a_judge_that_fails_the_first_responses_alike_stops_the_run(fake, tmp_path, capsys):
    """Five failures with one error before any score: the judge (a model that cannot take the
    request, a server that always errs) is at fault, so the run stops rather than failing 1,000 entries."""
    many = [{**e, "instruction": f"{e['instruction']} ({i})"} for i in range(4) for e in ENTRIES]  # 12
    judge = fake([400])
    argv, out = judge_run(judge, many, tmp_path)
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and "the judge failed the first 5 responses alike (judge rejected" in err
    )
    assert len(judge.requests) == SAME_FAILURES_FATAL == 5
    result = json.loads(out.read_text())
    assert not result["complete"] and (result["count"], result["failed"]) == (5, 5)

    judge = fake(["70"] * 7 + [400])  # a resume of a run whose last 5 failed alike (say, too long)
    with client_for(judge) as client:
        first = judge_entries(many, client)
        done = {judge_module._entry_key(it): it for it in first}
        again = judge_entries(many, client, done=done)  # only the failed ones are asked again: all fail
    assert [it["score"] for it in again] == [70] * 7 + [None] * 5 and len(judge.requests) == 17

    judge = fake(["88", 400])  # once one scored, a failure is the entry's own: the run goes on
    with client_for(judge) as client:
        items = judge_entries(many, client)
    assert [it["score"] for it in items] == [88] + [None] * 11

    judge = fake([400, 400, "70", 400])  # fewer than five failures before the first score: it goes on too
    with client_for(judge) as client:
        assert len(judge_entries(many, client)) == 12


# ----------------------------------------------------------------------------------------------
# a judge whose context is too short for the judge prompt


def test_a_judge_with_too_short_a_context_stops_before_sending_the_entries(tmp_path, bpe, capsys):
    """A 128-token judge (the size of the demo model) cannot take any judge prompt: one request tells,
    and the run stops with one line naming the model and the fix, instead of failing every entry."""

    judge_dir = save_model(tmp_path / "judge", scoring_model(bpe, context_length=128), bpe)
    app = create_app(load_chat_model(str(judge_dir), device="cpu", dtype="fp32"), model_name="small")
    many = [{**e, "instruction": f"{e['instruction']} ({i})"} for i in range(4) for e in ENTRIES]  # 12
    with BackgroundServer(app) as server:
        argv, out = judge_run(server, many, tmp_path)
        argv[argv.index("m")] = "small"
        assert main([*argv, "--workers", "4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"the judge model 'small' at {server.url}/v1/chat/completions has too short a context" in err
    assert "maximum context length is 128 tokens" in err and "use a judge model with a longer context" in err
    result = json.loads(out.read_text())
    assert not result["complete"] and result["count"] == result["failed"] == 2  # the first, the shortest


CONTEXT_ERRORS = {
    "scratchllm": {
        "status": 400,
        "error": {
            "message": "this model's maximum context length is 128 tokens, and the prompt takes 300, leaving "
            "no room for a completion; shorten the prompt",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        },
    },
    "scratchllm max_tokens": {
        "status": 400,
        "error": {
            "message": "this model's maximum context length is 512 tokens; you requested 556 (300 in the "
            "prompt, 256 in max_tokens); lower max_tokens to at most 212 or shorten the prompt",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": "context_length_exceeded",
        },
    },
    "vllm": {
        "status": 400,
        "error": {
            "message": "This model's maximum context length is 2048 tokens. However, you requested 2100 "
            "tokens (1844 in the messages, 256 in the completion). Please reduce the length of the messages "
            "or completion.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
    },
    "llama.cpp": {
        "status": 400,
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
        },
    },
}


@pytest.mark.parametrize(
    "server, fix",
    [
        ("scratchllm", "; use a judge model with a longer context (--judge-model, --judge-url)"),
        ("scratchllm max_tokens", "; lower --max-tokens (now 256; the judge answers with a number"),
        ("vllm", "; use a judge model with a longer context (or a lower --max-tokens, if the prompt"),
        ("llama.cpp", "; use a judge model with a longer context (or a lower --max-tokens, if the prompt"),
    ],
)
def test_context_errors_of_known_servers_stop_the_run_with_the_fix(fake, server, fix):
    judge = fake([CONTEXT_ERRORS[server]])
    with client_for(judge) as client, pytest.raises(JudgeFatalError) as info:
        judge_entries(ENTRIES * 4, client, workers=2)
    message = str(info.value)
    assert "the judge model 'llama3'" in message and "too short a context" in message and fix in message
    assert "\n" not in message and len(judge.requests) == 2  # the first entry, then the shortest


def test_one_entry_too_long_for_the_judge_is_its_own_failure(fake):
    """The first entry is too long, the shortest fits: the judge can do the job, the run goes on."""
    long_first = {**ENTRIES[0], "model_response": "fast " * 600}
    judge = fake([CONTEXT_ERRORS["scratchllm"], "80"])
    with client_for(judge) as client:
        items = judge_entries([long_first, *ENTRIES], client)
    assert [it["score"] for it in items] == [None, 80, 80, 80]
    assert "maximum context length" in items[0]["error"] and len(judge.requests) == 4
    shortest = min(ENTRIES, key=lambda e: len(judge_prompt(e)))
    assert judge.requests[1]["messages"][0]["content"] == judge_prompt(shortest)

    judge = fake([CONTEXT_ERRORS["scratchllm"]])  # the first entry is the shortest: no other is sent
    with client_for(judge) as client, pytest.raises(JudgeFatalError, match="too short a context"):
        judge_entries([ENTRIES[2], long_first], client)
    assert len(judge.requests) == 1


# ----------------------------------------------------------------------------------------------
# preference pairs from the judge (`judge --make-preferences`), end to end


def test_make_preferences_against_scratchllm_serve_then_dpo_reads_them(tmp_path, bpe, capsys):
    from scratchllm.finetune.dpo import load_preference_data

    rewrite = "Paris is the capital."
    records = [{**e, "instruction": f"{e['instruction']} ({i})"} for i, e in enumerate(ENTRIES * 3)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "pairs.json"
    rewriter = save_model(tmp_path / "rewriter", scoring_model(bpe, rewrite), bpe)
    app = create_app(load_chat_model(str(rewriter), dtype="fp32"), model_name="judge")
    with BackgroundServer(app) as server:
        argv = ["judge", "--make-preferences", "--responses", str(data), "--judge-url", server.url + "/v1"]
        argv += ["--judge-model", "judge", "--out", str(out), "--max-tokens", "16", "--quiet"]
        assert main(argv) == 0
        assert f"{len(records)} preference pairs from {len(records)} records" in capsys.readouterr().out
        pairs = json.loads(out.read_text())
        assert {p["rewritten_as"] for p in pairs} == {"polite", "impolite"}  # drawn per record, seeded
        for record, pair in zip(records, pairs):
            polite = pair["rewritten_as"] == "polite"
            assert (pair["chosen"], pair["rejected"]) == (
                (rewrite, record["output"]) if polite else (record["output"], rewrite)
            )
            assert pair["instruction"] == record["instruction"] and pair["error"] is None
        assert [p["chosen"] for p in load_preference_data(out)] == [p["chosen"] for p in pairs]

        batches = app.state.scheduler.batches_run  # --resume asks nothing again
        assert main([*argv, "--resume"]) == 0 and app.state.scheduler.batches_run == batches
        assert json.loads(out.read_text()) == pairs
        assert main([*argv[:-3], "--style", "rude"]) == 2
        assert "--style must be one of" in capsys.readouterr().err

    # pick: the judge answers "B", so the second candidate is chosen
    picker = save_model(tmp_path / "picker", scoring_model(bpe, "B"), bpe)
    app = create_app(load_chat_model(str(picker), dtype="fp32"), model_name="judge")
    with BackgroundServer(app) as server:
        picked = tmp_path / "picked.json"
        argv = ["judge", "--make-preferences", "--pick", "output", "model_response", "--responses", str(data)]
        argv += ["--judge-url", server.url + "/v1", "--judge-model", "judge", "--out", str(picked)]
        argv += ["--max-tokens", "8", "--quiet"]
        assert main(argv) == 0
    for record, pair in zip(records, json.loads(picked.read_text())):
        assert (pair["chosen"], pair["rejected"]) == (record["model_response"], record["output"])
