"""render_chat against transformers' apply_chat_template, with templates written here in the style of the
Qwen3 (ChatML), Llama 3 and Gemma 3 families."""

from __future__ import annotations

from datetime import datetime

import pytest

from scratchllm.errors import ScratchLLMError
from scratchllm.text.chat_template import render_chat
from scratchllm.text.hf_tokenizer import HFTokenizer
from tests.conftest import require_transformers

tokenizers = pytest.importorskip("tokenizers")

# ChatML with a default system message, tools as JSON lines, earlier replies' <think> blocks dropped
QWEN_STYLE = """
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- '# Tools\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(found=false, last_query=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- if message.role == 'user' and not ns.found %}
        {%- set ns.found = true %}
        {%- set ns.last_query = messages|length - 1 - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
        {%- continue %}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n') %}
            {%- set reasoning = reasoning.split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query and reasoning is defined %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip() + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# BOS, role headers, the system message trimmed, a date from strftime_now unless one is given
LLAMA_STYLE = """
{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "Tools: " + tools | tojson(indent=2) + "\\n\\n" }}
{%- endif %}
{{- system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# BOS, the system message folded into the first user turn, roles that must alternate, assistant -> model
GEMMA_STYLE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if message['role'] == 'assistant' -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\\n' }}
{%- endif -%}
"""

SPECIALS = {
    "qwen": (QWEN_STYLE, None, "<|im_end|>"),
    "llama": (LLAMA_STYLE, "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA_STYLE, "<bos>", "<eos>"),
}

CONVERSATIONS = {
    "system, two turns": [
        {"role": "system", "content": "  You are terse. Ünïcödé ok 😀  "},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": ' And <b>"3+3"</b>?\n'},
    ],
    "no system": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "<think>a pun</think>A pun."},
    ],
    "one message": [{"role": "user", "content": "Hi"}],
}


def library_tokenizer() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tok.add_special_tokens(["<|im_end|>", "<|begin_of_text|>", "<|eot_id|>", "<bos>", "<eos>"])
    return tok


def transformers_render(template, messages, bos, eos, **kwargs) -> str:
    transformers = require_transformers()
    specials = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=library_tokenizer(), chat_template=template, **specials
    )
    return theirs.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("family", SPECIALS)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_same_text_as_transformers(family, conversation, add_generation_prompt):
    template, bos, eos = SPECIALS[family]
    messages = CONVERSATIONS[conversation]
    kwargs = {"add_generation_prompt": add_generation_prompt, "date_string": "26 Jul 2024"}
    ours = render_chat(template, messages, bos_token=bos, eos_token=eos, **kwargs)
    assert ours == transformers_render(template, messages, bos, eos, **kwargs)
    tok = HFTokenizer.from_tokenizer(
        library_tokenizer(), bos_token=bos, eos_token=eos, chat_template=template
    )
    assert tok.apply_chat_template(messages, add_generation_prompt, date_string="26 Jul 2024") == ours


@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_extra_variables_and_tools_as_transformers(family):
    template, bos, eos = SPECIALS[family]
    messages = CONVERSATIONS["system, two turns"]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"a": "int", "note": "<é>"}}}]
    kwargs = {"tools": tools, "enable_thinking": False, "date_string": "1 Jan 2025"}
    ours = render_chat(template, messages, bos_token=bos, eos_token=eos, **kwargs)
    assert ours == transformers_render(template, messages, bos, eos, add_generation_prompt=True, **kwargs)
    assert '"<é>"' in ours  # tojson keeps non-ASCII and does not escape HTML


def test_undefined_tokens_render_empty_as_in_transformers():
    template = "[{{ bos_token }}]{{ messages[0].content }}[{{ eos_token }}]"
    messages = CONVERSATIONS["one message"]
    assert render_chat(template, messages) == "[]Hi[]" == transformers_render(template, messages, None, None)


def test_strftime_now_and_loop_controls_and_generation_blocks():
    template = (
        "{{ strftime_now('%Y') }}|{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}{{ m.content }}{% endgeneration %};{% endfor %}"
    )
    messages = CONVERSATIONS["no system"]
    ours = render_chat(template, messages)
    assert ours == f"{datetime.now().year}|Hi;Hello! How can I help?;"
    assert ours == transformers_render(template, messages, None, None)


def test_roles_that_do_not_alternate_are_refused():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ScratchLLMError, match="Conversation roles must alternate") as info:
        render_chat(GEMMA_STYLE, messages, bos_token="<bos>")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{% for m in messages %}{{ m.content }}", "syntax error at line 1"),
        ("{% if %}\n{% endif %}", "syntax error"),
        ("{{ messages[0].content + 1 }}", "TypeError"),
        ("{{ messages.append(1) }}", "chat template"),  # the sandbox: data is immutable
        ("{% set ns = namespace(_x=1) %}", "may not start with '_'"),
        ("{{ ''.__class__.__mro__ }}", "chat template"),
    ],
)
def test_template_errors_are_one_line(template, match):
    with pytest.raises(ScratchLLMError, match=match) as info:
        render_chat(template, CONVERSATIONS["one message"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "list of"),
        ({"role": "user", "content": "hi"}, "list of"),
        ([], "empty"),
        (["hi"], "message 0 must be a"),
        ([{"role": "user"}], "message 0 needs a string 'content'"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], "message 1 needs a string 'role'"),
        ([{"role": "user", "content": ["parts"]}], "needs a string 'content'"),
        ([{"role": "user", "content": "a", "extra": object()}], "JSON-like"),
    ],
)
def test_message_shape_is_checked(messages, match):
    with pytest.raises(ScratchLLMError, match=match):
        render_chat("{{ messages }}", messages)


def test_extra_keys_pass_through_and_none_values_are_dropped():
    template = "{% for m in messages %}{{ m.name | default('-') }}:{{ m.tool_calls is defined }};{% endfor %}"
    messages = [{"role": "user", "content": "a", "name": "ann", "tool_calls": None}]
    assert (
        render_chat(template, messages) == "ann:False;" == transformers_render(template, messages, None, None)
    )


def test_the_callers_messages_are_not_changed():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    before = [dict(m) for m in messages]
    render_chat(LLAMA_STYLE, messages, bos_token="<|begin_of_text|>")
    assert messages == before
