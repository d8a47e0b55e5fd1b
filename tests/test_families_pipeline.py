"""Every stage for Llama 3, Qwen3 (dense and MoE) and Gemma 3 on the CLI: a tiny model pretrained from
scratch, finetuned on instructions, served to the official `openai` client and evaluated; and a model with
its own tokenizer.json and chat template (converted from transformers' files) prompted as transformers
prompts it, in finetuning and serving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scratchllm.cli import main
from scratchllm.finetune.instruct import InstructionDataset
from scratchllm.generation import GenerationConfig
from scratchllm.hub import load_model
from scratchllm.serve.app import create_app
from scratchllm.serve.chat import load_chat_model
from scratchllm.text.hf_tokenizer import HFTokenizer
from scratchllm.text.templates import TEMPLATE_KEY, get_template
from tests.conftest import require_transformers
from tests.serve.helpers import BackgroundServer

openai = pytest.importorskip("openai")
tokenizers = pytest.importorskip("tokenizers")

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "dog",
    "ran",
    "to",
    "park",
    "while",
    "birds",
    "sang",
    "in",
]
RECORDS = [
    {"instruction": f"Repeat the word {w}.", "input": "" if i % 2 else "twice", "output": f"{w} {w}"}
    for i, w in enumerate(WORDS * 2)
]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a bird."},
    {"role": "assistant", "content": "A wren."},
    {"role": "user", "content": "And a tree?"},
]


def cli(*argv: str) -> None:
    assert main([*argv]) == 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = torch.Generator().manual_seed(0)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (6000,), generator=rng)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(words), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft") / "data.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama3", "qwen3", "qwen3-moe", "gemma3"])
def test_pretrain_finetune_serve_and_evaluate(arch, corpus, instructions, tmp_path):
    base, sft = tmp_path / "base", tmp_path / "sft"
    common = ["--progress", "false", "--device", "cpu", "--batch-size", "2"]
    cli(
        "pretrain",
        "--arch",
        arch,
        "--model",
        "nano",
        "--corpus",
        str(corpus),
        "--vocab-size",
        "300",
        "--max-steps",
        "6",
        "--context-length",
        "256",
        "--eval-every",
        "6",
        "--eval-batches",
        "1",
        "--sample-tokens",
        "0",
        "--out-dir",
        str(base),
        *common,
    )
    loaded = load_model(base / "model")
    assert (
        loaded.model.cfg.architecture
        == arch
        == json.loads((base / "model" / "config.json").read_text())["model"]["architecture"]
    )
    cli(
        "finetune",
        "instruct",
        "--model",
        str(base / "model"),
        "--data",
        str(instructions),
        "--max-steps",
        "4",
        "--eval-every",
        "4",
        "--eval-batches",
        "1",
        "--sample-count",
        "0",
        "--out-dir",
        str(sft),
        "--lora",
        "true",
        "--lora-rank",
        "4",
        *common,
    )
    tuned = load_model(sft / "model")
    assert tuned.extra[TEMPLATE_KEY] == "alpaca"  # a tokenizer trained here has no chat template
    assert not any("lora" in name for name in tuned.model.state_dict())  # adapters merged

    chat = load_chat_model(str(sft / "model"), device="cpu", dtype="fp32")
    with BackgroundServer(create_app(chat, model_name=arch)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model=arch, messages=[{"role": "user", "content": "Repeat the word cat."}], max_tokens=6
        )
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 6

    cli(
        "generate",
        "--model",
        str(sft / "model"),
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "4",
        "--quantize",
        "int4",
    )
    labelled = tmp_path / "labels.jsonl"
    rows = [{"text": f"the {w} sat", "label": "cat" if i % 2 else "dog"} for i, w in enumerate(WORDS * 4)]
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cli(
        "finetune",
        "classify",
        "--model",
        str(base / "model"),
        "--data",
        str(labelled),
        "--max-steps",
        "3",
        "--eval-every",
        "3",
        "--eval-batches",
        "1",
        "--out-dir",
        str(tmp_path / "cls"),
        *common,
    )
    assert load_model(tmp_path / "cls" / "model").model.cfg.n_classes == 2

    task = tmp_path / "task.jsonl"
    items = [{"context": f"the {w}", "choices": [f" {w}", " zzz"], "answer": 0} for w in WORDS[:6]]
    task.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    out = tmp_path / "eval.json"
    cli("eval-tasks", "--model", str(sft / "model"), "--task", str(task), "--quiet", "--out", str(out))
    assert len(json.loads(out.read_text())["items"]) == 6


# ----------------------------------------------------------------------------------------------
# a model with its own tokenizer.json and chat template


def chatml_tokenizer() -> tokenizers.Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = " ".join(WORDS) + " Repeat the word twice. Name a bird. A wren. And a tree? You are terse."
    tok.train_from_iterator([text] * 20, trainer)
    return tok


@pytest.fixture(scope="module")
def qwen_with_template(tmp_path_factory) -> Path:
    """A tiny random Qwen3 saved by transformers with a ChatML tokenizer, converted here."""
    transformers = require_transformers()
    tok = chatml_tokenizer()
    hf = tmp_path_factory.mktemp("hf-qwen")
    config = transformers.Qwen3Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        eos_token_id=tok.token_to_id("<|im_end|>"),
    )
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(hf)
    tok.save(str(hf / "tokenizer.json"))
    settings = {
        "chat_template": CHATML,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (hf / "tokenizer_config.json").write_text(json.dumps(settings))
    ids = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    out = tmp_path_factory.mktemp("ours") / "qwen"
    cli("download", "qwen3-0.6b", "--from", str(hf), "--out", str(out))
    return out


def test_a_converted_model_keeps_its_tokenizer_and_template(qwen_with_template):
    transformers = require_transformers()
    loaded = load_model(qwen_with_template)
    tok = loaded.tokenizer
    assert isinstance(tok, HFTokenizer) and tok.chat_template == CHATML
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(qwen_with_template / "tokenizer.json"), chat_template=CHATML
    )
    chat = load_chat_model(str(qwen_with_template), device="cpu", dtype="fp32")
    assert chat.template.name == "model" and not chat.template_is_default
    want = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat.render(MESSAGES) == want
    assert chat.encode_chat(MESSAGES) == theirs(want, add_special_tokens=False)["input_ids"]
    stops = chat.engine.stop_ids(GenerationConfig(max_new_tokens=4))
    assert {tok.special_tokens["<|im_end|>"], tok.special_tokens["<|endoftext|>"]} <= stops


def test_instruct_finetuning_uses_the_models_template(qwen_with_template, instructions, tmp_path):
    tok = load_model(qwen_with_template).tokenizer
    template = get_template("auto", tok)
    assert template.name == "model"
    prompt, response = template.format_example(RECORDS[0])
    assert prompt.endswith("<|im_start|>assistant\n") and response == "the the"
    data = InstructionDataset(RECORDS[:3], tok, template)
    im_start = tok.special_tokens["<|im_start|>"]
    assert data.encoded_texts[0][0] == im_start  # the template's specials are special tokens
    assert data.encoded_texts[0][: data.prompt_lengths[0]] == tok.encode(prompt, "all")

    out = tmp_path / "sft"
    cli(
        "finetune",
        "instruct",
        "--model",
        str(qwen_with_template),
        "--data",
        str(instructions),
        "--max-steps",
        "2",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--sample-count",
        "1",
        "--sample-tokens",
        "3",
        "--batch-size",
        "2",
        "--out-dir",
        str(out),
        "--progress",
        "false",
        "--device",
        "cpu",
    )
    tuned = load_model(out / "model")
    assert tuned.extra[TEMPLATE_KEY] == "model"
    assert isinstance(tuned.tokenizer, HFTokenizer) and tuned.tokenizer.chat_template == CHATML

    hf_out = tmp_path / "hf"
    cli("export-hf", str(out / "model"), str(hf_out))
    transformers = require_transformers()
    theirs = transformers.AutoTokenizer.from_pretrained(hf_out)
    assert theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == get_template(
        "model", tuned.tokenizer
    ).render_chat(MESSAGES)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_out).eval()
    ids = torch.tensor([tuned.tokenizer.encode("the cat sat")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tuned.model.float()(ids), atol=1e-4, rtol=1e-4)
