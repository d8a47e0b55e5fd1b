"""Classifier finetuning (finetune/classify.py, data.py, spam.py, metrics.py) on small generated data,
offline."""

from __future__ import annotations

import csv
import io
import json
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchllm import checkpoint, cli
from scratchllm import cli as table
from scratchllm.config import load_config, overrides_from_args
from scratchllm.errors import ScratchLLMError
from scratchllm.finetune import spam
from scratchllm.finetune.classifier import Classifier, ClassifyTextsSettings, collate, pooled_logits
from scratchllm.finetune.classify import (
    ClassifyConfig,
    add_classifier_head,
    build_classifier_model,
    finetune_classify,
)
from scratchllm.finetune.classify_task import (
    ClassificationTask,
    EncodedSplit,
    balanced_class_weights,
    load_splits,
)
from scratchllm.finetune.data import Example, LabelSet, balance_classes, read_examples, split_by_fractions
from scratchllm.finetune.metrics import classification_metrics, confusion_matrix, format_report
from scratchllm.model.gpt import GPTModel, preset_config
from scratchllm.model.lora import (
    DEFAULT_TARGETS,
    apply_lora,
    count_trainable,
    lora_layers,
    mark_only_lora_trainable,
    merge_lora,
)
from scratchllm.text.simple import SimpleTokenizer
from scratchllm.train.setup import LoRASpec, setup_model
from tests.conftest import shared_file

pytestmark = pytest.mark.usefixtures("one_thread")


POS = [f"good{i}" for i in range(8)]
NEG = [f"bad{i}" for i in range(8)]
FILLER = [f"w{i}" for i in range(40)]


def synthetic(n: int, seed: int = 0) -> list[dict]:
    """A learnable task: the label says whether the one keyword hidden among filler words is a `good` or
    a `bad` one, anywhere in the text."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.random() < 0.5
        words = rng.choices(FILLER, k=rng.randint(2, 10))
        words.insert(rng.randint(0, len(words)), rng.choice(POS if y else NEG))
        rows.append({"text": " ".join(words), "label": "pos" if y else "neg"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny untrained GPT with a word tokenizer over the synthetic vocabulary, as a model directory."""
    tok = SimpleTokenizer.from_corpus(" ".join(POS + NEG + FILLER))
    torch.manual_seed(0)
    model = GPTModel(preset_config("nano", vocab_size=tok.vocab_size, context_length=24))
    return checkpoint.save_model(tmp_path_factory.mktemp("base") / "model", model, tok)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """Enough data to learn the task (the accuracy test)."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "data.jsonl", synthetic(500))


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> Path:
    """A few steps' worth, for tests of the mechanics."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "small.jsonl", synthetic(160, seed=5))


def quick_cfg(base_dir: Path, data: Path, out: Path, **changes) -> ClassifyConfig:
    settings_ = dict(
        model=str(base_dir),
        data=str(data),
        out_dir=str(out),
        trainable="all",
        lr=3e-3,
        epochs=1,
        batch_size=16,
        eval_every=0,
        progress=False,
        device="cpu",
        log_every=5,
    )
    return ClassifyConfig(**{**settings_, **changes})


# ----------------------------------------------------------------------------------------------
# end to end


