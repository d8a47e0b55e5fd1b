"""lm-evaluation-harness (its own CLI, `lm_eval`) scores a local multiple-choice task against a running
`scratchllm serve` with its `local-completions` model, and agrees with `scratchllm eval-tasks` on the
same file and model: the same log-likelihood for every choice, so the same `acc` and `acc_norm`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from scratchllm.cli import main

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval)")

ROOT = Path(__file__).resolve().parents[2]
TASK_FILE = ROOT / "examples" / "tasks" / "python-basics.jsonl"
BIN = Path(sys.executable).parent
KEY = "sk-test"

TASK_YAML = """\
task: scratch_python_basics
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"scratchllm serve exited: {server.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("scratchllm serve did not answer /health in time")


@pytest.fixture
def served(model_dir: Path):
    """`scratchllm serve` in its own process, as a user runs it."""
    port = _free_port()
    cmd = [str(BIN / "scratchllm"), "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--model-name", "tiny", "--api-key", KEY, "--log-level", "warning"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _harness(url: str, tmp_path: Path) -> tuple[dict, list[dict]]:
    """Run the harness's CLI on the task file; its results and its logged samples."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "scratch_python_basics.yaml").write_text(TASK_YAML.format(data=TASK_FILE))
    out = tmp_path / "harness"
    model_args = f"model=tiny,base_url={url}/v1/completions,num_concurrent=1,max_retries=1,auth_token={KEY}"
    cmd = [
        *(str(BIN / "lm_eval"), "--model", "local-completions", "--model_args", model_args),
        *("--include_path", str(tasks), "--tasks", "scratch_python_basics"),
        *("--output_path", str(out), "--log_samples"),
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env["OPENAI_API_KEY"] = KEY  # the key of the completions requests; auth_token the tokenizer's
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "remote tokenizer" in done.stderr.lower() + done.stdout.lower()  # found /tokenize by itself
    [results_file] = out.rglob("results_*.json")
    [samples_file] = out.rglob("samples_scratch_python_basics_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return json.loads(results_file.read_text())["results"]["scratch_python_basics"], samples


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("lm_eval", path=str(BIN)) is None, reason="the lm_eval command is missing")
def test_lm_eval_harness_through_serve_equals_eval_tasks(served, model_dir: Path, tmp_path: Path):
    harness, samples = _harness(served, tmp_path)

    ours_file = tmp_path / "ours.json"
    argv = ["eval-tasks", "--model", str(model_dir), "--task", str(TASK_FILE), "--out", str(ours_file)]
    assert main(argv) == 0
    ours = json.loads(ours_file.read_text())
    items = ours["items"]
    assert len(samples) == len(items) == ours["summary"]["n"]

    for sample in samples:
        item = items[sample["doc_id"]]
        theirs = [float(resp[0][0]) for resp in sample["resps"]]  # (loglikelihood, is_greedy), logged as text
        assert theirs == pytest.approx(item["loglikelihoods"], abs=1e-4), sample["doc_id"]
    assert harness["acc,none"] == pytest.approx(ours["summary"]["acc"])
    assert harness["acc_norm,none"] == pytest.approx(ours["summary"]["acc_norm"])


def test_tokenizer_routes_answer_in_vllms_shape(model_dir: Path):
    from fastapi.testclient import TestClient

    from scratchllm.serve.app import create_app
    from scratchllm.serve.chat import load_chat_model

    chat = load_chat_model(str(model_dir), device="cpu", dtype="fp32")
    with TestClient(create_app(chat, model_name="tiny", api_key="k")) as client:
        assert client.post("/tokenize", json={"prompt": "hi"}).status_code == 401
        client.headers["Authorization"] = "Bearer k"
        info = client.get("/tokenizer_info").json()
        assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == chat.context_length
        text = "The cat sat on the mat."
        got = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
        assert got["tokens"] == chat.tokenizer.encode(text) and got["count"] == len(got["tokens"])
        # the end-of-text string is its special id, as the harness expects when it looks the id up
        eos = client.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False})
        assert eos.json()["tokens"] == [chat.tokenizer.eot_id]
        assert client.post("/detokenize", json={"tokens": got["tokens"]}).json() == {"prompt": text}
        chat_ids = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
        assert chat_ids["tokens"] == chat.encode_chat([{"role": "user", "content": "Hi"}])
        bad = client.post("/detokenize", json={"tokens": [10**6]})
        assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
        both = client.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]})
        assert both.status_code == 400
        assert client.post("/tokenize", json={"prompt": "a", "model": "other"}).status_code == 404
