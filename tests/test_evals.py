"""Zero-/few-shot evaluation: log-likelihoods against transformers, a trained model that solves a
copy task, K-shot prompts, task-file errors and the `scratchllm eval-tasks` command."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchllm import cli, hub
from scratchllm.checkpoint import save_model
from scratchllm.cli import main
from scratchllm.config import load_config, overrides_from_args
from scratchllm.errors import ScratchLLMError
from scratchllm.evals import (
    EvalSettings,
    EvalTasksSettings,
    FewShot,
    GenerationItem,
    MultipleChoiceItem,
    TaskFile,
    encode_context,
    encode_pair,
    evaluate_task,
    loglikelihoods,
    normalize_answer,
    read_task,
    score_choices,
)
from scratchllm.generation import Engine, GenerationConfig
from scratchllm.model.gpt import GPTConfig, GPTModel
from scratchllm.text.bpe import BPETokenizer
from scratchllm.text.registry import load_tokenizer
from tests.generation.helpers import tiny_model

from .conftest import require_transformers, shared_file, single_thread

WINDOW = 64  # context length of the random GPT-2: short, so long few-shot prompts get cut


pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------------------------
# Log-likelihoods equal transformers' on the same random GPT-2


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """(our model, our GPT-2 tokenizer, HF GPT2LMHeadModel, HF `tokenizers` GPT-2 tokenizer), same weights."""
    transformers = require_transformers()
    tokenizers = pytest.importorskip("tokenizers")
    data = shared_file("encoder.json").parent
    shared_file("vocab.bpe")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50257, n_positions=WINDOW)
    hf = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.1)
    hf.eval()
    src = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(src)
    model, _ = hub.load_hf_dir(src)
    ref_tok = tokenizers.Tokenizer(
        tokenizers.models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe"))
    )
    ref_tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    return model, load_tokenizer(data), hf, ref_tok


def reference_loglikelihood(hf, ref_tok, context: str, continuation: str) -> float:
    """lm-evaluation-harness's recipe, written independently with HF's tokenizer and model: trailing
    context whitespace joins the continuation, the sequence keeps its last WINDOW + 1 tokens, and
    the continuation's log-probabilities are summed."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    ctx = ref_tok.encode(stripped).ids if stripped else [50256]
    cont = ref_tok.encode(continuation).ids
    seq = (ctx + cont)[-(WINDOW + 1) :]
    with torch.no_grad():
        logits = hf(torch.tensor([seq[:-1]])).logits[0, -len(cont) :]
    return float(F.log_softmax(logits.double(), -1)[torch.arange(len(cont)), torch.tensor(cont)].sum())


VERDICT_LINES = [
    "I had always thought Jack Gisburn rather a cheap genius--though a good fellow enough",
    "so it was no great surprise to me to hear that, in the height of his glory,",
    "he had dropped his painting, married a rich widow, and established himself in a villa",
]


def mc_items() -> list[MultipleChoiceItem]:
    long = " ".join(VERDICT_LINES * 3)  # ~110 tokens: longer than the window, cut from the left
    return [
        MultipleChoiceItem("The capital of France is", ("Paris.", "a large city", "Berlin"), 0, 1),
        MultipleChoiceItem("Answer: ", ("yes", "no"), 1, 2),  # trailing space moves to the choice
        MultipleChoiceItem("", ("Hello", "Goodbye, world"), 0, 3),  # empty context: <|endoftext|>
        MultipleChoiceItem(long, ("on the Riviera.", "in Florence", "nowhere at all, sadly"), 2, 4),
        MultipleChoiceItem("Café, naïve, 東京 and", (" emoji 🎉", "ünïcödé"), 0, 5),
    ]


def test_per_item_loglikelihoods_equal_transformers(gpt2_pair):
    model, tok, hf, ref_tok = gpt2_pair
    items = mc_items()
    task = TaskFile("mc", "choice", items)
    for shots in (0, 2):
        result = evaluate_task(model, tok, task, EvalSettings(shots=shots, batch_size=3, seed=7))
        fewshot = FewShot(items, shots, seed=7)
        for item, row in zip(items, result["items"]):
            context = fewshot.context(item, row["index"])
            ref = [reference_loglikelihood(hf, ref_tok, context, " " + c) for c in item.choices]
            np.testing.assert_allclose(row["loglikelihoods"], ref, rtol=0, atol=1e-4)
            norm = [ll / len(c.encode()) for ll, c in zip(ref, item.choices)]
            assert row["pred"] == int(np.argmax(ref)) and row["pred_norm"] == int(np.argmax(norm))
            assert row["acc"] == float(row["pred"] == item.label)
        assert result["items"][3]["truncated"] > 0  # the long context was cut
        assert result["summary"]["acc"] == np.mean([r["acc"] for r in result["items"]])


