"""The README, run: its ```bash commands and ```python snippets, in order, in a fresh directory, with
small settings, so that what it shows a newcomer keeps working. Commands that need the network, a GPU,
several processes, a terminal or another server are skipped by the rules below, each with its reason."""

from __future__ import annotations

import glob
import itertools
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scratchllm.cli import main
from tests.conftest import REPO, SHARED_DATA, single_thread

README = REPO / "README.md"

# Commands not run, with why. Each rule must match a README command, so the list stays true.
SKIPPED = {
    r"^make test\b": "runs ruff and the whole test suite, this test included",
    r"^scratchllm download gpt2 --size\b": "downloads GPT-2 from the Hugging Face hub (network)",
    r"--init-from gpt2\b": "downloads GPT-2 from the Hugging Face hub (network)",
    r"--model gpt2\b": "downloads GPT-2 (network); hellaswag_val.jsonl is the reader's own download",
    r"^torchrun\b": "starts two training processes (tests/train/test_distributed.py covers DDP and FSDP)",
    r"^scratchllm chat\b": "an interactive session that waits for input (tests/serve/test_chat.py)",
    r"^scratchllm serve\b": "a server that runs until stopped (tests/serve/test_server.py)",
    r"^scratchllm judge\b": "needs a judge model behind a server such as Ollama (tests/serve/test_judge.py)",
    r"^lm_eval\b": "downloads HellaSwag, needs a running server (tests/serve/test_lm_eval.py: offline)",
    r"^llama-cli\b": "llama.cpp's command line (tests/test_gguf.py runs the file in llama.cpp)",
    r"^ollama\b": "needs Ollama, not installed here (tests/test_gguf.py checks the Modelfile)",
}
# Kinds of commands never run here, wherever they are added to the README: tests stay offline and on CPU.
NEVER_RUN = {
    r"(^|\s)hf:": "reads a Hugging Face dataset (network)",
    r"\bdownload (llama|qwen|gemma)\S*(?!.* --from )": "downloads from the Hugging Face hub (network)",
    r"--data spam\b": "downloads the SMS Spam Collection (network)",
    r"--(model|init-from) gpt2\b|\bdownload gpt2\b(?!.* --from )": "downloads GPT-2 (network)",
    r"--compile\b": "needs a GPU",
    r"^torchrun\b": "starts several processes",
}

# Flags appended to the commands each rule matches (all matching rules, in this order; argparse keeps a
# repeated flag's last value), so that the whole README runs in about a minute on two cores.
OVERRIDES = [
    (r"^scratchllm demo\b", shlex.split("--max-steps 20 --sample-tokens 8 --progress false")),
    (r"^scratchllm demo --corpus notes/ ", shlex.split("--vocab-size 300")),
    (
        r"^scratchllm pretrain (?!.*--resume)",
        shlex.split("--max-steps 10 --eval-every 0 --eval-batches 2 --sample-tokens 0 --progress false"),
    ),
    (r"^scratchllm pretrain --corpus builtin\b", shlex.split("--vocab-size 512")),
    (r"^scratchllm pretrain .*--model mini\b", shlex.split("--model nano")),
    (r"^scratchllm pretrain .*--max-minutes\b", shlex.split("--max-minutes 0.5")),
    (r"^scratchllm pretrain .*--resume\b", shlex.split("--max-steps 15 --progress false")),
    (r"^scratchllm generate\b", shlex.split("--max-new-tokens 5")),
    (r"^scratchllm perplexity\b", shlex.split("--max-tokens 2000")),
    (r"^scratchllm eval-tasks\b", shlex.split("--limit 4 --max-new-tokens 4 --quiet")),
    (
        r"^scratchllm finetune classify\b",
        shlex.split("--max-steps 10 --eval-every 0 --eval-batches 2 --progress false"),
    ),
    (
        r"^scratchllm finetune instruct\b",
        shlex.split(
            "--max-steps 4 --eval-every 0 --eval-batches 2 "
            "--sample-count 1 --sample-tokens 4 --progress false"
        ),
    ),
    (
        r"^scratchllm finetune dpo\b",
        shlex.split(
            "--max-steps 2 --eval-every 0 --eval-batches 1 --sample-count 1 --sample-tokens 4 "
            "--progress false"
        ),
    ),
    (
        r"^scratchllm finetune grpo\b",
        shlex.split(
            "--max-steps 2 --eval-every 0 --eval-limit 4 --group-size 4 --batch-size 4 --progress false"
        ),
    ),
    (r"^scratchllm data arithmetic\b", shlex.split("--train 500 --test 20")),
    (r"^scratchllm respond\b", shlex.split("--max-new-tokens 4 --quiet")),
]
SNIPPET_OVERRIDES = [(r"max_new_tokens=\d+", "max_new_tokens=5")]