def test_learns_a_synthetic_task_and_the_saved_classifier_predicts_identically(base_dir, data_file, tmp_path):
    cfg = quick_cfg(base_dir, data_file, tmp_path / "run", epochs=3, eval_every=22)
    result = finetune_classify(cfg, log=lambda s: None)
    assert result.before["test"]["accuracy"] < 0.7  # a fresh head guesses
    assert result.after["test"]["accuracy"] >= 0.95
    assert result.after["test"]["n"] == 100 and result.train.stopped == "done"
    for name in ("classification.json", "confusion.png", "curves.png", "loss.png", "metrics.jsonl"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    report = json.loads((tmp_path / "run" / "classification.json").read_text())
    assert report["after"]["test"]["confusion"] == result.after["test"]["confusion"]

    # the saved classifier is a model directory like any other, with its labels
    loaded = checkpoint.load_model(result.model_dir)
    assert loaded.config.n_classes == 2 and loaded.extra["labels"] == ["neg", "pos"]
    texts = [r["text"] for r in synthetic(40, seed=9)]
    clf = Classifier.load(str(result.model_dir), device="cpu")
    again = Classifier.load(str(result.model_dir), device="cpu")
    p1, p2 = clf.predict_proba(texts), again.predict_proba(texts)
    assert np.array_equal(p1, p2)
    # ... and predicts exactly what the model in memory predicted at the end of training
    in_memory = Classifier(
        checkpoint.load_model(tmp_path / "run" / "best").model, loaded.tokenizer, loaded.extra
    )
    assert np.array_equal(in_memory.predict_proba(texts), p1)
    gold = [r["label"] for r in synthetic(40, seed=9)]
    assert np.mean([p.label == g for p, g in zip(clf.predict(texts), gold)]) >= 0.9


@pytest.mark.parametrize(
    "trainable, changes",
    [
        ("head", {"trainable": "head"}),
        ("last_blocks", {"trainable": "last_blocks", "trainable_blocks": 1}),
        ("lora", {"lora": True, "lora_rank": 2, "lora_alpha": 2.0}),
    ],
)
def test_parameters_outside_the_trainable_parts_stay_bit_identical(
    base_dir, small_file, tmp_path, trainable, changes
):
    cfg = quick_cfg(
        base_dir,
        small_file,
        tmp_path / "run",
        max_steps=4,
        lr=1e-2,
        lora_merge=False,
        restore_best=False,
        **changes,
    )
    result = finetune_classify(cfg, log=lambda s: None)
    base = checkpoint.load_model(base_dir).model.state_dict()
    after = checkpoint.load_model(result.model_dir).model.state_dict()
    if trainable == "head":
        learns = ("out_head.",)
    elif trainable == "last_blocks":
        learns = ("out_head.", "final_norm.", "trf_blocks.1.")  # nano has 2 blocks
    else:
        learns = ("out_head.",)
    changed = {k for k in base if k != "out_head.weight" and not torch.equal(base[k], after[k])}
    assert all(k.startswith(learns) for k in changed), sorted(changed)
    if trainable == "last_blocks":
        assert any(k.startswith("trf_blocks.1.") for k in changed)
        assert not any(k.startswith(("trf_blocks.0.", "tok_emb", "pos_emb")) for k in changed)
    if trainable == "lora":
        lora = [k for k in after if ".lora." in k]
        assert lora and any(
            not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora if k.endswith(".B")
        )
        assert not changed  # every original weight (the head aside) is untouched


def test_lora_finetune_merges_into_a_plain_model_that_predicts_the_same(base_dir, small_file, tmp_path):
    cfg = quick_cfg(
        base_dir,
        small_file,
        tmp_path / "run",
        lora=True,
        lora_rank=4,
        lora_alpha=4.0,
        max_steps=6,
        lr=1e-2,
        restore_best=False,
    )
    result = finetune_classify(cfg, log=lambda s: None)
    doc = json.loads((result.model_dir / "config.json").read_text())
    assert "lora" not in doc  # merged
    unmerged = checkpoint.load_model(tmp_path / "run" / "checkpoints" / "step-000006")
    assert lora_layers(unmerged.model)
    texts = [r["text"] for r in synthetic(30, seed=3)]
    merged = Classifier.load(str(result.model_dir), device="cpu").predict_proba(texts)
    direct = Classifier(unmerged.model, unmerged.tokenizer, unmerged.extra).predict_proba(texts)
    np.testing.assert_allclose(merged, direct, atol=1e-5)
    # an unmerged LoRA classifier finetuned again with LoRA: its adapters fold in, new ones train
    again = quick_cfg(
        tmp_path / "run" / "checkpoints" / "step-000006",
        small_file,
        tmp_path / "again",
        lora=True,
        lora_rank=4,
        lora_alpha=4.0,
        max_steps=2,
        restore_best=False,
    )
    assert finetune_classify(again, log=lambda s: None).train.steps == 2


def test_lora_adds_the_expected_trainable_parameters(base_dir):
    r = 4
    lora = LoRASpec(rank=r, alpha=8, targets=("qkv", "ff.layers.2"))
    loaded = setup_model(
        str(base_dir),
        lora=lora,
        also_trained=("out_head",),
        prepare=lambda m: add_classifier_head(m.model, 3),
    )
    model = loaded.model
    d, n_layers = model.cfg.emb_dim, model.cfg.n_layers
    n = count_trainable(model)
    assert n == n_layers * r * ((d + 3 * d) + (4 * d + d)) + (d * 3 + 3)  # adapters + the new head


def _old_lora_setup(base_dir: Path, n_classes: int, seed: int, rank: int, alpha: float) -> torch.nn.Module:
    """The model that `--trainable lora` set up before `setup_model`, step by step."""
    model = checkpoint.load_model(base_dir, dtype="fp32").model
    torch.manual_seed(seed)
    add_classifier_head(model, n_classes)
    model.requires_grad_(False)
    merge_lora(model)
    apply_lora(model, rank, alpha, DEFAULT_TARGETS, 0.0)
    mark_only_lora_trainable(model, also=("out_head",))
    model.out_head.requires_grad_(True)
    return model


def test_the_old_trainable_lora_sets_up_the_model_as_before(base_dir, small_file, tmp_path):
    with pytest.warns(FutureWarning, match=r"--trainable lora .*is deprecated: use --lora true"):
        cfg = quick_cfg(base_dir, small_file, tmp_path / "run", trainable="lora", lora_rank=8)
    assert cfg.lora and cfg.trained_parts == "lora" and (cfg.lora_rank, cfg.lora_alpha) == (8, 16.0)
    model, *_ = build_classifier_model(cfg, LabelSet(["neg", "pos"]))
    old = _old_lora_setup(base_dir, 2, cfg.seed, rank=8, alpha=16.0)
    new_state, old_state = model.state_dict(), old.state_dict()
    assert new_state.keys() == old_state.keys()
    assert all(torch.equal(new_state[k], old_state[k]) for k in old_state)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, p in old.named_parameters() if p.requires_grad}
    # without a rank, the note says how to keep the old default of 8
    with pytest.warns(FutureWarning, match=r"default rank is now 16 .* give --lora-rank 8"):
        assert ClassifyConfig(trainable="lora").lora_rank == 16