def test_batched_scoring_equals_one_sequence_at_a_time(gpt2_pair):
    model, tok, _, _ = gpt2_pair
    requests = [encode_pair(tok, it.context, " " + c) for it in mc_items() for c in it.choices]
    requests.append(requests[0])  # a duplicate is scored once and reported twice
    one = loglikelihoods(model, requests, batch_size=1)
    batched = loglikelihoods(model, requests, batch_size=5)
    assert [s.n_tokens for s in one] == [len(c) for _, c in requests]
    np.testing.assert_allclose([s.loglikelihood for s in batched], [s.loglikelihood for s in one], atol=1e-5)
    assert [s.truncated for s in batched] == [s.truncated for s in one]
    assert batched[-1] == batched[0]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_choices_sharing_their_context_equal_scoring_each_alone(gpt2_pair, batch_size):
    model, tok, _, _ = gpt2_pair
    rng = random.Random(batch_size)
    groups = []
    for it in mc_items():  # left-padded contexts of many lengths, one too long for the window
        ctx, moved = encode_context(tok, it.context)
        groups.append((ctx, [tok.encode(moved + " " + c) for c in it.choices]))
    groups.append((groups[0][0], [[rng.randrange(50257)] for _ in range(3)]))  # one-token choices only
    groups.append(([5] * 40, [[7] * 24, [8]]))  # 40 + 24 = window: fits without a cut
    shared = score_choices(model, groups, batch_size=batch_size)
    alone = loglikelihoods(model, [(ctx, c) for ctx, conts in groups for c in conts], batch_size=1)
    flat = [s for scores in shared for s in scores]
    assert [len(s) for s in shared] == [len(conts) for _, conts in groups]
    np.testing.assert_allclose([s.loglikelihood for s in flat], [s.loglikelihood for s in alone], atol=2e-5)
    assert [(s.is_greedy, s.n_tokens, s.truncated) for s in flat] == [
        (s.is_greedy, s.n_tokens, s.truncated) for s in alone
    ]
    assert any(s.truncated for s in flat)


def test_continuations_longer_than_the_window_are_errors(gpt2_pair):
    model, tok, _, _ = gpt2_pair
    with pytest.raises(ScratchLLMError, match="more than the context window of 64"):
        loglikelihoods(model, [([1, 2], list(range(WINDOW + 1)))])
    with pytest.raises(ScratchLLMError, match="continuation has no tokens"):
        loglikelihoods(model, [([1, 2], [])])
    with pytest.raises(ScratchLLMError, match="item 0: the context has no tokens"):
        score_choices(model, [([], [[1]])])


# ----------------------------------------------------------------------------------------------
# K-shot prompts


def numbered_items(n: int) -> list[MultipleChoiceItem]:
    return [MultipleChoiceItem(f"Q{i}?", (f"A{i}", f"B{i}"), 0, i + 1) for i in range(n)]


@settings(max_examples=30, deadline=None)
@given(shots=st.integers(0, 6), seed=st.integers(0, 10_000), n=st.integers(8, 20))
def test_k_shot_prompts_hold_exactly_k_examples_never_the_item(shots, seed, n):
    items = numbered_items(n)
    # the pool holds the task's items plus a copy of item 3 under another line number: never shown to item 3
    pool = [*items, MultipleChoiceItem("Q3?", ("A3", "B3"), 0, 99)]
    fewshot = FewShot(pool, shots, seed=seed, separator="\n###\n")
    for index, item in enumerate(items):
        examples = fewshot.examples(item, index)
        assert len(examples) == shots
        assert len({ex.context for ex in examples}) == shots  # distinct examples
        assert item.context not in {ex.context for ex in examples}
        prompt = fewshot.context(item, index)
        blocks = prompt.split("\n###\n")
        assert len(blocks) == shots + 1 and blocks[-1] == item.context
        assert blocks[:-1] == [f"{ex.context} {ex.target}" for ex in examples]
        assert f"A{index} " not in prompt + " "  # the item's own answer never appears
        assert fewshot.context(item, index) == prompt  # same seed, same prompt