# Output the README shows: each pattern must match the README's text and what the command prints.
EXPECTED = [
    (
        r"^scratchllm demo$",
        [
            r"eval \| step \d+ \| tokens \d+ \| train_loss [\d.]+ \| val_loss [\d.]+",
            r"  sample: '",
            r"(done|budget): [\d,]+ steps, [\d,]+ tokens in \d+ s of training",
            r"validation loss [\d.]+, perplexity [\d.]+",
            r"model: runs/demo/model +best: runs/demo/best +loss plot: runs/demo/loss\.png",
            r"next: \S*scratchllm generate --model runs/demo/model ",
        ],
    ),
    (r"^scratchllm tokenizer encode .*Hello, world", [r"\b6531 44 8023\b"]),
    (r"^scratchllm tokenizer decode .* 6531 44 8023$", [r"Hello, world"]),
    (r"^scratchllm info --preset gpt2-small$", [r"124,439,808", r"163,037,184"]),
    (r"^scratchllm classify\b", [r"(?m)^(ham|spam) +\d\.\d{4} +\S"]),
]
SNIPPET_EXPECTED = [r"'label': '(ham|spam)'"]


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """The README's ```bash and ```python blocks, as (language, source), in order."""
    return [(m[1], m[2]) for m in re.finditer(r"^```(bash|python)\n(.*?)^```", text, re.M | re.S)]


def bash_commands(source: str) -> list[list[str]]:
    """The arguments of each command (continued lines joined), without comments."""
    commands = [shlex.split(line, comments=True) for line in source.replace("\\\n", " ").splitlines()]
    return [args for args in commands if args]


def makefile_recipe(target: str) -> str:
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    return lines[start + 1].strip().replace("$(BIN)/", "")


def skip_reason(command: str, missing: set[str]) -> str | None:
    for rules in (SKIPPED, NEVER_RUN):
        for pattern, reason in rules.items():
            if re.search(pattern, command):
                return reason
    if "../shared/" in command and not SHARED_DATA.is_dir():
        return f"needs the shared data folder {SHARED_DATA}, absent here"
    needed = [path for path in missing if re.search(rf"(?<![\w/.]){re.escape(path)}\b", command)]
    return f"needs {needed[0]}, which a skipped command makes" if needed else None


def outputs(args: list[str]) -> list[str]:
    """The run directories and files a command writes (its --out/--out-dir values)."""
    return [b for a, b in itertools.pairwise(args) if a in ("--out", "--out-dir")]


def with_overrides(args: list[str]) -> list[str]:
    command = shlex.join(args)
    for pattern, flags in OVERRIDES:
        if re.search(pattern, command):
            args = [*args, *flags]
    return args


def expand_globs(args: list[str]) -> list[str]:
    """As bash does: a pattern that matches files becomes them, one that matches none stays as it is."""
    return [x for a in args for x in (sorted(glob.glob(a)) if glob.has_magic(a) and glob.glob(a) else [a])]


def prepare_inputs(command: str) -> None:
    """The inputs the README leaves to the reader, made here so that their commands run too."""
    if re.search(r"--corpus notes/ ", command):
        from scratchllm.text.corpus import builtin_documents

        docs = builtin_documents()[:40]
        for i, doc in enumerate(docs):
            path = Path("notes" if i % 2 else "essays") / (f"{i}.txt" if i % 2 else f"{i}.md")
            path.parent.mkdir(exist_ok=True)
            path.write_text(doc.text)
    if "--from path/to/hf-gpt2" in command:
        assert main(["export-hf", "runs/demo/model", "path/to/hf-gpt2"]) == 0


