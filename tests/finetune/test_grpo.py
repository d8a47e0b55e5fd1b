"""`scratchllm finetune grpo` and its parts: the verifiers, the objective against its formula, group
advantages, a tiny model that learns what the reward asks, exact resume, and `data arithmetic`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from scratchllm.checkpoint import save_model
from scratchllm.cli import main
from scratchllm.errors import ScratchLLMError
from scratchllm.finetune.grpo import group_advantages, grpo_loss, load_prompts
from scratchllm.finetune.rewards import combine, exact_reward, final_number, make_reward, numeric_reward
from scratchllm.model.gpt import GPTConfig, GPTModel
from scratchllm.text.char import CharTokenizer
from tests.conftest import exit_code


@pytest.mark.parametrize(
    "completion, answer, want",
    [
        ("46", "46", 1.0),
        ("The sum is 1,000.", "1000", 1.0),
        ("3.50", "3.5", 1.0),
        ("-28\n", "-28", 1.0),
        ("first 12 then \\boxed{7} and 9", "7", 1.0),
        ("work: 5 + 6\nAnswer: 11\nsure", "11", 1.0),
        ("45", "46", 0.0),
        ("no number", "46", 0.0),
    ],
)
def test_the_numeric_verifier(completion, answer, want):
    assert numeric_reward("", completion, answer) == want


def test_the_other_verifiers_and_their_combination(tmp_path):
    assert exact_reward("", " Paris \nmore", "paris") == 1.0 and exact_reward("", "Rome", "Paris") == 0.0
    assert final_number("x = 1,234.5 and y = 2") == 2.0
    assert (
        make_reward("regex:^\\d+$")("", "42", "") == 1.0 and make_reward("regex:^\\d+$")("", "4x", "") == 0.0
    )
    (tmp_path / "my_reward.py").write_text(
        "def short(prompt, completion, answer):\n    return -len(completion)\n"
    )
    mine = make_reward(f"python:{tmp_path / 'my_reward.py'}:short")
    assert mine("p", "abc", "") == -3
    total = combine([(numeric_reward, 1.0), (make_reward("regex:^\\d"), 0.1)])
    assert total("", "46", "46") == pytest.approx(1.1) and total("", "x", "46") == 0.0
    for spec, message in [
        ("fuzzy", "unknown reward"),
        ("regex:(", "does not compile"),
        ("python:nope_module:f", "python reward"),
        ("python:nocolon", "MODULE:FUNCTION"),
    ]:
        with pytest.raises(ScratchLLMError, match=message):
            make_reward(spec)
    with pytest.raises(ScratchLLMError, match="returned nan"):
        combine([(lambda p, c, a: float("nan"), 1.0)])("", "", "")


def test_the_objective_is_the_formula():
    torch.manual_seed(0)
    logps, old, ref = torch.randn(3, 4) * 0.3 - 1, torch.randn(3, 4) * 0.3 - 1, torch.randn(3, 4) * 0.3 - 1
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float)
    loss, kl = grpo_loss(logps, old, adv, mask, clip_eps=0.2, ref_logps=ref, kl_coef=0.1)
    per_seq, kls = [], []
    for i in range(3):
        terms, ks = [], []
        for t in range(4):
            if not mask[i, t]:
                continue
            r = math.exp(logps[i, t] - old[i, t])
            clipped = min(max(r, 0.8), 1.2)
            k = math.exp(ref[i, t] - logps[i, t]) - (ref[i, t] - logps[i, t]) - 1
            terms.append(-(min(r * adv[i], clipped * adv[i]) - 0.1 * k))
            ks.append(k)
        per_seq.append(sum(terms) / len(terms))
        kls.append(sum(ks) / len(ks))
    assert loss.item() == pytest.approx(float(sum(per_seq)) / 3, rel=1e-5)
    assert kl.item() == pytest.approx(float(sum(kls)) / 3, rel=1e-5)
    # at the rollout's own policy the ratio is 1: the gradient is the advantage-weighted log-likelihood's
    assert grpo_loss(old, old, adv, mask)[0].item() == pytest.approx(-(adv.mean()).item(), rel=1e-6)


def test_group_advantages_compare_within_each_group():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4)
    assert adv[:4].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-3)
    assert adv[4:].tolist() == [0.0] * 4  # a group that all agree teaches nothing


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random tiny GPT over five characters, and prompts whose reward is a completion starting with a."""
    root = tmp_path_factory.mktemp("grpo")
    tok = CharTokenizer.from_corpus(["abcd\nx"])
    torch.manual_seed(0)
    model = GPTModel(
        GPTConfig(vocab_size=tok.vocab_size, context_length=32, emb_dim=32, n_heads=2, n_layers=1)
    )
    save_model(root / "base", model, tok)
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": "x" * k, "answer": ""}) + "\n" for k in range(1, 9))
    )
    return root


