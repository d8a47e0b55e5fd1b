"""Prompt templates: how an instruction (and a chat) becomes the text an assistant model sees.

An instruction-finetuned model only answers well when it is prompted in the layout it was
trained on, so the template's name is stored with the model (`extra["prompt_template"]`) and
everything that prompts it (`respond`, chat, the server, evaluation) asks `template_for_model`.

A template renders three pieces, joined by `separator`:

    [system block]  the preamble ("Below is an instruction ...") or a system message
    user block      the instruction, plus the optional input
    assistant       the header the response follows ("### Response:\\n"), then the response

    prompt(instruction, input)  -> everything up to where the response starts
    prompt + response           == the training text (the book's `format_input(entry)` +
                                   "\\n\\n### Response:\\n" + output, for "alpaca")

The model learns to end a response with the end-of-text token (the collate function appends
it); `stop_strings` are a second guard for when it instead starts the next turn itself.

Adding a template: `register_template(PromptTemplate(name=..., ...))`.

A model with a chat template of its own (Llama 3, Qwen3, Gemma 3: the Jinja template in its
tokenizer_config.json) is prompted with that one: `ModelTemplate`, named "model". "auto" picks it
when the tokenizer has one, else alpaca.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scratchllm.errors import ScratchLLMError
from scratchllm.text.tokenizer import AllowedSpecial

TEMPLATE_KEY = "prompt_template"  # the key in a model directory's `extra`
DEFAULT_TEMPLATE = "alpaca"
MODEL_TEMPLATE = "model"  # the tokenizer's own chat template
AUTO_TEMPLATE = "auto"  # the model's own when it has one, else DEFAULT_TEMPLATE
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptTemplate:
    """A named prompt layout. Format strings use `{system}`, `{instruction}` and `{input}`."""

    name: str
    description: str
    user_format: str  # the user block, e.g. "### Instruction:\n{instruction}"
    assistant_header: str  # what the response follows, e.g. "### Response:\n"
    input_format: str = ""  # appended to the user block when the entry has an input
    system_format: str = "{system}"  # the system block
    default_system: str = ""  # used when no system message is given ("" = no system block)
    separator: str = "\n\n"
    stop_strings: tuple[str, ...] = ()  # generation ends before any of these
    allowed_special: AllowedSpecial = frozenset()  # specials its text may hold (none: all is plain text)

    def prompt(self, instruction: str, input: str = "", system: str | None = None) -> str:
        """The text up to where the response starts (ends with `assistant_header`)."""
        return self.separator.join(
            [*self._system_block(system), self._user_block(instruction, input), self.assistant_header]
        )

    def format_input(self, entry: Mapping[str, Any]) -> str:
        """The book's `format_input`: the system block and user block of an entry, without the
        response header (`prompt` = `format_input` + separator + `assistant_header`)."""
        return self.separator.join(
            [*self._system_block(None), self._user_block(entry["instruction"], entry.get("input") or "")]
        )

    def format_example(self, entry: Mapping[str, Any]) -> tuple[str, str]:
        """(prompt, response) of an {"instruction", "input", "output"} entry; training text = prompt +
        response."""
        return self.prompt(entry["instruction"], entry.get("input") or ""), str(entry.get("output") or "")

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """A multi-turn conversation ({"role": "system"|"user"|"assistant", "content": str} messages)
        as one prompt. With `add_generation_prompt` the text ends with the assistant header, where
        the model speaks next. System messages (anywhere) form the system block; without any, the
        template's default system text is used. A single user message renders exactly as `prompt`."""
        system_parts: list[str] = []
        turns: list[str] = []
        for i, message in enumerate(messages):
            role, content = _check_message(i, message)
            if role == "system":
                system_parts.append(content)
            elif role == "user":
                turns.append(self._user_block(content))
            else:
                turns.append(self.assistant_header + content)
        if not turns:
            raise ScratchLLMError(
                "chat messages: need at least one user message; add {'role': 'user', 'content': ...}"
            )
        last_role = next(m["role"] for m in reversed(messages) if m["role"] != "system")
        if add_generation_prompt and last_role == "user":
            turns.append(self.assistant_header)
        system = "\n".join(system_parts) if system_parts else None
        return self.separator.join([*self._system_block(system), *turns])

    def extract_response(self, generated: str) -> str:
        """The response in generated text: cut at the first stop string, whitespace stripped."""
        return cut_at_stops(generated, self.stop_strings)

    def _system_block(self, system: str | None) -> list[str]:
        text = self.default_system if system is None else system
        return [self.system_format.format(system=text)] if text else []

    def _user_block(self, instruction: str, input: str = "") -> str:
        block = self.user_format.format(instruction=instruction)
        if input:
            block += self.input_format.format(input=input)
        return block


ALPACA = PromptTemplate(
    name="alpaca",
    description="Alpaca style, the book's default (### Instruction / ### Input / ### Response)",
    default_system=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
    ),
    user_format="### Instruction:\n{instruction}",
    input_format="\n\n### Input:\n{input}",
    assistant_header="### Response:\n",
    stop_strings=("### Instruction:", "### Input:", "### Response:", "<|endoftext|>"),
)