def test_the_old_and_new_lora_flags_train_the_same_classifier(base_dir, small_file, tmp_path):
    def run(out: Path, *flags: str) -> dict[str, torch.Tensor]:
        argv = [
            "finetune",
            "classify",
            "--model",
            str(base_dir),
            "--data",
            str(small_file),
            "--out",
            str(out),
            "--lora-rank",
            "8",
            "--max-steps",
            "3",
            "--lr",
            "1e-2",
            "--progress",
            "false",
            "--device",
            "cpu",
        ]
        assert cli.main([*argv, *flags]) == 0
        loaded = checkpoint.load_model(out / "model")
        assert loaded.extra["trainable"] == "lora"
        assert json.loads((out / "classification.json").read_text())["trainable"] == "lora"
        return loaded.model.state_dict()

    with pytest.warns(FutureWarning, match="--trainable lora"):  # with --trainable-blocks, ignored as before
        old = run(tmp_path / "old", "--trainable", "lora", "--trainable-blocks", "2")
    new = run(tmp_path / "new", "--lora")
    assert all(torch.equal(old[k], new[k]) for k in old)
    config = tmp_path / "old.toml"  # a config file with the old spelling
    config.write_text('[model]\ntrainable = "lora"\nlora_rank = 8\n')
    with pytest.warns(FutureWarning, match="--trainable lora"):
        cfg = load_config(ClassifyConfig, str(config))
    assert cfg.lora and cfg.lora_rank == 8


def test_lora_leaves_no_room_for_trainable_flags(base_dir, capsys):
    assert cli.main(["finetune", "classify", "--model", str(base_dir), "--lora", "--trainable", "head"]) == 2
    err = capsys.readouterr().err
    assert "--trainable: with --lora true the adapters and the head learn; leave it out" in err


def test_early_stopping_ends_training(base_dir, small_file, tmp_path):
    # lr so small nothing improves: after `patience` evaluations without gain, training stops
    cfg = quick_cfg(
        base_dir,
        small_file,
        tmp_path / "run",
        lr=1e-12,
        epochs=3,
        eval_every=2,
        patience=2,
        select_metric="val_accuracy",
    )
    result = finetune_classify(cfg, log=lambda s: None)
    assert result.train.stopped == "early"
    assert result.train.steps == 6  # evaluations at 2 (best), 4 and 6 (no gain twice)


def test_resume_continues_a_classifier_run(base_dir, small_file, tmp_path):
    out = tmp_path / "run"
    full = finetune_classify(
        quick_cfg(base_dir, small_file, tmp_path / "full", max_steps=6, restore_best=False),
        log=lambda s: None,
    )
    finetune_classify(
        quick_cfg(base_dir, small_file, out, max_steps=3, restore_best=False), log=lambda s: None
    )
    cfg = quick_cfg(base_dir, small_file, out, max_steps=6, restore_best=False)
    resumed = finetune_classify(cfg, resume=str(out / "checkpoints" / "step-000003"), log=lambda s: None)
    a = checkpoint.load_model(full.model_dir).model.state_dict()
    b = checkpoint.load_model(resumed.model_dir).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# batches, pooling, the task


def test_right_padding_leaves_the_last_real_token_unchanged(base_dir):
    model = checkpoint.load_model(base_dir).model
    add_classifier_head(model, 3)
    model.eval()
    seqs = [[1, 2, 3, 4, 5], [6, 7], [8]]
    ids, lengths = collate(seqs, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0], [8, 0, 0, 0, 0]] and lengths.tolist() == [
        5,
        2,
        1,
    ]
    with torch.no_grad():
        batched = pooled_logits(model, ids, lengths, "last")
        alone = torch.cat([model(torch.tensor([s]))[:, -1] for s in seqs])
        torch.testing.assert_close(batched, alone, rtol=0, atol=1e-6)
        mean = pooled_logits(model, ids, lengths, "mean")
        hidden = [model(torch.tensor([s]), return_hidden=True)[0].mean(0) for s in seqs]
        torch.testing.assert_close(mean, model.out_head(torch.stack(hidden)), rtol=0, atol=1e-5)


