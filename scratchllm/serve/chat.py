"""Chat with a model: a conversation rendered through its prompt template, streamed turn by turn.

An assistant model answers well only when prompted in the layout it was finetuned on, so a
`ChatModel` pairs the generation engine with the model's stored prompt template
(text/templates.py). A model without one (a plain pretrained LM, GPT-2) still chats, through
the default template; `template_is_default` says so, and the REPL prints it.

    session = ChatSession(load_chat_model("runs/sft/model"), GenerationConfig(max_new_tokens=200))
    for piece in session.send("Name three primary colors."):
        print(piece, end="", flush=True)

A `ChatSession` keeps the conversation and, before each reply, drops its oldest turns until the
prompt leaves room for an answer inside the context window. `chat_loop` is the REPL behind
`scratchllm chat`: it reads lines (from a terminal or a pipe), streams the replies, and knows
/reset and /exit. The OpenAI-compatible server (app.py) renders chats the same way.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..config import setting
from ..device import pick_device
from ..errors import ScratchLLMError
from ..generation import (
    SAMPLING_FLAGS,
    Completion,
    Engine,
    GenerationConfig,
    RuntimeSettings,
    TextStream,
    resolve_dtype,
)
from ..generation.config import DRAFT_CONFIDENCE, DRAFT_SCHEDULE, DRAFT_TOKENS
from ..generation.speculative import check_draft_settings
from ..hub import load_model
from ..text.templates import (
    DEFAULT_TEMPLATE,
    TEMPLATE_KEY,
    PromptTemplate,
    get_template,
    template_for_model,
    template_names,
)
from ..text.tokenizer import Tokenizer

Message = Mapping[str, str]


@dataclass
class ChatModel:
    """A generation engine plus the prompt template its conversations are rendered with."""

    engine: Engine
    template: PromptTemplate
    name: str = "model"
    template_is_default: bool = False  # the model stores no template; `template` is the default one

    @property
    def context_length(self) -> int:
        """The most tokens a prompt and its reply may take together."""
        return self.engine.model.cfg.context_length

    @property
    def vocab_size(self) -> int:
        return self.engine.model.cfg.vocab_size

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text of a conversation, ending where the assistant speaks next."""
        return self.template.render_chat(messages, add_generation_prompt=True)

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """The prompt token ids of a conversation."""
        return self.engine.encode(self.render(messages), allowed_special=self.template.allowed_special)

    def stop_strings(self, extra: Iterable[str] = ()) -> tuple[str, ...]:
        """The template's stop strings (the model starting the next turn itself) plus `extra`."""
        return tuple(dict.fromkeys([*self.template.stop_strings, *extra]))

    def describe_template(self) -> str:
        """One line naming the template, saying when it is only the default."""
        if self.template_is_default:
            return (
                f"{self.name} stores no prompt template (a plain pretrained model?); using the default "
                f"{self.template.name!r} template (choose another with --template)"
            )
        return f"prompt template {self.template.name!r}"


def chat_model(
    engine: Engine,
    extra: Mapping[str, object] | None = None,
    name: str = "model",
    template: str | PromptTemplate | None = None,
) -> ChatModel:
    """A `ChatModel` for an engine: `template` if given, else the one stored in the model's `extra`,
    else the default template."""
    tokenizer = engine.tokenizer
    if template is not None:
        return ChatModel(engine, get_template(template, tokenizer), name, template_is_default=False)
    own = bool((extra or {}).get(TEMPLATE_KEY) or getattr(tokenizer, "chat_template", None))
    return ChatModel(
        engine, template_for_model(extra, tokenizer=tokenizer), name, template_is_default=not own
    )


def load_chat_model(
    spec: str,
    device: str = "auto",
    dtype: str = "auto",
    template: str | None = None,
    compile: bool = False,
    quantize: str | None = None,
    draft_model: str | None = None,
    draft_tokens: int = DRAFT_TOKENS,
    draft_confidence: float = DRAFT_CONFIDENCE,
    draft_schedule: str = DRAFT_SCHEDULE,
) -> ChatModel:
    """Load a model directory (or a hub name such as `gpt2`) with its tokenizer and template;
    `draft_model`, a draft for speculative decoding (`Engine.load`)."""
    if template is not None and template not in template_names():  # fails before the (slow) model load
        get_template(template)
    check_draft_settings(draft_tokens, draft_confidence, draft_schedule)
    dev = pick_device(device)
    loaded = load_model(spec, device=dev, dtype=resolve_dtype(dtype, dev), quantize=quantize)
    engine = Engine.from_loaded(
        loaded,
        spec,
        compile=compile,
        draft_model=draft_model,
        draft_tokens=draft_tokens,
        draft_confidence=draft_confidence,
        draft_schedule=draft_schedule,
    )
    name = Path(spec).name if Path(spec).expanduser().is_dir() else str(spec)
    return chat_model(engine, loaded.extra, name, template)