def run_command(args: list[str], capsys) -> tuple[int, str]:
    """Exit code and output (stdout and stderr) of one command: `scratchllm` in-process, anything else
    in bash."""
    capsys.readouterr()
    if args[0] == "scratchllm":
        with single_thread():
            code = main(args[1:])
        out = capsys.readouterr()
        return code, out.out + out.err
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(shlex.join(args), shell=True, capture_output=True, text=True, env=env, timeout=300)
    return done.returncode, done.stdout + done.stderr


def check_expected(rules: list, command: str, output: str, readme: str) -> None:
    for pattern, wanted in rules:
        if re.search(pattern, command):
            for part in wanted:
                assert re.search(part, readme), f"the README no longer shows {part!r} for `{command}`"
                assert re.search(part, output), f"`{command}` did not print {part!r}:\n{output[-3000:]}"


@pytest.mark.slow
def test_readme_commands_and_snippets_run(tmp_path, monkeypatch, capsys):
    readme = README.read_text()
    work = tmp_path / "work"
    work.mkdir()
    if SHARED_DATA.is_dir():  # the README's ../shared/data, seen from the fresh directory
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared" / "data").symlink_to(SHARED_DATA.resolve(), target_is_directory=True)
    (work / "examples").symlink_to(REPO / "examples", target_is_directory=True)  # the checkout's own files
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SCRATCHLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    missing: set[str] = set()
    skipped: list[tuple[str, str]] = []
    ran: list[tuple[str, float]] = []
    used_rules: set[str] = set()
    blocks = readme_blocks(readme)
    assert any(lang == "bash" for lang, _ in blocks) and any(lang == "python" for lang, _ in blocks)
    for lang, source in blocks:
        if lang == "python":
            reason = skip_reason(source, missing)
            if reason:
                skipped.append(("python snippet", reason))
                continue
            for pattern, replacement in SNIPPET_OVERRIDES:
                source = re.sub(pattern, replacement, source)
            start = time.perf_counter()
            capsys.readouterr()
            with single_thread():
                exec(compile(source, str(README), "exec"), {"__name__": "__readme__"})
            output = capsys.readouterr().out
            ran.append(("python snippet", time.perf_counter() - start))
            for part in SNIPPET_EXPECTED:
                assert re.search(part, output), (
                    f"the Python snippet did not print {part!r}:\n{output[-3000:]}"
                )
            continue
        for args in bash_commands(source):
            if args[0].endswith("/bin/scratchllm"):  # `.venv/bin/scratchllm ...`, as the README also allows
                args = ["scratchllm", *args[1:]]
            command = label = shlex.join(args)
            used_rules.update(p for p in SKIPPED if re.search(p, command))
            if command == "make demo":  # a second .venv and install would take minutes: run its recipe
                command = makefile_recipe("demo")
                assert command == "scratchllm demo", f"the Makefile's demo recipe changed: {command}"
                args, label = shlex.split(command), f"make demo, as {command}"
            reason = skip_reason(command, missing)
            if reason:
                skipped.append((command, reason))
                missing.update(outputs(args))
                continue
            prepare_inputs(command)
            start = time.perf_counter()
            code, output = run_command(expand_globs(with_overrides(args)), capsys)
            ran.append((label, time.perf_counter() - start))
            assert code == 0, f"`{command}` exited with {code}:\n{output[-3000:]}"
            check_expected(EXPECTED, command, output, readme)
    print("\n".join([f"ran ({s:.1f} s): {c}" for c, s in ran] + [f"skipped: {c}: {r}" for c, r in skipped]))
    assert not set(SKIPPED) - used_rules, (
        f"skip rules that match no README command: {set(SKIPPED) - used_rules}"
    )
    assert len(ran) >= 15, "the README's commands were not found"
