"""`scratchllm finetune dpo`: the loss against the formula, the log-probabilities against a manual sum, a tiny
model that learns a synthetic preference, exact resume, the book's preference file, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scratchllm.checkpoint import load_model, save_model
from scratchllm.cli import main
from scratchllm.errors import ScratchLLMError
from scratchllm.finetune.dpo import (
    IGNORE_INDEX,
    PreferenceDataset,
    collate_pairs,
    dpo_loss,
    load_preference_data,
    response_logps,
)
from scratchllm.model.gpt import GPTConfig, GPTModel
from scratchllm.text.bpe import train_bpe
from scratchllm.text.templates import get_template
from tests.conftest import exit_code, shared_file

THINGS = ["cats", "dogs", "birds", "trees", "rivers", "stars", "books", "songs", "boats", "clouds"]
# the chosen answer is plain; the rejected one ends with a marker word the model should learn to avoid
PAIRS = [
    {
        "instruction": f"About {t}.",
        "input": "",
        "chosen": f"{t} are nice.",
        "rejected": f"{t} are nice zebra.",
    }
    for t in THINGS * 4
]


def test_the_loss_is_the_formula():
    pc, pr = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -4.5, -6.0])
    rc, rr = torch.tensor([-3.5, -5.0, -2.5]), torch.tensor([-3.9, -4.0, -5.5])
    for beta, smoothing in ((0.1, 0.0), (0.5, 0.0), (0.2, 0.1)):
        loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, smoothing)
        want = []
        for i in range(3):
            z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
            sig = 1 / (1 + torch.exp(-z))
            want.append(-(1 - smoothing) * torch.log(sig) - smoothing * torch.log(1 - sig))
        assert loss.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-6)
        assert torch.allclose(chosen, beta * (pc - rc)) and torch.allclose(rejected, beta * (pr - rr))
    # identical policy and reference: no preference yet, log 2
    assert dpo_loss(pc, pr, pc, pr)[0].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_response_logps_sum_the_response_tokens_only():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=30, context_length=16, emb_dim=16, n_heads=2, n_layers=1)).eval()
    inputs = torch.randint(0, 30, (2, 8))
    targets = torch.full((2, 8), IGNORE_INDEX)
    targets[0, 3:6], targets[1, 1:7] = inputs[0, 4:7], inputs[1, 2:8]
    with torch.no_grad():
        logp = F.log_softmax(model(inputs), -1)
        got, mean = (
            response_logps(model, inputs, targets),
            response_logps(model, inputs, targets, average=True),
        )
    for row in range(2):
        cols = (targets[row] != IGNORE_INDEX).nonzero()[:, 0]
        want = sum(logp[row, c, targets[row, c]] for c in cols)
        assert got[row].item() == pytest.approx(want.item(), rel=1e-5)
        assert mean[row].item() == pytest.approx(want.item() / len(cols), rel=1e-5)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny GPT with a BPE tokenizer trained on the pairs' words."""
    text = (
        " ".join(f"{p['instruction']} {p['chosen']} {p['rejected']}" for p in PAIRS)
        + " Below is an instruction"
    )
    tok = train_bpe([text * 3], vocab_size=300, progress=False)
    torch.manual_seed(0)
    model = GPTModel(
        GPTConfig(vocab_size=tok.vocab_size, context_length=256, emb_dim=32, n_heads=2, n_layers=2)
    )
    return save_model(tmp_path_factory.mktemp("dpo") / "base", model, tok)


def _run(base: Path, data: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "finetune",
            "dpo",
            "--model",
            str(base),
            "--data",
            str(data),
            "--out-dir",
            str(out),
            "--batch-size",
            "4",
            "--lr",
            "3e-3",
            "--min-lr",
            "3e-3",
            "--warmup-steps",
            "0",
            "--beta",
            "0.5",
            "--eval-batches",
            "0",
            "--sample-count",
            "0",
            "--progress",
            "false",
            "--device",
            "cpu",
            "--val-fraction",
            "0.2",
            "--test-fraction",
            "0",
            "--drop-rate",
            "0",
            *extra,
        ]
    )