def _grpo(root: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "finetune",
            "grpo",
            "--model",
            str(root / "base"),
            "--data",
            str(root / "prompts.jsonl"),
            "--val-data",
            str(root / "prompts.jsonl"),
            "--reward",
            "regex:^a",
            "--max-new-tokens",
            "3",
            "--group-size",
            "8",
            "--batch-size",
            "8",
            "--grad-accum",
            "2",
            "--lr",
            "3e-2",
            "--min-lr",
            "3e-2",
            "--out-dir",
            str(out),
            "--progress",
            "false",
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_a_tiny_model_learns_what_the_reward_asks(tiny, tmp_path):
    out = tmp_path / "run"
    assert _grpo(tiny, out, "--max-steps", "12", "--eval-every", "12") == 0
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in evals if r["kind"] == "eval"][-1]
    assert last["val_reward"] == 1.0  # greedy answers now start with "a"; a random start: about 1 in 6
    assert last["rollout_reward_mean"] > 0.6


def test_resume_is_exact_and_says_when_it_cannot_be(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--max-steps", "6", "--eval-every", "6", "--keep-last", "9", "--ppo-epochs", "2"]
    args += ["--kl-coef", "0.1", "--checkpoint-every", "2"]
    assert _grpo(tiny, out, *args) == 0
    final = (out / "model" / "model.safetensors").read_bytes()
    # each resume starts a rollout's first step: the rollout is sampled again exactly
    for step, exact in (("step-000004", True), ("step-000002", True)):
        again = tmp_path / f"again-{step}"
        shutil.copytree(out, again, ignore=shutil.ignore_patterns("model", "best"))
        capsys.readouterr()
        assert _grpo(tiny, again, *args, "--resume", str(again / "checkpoints" / step)) == 0
        assert ((again / "model" / "model.safetensors").read_bytes() == final) == exact
    # a resume in the middle of a rollout's steps whose rollout was replaced says so
    middle = tmp_path / "middle"
    every_step = [*args[:-1], "1"]
    assert _grpo(tiny, middle, *every_step) == 0
    capsys.readouterr()
    assert _grpo(tiny, middle, *every_step, "--resume", str(middle / "checkpoints" / "step-000003")) == 0
    assert "will not match an uninterrupted one exactly" in capsys.readouterr().out
    # in the middle of the last rollout's steps: that rollout is read back from the run directory, exactly
    last = tmp_path / "last"
    assert _grpo(tiny, last, *every_step) == 0
    final = (last / "model" / "model.safetensors").read_bytes()
    assert _grpo(tiny, last, *every_step, "--resume", str(last / "checkpoints" / "step-000005")) == 0
    assert "will not match" not in capsys.readouterr().out
    assert (last / "model" / "model.safetensors").read_bytes() == final


def test_arithmetic_data_and_bad_settings(tmp_path, capsys):
    assert (
        main(
            [
                "data",
                "arithmetic",
                "--out",
                str(tmp_path / "a"),
                "--train",
                "50",
                "--test",
                "10",
                "--digits",
                "1",
            ]
        )
        == 0
    )
    corpus = (tmp_path / "a" / "corpus.txt").read_text().splitlines()
    train, test = load_prompts(tmp_path / "a" / "train.jsonl"), load_prompts(tmp_path / "a" / "test.jsonl")
    assert len(corpus) == len(train) == 50 and len(test) == 10
    assert all(eval(r["prompt"][:-1]) == int(r["answer"]) for r in train + test)
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}
    assert corpus[0] == train[0]["prompt"] + train[0]["answer"]
    base = ["finetune", "grpo", "--model", str(tmp_path), "--data", str(tmp_path / "a" / "train.jsonl")]
    for extra, message in [
        (["--group-size", "3"], "group_size must be"),
        (["--reward", "fuzzy"], "unknown reward"),
        (["--template", "nope"], "unknown template"),
    ]:
        assert exit_code(main, [*base, *extra]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama3", "qwen3-moe", "gemma3"])
def test_grpo_runs_for_every_family(arch, tiny, tmp_path):
    from scratchllm.checkpoint import load_model
    from scratchllm.model import registry

    tok = load_model(tiny / "base").tokenizer
    cfg = registry.preset_config("nano", arch, vocab_size=tok.vocab_size, context_length=32)
    root = tmp_path / "family"
    (root / "base").parent.mkdir(parents=True)
    save_model(root / "base", registry.build_model(cfg), tok)
    shutil.copy(tiny / "prompts.jsonl", root / "prompts.jsonl")
    assert _grpo(root, tmp_path / "run", "--max-steps", "2", "--eval-every", "2", "--kl-coef", "0.1") == 0
    assert load_model(tmp_path / "run" / "model").model.cfg.architecture == arch
