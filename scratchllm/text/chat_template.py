"""Chat templates: a model's own Jinja2 template turned into prompt text, the way `transformers` renders it.

A Hugging Face model ships its chat format as a Jinja2 template (tokenizer_config.json's `chat_template`,
or chat_template.jinja). `render_chat` renders one with the same environment as transformers'
`apply_chat_template`, so a conversation becomes exactly the text the model was trained on:

- a sandbox (templates come from the Hub: untrusted code) whose data cannot be changed from inside;
- `trim_blocks` and `lstrip_blocks`, and the `loopcontrols` extension (`{% break %}`, `{% continue %}`);
- the helpers templates rely on: `raise_exception(message)`, `strftime_now(format)`, a `tojson` filter
  that keeps non-ASCII characters and takes json.dumps's `indent`, `separators`, `sort_keys`;
- `{% generation %}...{% endgeneration %}` (marks the assistant's text for training masks) renders its body;
- the variables `messages`, `add_generation_prompt`, `tools` and `documents` (None), the special tokens
  that are set (`bos_token`, `eos_token`, ...) and any extra ones the caller passes (`enable_thinking`, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ScratchLLMError, first_line


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **extra: Any,
) -> str:
    """The prompt text of `messages` (dicts with a "role" and a "content" string) in the chat format of
    `template`. With `add_generation_prompt` it ends with the header that starts the assistant's reply.

    `bos_token` and `eos_token` are the strings the template may write (left undefined when None, as in
    transformers); `extra` are more template variables (e.g. `enable_thinking=False` for Qwen3, `tools`).
    A template that refuses the conversation (`raise_exception`) or fails raises `ScratchLLMError`."""
    if not isinstance(template, str):
        raise ScratchLLMError(f"chat template must be a string, got {type(template).__name__}")
    compiled = _compile(template)
    context: dict[str, Any] = {"tools": None, "documents": None}
    context.update({k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None})
    context.update(_plain(extra, "a template variable"))
    context["messages"] = check_messages(messages)
    context["add_generation_prompt"] = bool(add_generation_prompt)
    try:
        return compiled.render(**context)
    except _Refusal as e:
        raise ScratchLLMError(f"the chat template refuses this conversation: {first_line(e)}") from e
    # the template is code from the model's files: its own bugs surface as Python errors too
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
        raise ScratchLLMError(
            f"chat template failed on this conversation ({type(e).__name__}: {first_line(e).rstrip('.')}); "
            "the template and the messages do not fit each other"
        ) from e


def check_messages(messages: object) -> list[dict[str, Any]]:
    """`messages` as plain dicts, checked: a non-empty list of {"role": str, "content": str, ...} (other
    keys, such as "tool_calls", are passed on; keys whose value is None are dropped, as in transformers)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ScratchLLMError(
            "chat messages must be a list of {'role': ..., 'content': ...} dicts, got "
            f"{type(messages).__name__}"
        )
    if not messages:
        raise ScratchLLMError("chat messages: the conversation is empty; give at least one message")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ScratchLLMError(
                f"chat message {i} must be a {{'role': ..., 'content': ...}} dict, got "
                f"{type(message).__name__}"
            )
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ScratchLLMError(
                    f"chat message {i} needs a string {key!r}, got {message.get(key)!r}; write it as "
                    "{'role': 'user', 'content': 'text'}"
                )
        checked.append(_plain({k: v for k, v in message.items() if v is not None}, f"chat message {i}"))
    return checked


def _plain(value: Any, where: str) -> Any:
    """`value` rebuilt from plain JSON types, so the template sees no object with methods of its own (a
    str subclass included); anything else is an error."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    raise ScratchLLMError(
        f"{where}: a chat template only takes JSON-like values (str, numbers, lists, dicts), got "
        f"{type(value).__name__}"
    )


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """The template compiled in the sandboxed environment (cached: a chat compiles its template once)."""
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ScratchLLMError(
            f"chat template: syntax error at line {e.lineno}: {first_line(e).rstrip('.')}; fix the template "
            "(tokenizer_config.json's chat_template or chat_template.jinja)"
        ) from e


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


class _Refusal(jinja2.TemplateError):
    """What `raise_exception` raises: the template refuses the conversation (roles that do not alternate)."""


def _raise_exception(message: str) -> None:
    raise _Refusal(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change the model's prompt
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace()`, refusing attributes that start with "_" (a way towards Python's internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature, so `namespace(self=1)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}body{% endgeneration %}` renders as its body (transformers uses the block to find
    the assistant's tokens; rendering is all that is needed here)."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)