def test_train_batches_are_a_pure_function_of_the_index_and_cover_each_epoch():
    ids = [[i + 1] * (1 + i % 4) for i in range(23)]
    split = EncodedSplit(ids, np.arange(23) % 2)
    task = ClassificationTask(split, split, 2, batch_size=5, seed=3, pad_id=0)
    assert task.batches_per_epoch() == 4  # 23 // 5: the last incomplete batch is dropped, as in the book
    first = [task.train_batch(i) for i in range(8)]
    fresh = ClassificationTask(split, split, 2, batch_size=5, seed=3, pad_id=0)
    for i in (5, 0, 7, 2):  # any order: the same batch
        assert all(torch.equal(a, b) for a, b in zip(fresh.train_batch(i), first[i]))
    epoch0 = [int(x[0]) for b in first[:4] for x in b[0]]
    epoch1 = [int(x[0]) for b in first[4:] for x in b[0]]
    assert len(set(epoch0)) == 20 and len(set(epoch1)) == 20 and epoch0 != epoch1
    # across two processes, each epoch's batches split between ranks without overlap
    r0 = [int(x[0]) for i in range(2) for x in task.train_batch(i, 0, 2)[0]]
    r1 = [int(x[0]) for i in range(2) for x in task.train_batch(i, 1, 2)[0]]
    assert not set(r0) & set(r1) and len(set(r0 + r1)) == 20


def test_balanced_class_weights(base_dir, tmp_path):
    rows = [{"text": "good1 w1", "label": "pos"}] * 30 + [{"text": "bad1 w2", "label": "neg"}] * 90
    data = write_jsonl(tmp_path / "skewed.jsonl", rows)
    w = balanced_class_weights(np.array([0] * 90 + [1] * 30), 2)
    torch.testing.assert_close(w, torch.tensor([120 / (2 * 90), 120 / (2 * 30)]))
    cfg = quick_cfg(base_dir, data, tmp_path / "run", class_weights="balanced", max_steps=2)
    assert finetune_classify(cfg, log=lambda s: None).train.steps == 2


# ----------------------------------------------------------------------------------------------
# data


def test_reads_csv_tsv_jsonl_and_json(tmp_path):
    rows = [{"text": 'he said "hi, there', "label": "a"}, {"text": "x\ty", "label": 2}]
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["label", "text"])
    w.writeheader()
    w.writerows(rows)
    (tmp_path / "d.csv").write_text(buf.getvalue())
    (tmp_path / "d.tsv").write_text('label\ttext\na\the said "hi, there\nb\tunbalanced " quote\n')
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert [e.text for e in read_examples(tmp_path / "d.csv")] == ['he said "hi, there', "x\ty"]
    assert [e.text for e in read_examples(tmp_path / "d.tsv")] == ['he said "hi, there', 'unbalanced " quote']
    for name in ("d.jsonl", "d.json"):
        ex = read_examples(tmp_path / name)
        assert [(e.text, e.label) for e in ex] == [('he said "hi, there', "a"), ("x\ty", "2")]
    assert read_examples(tmp_path / "d.jsonl")[1].source.endswith("d.jsonl:2")
    (tmp_path / "nohead.tsv").write_text("ham\thello\nspam\tWIN now\n")
    ex = read_examples(tmp_path / "nohead.tsv", text_column="1", label_column="0", header=False)
    assert [(e.label, e.text) for e in ex] == [("ham", "hello"), ("spam", "WIN now")]
    with pytest.raises(ScratchLLMError, match="--header false is for CSV/TSV files"):
        read_examples(tmp_path / "d.jsonl", header=False)
    # Excel's "CSV UTF-8" starts with a byte-order mark, which is not part of the first column's name
    (tmp_path / "bom.csv").write_bytes("\ufefftext,label\nhello,a\n".encode())
    assert [(e.text, e.label) for e in read_examples(tmp_path / "bom.csv")] == [("hello", "a")]
    (tmp_path / "head.csv").write_text("text,label\n")
    with pytest.raises(ScratchLLMError, match=r"has a header \(text, label\) but no records"):
        read_examples(tmp_path / "head.csv")
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(ScratchLLMError, match="is a directory"):
        read_examples(tmp_path / "dir.csv")