def test_a_tiny_model_learns_the_preference_and_resumes_exactly(base, tmp_path):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(PAIRS))
    out = tmp_path / "run"
    assert _run(base, data, out, "--max-steps", "16", "--eval-every", "8", "--checkpoint-every", "8") == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["val_reward_accuracy"] >= 0.9 and evals[-1]["val_reward_margin"] > 0
    assert evals[-1]["val_loss"] < 0.5 < 0.6931 - 1e-3  # from log 2 at the start
    tuned = load_model(out / "model")
    assert (
        tuned.extra["prompt_template"] == "alpaca" and tuned.extra["trained_by"] == "scratchllm finetune dpo"
    )
    assert (out / "reference_logps.safetensors").is_file()

    # the aligned model prefers the plain answer on pairs it never saw
    template = get_template("alpaca")
    unseen = [
        {
            "instruction": "About cats.",
            "chosen": "cats are nice.",
            "rejected": "cats are nice zebra.",
        }
    ]
    pair = PreferenceDataset(unseen, tuned.tokenizer, template)
    inputs, targets = collate_pairs(pair, [0], tuned.tokenizer.eot_id, None)
    with torch.no_grad():
        chosen, rejected = response_logps(tuned.model.eval(), inputs, targets)
    assert chosen > rejected

    # exact resume from the middle checkpoint (the reference comes from the cache)
    again = tmp_path / "again"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("step-000016", "model", "best"))
    assert (
        _run(
            base,
            data,
            again,
            "--max-steps",
            "16",
            "--eval-every",
            "8",
            "--checkpoint-every",
            "8",
            "--resume",
            str(again / "checkpoints" / "step-000008"),
        )
        == 0
    )
    a = (out / "model" / "model.safetensors").read_bytes()
    assert (again / "model" / "model.safetensors").read_bytes() == a


def test_lora_and_the_books_preference_file(base, tmp_path):
    book = json.loads(shared_file("instruction-data-with-preference.json").read_text())
    assert len(book) == 1100 and {"instruction", "input", "chosen", "rejected"} <= book[0].keys()
    data = tmp_path / "book.json"
    data.write_text(json.dumps(book[:24]))
    out = tmp_path / "lora"
    assert (
        _run(
            base,
            data,
            out,
            "--max-steps",
            "2",
            "--lora",
            "true",
            "--lora-rank",
            "4",
            "--average-logps",
            "true",
        )
        == 0
    )
    assert not any("lora" in k for k in load_model(out / "model").model.state_dict())


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"instruction": "x", "chosen": "a"}], '"rejected" must be a string'),
        ([{"chosen": "a", "rejected": "b"}], "give exactly one of instruction"),
        ([{"prompt": "p", "instruction": "i", "chosen": "a", "rejected": "b"}], "give exactly one of"),
        ([{"messages": "hi", "chosen": "a", "rejected": "b"}], '"messages" must be a list'),
        (["text"], r"record \[0\]: expected a JSON object"),
    ],
)
def test_bad_preference_records_name_the_record(tmp_path, records, message):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ScratchLLMError, match=message):
        load_preference_data(path)


def test_bad_settings_are_one_line_errors(base, tmp_path, capsys):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(PAIRS))
    assert exit_code(main, ["finetune", "dpo", "--model", str(base)]) == 2
    assert "no preference data" in capsys.readouterr().err
    assert exit_code(main, ["finetune", "dpo", "--model", str(base), "--data", str(data), "--beta", "0"]) == 2
    assert "beta > 0" in capsys.readouterr().err
    code = exit_code(
        main, ["finetune", "dpo", "--model", str(base), "--data", str(data), "--mask-prompt", "true"]
    )
    assert code == 2 and "mask_prompt" in capsys.readouterr().err.replace("-", "_")


def test_chat_message_pairs_use_the_template(base):
    tok = load_model(base).tokenizer
    pairs = [{"messages": [{"role": "user", "content": "Hi"}], "chosen": "Hello.", "rejected": "Go."}]
    data = PreferenceDataset(pairs, tok, get_template("alpaca"))
    assert data.prompts[0].endswith("### Response:\n")
    assert tok.decode(data.chosen[0][data.chosen_prompt[0] :]) == "Hello."


@pytest.mark.parametrize("arch", ["llama3", "qwen3-moe", "gemma3"])
def test_dpo_runs_for_every_family(arch, base, tmp_path):
    from scratchllm.model import registry

    tok = load_model(base).tokenizer
    cfg = registry.preset_config("nano", arch, vocab_size=tok.vocab_size, context_length=256)
    family = save_model(tmp_path / arch, registry.build_model(cfg), tok)
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(PAIRS[:16]))
    assert _run(family, data, tmp_path / "run", "--max-steps", "2", "--lora", "true", "--lora-rank", "4") == 0
    tuned = load_model(tmp_path / "run" / "model")
    assert tuned.model.cfg.architecture == arch and not any("lora" in k for k in tuned.model.state_dict())
