"""The chat REPL: replies equal the engine's on the template-rendered conversation, history is kept
and trimmed to the context window, /reset and /exit work, piped stdin works, stored templates are used."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import scratchllm
import scratchllm.serve.chat as chat_module
import scratchllm.serve.server as server_module
from scratchllm.checkpoint import save_model
from scratchllm.cli import main
from scratchllm.errors import ScratchLLMError
from scratchllm.generation import Engine, GenerationConfig
from scratchllm.model.quantize import int4_supported, is_quantized
from scratchllm.serve.chat import ChatSession, chat_loop, chat_model, load_chat_model, strip_stream

from .conftest import tiny_gpt


@pytest.fixture(scope="module")
def chat(model_dir: Path):
    return load_chat_model(str(model_dir), device="cpu", dtype="fp32")


def expected_reply(chat, messages, max_new_tokens) -> str:
    """The engine's greedy answer to the rendered conversation, as the chat shows it."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, stop=chat.stop_strings())
    return chat.engine.generate([chat.encode_chat(messages)], cfg)[0].text.strip()


def run_loop(session, lines: str) -> tuple[list[str], str, int]:
    out, err = io.StringIO(), io.StringIO()
    n = chat_loop(session, io.StringIO(lines), out, err)
    return out.getvalue().split("\n")[:-1], err.getvalue(), n


def test_multi_turn_replies_equal_the_engine_and_reset_and_exit_work(chat):
    session = ChatSession(chat, GenerationConfig(max_new_tokens=12))
    q1, q2 = "Name three primary colors.", "What is the capital of France?"
    lines = f"{q1}\n\n/help\n{q2}\n/reset\n{q1}\n/bogus\n/exit\nnever read\n"
    replies, err, n = run_loop(session, lines)

    a1 = expected_reply(chat, [{"role": "user", "content": q1}], 12)
    a2 = expected_reply(
        chat,
        [
            {"role": "user", "content": q1},
            {"role": "assistant", "content": a1},
            {"role": "user", "content": q2},
        ],
        12,
    )
    assert a1 and a2 and a1 != a2
    assert n == 3 and replies == [a1, a2, a1]  # after /reset the first question gets the first answer again
    assert session.messages == [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}]
    assert "stores no prompt template" in err and "'alpaca'" in err  # a plain model: the default, said so
    assert "(conversation reset)" in err and "unknown command /bogus" in err and "/reset forgets" in err


def test_history_is_trimmed_to_the_context_window(bpe):
    small = chat_model(Engine(tiny_gpt(bpe.vocab_size, ctx=96), bpe), name="small")
    session = ChatSession(small, GenerationConfig(max_new_tokens=16), system="Be brief.")
    questions = [f"Question {i}: what is the capital of France?" for i in range(6)]
    dropped = []
    for q in questions:
        reply = session.send(q)
        expected = expected_reply(
            small, session.messages, min(16, 96 - len(small.encode_chat(session.messages)))
        )
        assert "".join(reply) == expected == session.messages[-1]["content"]
        dropped.append(reply.dropped_turns)
        assert reply.prompt_tokens + min(16, 96 // 2) <= 96  # room left for the answer
    assert sum(dropped) > 0 and dropped[0] == 0
    assert session.messages[0] == {"role": "system", "content": "Be brief."}  # the system message stays
    assert session.messages[-2]["content"] == questions[-1]
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users == questions[len(questions) - len(users) :]  # the newest turns survive, in order

    # a message that cannot fit even alone is refused and not kept; the loop says so and goes on
    before = list(session.messages)
    with pytest.raises(ScratchLLMError, match="message too long"):
        session.send("capital " * 200)
    assert session.messages == before
    replies, err, n = run_loop(session, "capital " * 200 + "\n/exit\n")
    assert n == 0 and "error: message too long" in err


def test_stop_strings_system_messages_and_closing_a_reply_early(chat):
    session = ChatSession(
        chat, GenerationConfig(max_new_tokens=20, stop=["\nUser:"]), system="You are terse."
    )
    assert set(chat.template.stop_strings) | {"\nUser:"} == set(session.config.stop)
    reply = session.send("Name three primary colors.")
    expected = expected_reply(chat, session.messages, 20)
    first = next(reply)
    reply.close()  # Ctrl-C: the text so far stays in the history
    assert expected.startswith(first) and session.messages[-1] == {"role": "assistant", "content": first}
    assert list(reply) == []
    session.reset()
    assert session.messages == [{"role": "system", "content": "You are terse."}]


def test_a_seeded_session_samples_each_turn_with_its_own_seed_and_replays(chat):
    """Turn n samples with seed + n: the same seed every turn would draw the same numbers for each
    reply; the whole conversation still replays exactly, and after /reset starts over."""
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.5, seed=7)
    session = ChatSession(chat, cfg)
    questions = ["Name three primary colors.", "And three more?", "Why?"]
    replies, expected = [], []
    for i, q in enumerate(questions):
        reply = "".join(session.send(q))
        turn = cfg.replace(seed=7 + i, stop=session.config.stop)
        expected.append(chat.engine.generate([chat.encode_chat(session.messages[:-1])], turn)[0].text.strip())
        replies.append(reply)
    assert replies == expected
    again = ChatSession(chat, cfg)
    assert ["".join(again.send(q)) for q in questions] == replies
    again.reset()
    assert "".join(again.send(questions[0])) == replies[0]
    edge = ChatSession(chat, cfg.replace(seed=2**64 - 1))  # the largest seed: turn 1 wraps to 0
    "".join(edge.send(questions[0]))
    wrapped = chat.engine.generate(
        [chat.encode_chat([*edge.messages, {"role": "user", "content": "Hi"}])],
        cfg.replace(seed=0, stop=edge.config.stop),
    )[0].text.strip()
    assert "".join(edge.send("Hi")) == wrapped


