from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from llms_from_scratch.ch07 import format_input

from scratchllm.errors import ScratchLLMError
from scratchllm.text import templates
from scratchllm.text.templates import (
    ALPACA,
    PHI3,
    TEMPLATE_KEY,
    PromptTemplate,
    get_template,
    register_template,
    template_for_model,
    template_names,
)
from tests.conftest import shared_file

ENTRIES = [
    {
        "instruction": "Convert 45 kilometers to meters.",
        "input": "",
        "output": "45 kilometers is 45000 meters.",
    },
    {"instruction": "Edit the sentence.", "input": "He go to school.", "output": "He goes to school."},
    {"instruction": "Say {hi} with braces", "input": "{input}", "output": "{ok}"},
]


def test_registry_has_alpaca_and_phi3():
    assert {"alpaca", "phi3"} <= set(template_names())
    assert get_template("alpaca") is ALPACA and get_template(PHI3) is PHI3
    with pytest.raises(ScratchLLMError, match=r"unknown prompt template 'nope'.*alpaca"):
        get_template("nope")


def test_alpaca_equals_the_books_format_input_and_training_text():
    for entry in ENTRIES:
        assert ALPACA.format_input(entry) == format_input(entry)
        prompt, response = ALPACA.format_example(entry)
        # the book's InstructionDataset trains on format_input(entry) + "\n\n### Response:\n" + output
        assert prompt + response == format_input(entry) + f"\n\n### Response:\n{entry['output']}"
        assert prompt == ALPACA.prompt(entry["instruction"], entry["input"])


def test_alpaca_equals_the_book_on_the_real_instruction_data():
    data = json.loads(shared_file("instruction-data.json").read_text())
    assert len(data) == 1100
    for entry in data:
        prompt, response = ALPACA.format_example(entry)
        assert prompt + response == format_input(entry) + f"\n\n### Response:\n{entry['output']}"


def test_phi3_layout_is_the_books_exercise_style():
    assert PHI3.prompt("Identify the correct spelling.", "Ocassion") == (
        "<|user|>\nIdentify the correct spelling.\nOcassion\n\n<|assistant|>\n"
    )
    assert PHI3.prompt("Hi") == "<|user|>\nHi\n\n<|assistant|>\n"
    assert PHI3.prompt("Hi", system="Be brief.") == "<|system|>\nBe brief.\n\n<|user|>\nHi\n\n<|assistant|>\n"


def test_alpaca_multi_turn_chat():
    messages = [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ]
    expected = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a color.\n\n### Response:\nBlue."
        "\n\n### Instruction:\nAnother?\n\n### Response:\n"
    )
    assert ALPACA.render_chat(messages) == expected
    # without the generation prompt the text ends after the last message
    assert ALPACA.render_chat(messages[:2], add_generation_prompt=False).endswith("### Response:\nBlue.")
    # a system message replaces the default preamble
    with_system = ALPACA.render_chat([{"role": "system", "content": "You are terse."}, *messages])
    assert with_system == expected.replace(ALPACA.default_system, "You are terse.")


def test_phi3_multi_turn_chat_with_system():
    text = PHI3.render_chat(
        [
            {"role": "system", "content": "Be nice."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
        ]
    )
    assert (
        text
        == "<|system|>\nBe nice.\n\n<|user|>\nhi\n\n<|assistant|>\nhello\n\n<|user|>\nbye\n\n<|assistant|>\n"
    )


@given(st.text(min_size=1), st.sampled_from([ALPACA, PHI3]))
def test_one_user_message_renders_as_the_training_prompt(content, template):
    assert template.render_chat([{"role": "user", "content": content}]) == template.prompt(content)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "at least one user message"),
        ([{"role": "system", "content": "x"}], "at least one user message"),
        ([{"role": "bot", "content": "x"}], r"chat message 0: role must be one of"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": 3}],
            r"chat message 1: 'content' must be a string",
        ),
        (["hello"], "chat message 0: expected an object"),
    ],
)
def test_chat_errors_name_the_message(messages, match):
    with pytest.raises(ScratchLLMError, match=match):
        ALPACA.render_chat(messages)


def test_extract_response_cuts_at_the_first_stop_string():
    assert ALPACA.extract_response("  The answer.\n\n### Instruction:\nmore") == "The answer."
    assert ALPACA.extract_response("42<|endoftext|>junk") == "42"
    assert PHI3.extract_response("Sure.\n<|user|>\nagain") == "Sure."
    assert PHI3.extract_response("no stop here ") == "no stop here"


def test_template_for_model_reads_the_model_extra():
    assert template_for_model({TEMPLATE_KEY: "phi3"}) is PHI3
    assert template_for_model({}) is ALPACA and template_for_model(None) is ALPACA
    assert template_for_model({}, default="phi3") is PHI3
    with pytest.raises(ScratchLLMError, match="unknown prompt template"):
        template_for_model({TEMPLATE_KEY: "missing"})


def test_a_new_template_is_one_registration(monkeypatch):
    monkeypatch.setattr(templates, "_TEMPLATES", dict(templates._TEMPLATES))  # keep the registry as it was
    chatml = register_template(
        PromptTemplate(
            name="test-chatml",
            description="ChatML-like, for the test",
            system_format="<|im_start|>system\n{system}<|im_end|>",
            user_format="<|im_start|>user\n{instruction}<|im_end|>",
            input_format="\n{input}",
            assistant_header="<|im_start|>assistant\n",
            separator="\n",
            stop_strings=("<|im_end|>",),
        )
    )
    assert get_template("test-chatml") is chatml
    assert chatml.prompt("Hi", system="S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chatml.extract_response("Hello<|im_end|>\n") == "Hello"