def test_k_shot_examples_depend_on_the_seed_and_pools_must_be_big_enough():
    items = numbered_items(30)
    a = [FewShot(items, 3, seed=1).examples(it, i) for i, it in enumerate(items)]
    b = [FewShot(items, 3, seed=2).examples(it, i) for i, it in enumerate(items)]
    assert a != b
    with pytest.raises(ScratchLLMError, match="pool has 2"):
        FewShot(items[:2], 3)
    with pytest.raises(ScratchLLMError, match="only 2 pool examples differ"):
        FewShot(items[:3], 3).examples(items[0], 0)


def test_holdout_items_are_the_pool_and_are_not_scored(gpt2_pair, tmp_path):
    model, tok, _, _ = gpt2_pair
    records = [{"context": f"Q{i}?", "choices": [f" A{i}", f" B{i}"], "answer": 0} for i in range(8)]
    task = write_jsonl(tmp_path / "t.jsonl", records)
    result = evaluate_task(model, tok, task, EvalSettings(shots=2, holdout=3, limit=4))
    assert [r["index"] for r in result["items"]] == [3, 4, 5, 6]
    assert [r["line"] for r in result["items"]] == [4, 5, 6, 7]
    assert result["settings"]["fewshot_pool"].startswith("the first 3 items")
    pool_file = write_jsonl(tmp_path / "pool.jsonl", records[6:])
    result = evaluate_task(model, tok, task, EvalSettings(shots=2, fewshot_file=str(pool_file), limit=2))
    assert result["summary"]["n"] == 2 and result["settings"]["fewshot_pool"] == str(pool_file)
    with pytest.raises(ScratchLLMError, match="leaves nothing to score"):
        evaluate_task(model, tok, task, EvalSettings(shots=1, holdout=8))


# ----------------------------------------------------------------------------------------------
# Task files


def test_the_three_formats(tmp_path):
    hs = write_jsonl(
        tmp_path / "hs.jsonl",
        [
            {
                "ctx": "A man is sitting on a roof. he",
                "endings": ["starts pulling up roofing.", "is ugly."],
                "label": "0",
                "activity_label": "Roof shingle removal",
            },
            "",
            {
                "ctx": "[header] How to cook [title] Boil water.",
                "endings": ["[step] Add salt.", "Run."],
                "label": 1,
            },
        ],
    )
    task = read_task(hs)
    assert task.format == "hellaswag" and task.kind == "multiple_choice"
    first, second = task.items
    assert first == MultipleChoiceItem(
        "Roof shingle removal: A man is sitting on a roof. he",
        ("starts pulling up roofing.", "is ugly."),
        0,
        1,
    )
    assert (second.context, second.choices, second.label, second.line) == (
        "How to cook. Boil water.",
        ("Add salt.", "Run."),
        1,
        3,
    )
    mc = read_task(
        write_jsonl(tmp_path / "mc.jsonl", [{"context": "2+2=", "choices": ["3", "4"], "answer": "4"}])
    )
    assert mc.format == "choice" and mc.items[0].label == 1
    gen = read_task(write_jsonl(tmp_path / "g.jsonl", [{"prompt": "Q", "answer": ["a", "b"]}]))
    assert gen.kind == "generation" and gen.items[0] == GenerationItem("Q", ("a", "b"), 1)
    # a generation item with a context field of its own is still one (it was read as multiple choice)
    gen = read_task(write_jsonl(tmp_path / "gc.jsonl", [{"prompt": "Q", "answer": "a", "context": "notes"}]))
    assert gen.kind == "generation" and gen.items[0] == GenerationItem("Q", ("a",), 1)


HS_OK = {"ctx": "c", "endings": ["a", "b"], "label": 0}