@given(st.lists(st.text(alphabet=" \n\tab", max_size=4), max_size=8))
def test_strip_stream_equals_stripping_the_whole_text(pieces):
    out = list(strip_stream(pieces))
    assert "".join(out) == "".join(pieces).strip()
    assert all(out)


def test_a_stored_template_is_used_and_can_be_overridden(tmp_path, bpe):
    model = tiny_gpt(bpe.vocab_size)
    path = save_model(tmp_path / "assistant", model, bpe, extra={"prompt_template": "phi3"})
    loaded = load_chat_model(str(path), device="cpu", dtype="fp32")
    assert loaded.template.name == "phi3" and not loaded.template_is_default and loaded.name == "assistant"
    assert loaded.render([{"role": "user", "content": "Hi"}]) == "<|user|>\nHi\n\n<|assistant|>\n"
    assert "<|user|>" in loaded.stop_strings()
    assert load_chat_model(str(path), device="cpu", template="alpaca").template.name == "alpaca"
    with pytest.raises(ScratchLLMError, match="unknown prompt template"):
        load_chat_model(str(path), template="vicuna")


def test_cli_chat_reads_piped_stdin(model_dir, monkeypatch, capsys, chat):

    monkeypatch.setattr("sys.stdin", io.StringIO("Name three primary colors.\n/exit\n"))
    assert (
        main(
            [
                "chat",
                "--model",
                str(model_dir),
                "--max-new-tokens",
                "10",
                "--device",
                "cpu",
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert (
        captured.out
        == expected_reply(chat, [{"role": "user", "content": "Name three primary colors."}], 10) + "\n"
    )
    assert "Chatting with tiny" in captured.err

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(model_dir), "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_compile_reaches_the_engine_from_chat_and_serve(model_dir, monkeypatch):
    """`--compile` on chat and serve gives their engine a CompiledDecoding (compiled on first use)."""
    loaded = load_chat_model(str(model_dir), device="cpu", dtype="fp32", compile=True)
    assert loaded.engine.compiled is not None and loaded.engine.kernels is None
    assert load_chat_model(str(model_dir), device="cpu", dtype="fp32").engine.compiled is None

    assert scratchllm.load(model_dir, device="cpu", compile=True).engine.compiled is not None
    assert scratchllm.load(model_dir, device="cpu").engine.compiled is None
    assert passed_to_load_chat_model(monkeypatch, model_dir, "compile", ["--compile"]) == [True, True, False]


def passed_to_load_chat_model(monkeypatch, model_dir, key: str, flags: list[str]) -> list:
    """What `chat FLAGS`, `serve FLAGS` and a plain `chat` pass as `key` to load_chat_model."""

    seen = []

    def fake_load(*args, **kwargs):
        seen.append(kwargs.get(key))
        raise ScratchLLMError("stop here")

    monkeypatch.setattr(chat_module, "load_chat_model", fake_load)
    monkeypatch.setattr(server_module, "load_chat_model", fake_load)
    assert main(["chat", "--model", str(model_dir), *flags]) == 2
    assert main(["serve", "--model", str(model_dir), "--port", "0", *flags]) == 2
    assert main(["chat", "--model", str(model_dir)]) == 2
    return seen


def test_quantize_reaches_the_model_from_chat_serve_and_the_api(model_dir, monkeypatch):
    """`--quantize int4` on chat and serve (and `scratchllm.load(quantize=)`) give int4 layers."""

    if not int4_supported():
        pytest.skip("this PyTorch lacks the int4 CPU kernel")
    loaded = load_chat_model(str(model_dir), device="cpu", dtype="fp32", quantize="int4")
    assert is_quantized(loaded.engine.model)
    ids = loaded.encode_chat([{"role": "user", "content": "Hi"}])
    assert len(loaded.engine.generate([ids], max_new_tokens=5, ignore_eos=True)[0].token_ids) == 5
    llm = scratchllm.load(model_dir, device="cpu", quantize="int4")
    assert is_quantized(llm.model)
    # the int4 weights sit in buffers; the summary still counts them
    assert repr(llm).split(", ")[-1] == repr(scratchllm.load(model_dir, device="cpu")).split(", ")[-1]
    flags = ["--quantize", "int4"]
    assert passed_to_load_chat_model(monkeypatch, model_dir, "quantize", flags) == ["int4", "int4", None]
