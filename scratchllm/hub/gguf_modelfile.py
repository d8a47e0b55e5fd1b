"""The prompt format of an exported GGUF (`modelfile`): the Ollama Modelfile written beside it (FROM the file,
the prompt template in Ollama's Go-template syntax, the default system prompt and PARAMETER stop lines), and
the Jinja chat template stored in the file for llama.cpp.

Ollama renders a conversation with Go's text/template over `.System` (the system messages) and `.Messages`
(each with `.Role` and `.Content`). The TEMPLATE is
- for a model finetuned with one of the book's templates (alpaca, phi3, ...): the same layout written out
  from the template's parts (`book_go_template`), its default system text as SYSTEM;
- for a model with a Jinja chat template of its own: a translation for the families whose turn markers it
  shows (ChatML for Qwen, Llama 3's headers, Gemma's turns); another one is left out and the file says so
  (Ollama then tries the chat template stored in the GGUF);
- for a base model: the prompt as it is.
The GGUF's chat template is the same layout in Jinja: a book template's written out (`book_jinja_template`),
else the tokenizer's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ScratchLLMError
from ..text.templates import (
    AUTO_TEMPLATE,
    MODEL_TEMPLATE,
    TEMPLATE_KEY,
    PromptTemplate,
    get_template,
    template_names,
)
from ..text.tokenizer import Tokenizer

MODELFILE = "Modelfile"
MARK = "# Written by scratchllm export-gguf"  # the first line: a Modelfile that a new export may replace
RAW_TEMPLATE = "none"  # --template none: the prompt as it is (a base model)
TEMPLATE_CHOICES = (*template_names(), RAW_TEMPLATE)

CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ if $last }}<|im_start|>assistant
{{ end }}
{{- else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- end }}"""
LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>