def test_data_errors_are_one_clear_line(tmp_path, base_dir):
    write_jsonl(tmp_path / "a.jsonl", [{"txt": "hi", "label": "x"}])
    with pytest.raises(ScratchLLMError, match=r"no text column 'text'.*\['txt', 'label'\].*--text-column"):
        read_examples(tmp_path / "a.jsonl")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "hi", "label": "x"}, {"text": "  ", "label": "y"}])
    with pytest.raises(ScratchLLMError, match=r"b.jsonl:2: empty text"):
        read_examples(tmp_path / "b.jsonl")
    with pytest.raises(ScratchLLMError, match="unknown data format"):
        read_examples(tmp_path / "c.xlsx")
    write_jsonl(tmp_path / "d.jsonl", [{"text": "hi", "label": "x"}, {"text": ["a"], "label": "y"}])
    with pytest.raises(
        ScratchLLMError, match=r"d.jsonl:2: the text in 'text' is a JSON list; it must be a string"
    ):
        read_examples(tmp_path / "d.jsonl")
    write_jsonl(tmp_path / "e.jsonl", [{"text": "hi", "label": {"a": 1}}])
    with pytest.raises(
        ScratchLLMError, match=r"the label in 'label' is a JSON dict; it must be a string \(or a number\)"
    ):
        read_examples(tmp_path / "e.jsonl")
    # a header naming one column twice: the chosen name is ambiguous (it read the last one, silently)
    (tmp_path / "dup.csv").write_text("text,text,label,note,note\nhello,OTHER,ham,a,b\nwin,OTHER,spam,c,d\n")
    with pytest.raises(ScratchLLMError, match=r"dup.csv: the header names 2 columns 'text' \(columns 1, 2\)"):
        read_examples(tmp_path / "dup.csv")
    examples = read_examples(tmp_path / "dup.csv", text_column="text.1")  # as pandas names them
    assert [e.text for e in examples] == ["OTHER", "OTHER"] and [e.label for e in examples] == ["ham", "spam"]
    (tmp_path / "dup3.csv").write_text("text,text,text.1,label\nA,B,C,ham\n")  # NAME.1 taken by the header
    with pytest.raises(ScratchLLMError, match=r"pass --text-column text.2 for the second"):
        read_examples(tmp_path / "dup3.csv")
    assert [e.text for e in read_examples(tmp_path / "dup3.csv", text_column="text.2")] == ["B"]
    assert [e.text for e in read_examples(tmp_path / "dup3.csv", text_column="text.1")] == ["C"]
    (tmp_path / "dup2.csv").write_text("text,label,note,note\nhello,ham,a,b\n")  # an unused name twice: fine
    assert [e.text for e in read_examples(tmp_path / "dup2.csv")] == ["hello"]
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": f"w{i}", "label": "only"} for i in range(20)])
    with pytest.raises(ScratchLLMError, match=r"at least two classes, the training data has only \['only'\]"):
        finetune_classify(quick_cfg(base_dir, one, tmp_path / "r1"), log=lambda s: None)
    train = write_jsonl(tmp_path / "train.jsonl", synthetic(40))
    val = write_jsonl(tmp_path / "val.jsonl", [*synthetic(5, 1), {"text": "w1 w2", "label": "maybe"}])
    with pytest.raises(
        ScratchLLMError, match=r"val.jsonl:6: label 'maybe' in the val split is not one of.*\['neg', 'pos'\]"
    ):
        finetune_classify(quick_cfg(base_dir, train, tmp_path / "r2", val_data=str(val)), log=lambda s: None)


def test_separate_split_files_and_fractions(base_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic(50))
    val = write_jsonl(tmp_path / "val.jsonl", synthetic(7, 1))
    test = write_jsonl(tmp_path / "test.jsonl", synthetic(9, 2))
    s = load_splits(quick_cfg(base_dir, train, tmp_path, val_data=str(val), test_data=str(test)))
    assert (len(s.train), len(s.val), len(s.test)) == (50, 7, 9)
    s = load_splits(quick_cfg(base_dir, train, tmp_path, val_data=str(val)))  # test cut from data: 0.7 : 0.2
    assert (len(s.train), len(s.val), len(s.test)) == (38, 7, 12)
    s = load_splits(quick_cfg(base_dir, train, tmp_path, split=[0.8, 0.2, 0.0]))
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 0)
    # the rounding goes to the last split cut from --data: never to one of fraction 0 (a one-example
    # test split), nor to one given as a file (which would drop that example)
    odd = write_jsonl(tmp_path / "odd.jsonl", synthetic(101))
    s = load_splits(quick_cfg(base_dir, odd, tmp_path, split=[0.7, 0.3, 0.0]))
    assert (len(s.train), len(s.val), len(s.test)) == (70, 31, 0)
    s = load_splits(quick_cfg(base_dir, odd, tmp_path, test_data=str(test)))  # train : val = 0.7 : 0.1
    assert (len(s.train), len(s.val), len(s.test)) == (88, 13, 9)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.lists(st.integers(0, 10), min_size=3, max_size=3).filter(any))
def test_split_by_fractions_uses_every_example_once(n, weights):
    fractions = [w / sum(weights) for w in weights]
    ex = [Example(f"t{i}", "a") for i in range(n)]
    parts = split_by_fractions(ex, fractions, 0)
    assert sorted(e.text for p in parts for e in p) == sorted(e.text for e in ex)
    assert all(not p for p, f in zip(parts, fractions) if f == 0)


def test_split_and_balance_follow_the_books_procedure():
    ex = [Example(f"t{i}", "spam" if i % 5 == 0 else "ham") for i in range(100)]
    bal = balance_classes(ex, 123)
    assert [e.label for e in bal] == ["ham"] * 20 + ["spam"] * 20  # ham sample first, then all spam
    ham = [e for e in ex if e.label == "ham"]
    # pandas' df.sample(n, random_state=123) draws RandomState(123).choice(len, n, replace=False)
    assert [e.text for e in bal[:20]] == [
        ham[i].text for i in np.random.RandomState(123).choice(80, 20, replace=False)
    ]
    train, val, test = split_by_fractions(bal, [0.7, 0.1, 0.2], 123)
    assert (len(train), len(val), len(test)) == (28, 4, 8)
    assert [e.text for e in train + val + test] == [
        bal[i].text for i in np.random.RandomState(123).permutation(40)
    ]