# The book's exercise 7.1 layout (Phi-3 style tags as plain text; GPT-2 has no such special tokens).
PHI3 = PromptTemplate(
    name="phi3",
    description="Phi-3 style (<|user|> / <|assistant|>), the book's exercise 7.1",
    system_format="<|system|>\n{system}",
    user_format="<|user|>\n{instruction}",
    input_format="\n{input}",
    assistant_header="<|assistant|>\n",
    stop_strings=("<|user|>", "<|system|>", "<|assistant|>", "<|end|>", "<|endoftext|>"),
)

_TEMPLATES: dict[str, PromptTemplate] = {}


def register_template(template: PromptTemplate) -> PromptTemplate:
    """Add a template to the registry (replacing one of the same name) and return it."""
    _TEMPLATES[template.name] = template
    return template


def template_names() -> list[str]:
    """The template names: the registered ones, the model's own ("model") and "auto"."""
    return [*_TEMPLATES, MODEL_TEMPLATE, AUTO_TEMPLATE]


def get_template(name: str | PromptTemplate | ModelTemplate, tokenizer: Any = None) -> PromptTemplate:
    """The template called `name` (a template object is returned as is). "model": the tokenizer's own
    chat template; "auto": that one when the tokenizer has one, else the default."""
    if isinstance(name, (PromptTemplate, ModelTemplate)):
        return name
    own = getattr(tokenizer, "chat_template", None)
    if name == AUTO_TEMPLATE:
        name = MODEL_TEMPLATE if own else DEFAULT_TEMPLATE
    if name == MODEL_TEMPLATE:
        if not own:
            raise ScratchLLMError(
                "the prompt template 'model' is the tokenizer's own chat template, and this model's "
                f"tokenizer has none; choose one of: {', '.join(_TEMPLATES)}"
            )
        return ModelTemplate(tokenizer)
    try:
        return _TEMPLATES[name]
    except KeyError:
        raise ScratchLLMError(
            f"unknown prompt template {name!r}; choose one of: {', '.join(template_names())}"
        ) from None


def template_for_model(
    extra: Mapping[str, Any] | None, default: str = DEFAULT_TEMPLATE, tokenizer: Any = None
) -> PromptTemplate:
    """The template a model directory was finetuned with (its `extra["prompt_template"]`), else its
    tokenizer's own chat template, else `default`."""
    name = (extra or {}).get(TEMPLATE_KEY)
    if not name:
        name = MODEL_TEMPLATE if getattr(tokenizer, "chat_template", None) else default
    return get_template(name, tokenizer)


class ModelTemplate:
    """A model's own chat template (Jinja, from its tokenizer_config.json) as a prompt template: the
    prompt is the conversation rendered up to the assistant's turn, the response what the template
    writes after it up to the end-of-turn token (which training appends as the end-of-text id)."""

    name = MODEL_TEMPLATE
    description = "the model's own chat template (its tokenizer_config.json)"
    allowed_special: AllowedSpecial = "all"  # the template writes the model's special tokens as text

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        ids = [i for i in tokenizer.stop_ids if i is not None]
        self.stop_strings = tuple(dict.fromkeys(tokenizer.decode([i]) for i in ids))

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's template writes it (roles checked as for every template)."""
        for i, message in enumerate(messages):
            _check_message(i, message)
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)

    def _messages(self, instruction: str, input: str = "", system: str | None = None) -> list[dict[str, str]]:
        content = f"{instruction}\n\n{input}" if input else instruction
        return [
            *([{"role": "system", "content": system}] if system else []),
            {"role": "user", "content": content},
        ]

    def prompt(self, instruction: str, input: str = "", system: str | None = None) -> str:
        """The text up to where the response starts."""
        return self.render_chat(self._messages(instruction, input, system))

    def format_example(self, entry: Mapping[str, Any]) -> tuple[str, str]:
        """(prompt, response) of an {"instruction", "input", "output"} entry; training text = prompt +
        response, and training appends the end-of-turn id after it."""
        messages = self._messages(entry["instruction"], entry.get("input") or "")
        prompt = self.render_chat(messages)
        reply = {"role": "assistant", "content": str(entry.get("output") or "")}
        full = self.render_chat([*messages, reply], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ScratchLLMError(
                "the model's chat template writes a reply that does not continue its prompt (it rewrites "
                "earlier turns); finetune with --template alpaca instead"
            )
        response = full[len(prompt) :]
        eos = self.tokenizer.eos_token
        if eos and eos in response:
            response = response[: response.rindex(eos)]  # the end of turn: training appends its id
        return prompt, response

    def extract_response(self, generated: str) -> str:
        """The response in generated text: cut at the first end-of-turn string, whitespace stripped."""
        return cut_at_stops(generated, self.stop_strings)


def cut_at_stops(generated: str, stops: Sequence[str]) -> str:
    """`generated` up to the first of `stops`, whitespace stripped."""
    end = min([at for at in (generated.find(s) for s in stops) if at != -1], default=len(generated))
    return generated[:end].strip()


def _check_message(index: int, message: Mapping[str, str]) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise ScratchLLMError(
            f"chat message {index}: expected an object with 'role' and 'content', got "
            f"{type(message).__name__}"
        )
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ScratchLLMError(f"chat message {index}: role must be one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(content, str):
        raise ScratchLLMError(
            f"chat message {index}: 'content' must be a string, got {type(content).__name__}"
        )
    return role, content


register_template(ALPACA)
register_template(PHI3)