{{ .Content }}<|eot_id|>{{ if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>

{{ .Content }}{{ if not $last }}<|eot_id|>{{ end }}
{{- end }}
{{- end }}"""
GEMMA = """{{- $system := .System }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""
# A Jinja chat template's family, told by its turn markers: (marker, name, Go template, end of turn)
CHAT_FAMILIES = (
    ("<|im_start|>", "ChatML (Qwen)", CHATML, "<|im_end|>"),
    ("<|start_header_id|>", "Llama 3", LLAMA3, "<|eot_id|>"),
    ("<start_of_turn>", "Gemma", GEMMA, "<end_of_turn>"),
)


@dataclass
class Modelfile:
    """A Modelfile's text, a line for people on which template it has, and the Jinja chat template for the
    GGUF file (None: none)."""

    text: str
    note: str
    chat_template: str | None = None


def modelfile(
    gguf_name: str, tokenizer: Tokenizer | None, extra: dict[str, Any] | None, template: str = AUTO_TEMPLATE
) -> Modelfile:
    """The Modelfile for the GGUF file `gguf_name` (in the same folder). `template`: "auto" (the template
    the model was finetuned with, else its tokenizer's chat template, else none), a book template's name,
    "model" (the tokenizer's chat template) or "none" (the prompt as it is)."""
    name = _resolve(template, tokenizer, extra)
    jinja = getattr(tokenizer, "chat_template", None)
    if name == RAW_TEMPLATE:
        go, system, stops = "{{ .Prompt }}", "", []
        note = "TEMPLATE: the prompt as it is (a base model; --template picks a chat layout)"
    elif name == MODEL_TEMPLATE:
        go, system, stops, note = _chat_template(tokenizer)
    else:
        book = get_template(name)
        go, system, stops = book_go_template(book), book.default_system, list(book.stop_strings)
        jinja = book_jinja_template(book)
        note = f"TEMPLATE: the book's {book.name!r} template ({book.description})"
    eot = (
        tokenizer.decode([tokenizer.eot_id])
        if tokenizer is not None and tokenizer.eot_id is not None
        else None
    )
    stops = list(dict.fromkeys([*stops, *([eot] if eot else [])]))
    lines = [f"{MARK}: ollama create NAME -f {MODELFILE}", f"FROM ./{gguf_name}"]
    if go is None:
        lines.append(f"# no TEMPLATE: {note}")
    else:
        lines.append(f"TEMPLATE {_triple_quoted(go, 'TEMPLATE')}")
    if system:
        lines.append(f"SYSTEM {_triple_quoted(system, 'SYSTEM')}")
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return Modelfile("\n".join(lines) + "\n", note, jinja)


def check_replaceable_modelfile(path: Path) -> None:
    """An existing Modelfile that no export wrote is the user's: refuse to replace it."""
    if path.is_dir() or (
        path.exists() and not path.read_text(encoding="utf-8", errors="replace").startswith(MARK)
    ):
        raise ScratchLLMError(
            f"{path} exists and was not written by export-gguf; the export writes its Modelfile there, so "
            "move it away or export to another folder"
        )


def book_go_template(template: PromptTemplate) -> str:
    """One of the book's layouts in Go-template syntax: the system block if there is a system text, then
    each user turn followed by the response header, each assistant turn's text, blocks joined by the
    template's separator; what `PromptTemplate.render_chat` writes."""
    sep, header = _go_text(template.separator), _go_text(template.assistant_header)
    system = _fill(template.system_format, "system", "{{ .System }}")
    user = _fill(template.user_format, "instruction", "{{ .Content }}")
    system_block = "{{ if .System }}" + system + "{{ end }}"
    user_turn = '{{ if eq .Role "user" }}{{ if or $.System $i }}' + sep + "{{ end }}" + user + sep + header
    reply_turn = '{{ else if eq .Role "assistant" }}{{ .Content }}{{ end }}'
    return system_block + "{{ range $i, $_ := .Messages }}" + user_turn + reply_turn + "{{ end }}"


def book_jinja_template(template: PromptTemplate) -> str:
    """One of the book's layouts as a Jinja chat template (llama.cpp's kind) that renders a conversation
    exactly as `PromptTemplate.render_chat` does: system messages joined by newlines (else the default
    system text) as the system block, then the turns, then the response header after a user's turn."""
    sep, header = json.dumps(template.separator), json.dumps(template.assistant_header)
    system = _jinja_fill(template.system_format, "system", "text")
    user = _jinja_fill(template.user_format, "instruction", "m.content")
    return (
        "{%- set ns = namespace(system=none, started=false, last=none) -%}"
        '{%- for m in messages if m.role == "system" -%}'
        '{%- set ns.system = (ns.system ~ "\\n" if ns.system is not none else "") ~ m.content -%}'
        "{%- endfor -%}"
        "{%- set text = " + json.dumps(template.default_system) + " if ns.system is none else ns.system -%}"
        "{%- if text -%}{{ " + system + " }}{%- set ns.started = true -%}{%- endif -%}"
        '{%- for m in messages if m.role != "system" -%}'
        "{%- if ns.started -%}{{ " + sep + " }}{%- endif -%}{%- set ns.started = true -%}"
        '{%- if m.role == "user" -%}{{ '
        + user
        + " }}{%- else -%}{{ "
        + header
        + " ~ m.content }}{%- endif -%}"
        "{%- set ns.last = m.role -%}"
        "{%- endfor -%}"
        '{%- if add_generation_prompt and ns.last == "user" -%}{{ '
        + sep
        + " ~ "
        + header
        + " }}{%- endif -%}"
    )


def _jinja_fill(fmt: str, field: str, variable: str) -> str:
    """A `str.format` layout as a Jinja expression: its text as string literals around `variable`."""
    return f" ~ {variable} ~ ".join(json.dumps(part) for part in fmt.format(**{field: _SLOT}).split(_SLOT))


def _resolve(template: str, tokenizer: Tokenizer | None, extra: dict[str, Any] | None) -> str:
    own = getattr(tokenizer, "chat_template", None)
    if template == AUTO_TEMPLATE:
        return (extra or {}).get(TEMPLATE_KEY) or (MODEL_TEMPLATE if own else RAW_TEMPLATE)
    if template == MODEL_TEMPLATE and not own:
        raise ScratchLLMError(
            "--template model is the tokenizer's own chat template, and this model's tokenizer has none; "
            f"choose one of: {', '.join(n for n in TEMPLATE_CHOICES if n != MODEL_TEMPLATE)}"
        )
    if template not in TEMPLATE_CHOICES:
        raise ScratchLLMError(
            f"unknown --template {template!r}; choose one of: {', '.join(TEMPLATE_CHOICES)}"
        )
    return template


def _chat_template(tokenizer: Any) -> tuple[str | None, str, list[str], str]:
    """(Go template or None, system text, stop strings, note) for the tokenizer's Jinja chat template."""
    stops = [tokenizer.decode([i]) for i in tokenizer.stop_ids]
    for marker, name, go, end_of_turn in CHAT_FAMILIES:
        if marker in tokenizer.chat_template:
            return go, "", [end_of_turn, *stops], f"TEMPLATE: {name}, the model's chat template in Go syntax"
    note = (
        "the model's Jinja chat template is of no family this export can translate (ChatML, Llama 3, Gemma); "
        "Ollama reads the chat template stored in the GGUF if it recognizes it, else write a TEMPLATE here"
    )
    return None, "", stops, note


_SLOT = "\x00"


def _fill(fmt: str, field: str, action: str) -> str:
    """A `str.format` layout (`{instruction}`) as Go-template text with `action` in the field's place."""
    return _go_text(fmt.format(**{field: _SLOT})).replace(_SLOT, action)


def _go_text(text: str) -> str:
    """Literal text inside a Go template: `{{` would open an action."""
    return text.replace("{{", '{{ "{{" }}')


def _triple_quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise ScratchLLMError(
            f'the Modelfile\'s {what} would contain """, which ends it early; use another template'
        )
    return f'"""{text}"""'