class WhitespaceStripper:
    """Removes the leading and trailing whitespace of a text that arrives in pieces: `feed` each
    piece and show what it returns. Trailing whitespace is held back until more text follows, so a
    reply that ends in blank lines before a stop string never shows them."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def feed(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        text = self.held + piece
        body = text.rstrip()
        self.held = text[len(body) :]
        return body


def strip_stream(pieces: Iterable[str]) -> Iterator[str]:
    """Stream pieces with the whitespace around their concatenation removed:
    `"".join(strip_stream(p)) == "".join(p).strip()`."""
    stripper = WhitespaceStripper()
    for piece in pieces:
        if out := stripper.feed(piece):
            yield out


class ChatReply(Iterator[str]):
    """The streamed text pieces of one reply. When the stream ends (or is closed early) the
    reply's text joins the session's history; `completion` holds the token counts."""

    def __init__(self, session: ChatSession, stream: TextStream, dropped_turns: int, prompt_tokens: int):
        self.dropped_turns = dropped_turns  # oldest turns dropped to fit the context window
        self.prompt_tokens = prompt_tokens
        self.text = ""
        self._session = session
        self._stream = stream
        self._pieces = strip_stream(stream)
        self._done = False

    @property
    def completion(self) -> Completion | None:
        return self._stream.completion

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        try:
            piece = next(self._pieces)
        except StopIteration:
            self._finish()
            raise
        self.text += piece
        return piece

    def close(self) -> None:
        """Stop generating; the text so far stays in the history."""
        self._stream.close()
        self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._session.messages.append({"role": "assistant", "content": self.text})


class ChatSession:
    """A multi-turn conversation with a `ChatModel`.

    `send(text)` adds a user message and returns the streamed reply; each turn keeps as much
    history as fits the context window with room for `min(max_new_tokens, context_length // 2)`
    reply tokens, dropping the oldest user/assistant turns first (system messages stay). With a
    `seed`, turn n samples with seed + n: each reply draws its own numbers, and the same conversation
    replays the same (the first reply is `generate`'s with that seed).
    """

    def __init__(self, model: ChatModel, config: GenerationConfig | None = None, system: str | None = None):
        self.model = model
        self.config = config or GenerationConfig()
        self.config = self.config.replace(stop=model.stop_strings(self.config.stop))
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.turns = 0  # replies started since the start or the last reset
        self.reset()  # sets both

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.turns = 0

    def send(self, text: str) -> ChatReply:
        """Add the user's message and start the reply. A message that cannot fit the context
        window even alone raises `ScratchLLMError` and leaves the history as it was."""
        before = list(self.messages)
        self.messages.append({"role": "user", "content": text})
        ctx = self.model.context_length
        reserve = min(self.config.max_new_tokens, ctx // 2)
        dropped = 0
        ids = self.model.encode_chat(self.messages)
        while len(ids) + reserve > ctx and self._drop_oldest_turn():
            dropped += 1
            ids = self.model.encode_chat(self.messages)
        room = ctx - len(ids)
        if room < 1:
            self.messages = before  # the history stays as it was
            raise ScratchLLMError(
                f"message too long: the prompt takes {len(ids)} tokens but the context window holds {ctx}; "
                "write a shorter message"
            )
        cfg = self.config.replace(max_new_tokens=min(self.config.max_new_tokens, room))
        if cfg.seed is not None:
            seed = cfg.seed + self.turns
            cfg = cfg.replace(seed=seed - 2**64 if seed >= 2**64 else seed)  # the range torch takes
        self.turns += 1
        return ChatReply(self, self.model.engine.stream(ids, cfg), dropped, len(ids))

    def _drop_oldest_turn(self) -> bool:
        """Remove the oldest user message and the replies after it; False if only the latest is left."""
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if len(users) < 2:
            return False
        turn = [i for i in range(users[0], users[1]) if self.messages[i]["role"] != "system"]
        for i in reversed(turn):
            del self.messages[i]
        return True


HELP = "commands: /reset forgets the conversation, /exit (or /quit, Ctrl-D) leaves, /help shows this"


def chat_loop(
    session: ChatSession,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    prompt: str | None = None,
) -> int:
    """Read user lines until /exit or end of input; stream each reply to `stdout` (one line per
    reply), notices to `stderr`. `prompt` (default ">>> " on a terminal, none on a pipe) is shown
    before each line. Returns the number of replies."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    interactive = stdin.isatty()
    if prompt is None:
        prompt = ">>> " if interactive else ""
    read_line = (
        _terminal_reader(prompt)
        if interactive and stdin is sys.stdin
        else _stream_reader(stdin, stdout, prompt)
    )

    stderr.write(f"Chatting with {session.model.name}: {session.model.describe_template()}.\n{HELP}\n")
    stderr.flush()
    replies = 0
    while True:
        try:
            line = read_line()
        except (KeyboardInterrupt, EOFError):
            line = None
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not _run_command(text, session, stderr):
                break
            continue
        if _reply(text, session, stdout, stderr):
            replies += 1
    return replies


def _run_command(text: str, session: ChatSession, stderr: TextIO) -> bool:
    """Carry out a /command; False for /exit."""
    command = text.split()[0].lower()
    if command in ("/exit", "/quit"):
        return False
    if command == "/reset":
        session.reset()
        stderr.write("(conversation reset)\n")
    elif command == "/help":
        stderr.write(HELP + "\n")
    else:
        stderr.write(f"unknown command {command}; {HELP}\n")
    stderr.flush()
    return True


def _reply(text: str, session: ChatSession, stdout: TextIO, stderr: TextIO) -> bool:
    """Send one message and stream the reply to `stdout`; False if the message was refused."""
    try:
        reply = session.send(text)
    except ScratchLLMError as e:
        stderr.write(f"error: {e}\n")
        stderr.flush()
        return False
    if reply.dropped_turns:
        stderr.write(
            f"(dropped the {reply.dropped_turns} oldest turn{'s' if reply.dropped_turns > 1 else ''} "
            f"to fit the context window of {session.model.context_length} tokens)\n"
        )
        stderr.flush()
    try:
        for piece in reply:
            stdout.write(piece)
            stdout.flush()
    except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
        reply.close()
        stderr.write("\n(interrupted)")
    stdout.write("\n")
    stdout.flush()
    return True


def _terminal_reader(prompt: str) -> Callable[[], str | None]:
    with contextlib.suppress(ImportError):  # not on Windows
        import readline  # noqa: F401  (only on a terminal: it changes how input() reads lines)

    def read() -> str | None:
        try:
            return input(prompt)
        except EOFError:
            print()
            return None

    return read


def _stream_reader(stdin: TextIO, stdout: TextIO, prompt: str) -> Callable[[], str | None]:
    def read() -> str | None:
        if prompt:
            stdout.write(prompt)
            stdout.flush()
        line = stdin.readline()
        return line if line else None

    return read


MODEL_HELP = "a model directory (an assistant from `finetune instruct`), or gpt2, gpt2-medium, ..."
TEMPLATE_HELP = "prompt template (default: the model's own, else alpaca)"
SAMPLING = (*SAMPLING_FLAGS, "stop")


@dataclass
class ChatSettings:
    """`scratchllm chat`: an interactive chat: type a message, the reply streams back. The conversation
    is rendered with the model's prompt template and its oldest turns are dropped when it outgrows the
    context window. /reset starts over, /exit (or Ctrl-D) quits; Ctrl-C stops a reply. Reads lines from
    stdin, so it also works piped."""

    model: str = setting("", MODEL_HELP, "model", required=True)
    template: str | None = setting(None, TEMPLATE_HELP, "model", choices=tuple(template_names()))
    system: str = setting("", "a system message (default: the template's own, if any)", "chat")
    sampling: GenerationConfig = setting(
        GenerationConfig(max_new_tokens=256), "how the replies' tokens are chosen", only=SAMPLING
    )
    runtime: RuntimeSettings = setting(RuntimeSettings(), "where and how the model runs")


def chat_command(settings: ChatSettings) -> None:
    """`scratchllm chat`: load the model and run the REPL on stdin/stdout."""
    runtime = settings.runtime
    loaded = load_chat_model(
        settings.model,
        device=runtime.device,
        dtype=runtime.dtype,
        template=settings.template,
        compile=runtime.compile,
        quantize=runtime.quantize,
        draft_model=runtime.draft_model,
        draft_tokens=runtime.draft_tokens,
        draft_confidence=runtime.draft_confidence,
        draft_schedule=runtime.draft_schedule,
    )
    if runtime.compile:
        print("compiling the decode step...", end=" ", flush=True)
        loaded.engine.warm_up(1)
        print("done", flush=True)
    session = ChatSession(loaded, settings.sampling, settings.system or None)
    chat_loop(session)


__all__ = [
    "DEFAULT_TEMPLATE",
    "ChatModel",
    "ChatReply",
    "ChatSession",
    "ChatSettings",
    "WhitespaceStripper",
    "chat_command",
    "chat_loop",
    "chat_model",
    "load_chat_model",
    "strip_stream",
]