@pytest.mark.parametrize(
    "lines, message",
    [
        ([HS_OK, HS_OK, {"ctx": "c", "endings": ["a", "b"]}], r"line 3: missing field 'label'"),
        ([{"context": "c", "answer": 0}], r"line 1: missing field 'choices'"),
        ([{"prompt": "p"}], r"line 1: missing field 'answer'"),
        ([HS_OK, '{"ctx": "c", "endings": ["a", "b"], "label": 0'], r"line 2: not valid JSON"),
        ([HS_OK, "[1, 2]"], r"line 2: expected a JSON object"),
        (
            [{"ctx": "c", "endings": ["a", "b"], "label": 2}],
            r"line 1: field 'label' must be a choice index 0\.\.1",
        ),
        (
            [{"ctx": "c", "endings": "ab", "label": 0}],
            r"line 1: field 'endings' must be a list of at least 2",
        ),
        ([{"context": 3, "choices": ["a", "b"], "answer": 0}], r"line 1: field 'context' must be a string"),
        ([{"context": "c", "choices": ["a", "b"], "answer": "z"}], r"'answer' is 'z', which is not one of"),
        ([{"prompt": "p", "answer": 5}], r"line 1: field 'answer' must be a string or a list"),
        ([{"prompt": "p", "answer": ["a", " "]}], r"line 1: field 'answer' has an empty answer"),
        ([{"question": "q"}], r"line 1: cannot tell the task format"),
        (["", "  "], r"has no records"),
    ],
)
def test_malformed_task_files_name_the_line_and_field(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ScratchLLMError, match=message):
        read_task(path)