def test_label_set_order_and_unknown_labels():
    assert LabelSet.from_examples([Example("a", n) for n in ["10", "2", "1"]]).names == ["1", "2", "10"]
    assert LabelSet.from_examples([Example("a", n) for n in ["spam", "ham"]]).names == ["ham", "spam"]
    with pytest.raises(ScratchLLMError, match="--labels: labels must be distinct"):
        LabelSet(["a", "a"])
    with pytest.raises(ScratchLLMError, match=r"two classes, --labels has only \['a'\]; name every class"):
        LabelSet(["a"])
    with pytest.warns(
        UserWarning, match=r"the labels 'POS' and 'pos' differ only in case, so they are separate"
    ):
        labels = LabelSet.from_examples([Example("a", n) for n in ["pos", "POS", "neg"]])
    assert labels.names == ["POS", "neg", "pos"]


def test_reads_the_real_sms_spam_collection_and_makes_the_books_split():
    path = shared_file("SMSSpamCollection.tsv")
    assert spam.is_spam_file(path)
    messages = spam.read_spam(path)
    assert len(messages) == spam.N_MESSAGES == 5574
    assert sum(e.label == "spam" for e in messages) == 747
    assert any('"' in e.text for e in messages)
    train, val, test = spam.book_splits(messages)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    everything = train + val + test
    assert sum(e.label == "spam" for e in everything) == 747 and len({e.source for e in everything}) == 1494
    assert spam.book_splits(messages)[2] == test  # fixed seed: the same split every time


