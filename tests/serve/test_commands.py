"""`chat`, `serve` and `judge` through the command table: their flags (GenerationConfig's and
RuntimeSettings' embedded) become the settings the commands take, a TOML file sets them too, and each
command runs end to end on the tiny model or against a fake judge."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest
import uvicorn

import scratchllm.evals.judge as judge_module
import scratchllm.serve.chat as chat_module
import scratchllm.serve.server as server_module
from scratchllm.cli import main
from scratchllm.evals.judge import JudgeSettings
from scratchllm.generation import GenerationConfig, RuntimeSettings
from scratchllm.serve.chat import ChatSettings, load_chat_model
from scratchllm.serve.server import ServeSettings
from tests.conftest import exit_code

from .test_chat import expected_reply
from .test_judge import ENTRIES, FakeJudge


def settings_of(monkeypatch, module, argv: list[str]):
    """The settings object `main(argv)` hands the command's function (replaced by a recorder)."""
    seen = []
    with monkeypatch.context() as m:
        m.setattr(module, f"{argv[0]}_command", seen.append)
        assert main(argv) == 0
    return seen[0]


FULL_SAMPLING = [
    *("--max-new-tokens", "20", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--seed", "3"),
    *("--repetition-penalty", "1.2", "--presence-penalty", "0.5", "--frequency-penalty", "0.25"),
    *("--stop", "END", "--stop", "\n\n"),
]
FULL_RUNTIME = ["--device", "cpu", "--dtype", "fp32", "--compile", "--quantize", "int4"]


def test_chat_flags_become_its_settings(monkeypatch, tmp_path):
    settings = settings_of(monkeypatch, chat_module, ["chat", "--model", "m"])
    assert settings == ChatSettings(model="m")
    assert settings.sampling == GenerationConfig(max_new_tokens=256) and settings.runtime == RuntimeSettings()

    argv = [
        "chat",
        "--model",
        "m",
        "--template",
        "phi3",
        "--system",
        "Be brief.",
        *FULL_SAMPLING,
        *FULL_RUNTIME,
    ]
    assert settings_of(monkeypatch, chat_module, argv) == ChatSettings(
        model="m",
        template="phi3",
        system="Be brief.",
        sampling=GenerationConfig(
            max_new_tokens=20,
            temperature=0.7,
            top_k=5,
            top_p=0.9,
            seed=3,
            repetition_penalty=1.2,
            presence_penalty=0.5,
            frequency_penalty=0.25,
            stop=("END", "\n\n"),
        ),
        runtime=RuntimeSettings(device="cpu", dtype="fp32", compile=True, quantize="int4"),
    )

    config = tmp_path / "chat.toml"
    config.write_text('[chat]\nsystem = "Be kind."\n[sampling]\ntemperature = 0.5\ntop_k = 9\n')
    settings = settings_of(
        monkeypatch, chat_module, ["chat", "--config", str(config), "--model", "m", "--top-k", "3"]
    )
    assert settings.system == "Be kind." and (settings.sampling.temperature, settings.sampling.top_k) == (
        0.5,
        3,
    )

    for argv in (
        ["chat"],
        ["chat", "--model", "m", "--template", "vicuna"],
        ["chat", "--model", "m", "--ignore-eos"],
    ):
        assert exit_code(main, argv) == 2


def test_serve_flags_become_its_settings(monkeypatch):
    settings = settings_of(monkeypatch, server_module, ["serve", "--model", "m"])
    assert settings == ServeSettings(model="m") and settings.runtime == RuntimeSettings()
    assert (settings.host, settings.port, settings.max_batch_size, settings.log_level) == (
        "127.0.0.1",
        8000,
        8,
        "info",
    )

    argv = [
        *("serve", "--model", "m", "--template", "alpaca", *FULL_RUNTIME, "--host", "0.0.0.0", "--port", "0"),
        *("--api-key", "k", "--model-name", "mine", "--max-batch-size", "2", "--default-max-tokens", "50"),
        *("--log-level", "warning"),
    ]
    assert settings_of(monkeypatch, server_module, argv) == ServeSettings(
        model="m",
        template="alpaca",
        runtime=RuntimeSettings(device="cpu", dtype="fp32", compile=True, quantize="int4"),
        host="0.0.0.0",
        port=0,
        api_key="k",
        model_name="mine",
        max_batch_size=2,
        default_max_tokens=50,
        log_level="warning",
    )
    for argv in (
        ["serve", "--model", "m", "--log-level", "loud"],
        ["serve", "--model", "m", "--temperature", "1"],
    ):
        assert exit_code(main, argv) == 2


def test_judge_flags_become_its_settings_and_max_tokens_0_is_none(monkeypatch):
    required = ["--responses", "r.json", "--judge-url", "http://x/v1", "--judge-model", "llama3"]
    assert settings_of(monkeypatch, judge_module, ["judge", *required]) == JudgeSettings(
        responses="r.json", judge_url="http://x/v1", judge_model="llama3"
    )

    calls = []
    monkeypatch.setattr(judge_module, "judge_file", lambda *args, **kwargs: calls.append((args, kwargs)) or 1)
    assert main(["judge", *required]) == 1  # judge_file's exit code: some items got no score
    assert (
        main(
            [
                "judge",
                *required,
                "--max-tokens",
                "0",
                "--resume",
                "--quiet",
                "--out",
                "o.json",
                "--workers",
                "3",
            ]
        )
        == 1
    )
    assert (
        main(["judge", *required, "--template", "phi3", "--api-key", "k", "--timeout", "9", "--retries", "0"])
        == 1
    )
    assert [c[0] for c in calls] == [("r.json", "http://x/v1", "llama3")] * 3
    first, second, third = (c[1] for c in calls)
    assert first == dict(
        out=None,
        response_key="model_response",
        template="alpaca",
        api_key=None,
        timeout=120.0,
        retries=4,
        max_tokens=256,
        workers=1,
        resume=False,
        progress=True,
    )
    assert second == {
        **first,
        "out": "o.json",
        "max_tokens": None,
        "workers": 3,
        "resume": True,
        "progress": False,
    }
    assert third == {**first, "template": "phi3", "api_key": "k", "timeout": 9.0, "retries": 0}
    assert (
        exit_code(main, ["judge", "--responses", "r.json", "--judge-url", "http://x/v1"]) == 2
    )  # no --judge-model


def test_chat_runs_end_to_end_on_piped_stdin(model_dir: Path, monkeypatch, capsys):
    chat = load_chat_model(str(model_dir), device="cpu", dtype="fp32")
    monkeypatch.setattr("sys.stdin", io.StringIO("Name three primary colors.\n/exit\n"))
    argv = ["chat", "--model", str(model_dir), "--max-new-tokens", "10", "--device", "cpu", "--dtype", "fp32"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    messages = [{"role": "user", "content": "Name three primary colors."}]
    assert captured.out == expected_reply(chat, messages, 10) + "\n"
    assert "Chatting with tiny" in captured.err

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(model_dir), "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_serve_runs_end_to_end_up_to_uvicorn(model_dir: Path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(
        uvicorn.Server,
        "run",
        lambda self, sockets=None: started.append((self.config, sockets[0].getsockname()[1])),
    )
    monkeypatch.delenv("SCRATCHLLM_API_KEY", raising=False)
    argv = ["serve", "--model", str(model_dir), "--port", "0", "--device", "cpu", "--dtype", "fp32"]
    assert main([*argv, "--model-name", "mine", "--api-key", "k", "--log-level", "warning"]) == 0
    [(config, port)] = started
    assert config.log_level == "warning" and port > 0
    assert (config.app.state.settings.model_id, config.app.state.settings.api_key) == ("mine", "k")
    assert "serving 'mine'" in capsys.readouterr().out

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--model", str(model_dir), "--port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    assert main(["serve", "--model", "unused", "--default-max-tokens", "-1", "--port", "0"]) == 2
    assert "--default-max-tokens must be >= 1" in capsys.readouterr().err


@pytest.fixture
def judge():
    server = FakeJudge(["85"])
    yield server
    server.close()


def test_judge_runs_end_to_end_and_resumes(judge, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SCRATCHLLM_JUDGE_API_KEY", raising=False)
    responses, out = tmp_path / "r.json", tmp_path / "scores.json"
    responses.write_text(json.dumps(ENTRIES))
    argv = ["judge", "--responses", str(responses), "--judge-url", judge.url, "--judge-model", "m"]
    assert main([*argv, "--out", str(out), "--max-tokens", "0", "--api-key", "k", "--quiet"]) == 0
    assert "average score 85.00 over 3/3 responses" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["complete"] and [it["score"] for it in result["items"]] == [85, 85, 85]
    assert len(judge.requests) == 3 and all("max_tokens" not in r for r in judge.requests)  # 0: none
    assert all(r["auth"] == "Bearer k" for r in judge.requests)

    assert main([*argv, "--out", str(out), "--resume", "--quiet"]) == 0
    assert len(judge.requests) == 3  # every entry was scored already

    judge.script = [500]  # every request fails: the items get no score, the exit code is 1
    assert main([*argv, "--retries", "0", "--quiet"]) == 1
    assert (tmp_path / "r-judged.json").is_file()
    assert "3 responses got no score" in capsys.readouterr().err