def test_cli_reports_a_malformed_task_in_one_line_before_loading_the_model(tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [HS_OK, {"ctx": "c", "label": 0}])
    code = main(["eval-tasks", "--model", str(tmp_path / "no-such-model"), "--task", str(path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "bad.jsonl, line 2: missing field 'endings'" in err


@pytest.mark.parametrize(
    "settings_, message",
    [
        (EvalSettings(shots=-1), "--shots must be >= 0"),
        (EvalSettings(limit=0), "--limit must be >= 1"),
        (EvalSettings(shots=1, holdout=2, fewshot_file="pool.jsonl"), "either --fewshot-file or --holdout"),
        (EvalSettings(shots=9), "9-shot prompts need at least 9 examples, the pool has 8"),
    ],
)
def test_bad_settings_are_errors(gpt2_pair, settings_, message):
    model, tok, _, _ = gpt2_pair
    with pytest.raises(ScratchLLMError, match=message):
        evaluate_task(model, tok, TaskFile("t", "choice", numbered_items(8)), settings_)


def test_eval_and_evaluate_point_at_each_other(capsys):
    for command, other in (("eval-tasks", "scratchllm perplexity"), ("perplexity", "scratchllm eval-tasks")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert other in " ".join(capsys.readouterr().out.split())


def _eval_tasks_settings(argv: list[str]) -> EvalTasksSettings:
    args = cli.build_parser(cli.COMMANDS["eval-tasks"]).parse_args(["eval-tasks", *argv])
    return load_config(EvalTasksSettings, None, overrides_from_args(args))


def test_eval_tasks_flags_become_settings():
    s = _eval_tasks_settings(["--model", "m", "--task", "t.jsonl"])
    assert s == EvalTasksSettings(model="m", task="t.jsonl") and s.eval == EvalSettings()
    assert (s.device, s.precision, s.out, s.json, s.quiet) == ("auto", "fp32", None, False, False)
    flags = ["--model", "m", "--task", "t.jsonl", "--shots", "3", "--fewshot-file", "pool.jsonl"]
    flags += [
        "--seed",
        "7",
        "--separator",
        "\\n",
        "--target-delimiter",
        ":",
        "--limit",
        "5",
        "--batch-size",
        "4",
    ]
    flags += [
        "--max-new-tokens",
        "9",
        "--stop",
        "A",
        "--stop",
        "\\n\\n",
        "--format",
        "choice",
        "--device",
        "cpu",
    ]
    flags += ["--precision", "bf16", "--out", "o.json", "--json", "--quiet", "--holdout", "2"]
    s = _eval_tasks_settings(flags)
    assert s.eval == EvalSettings(
        shots=3,
        fewshot_file="pool.jsonl",
        holdout=2,
        seed=7,
        separator="\\n",  # as typed: the command unescapes it
        target_delimiter=":",
        limit=5,
        batch_size=4,
        max_new_tokens=9,
        stop=("A", "\\n\\n"),
        format="choice",
    )
    assert (s.device, s.precision, s.out, s.json, s.quiet) == ("cpu", "bf16", "o.json", True, True)
    with pytest.raises(ScratchLLMError, match="required: --task"):
        _eval_tasks_settings(["--model", "m"])


@pytest.fixture
def byte_model_dir(tmp_path):
    tok = BPETokenizer({bytes([b]): b for b in range(256)}, special_tokens={"<|endoftext|>": 256})
    save_model(tmp_path / "m", tiny_model(vocab=tok.vocab_size, ctx=64), tok)
    return str(tmp_path / "m")


def test_eval_tasks_runs_through_the_command_table_and_unescapes_its_texts(byte_model_dir, tmp_path, capsys):
    task = write_jsonl(tmp_path / "choice.jsonl", copy_task_records(6, seed=4))
    out = tmp_path / "r.json"
    args = ["eval-tasks", "--model", byte_model_dir, "--task", str(task), "--shots", "1", "--device", "cpu"]
    args += ["--separator", "\\n\\t", "--target-delimiter", "\\t", "--out", str(out), "--quiet"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert (result["settings"]["separator"], result["settings"]["target_delimiter"]) == ("\n\t", "\t")
    summary = result["summary"]
    assert summary["n"] == 6 and summary["model"] == byte_model_dir and "n=6, 1-shot" in printed
    assert cli.main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == summary["acc"]
    gen = write_jsonl(tmp_path / "gen.jsonl", copy_task_records(3, seed=5, generation=True))
    args = ["eval", "--model", byte_model_dir, "--task", str(gen), "--device", "cpu", "--stop", "x\\n"]
    assert cli.main([*args, "--max-new-tokens", "3", "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["settings"]["stop"] == ["x\n"]
    assert "`eval` is now `eval-tasks`" in capsys.readouterr().err  # the old name, with a notice


def test_eval_tasks_reports_a_malformed_task_in_one_line_before_loading_the_model(tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [HS_OK, {"ctx": "c", "label": 0}])
    code = cli.main(["eval-tasks", "--model", str(tmp_path / "no-model"), "--task", str(path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "bad.jsonl, line 2: missing field 'endings'" in err
    code = cli.main(
        ["eval-tasks", "--model", "m", "--task", str(path), "--holdout", "1", "--fewshot-file", "p"]
    )
    assert code == 2 and "either --fewshot-file or --holdout" in capsys.readouterr().err


def test_perplexity_and_eval_tasks_point_at_each_other():
    from scratchllm.train.evaluate import PerplexitySettings

    assert "`scratchllm perplexity`" in " ".join(EvalTasksSettings.__doc__.split())
    assert "`scratchllm eval-tasks`" in " ".join(PerplexitySettings.__doc__.split())


def test_the_judge_imports_without_torch():
    code = "import sys, scratchllm.evals.judge; assert 'torch' not in sys.modules, 'torch imported'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_normalize_answer():
    assert normalize_answer("  The\tQuick \n\n Fox ") == "the quick fox"


# ----------------------------------------------------------------------------------------------
# Generation: exact match through the engine


def test_generation_exact_match_through_the_engine(gpt2_pair):
    model, tok, _, _ = gpt2_pair
    prompts = ["Once upon a time", "The cat", "In the beginning God created", "Hello"]
    engine = Engine(model, tok)
    config = GenerationConfig(max_new_tokens=6, temperature=0.0, stop=("\n",))
    expected = [engine.generate(p, config)[0].text for p in prompts]  # each prompt alone
    # even items: the greedy output with other case and spacing (still right); odd items: wrong
    items = [
        GenerationItem(p, (f"  {e.upper()}  " if i % 2 == 0 else "not this",), i + 1)
        for i, (p, e) in enumerate(zip(prompts, expected))
    ]
    result = evaluate_task(
        model, tok, TaskFile("gen", "generation", items), EvalSettings(max_new_tokens=6, batch_size=3)
    )
    assert [r["output"] for r in result["items"]] == expected
    assert [r["exact_match"] for r in result["items"]] == [1.0, 0.0, 1.0, 0.0]
    assert result["summary"]["exact_match"] == 0.5
    empty = [*items[:2], GenerationItem("", ("x",), 7)]
    with pytest.raises(ScratchLLMError, match="the task item on line 7: generation: the prompt is empty"):
        evaluate_task(model, tok, TaskFile("gen", "generation", empty), EvalSettings(max_new_tokens=6))


# ----------------------------------------------------------------------------------------------
# A model trained on "key: X answer: X" solves the same task as multiple choice and by generation

WORDS = ["red", "blue", "green", "black", "white", "pink", "gold", "gray", "brown", "tan", "cyan", "lime"]


@pytest.fixture(scope="module")
def copy_model(tmp_path_factory):
    """A one-block GPT trained for 500 steps (~5-10 s) on lines "key: X answer: X" with a BPE trained here."""
    from scratchllm.text.bpe import train_bpe
    from scratchllm.train.pretrain import LanguageModelTask
    from scratchllm.train.trainer import Trainer
    from scratchllm.train.trainer_config import TrainerConfig

    rng = random.Random(0)
    text = "".join(f"key: {w} answer: {w}\n" for w in rng.choices(WORDS, k=3000))
    tok = train_bpe([text], 300, progress=False)
    ids = np.array(tok.encode(text), dtype=np.uint16)
    split = len(ids) * 9 // 10
    torch.manual_seed(0)
    model = GPTModel(
        GPTConfig(
            vocab_size=tok.vocab_size, context_length=32, emb_dim=64, n_heads=2, n_layers=1, drop_rate=0.0
        )
    )
    task = LanguageModelTask(
        ids[:split], ids[split:], context_length=32, batch_size=16, seed=1, eval_batches=1
    )
    out = tmp_path_factory.mktemp("copy")
    cfg = TrainerConfig(
        out_dir=str(out / "run"),
        max_steps=500,
        warmup_steps=10,
        lr=1e-2,
        min_lr=1e-3,
        eval_every=0,
        precision="fp32",
        device="cpu",
        progress=False,
    )
    with single_thread():
        Trainer(model, task, cfg, tokenizer=tok, log=lambda msg: None).fit()
    return model.eval(), tok, out / "run" / "model"


def copy_task_records(n: int, seed: int, generation: bool = False) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        word = rng.choice(WORDS)
        if generation:
            records.append({"prompt": f"key: {word} answer:", "answer": word})
            continue
        choices = [word, *rng.sample([w for w in WORDS if w != word], 3)]
        rng.shuffle(choices)
        records.append({"context": f"key: {word} answer:", "choices": choices, "answer": choices.index(word)})
    return records


@pytest.mark.slow
def test_copy_task_scores_above_chance_after_a_short_training_run(copy_model, tmp_path):
    model, tok, _ = copy_model
    task = write_jsonl(tmp_path / "copy.jsonl", copy_task_records(60, seed=1))
    untrained = GPTModel(model.cfg).eval()
    chance = evaluate_task(untrained, tok, task)["summary"]
    for shots in (0, 2):
        summary = evaluate_task(model, tok, task, EvalSettings(shots=shots, separator="\n"))["summary"]
        assert summary["acc"] > 0.5 and summary["acc_norm"] > 0.5, summary  # chance: 0.25
        assert summary["acc"] > chance["acc"] + 0.25
    gen = write_jsonl(tmp_path / "gen.jsonl", copy_task_records(20, seed=2, generation=True))
    summary = evaluate_task(model, tok, gen, EvalSettings(max_new_tokens=4))["summary"]
    assert summary["exact_match"] > 0.5, summary


@pytest.mark.slow
def test_cli_eval_writes_json_and_prints_the_summary(copy_model, tmp_path, capsys):
    _, _, model_dir = copy_model
    task = write_jsonl(tmp_path / "copy.jsonl", copy_task_records(12, seed=3))
    out = tmp_path / "results" / "copy.json"
    args = [
        "eval-tasks",
        "--model",
        str(model_dir),
        "--task",
        str(task),
        "--shots",
        "2",
        "--limit",
        "5",
        "--separator",
        "\\n",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert summary["n"] == 5 and summary["shots"] == 2 and len(result["items"]) == 5
    assert result["settings"]["separator"] == "\n"
    assert f"acc {summary['acc']:.4f}" in printed and "acc_norm" in printed and "n=5, 2-shot" in printed
    assert set(result["items"][0]) >= {"loglikelihoods", "bytes", "pred", "pred_norm", "label", "acc"}
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == summary["acc"]


def test_the_example_task_files_shipped_in_the_repo_parse():
    root = Path(__file__).resolve().parents[1] / "examples" / "tasks"
    choice = read_task(root / "python-basics.jsonl")
    assert choice.format == "choice" and len(choice.items) == 16
    assert all(
        item.choices[item.label] and len(set(item.choices)) == len(item.choices) for item in choice.items
    )
    generation = read_task(root / "python-completions.jsonl")
    assert generation.format == "generation" and len(generation.items) == 8


# ----------------------------------------------------------------------------------------------
# inference-time scaling: majority vote and best-of-N


def test_majority_vote_normalises_and_breaks_ties_by_first_seen():
    from scratchllm.evals.voting import majority_vote

    assert majority_vote([" Paris", "paris ", "Rome"]) == "paris"
    assert majority_vote(["b", "a", "a", "b"]) == "b"  # a tie: the first seen
    assert majority_vote([]) is None


class _ScriptedEngine:
    """Returns given completions (text, token log-probabilities) in order: the picks become checkable."""

    def __init__(self, scripted):
        self.scripted = list(scripted)

    def generate(self, prompts, config):
        from scratchllm.generation.completion import Completion
        from scratchllm.generation.sampling import TokenLogprob

        assert config.logprobs == 0 and len(prompts) == len(self.scripted)
        return [
            Completion(text, [1] * len(lps), "stop", 1, logprobs=[TokenLogprob(1, lp) for lp in lps])
            for text, lps in self.scripted
        ]


def test_the_three_picks_of_sampled_answers():
    from scratchllm.evals.voting import sample_answers
    from scratchllm.generation import GenerationConfig

    # item 1: the vote is right, the surest sample not; item 2: no majority (the first seen), the surest right
    first = [("red", [-1.0]), ("blue", [-0.1, -0.1]), ("red", [-2.0])]
    second = [("cat", [-3.0]), ("dog", [-0.5]), ("cow", [-4.0])]
    engine = _ScriptedEngine(first + second)
    out = sample_answers(engine, [[1], [2]], [{"red"}, {"dog"}], 3, GenerationConfig(temperature=1.0, seed=0))
    assert [o["majority_answer"] for o in out] == ["red", "cat"]
    assert [o["majority_match"] for o in out] == [1.0, 0.0]
    assert [o["best_of_n_logprob"] for o in out] == [0.0, 1.0]
    assert [o["best_of_n_verifier"] for o in out] == [1.0, 1.0]


@pytest.mark.slow
def test_eval_tasks_with_samples_reports_vote_and_best_of_n(copy_model, tmp_path, capsys):
    _, _, model_dir = copy_model
    task = write_jsonl(tmp_path / "gen.jsonl", copy_task_records(8, seed=4, generation=True))
    out = tmp_path / "gen.json"
    argv = ["eval-tasks", "--model", str(model_dir), "--task", str(task), "--samples", "5"]
    argv += ["--max-new-tokens", "4", "--sample-temperature", "1.0", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    s = result["summary"]
    assert s["samples"] == 5 and "majority_match" in capsys.readouterr().out
    for item in result["items"]:
        assert len(item["samples"]) == 5
        # the verifier picks a right sample whenever there is one: never below the other two picks
        assert item["best_of_n_verifier"] >= max(item["majority_match"], item["best_of_n_logprob"])
    assert s["best_of_n_verifier"] >= s["majority_match"] > 0.5  # the trained copy task mostly agrees
    assert main([*argv[:-3], "--sample-temperature", "0", "--quiet"]) == 2


def test_the_api_samples_n_answers(copy_model):
    import scratchllm

    _, _, model_dir = copy_model
    llm = scratchllm.load(str(model_dir))
    samples = llm.generate("key:", n=4, temperature=1.5, top_k=None, seed=0, max_new_tokens=3)
    assert isinstance(samples, list) and len(samples) == 4 and len(set(samples)) > 1
    both = llm.generate(["key:", "answer:"], n=2, temperature=1.0, seed=0, max_new_tokens=2)
    assert [len(b) for b in both] == [2, 2]
    assert isinstance(llm.generate("key:", max_new_tokens=2), str)
    assert scratchllm.majority_vote(["Key", "key ", "answer"]) == "key"