def _zip_with(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(spam.MEMBER, data)
        z.writestr("readme", b"the SMS Spam Collection")
    return buf.getvalue()


def test_download_checks_the_checksum_falls_back_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLLM_HOME", str(tmp_path / "home"))
    good = b"ham\thello\nspam\tWIN a prize\n"
    monkeypatch.setattr(spam, "SHA256", spam._sha256(good))
    calls = []

    def fake_fetch(url, timeout):
        calls.append(url)
        if url == spam.URLS[0]:
            return _zip_with(b"tampered")  # wrong checksum: the backup URL is tried
        return _zip_with(good)

    monkeypatch.setattr(spam, "_fetch", fake_fetch)
    path = spam.spam_file()
    assert calls == list(spam.URLS)
    assert path == tmp_path / "home" / "data" / "sms_spam" / "SMSSpamCollection" and path.read_bytes() == good
    assert spam.spam_file() == path and len(calls) == 2  # cached: no second download

    path.unlink()

    def offline(url, timeout):
        raise ScratchLLMError(f"{url}: no network")

    monkeypatch.setattr(spam, "_fetch", offline)
    with pytest.raises(ScratchLLMError, match=r"could not download.*--data PATH"):
        spam.spam_file()
    with pytest.raises(ScratchLLMError, match="not in the cache"):
        spam.spam_file(download=False)


def test_fetch_uses_urllib(monkeypatch):
    seen = {}

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    def fake_urlopen(url, timeout):
        seen["url"], seen["timeout"] = url, timeout
        return Response(b"zip bytes")

    monkeypatch.setattr(spam.urllib.request, "urlopen", fake_urlopen)
    assert spam._fetch("https://example.invalid/x.zip", 5) == b"zip bytes"
    assert seen == {"url": "https://example.invalid/x.zip", "timeout": 5}


# ----------------------------------------------------------------------------------------------
# metrics


def test_metrics_on_a_hand_checked_example():
    # true:  a a a a b b c ; pred: a a b c b b a
    y_true, y_pred = [0, 0, 0, 0, 1, 1, 2], [0, 0, 1, 2, 1, 1, 0]
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["confusion"] == [[2, 1, 1], [0, 2, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(4 / 7)
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"]) == pytest.approx((2 / 3, 2 / 4))
    assert a["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 1)
    text = format_report(m)
    assert "57.14%" in text and "confusion matrix" in text


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=60))
def test_metric_identities(pairs):
    y_true, y_pred = zip(*pairs)
    m = classification_metrics(y_true, y_pred, ["a", "b", "c", "d"])
    cm = np.array(m["confusion"])
    assert cm.sum() == len(pairs) and np.trace(cm) == sum(t == p for t, p in pairs)
    assert m["accuracy"] == pytest.approx(np.trace(cm) / len(pairs))
    for i, name in enumerate("abcd"):
        c = m["per_class"][name]
        assert c["support"] == sum(t == i for t in y_true)
        assert 0 <= c["f1"] <= max(c["precision"], c["recall"]) + 1e-12
    assert np.array_equal(confusion_matrix(y_true, y_pred, 4), cm)


# ----------------------------------------------------------------------------------------------
# command line


def test_cli_finetune_and_classify(base_dir, small_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        [
            "finetune",
            "classify",
            "--model",
            str(base_dir),
            "--data",
            str(small_file),
            "--out",
            str(out),
            "--trainable",
            "head",
            "--max-steps",
            "3",
            "--progress",
            "false",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and str(out / "model") in printed
    # a bare --resume continues with the run's settings (it took the defaults: --model gpt2, --data spam)
    assert cli.main(["finetune", "classify", "--out", str(out), "--resume", "--max-steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"resuming with the settings of {out / 'config.toml'}" in printed and "resumed from" in printed
    assert cli.main(["classify", "--model", str(out / "model"), "w1 good1", "bad3 w2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[0] in ("neg", "pos") and lines[0].endswith("w1 good1")

    src = write_jsonl(
        tmp_path / "in.jsonl", [{"id": 1, "text": "good2 w3"}, {"id": 2, "text": "bad1", "label": "neg"}]
    )
    assert (
        cli.main(
            [
                "classify",
                "--model",
                str(out / "model"),
                "--file",
                str(src),
                "--out",
                str(tmp_path / "o.jsonl"),
                "--device",
                "cpu",  # the API below runs on the CPU too: on a GPU the last bits would differ
            ]
        )
        == 0
    )
    recs = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == [1, 2] and recs[1]["given_label"] == "neg"
    assert all(set(r["probabilities"]) == {"neg", "pos"} and r["label"] in ("neg", "pos") for r in recs)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in recs)
    # a headerless TSV (as the SMS Spam Collection comes): the text column by its position
    tsv = tmp_path / "in.tsv"
    tsv.write_text("neg\tgood2 w3\nneg\tbad1\n")
    assert (
        cli.main(
            [
                "classify",
                "--model",
                str(out / "model"),
                "--file",
                str(tsv),
                "--header",
                "false",
                "--text-column",
                "1",
                "--out",
                str(tmp_path / "t.jsonl"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    from_tsv = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["probabilities"] for r in from_tsv] == [r["probabilities"] for r in recs]
    # the same through the Python API
    probs = Classifier.load(str(out / "model"), device="cpu").predict(["good2 w3", "bad1"])
    assert [p.probabilities for p in probs] == [r["probabilities"] for r in recs]
    import scratchllm

    llm = scratchllm.load(out / "model", device="cpu")
    assert llm.classify(["good2 w3", "bad1"]) == [
        {"label": r["label"], "probabilities": r["probabilities"]} for r in recs
    ]


def test_cli_errors_exit_2_with_one_line(base_dir, small_file, tmp_path, capsys):
    assert (
        cli.main(
            [
                "finetune",
                "classify",
                "--model",
                str(base_dir),
                "--data",
                str(small_file),
                "--out",
                str(tmp_path / "r"),
                "--text-column",
                "body",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no text column 'body'" in err
    assert cli.main(["classify", "--model", str(base_dir), "hello"]) == 2
    assert "not a classifier" in capsys.readouterr().err
    assert cli.main(["finetune", "classify", "--model", str(base_dir), "--trainable", "some"]) == 2
    assert "trainable must be one of" in capsys.readouterr().err
    sms = tmp_path / "SMSSpamCollection.tsv"  # known by its name: its layout is fixed
    sms.write_text("ham\thello there\nspam\twin a prize\n" * 20)
    assert (
        cli.main(
            [
                "finetune",
                "classify",
                "--model",
                str(base_dir),
                "--data",
                str(sms),
                "--out",
                str(tmp_path / "s"),
                "--text-column",
                "body",
                "--header",
                "false",
            ]
        )
        == 2
    )
    assert (
        "is the SMS Spam Collection, whose layout is known (label, tab, text; no header); leave out "
        "--text-column, --header" in capsys.readouterr().err
    )
    own_val = tmp_path / "val.csv"  # ... but with a validation file of one's own they describe that file
    own_val.write_text("sms,kind\nhello again,ham\nwin big,spam\n")
    assert (
        cli.main(
            [
                "finetune",
                "classify",
                "--model",
                str(base_dir),
                "--data",
                str(sms),
                "--val-data",
                str(own_val),
                "--text-column",
                "sms",
                "--label-column",
                "kind",
                "--out",
                str(tmp_path / "v"),
                "--max-steps",
                "1",
                "--eval-every",
                "0",
                "--progress",
                "false",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    # an output of the run that cannot be written is refused before the data and the model load
    (tmp_path / "c" / "confusion.png").mkdir(parents=True)
    assert (
        cli.main(
            [
                "finetune",
                "classify",
                "--model",
                str(base_dir),
                "--data",
                str(small_file),
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert (
        f"{tmp_path / 'c' / 'confusion.png'} is a directory, where the run writes a file"
        in capsys.readouterr().err
    )
    # LoRA settings without LoRA would be ignored silently
    assert (
        cli.main(["finetune", "classify", "--model", str(base_dir), "--lora-rank", "4", "--lora-alpha", "8"])
        == 2
    )
    assert "--lora-rank, --lora-alpha need --lora true" in capsys.readouterr().err
    assert cli.main(["finetune", "classify", "--model", str(base_dir), "--muon-momentum", "0.9"]) == 2
    assert "--muon-momentum needs --optimizer muon" in capsys.readouterr().err
    assert (
        cli.main(["classify", "--model", str(base_dir), "--file", str(small_file), "--batch-size", "0"]) == 2
    )
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err


def test_a_broken_sms_spam_file_is_one_line_naming_the_file_and_line(tmp_path):
    sms = tmp_path / "SMSSpamCollection.tsv"
    sms.write_text("")
    with pytest.raises(ScratchLLMError, match=rf"^{sms} has no messages; .*--data spam to download it$"):
        spam.read_spam(sms)
    sms.write_text("ham\thello\n\tno label here\nspam\twin\n")
    with pytest.raises(
        ScratchLLMError, match=rf"^{sms}:2: no label before the tab; .* ham or spam: fix the line"
    ):
        spam.read_spam(sms)
    sms.write_text("ham\thello\nspam\twin\neggs\ta third class\n")
    with pytest.raises(ScratchLLMError, match=rf"^{sms}:3: label 'eggs'; .*not named SMSSpamCollection"):
        spam.read_spam(sms)
    sms.write_text("ham\thello\nham\tbye\n")
    with pytest.raises(ScratchLLMError, match=rf"^{sms} has only ham messages; .*ham and spam"):
        spam.read_spam(sms)
    sms.write_text("\ufeffham\thello\r\nspam\twin\r\n")  # saved by a Windows editor
    assert [(e.label, e.text) for e in spam.read_spam(sms)] == [("ham", "hello"), ("spam", "win")]
    with pytest.raises(ScratchLLMError, match="no examples to balance"):
        balance_classes([], 123)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "has no messages"),
        ("ham\thi\nspam\twin\n\tlost\n", ":3: no label before the tab"),
        ("ham\thi\nspam\twin\nmaybe\thmm\n", ":3: label 'maybe'"),
    ],
    ids=["empty", "empty-label", "third-label"],
)
def test_a_broken_sms_spam_file_exits_2_from_the_cli(base_dir, tmp_path, capsys, content, message):
    sms = tmp_path / "SMSSpamCollection.tsv"
    sms.write_text(content * (1 if not content else 20))
    assert (
        cli.main(
            [
                "finetune",
                "classify",
                "--model",
                str(base_dir),
                "--data",
                str(sms),
                "--out",
                str(tmp_path / "run"),
                "--device",
                "cpu",
                "--progress",
                "false",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith(f"scratchllm: error: {sms}") and message in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "model").exists()


# ----------------------------------------------------------------------------------------------
# the command table (scratchllm/cli.py): classify's settings


def classify_settings_of(argv: list[str], config: str | None = None) -> ClassifyTextsSettings:
    args = table.build_parser(table.COMMANDS["classify"]).parse_args(["classify", *argv])
    return load_config(ClassifyTextsSettings, config, overrides_from_args(args))


def test_classify_flags_become_settings(tmp_path):
    s = classify_settings_of(["--model", "m", "one text", "another"])
    assert s == ClassifyTextsSettings(model="m", texts=["one text", "another"])
    assert (s.file, s.out, s.text_column, s.header, s.batch_size, s.device) == (
        None,
        None,
        "text",
        "true",
        32,
        "auto",
    )
    s = classify_settings_of(
        [
            "--model",
            "m",
            "--file",
            "in.tsv",
            "--out",
            "o.jsonl",
            "--text-column",
            "1",
            "--header",
            "false",
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert s == ClassifyTextsSettings("m", [], "in.tsv", "o.jsonl", "1", "false", 4, "cpu")
    with pytest.raises(SystemExit):  # --header takes true or false, as it always has
        classify_settings_of(["--model", "m", "--header", "no"])
    toml = tmp_path / "c.toml"
    toml.write_text('[data]\nfile = "in.csv"\nheader = "false"\n[model]\nbatch_size = 2\n')
    s = classify_settings_of(["--model", "m", "--batch-size", "5"], str(toml))
    assert (s.file, s.header, s.batch_size) == ("in.csv", "false", 5)  # the flag wins over the file


def test_classify_through_the_command_table(base_dir, small_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "classify", "--model", str(base_dir), "--data", str(small_file), "--out", str(out)]
    assert (
        table.main(
            [*argv, "--trainable", "head", "--max-steps", "2", "--progress", "false", "--device", "cpu"]
        )
        == 0
    )
    capsys.readouterr()
    model = str(out / "model")
    expected = Classifier.load(model, device="cpu").predict(["w1 good1", "bad3 w2"])
    assert table.main(["classify", "--model", model, "--device", "cpu", "w1 good1", "bad3 w2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [[p.label, f"{p.score:.4f}"] for p in expected]
    tsv = tmp_path / "in.tsv"
    tsv.write_text("neg\tw1 good1\npos\tbad3 w2\n")
    written = tmp_path / "o.jsonl"
    flags = ["--file", str(tsv), "--header", "false", "--text-column", "1", "--out", str(written)]
    assert table.main(["classify", "--model", model, "--device", "cpu", *flags]) == 0
    records = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["probabilities"] for r in records] == [p.probabilities for p in expected]
    assert "classified 2 texts into" in capsys.readouterr().out
    assert table.main(["classify", "--model", model]) == 2
    assert "nothing to classify: give texts, or --file IN.jsonl" in capsys.readouterr().err
    assert table.main(["classify", "--model", model, "--out", str(written), "a text"]) == 2
    assert capsys.readouterr().err.strip() == "scratchllm: error: --out needs --file"
