from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from scratchllm.checkpoint import load_model
from scratchllm.cli import main
from scratchllm.fileio import directory_kind
from scratchllm.train.evaluate import evaluate_text, token_loss

FAST = [
    "--model",
    "nano",
    "--context-length",
    "32",
    "--batch-size",
    "4",
    "--eval-batches",
    "2",
    "--warmup-steps",
    "2",
    "--progress",
    "false",
    "--sample-tokens",
    "8",
    "--sample-prompts",
    "the",
    "--workers",
    "1",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    words = ["alpha", "beta", "gamma", "delta", "the", "cat", "sat", "on", "mat", "and", "ran"]
    rng = np.random.default_rng(0)
    for i in range(20):  # several documents, so the split is by document
        text = " ".join(words[j] for j in rng.integers(0, len(words), 1000))
        (root / f"doc{i}.txt").write_text(text + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert (
        main(
            [
                "pretrain",
                "--corpus",
                str(corpus),
                "--vocab-size",
                "280",
                "--max-steps",
                "30",
                "--eval-every",
                "15",
                "--val-fraction",
                "0.2",
                "--out-dir",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    return out


def test_pretrain_writes_a_usable_model_and_samples(trained, capsys):
    records = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30]
    assert all(s.startswith("the") for s in evals[-1]["samples"])
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(280)
    loaded = load_model(trained / "model")
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == 280
    assert loaded.config.context_length == 32
    meta = json.loads((trained / "data" / "meta.json").read_text())
    assert meta["split"]["method"] == "documents" and meta["documents"] == 20 and meta["val_documents"] > 0
    assert "[train]" in (trained / "config.toml").read_text()


def test_evaluate_reports_loss_perplexity_and_bits_per_byte(trained, corpus, capsys):
    """Every token of every document is predicted once (after an <|endoftext|> that is context only),
    so bits per byte is the text's own: its loss in bits over its UTF-8 bytes."""
    loaded = load_model(trained / "model")
    tok = loaded.tokenizer
    texts = [(corpus / f"doc{i}.txt").read_text(encoding="utf-8") for i in (0, 1)]
    docs = [tok.encode(t) for t in texts]
    stream = [tok.eot_id, *docs[0], tok.eot_id, *docs[1], tok.eot_id]

    def independent(stream: list[int]) -> tuple[float, int]:  # windows of 32, overlapping by one token
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(stream) - 1, 32):
                chunk = torch.tensor(stream[start : start + 33])[None]
                losses = torch.nn.functional.cross_entropy(
                    loaded.model(chunk[:, :-1])[0], chunk[0, 1:], reduction="none"
                )
                keep = chunk[0, 1:] != tok.eot_id
                total, count = total + losses[keep].sum().item(), count + int(keep.sum())
        return total, count

    total, count = independent(stream)
    assert count == len(docs[0]) + len(docs[1])
    n_bytes = sum(len(t.encode()) for t in texts)
    paths = [str(corpus / "doc0.txt"), str(corpus / "doc1.txt")]
    for max_tokens in (0, count, 10**8):  # a limit past the end changes nothing
        result = evaluate_text(str(trained / "model"), paths, batch_size=3, max_tokens=max_tokens)
        assert result["tokens"] == count and result["bytes"] == n_bytes
        assert result["loss"] == pytest.approx(total / count, rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
        assert result["bits_per_byte"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-5)
    # a limit inside the second document: that document's beginning, its bytes exactly
    cut = len(docs[0]) + 7
    part_total, part_count = independent([tok.eot_id, *docs[0], tok.eot_id, *docs[1][:7]])
    result = evaluate_text(str(trained / "model"), paths, batch_size=3, max_tokens=cut)
    part_bytes = len(texts[0].encode()) + len(tok.decode_bytes(docs[1][:7]))
    assert result["tokens"] == part_count == cut and result["bytes"] == part_bytes
    assert result["bits_per_byte"] == pytest.approx(part_total / math.log(2) / part_bytes, rel=1e-5)
    assert (
        main(
            ["perplexity", "--model", str(trained / "model"), "--corpus", str(corpus / "doc0.txt"), "--json"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["tokens"] == len(docs[0])
    for flags, message in (
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--context-length", "-5"], "--context-length must be >= 1"),
        (["--max-tokens", "-1"], "--max-tokens must be >= 0 (0: all), got -1"),
    ):
        assert (
            main(
                [
                    "perplexity",
                    "--model",
                    str(trained / "model"),
                    "--corpus",
                    str(corpus / "doc0.txt"),
                    *flags,
                ]
            )
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_token_loss_counts_every_prediction_once_and_equals_the_logits_cross_entropy():
    from scratchllm.model.gpt import GPTModel, preset_config

    torch.manual_seed(0)
    model = GPTModel(preset_config("nano", vocab_size=10, context_length=8)).eval()
    tokens = np.arange(23) % 10
    total, count = token_loss(model, tokens, context_length=5, batch_size=2)
    assert count == 22
    expected = 0.0  # windows 0-5, 5-10, ..., 20-22: every token after the first predicted once
    with torch.no_grad():
        for start in range(0, 22, 5):
            chunk = torch.as_tensor(tokens[start : start + 6])[None]
            logits = model(chunk[:, :-1])
            expected += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
    assert total == pytest.approx(expected, rel=1e-6)


def test_continue_pretraining_from_a_model_directory(trained, corpus, tmp_path):
    out = tmp_path / "more"
    fast = FAST[2:]  # the shape comes from the model: no --model
    assert (
        main(
            [
                "pretrain",
                "--init-from",
                str(trained / "model"),
                "--corpus",
                str(corpus),
                "--max-steps",
                "4",
                "--eval-every",
                "0",
                "--out-dir",
                str(out),
                *fast,
            ]
        )
        == 0
    )
    a, b = load_model(trained / "model"), load_model(out / "model")
    assert a.tokenizer.fingerprint() == b.tokenizer.fingerprint()
    assert not torch.equal(a.model.tok_emb.weight, b.model.tok_emb.weight)


def test_continuing_a_bf16_model_trains_fp32_weights(trained, corpus, tmp_path):
    """A model stored in bf16 (a converted bf16 download, say) is trained in fp32 weights: bf16 ones
    would round most small updates away. Autocast still computes in bf16 where that is the setting."""
    from scratchllm.checkpoint import save_model

    base = load_model(trained / "model")
    save_model(tmp_path / "bf16", base.model.to(torch.bfloat16), base.tokenizer)
    out = tmp_path / "more"
    assert (
        main(
            [
                "pretrain",
                "--init-from",
                str(tmp_path / "bf16"),
                "--corpus",
                str(corpus),
                "--max-steps",
                "3",
                "--eval-every",
                "0",
                "--lr",
                "1e-5",
                "--min-lr",
                "1e-6",
                "--out-dir",
                str(out),
                *FAST[2:],
            ]
        )
        == 0
    )
    after = load_model(out / "model").model.tok_emb.weight
    before = load_model(tmp_path / "bf16").model.tok_emb.weight
    assert after.dtype == torch.float32
    assert (after != before.float()).float().mean() > 0.9  # nearly every weight moved (bf16: a fraction)


def test_init_from_a_model_without_a_tokenizer_asks_for_one(trained, corpus, tmp_path, capsys):
    from scratchllm.checkpoint import save_model

    save_model(tmp_path / "bare", load_model(trained / "model").model)  # weights and config only
    argv = [
        "pretrain",
        "--init-from",
        str(tmp_path / "bare"),
        "--corpus",
        str(corpus),
        "--max-steps",
        "2",
        "--out-dir",
        str(tmp_path / "more"),
        *FAST[2:],
    ]
    assert main(argv) == 2
    assert (
        "has no tokenizer files, and one trained here would not match its embeddings"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "more" / "tokenizer").exists()  # refused before training one
    assert main([*argv, "--tokenizer", str(trained / "model")]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lrr", "0.1"], "unrecognized arguments: --lrr 0.1; did you mean --lr?"),
        (["--batch-size", "x"], "batch_size = 'x' is not a valid int"),
        (["--model", "giant"], "unknown model preset 'giant'"),
        (["--corpus", "/nonexistent/file.txt"], "corpus source '/nonexistent/file.txt' not found"),
        (["--schedule", "step"], "schedule must be one of cosine, linear, constant"),
        (["--config", "nope"], "config 'nope' is neither a file nor a preset"),
        (["--lr", "nan"], "lr must be a finite number, got nan"),
        (["--grad-clip", "-1"], "grad_clip must be >= 0, got -1.0"),
        (["--gelu", "erf"], "gelu must be tanh or exact, got 'erf'"),
        (
            ["--data", "/nonexistent/prepared"],
            "--data /nonexistent/prepared does not exist; make it with `scratchllm prepare",
        ),
        # flags that would be silently ignored
        (["--data", "d", "--corpus", "a.txt"], "--corpus and --data d both give the training text; give one"),
        (["--init-from", "gpt2", "--model", "mini"], "leave out --model"),
        (["--init-from", "gpt2", "--arch", "qwen3"], "leave out --arch"),
        # model families
        (["--arch", "llama3", "--gelu", "exact"], "--gelu: not a setting of llama3 models"),
        (["--arch", "gpt2", "--n-kv-groups", "2"], "--n-kv-groups: not a setting of gpt2 models"),
        (["--arch", "llama3", "--model", "qwen3-0.6b"], "'qwen3-0.6b' is a qwen3 model, not llama3"),
        (["--arch", "mamba"], "unknown model architecture 'mamba'"),
        (["--arch", "qwen3", "--n-kv-groups", "3"], "must be divisible by n_kv_groups"),
        (["--init-from", "gpt2", "--tokenizer", "char"], "keeps its model's tokenizer"),
        # refused before the model is loaded (or downloaded: gpt2 is not in this test's cache)
        (
            ["--init-from", "gpt2", "--gelu", "exact"],
            "fixes the model's architecture, which gelu would change",
        ),
        (
            ["--config", "shakespeare-char", "--corpus", "builtin", "--init-from", "gpt2"],
            "which emb_dim, n_layers, n_heads, gelu would",
        ),
        # a preset made for one corpus, which it cannot ship, says so instead of training on the built-in docs
        (["--config", "shakespeare-char-muon"], "no training text: give --corpus"),
        (["--muon-momentum", "0.9"], "--muon-momentum needs --optimizer muon"),
        (["--tokenizer", "char", "--vocab-size", "500"], "--tokenizer char has its own vocabulary"),
        (["--data", "d", "--vocab-size", "500"], "--data d's tokenizer has its own vocabulary"),
        (["--out", "elsewhere"], "name two run directories; give one"),
        # refused before the tokenizer and the data are made (nothing written)
        (["--max-steps", "0"], "max_steps is 0; give --max-steps"),
        (
            ["--tokenizer", "chr"],
            "--tokenizer chr: no such tokenizer; give train (a BPE trained on the corpus), char",
        ),
        (
            ["--resume", "--overwrite", "true"],
            "--resume continues the run and --overwrite true starts it over",
        ),
        (["--resume", "--overwrite", "false"], "--resume: no checkpoint in"),  # false is not overwriting
        (["--resume", "--overwrite"], "--resume continues the run and --overwrite true starts it over"),
        (["--precision", "fp16", "--device", "cpu"], "precision fp16 is not supported on CPU"),
        (["--fsdp", "true"], "--fsdp shards a model over processes: start the run with torchrun"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        code = main(["pretrain", "--out-dir", str(tmp_path / "x"), *args])
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x" / "model").exists()
    if "--data" not in args and "--init-from" not in args:
        assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_a_fresh_run_never_mixes_with_an_earlier_runs_checkpoints(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    base = [
        "pretrain",
        "--corpus",
        str(corpus),
        "--vocab-size",
        "280",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "4",
        *FAST,
    ]
    argv = [*base, "--out-dir", str(out)]
    assert main([*argv, "--max-steps", "8"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000008"]
    # the kinds that outputs check before replacing a directory, by the files the run wrote
    kinds = {
        p: directory_kind(out / p) for p in (".", "checkpoints/step-000008", "model", "data", "tokenizer")
    }
    assert kinds == {
        ".": "run directory",
        "checkpoints/step-000008": "checkpoint",
        "model": "model directory",
        "data": "prepared data directory",
        "tokenizer": "tokenizer directory",
    }
    capsys.readouterr()
    assert main([*argv, "--max-steps", "4"]) == 2  # would leave step-8 as the newest for --resume
    err = capsys.readouterr().err.strip()
    assert "holds the checkpoints of an earlier run (the last: step-000008)" in err and "--resume" in err
    assert len(err.splitlines()) == 1 and (out / "checkpoints" / "step-000008").exists()
    assert main([*argv, "--max-steps", "4", "--overwrite", "true"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 4  # the earlier run's metrics are gone too
    assert main([*argv, "--max-steps", "6", "--resume"]) == 0  # continuing is always allowed
    # the refusal comes before any work: nothing is written into a new directory
    other = tmp_path / "other"
    assert main([*base, "--out-dir", str(other), "--resume"]) == 2
    assert "--resume: no checkpoint" in capsys.readouterr().err and not other.exists()
    other.write_text("a file")
    assert main([*base, "--out-dir", str(other)]) == 2
    assert "is a file; give a directory for the run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make, culprit",
    [
        (
            lambda out: (out / "best").mkdir(parents=True) or (out / "best" / "notes.txt").write_text("x"),
            "best",
        ),
        (lambda out: (out / "data" / "raw").mkdir(parents=True), "data"),
        (lambda out: (out / "tokenizer" / "x").mkdir(parents=True), "tokenizer"),
        (lambda out: (out / "metrics.jsonl").mkdir(parents=True), "metrics.jsonl"),
        (lambda out: (out / "loss.png").mkdir(parents=True), "loss.png"),
        (lambda out: out.mkdir() or (out / "checkpoints").write_text("x"), "checkpoints"),
    ],
)
def test_an_out_dir_whose_outputs_cannot_be_written_is_refused_before_any_work(
    make, culprit, tmp_path, capsys
):
    """A folder of the user's own where the run writes model/, best/, data/... failed only at its
    first save (best/: the first evaluation), after the tokenizer, the data and training."""
    out = tmp_path / "mine"
    make(out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["pretrain", "--corpus", "builtin", "--out-dir", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"--out-dir {out} cannot hold this run: {out / culprit} " in err and err.count("\n") == 1
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written
    # the same folder is fine when the run does not write that output there
    if culprit == "data":
        prepared = tmp_path / "prepared"
        tok = tmp_path / "tok"
        assert (
            main(["tokenizer", "train", "--corpus", "builtin", "--vocab-size", "260", "--out", str(tok)]) == 0
        )
        assert main(["prepare", "--corpus", "builtin", "--tokenizer", str(tok), "--out", str(prepared)]) == 0
        assert (
            main(["pretrain", "--data", str(prepared), "--out-dir", str(out), "--max-steps", "2", *FAST]) == 0
        )


def test_a_run_directory_in_use_is_refused_before_the_tokenizer_and_data(tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "a") as held:  # as a run training there holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert (
            main(["pretrain", "--corpus", "builtin", "--out-dir", str(out), "--max-steps", "2", *FAST]) == 2
        )
        assert "another process is training in" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no tokenizer/, no data/


def test_corpus_shorter_than_a_window(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("hi there\n", encoding="utf-8")
    code = main(
        ["pretrain", "--corpus", str(small), "--vocab-size", "260", "--out-dir", str(tmp_path / "r"), *FAST]
    )
    err = capsys.readouterr().err
    assert code == 2 and "fewer than one window of 32" in err and err.count("\n") == 1


def test_prepared_data_brings_its_own_tokenizer(trained, tmp_path, capsys):
    out = tmp_path / "r"
    assert (
        main(["pretrain", "--data", str(trained / "data"), "--out-dir", str(out), "--eval-every", "0", *FAST])
        == 0
    )
    assert "training a byte-level BPE" not in capsys.readouterr().out  # nothing to train: the data's is used
    assert (
        load_model(out / "model").tokenizer.fingerprint()
        == load_model(trained / "model").tokenizer.fingerprint()
    )


def test_prepared_data_with_another_tokenizer_is_refused(trained, tmp_path, capsys, monkeypatch):
    from tests.conftest import shared_file

    monkeypatch.setenv("SCRATCHLLM_GPT2_TOKENIZER", str(shared_file("gpt2.tiktoken")))
    code = main(
        [
            "pretrain",
            "--data",
            str(trained / "data"),
            "--tokenizer",
            "gpt2",
            "--out-dir",
            str(tmp_path / "r"),
            *FAST,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "was prepared with tokenizer" in err


@pytest.mark.parametrize(
    "command", [["pretrain"], ["demo"], ["finetune", "classify"], ["finetune", "instruct"]]
)
def test_training_commands_share_out_resume_and_config_flags(command):
    from scratchllm.cli import COMMANDS, build_parser, training_overrides

    parser = build_parser(COMMANDS[" ".join(command)])
    args = parser.parse_args([*command, "--out", "runs/x", "--resume", "--batch-size", "4"])
    assert training_overrides(args) == {"out_dir": "runs/x", "batch_size": "4"}  # typed by load_config
    assert args.resume == "latest"
    assert getattr(args, "config", None) is None
    same = parser.parse_args([*command, "--out", "runs/x", "--out-dir", "./runs/x/"])
    assert training_overrides(same) == {"out_dir": "runs/x"}  # the same directory twice is fine
    if command != ["demo"]:  # the demo is its preset; the others take a TOML file or preset name
        assert parser.parse_args([*command, "--config", "c.toml"]).config == "c.toml"


def test_prepared_data_without_a_validation_split_says_how_to_prepare_it(trained, corpus, tmp_path, capsys):
    data = tmp_path / "data"
    assert (
        main(
            [
                "prepare",
                "--corpus",
                str(corpus),
                "--tokenizer",
                str(trained / "model"),
                "--out",
                str(data),
                "--val-fraction",
                "0",
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["pretrain", "--data", str(data), "--out-dir", str(tmp_path / "run"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "has 0 validation tokens (--val-fraction 0); re-run `scratchllm prepare` with --val-fraction 0.1"
        in err
    )
    assert len(err.splitlines()) == 1 and not (tmp_path / "run" / "model").exists()
    # a corpus too short for any validation tokens at 0.1 needs more text, not the same setting again
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi", encoding="utf-8")
    assert (
        main(
            [
                "prepare",
                "--corpus",
                str(tiny),
                "--tokenizer",
                str(trained / "model"),
                "--out",
                str(tmp_path / "tiny"),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(["pretrain", "--data", str(tmp_path / "tiny"), "--out-dir", str(tmp_path / "run"), *FAST]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "validation tokens (--val-fraction 0.1); re-run `scratchllm prepare` with more text" in err


def test_a_run_started_with_relative_paths_resumes_from_another_directory(
    corpus, tmp_path, monkeypatch, capsys
):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "text").symlink_to(corpus)
    monkeypatch.chdir(tmp_path / "project")
    argv = [
        "pretrain",
        "--corpus",
        "text",
        "--out-dir",
        "runs/a",
        "--tokenizer",
        "char",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "2",
        *FAST,
    ]
    assert main([*argv, "--max-steps", "2"]) == 0
    out = tmp_path / "project" / "runs" / "a"
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["pretrain", "--out-dir", str(out), "--resume", "--max-steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "resuming on other data" not in printed  # the same corpus, reused
    assert not (tmp_path / "runs").exists()  # nothing written relative to the new directory
    assert max(json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()) == 4


def test_resume_continues_the_run_as_it_was_set_up(corpus, tmp_path, capsys, monkeypatch):
    """A bare `--resume` takes the run's config.toml (the flags given change it); a tokenizer setting
    that differs from the checkpoint's is refused before anything in the run is replaced; changed
    data is said; another run's checkpoint is never continued inside an existing run."""
    out = tmp_path / "run"
    base = [
        "pretrain",
        "--corpus",
        str(corpus),
        "--tokenizer",
        "char",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "2",
        *FAST,
    ]
    assert main([*base, "--max-steps", "4", "--out-dir", str(out)]) == 0
    tok_files = {p.name: p.read_bytes() for p in (out / "tokenizer").iterdir()}
    capsys.readouterr()
    assert main(["pretrain", "--out-dir", str(out), "--resume", "--max-steps", "6"]) == 0
    printed = capsys.readouterr().out
    assert f"resuming with the settings of {out / 'config.toml'}" in printed and "resumed from" in printed
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 6 and load_model(out / "model").tokenizer.kind == "char"
    # another tokenizer kind (or size) than the run's: refused, the run's tokenizer left alone
    from scratchllm.text.bpe import train_bpe

    saved = train_bpe(
        [(corpus / "doc0.txt").read_text(encoding="utf-8")], vocab_size=270, progress=False
    ).save(tmp_path / "bpe")
    for flags in (["--tokenizer", "train", "--vocab-size", "300"], ["--tokenizer", str(saved)]):
        assert main(["pretrain", "--out-dir", str(out), "--resume", "--max-steps", "8", *flags]) == 2
        err = capsys.readouterr().err
        assert "was trained with the tokenizer 'char'" in err and "resume with the run's settings" in err, err
        assert {p.name: p.read_bytes() for p in (out / "tokenizer").iterdir()} == tok_files
    # other text: goes on with the run's tokenizer, and says the continuation is not the stopped run's
    other = tmp_path / "other.txt"
    other.write_text((corpus / "doc0.txt").read_text(encoding="utf-8")[::-1] * 3, encoding="utf-8")
    assert (
        main(["pretrain", "--out-dir", str(out), "--resume", "--max-steps", "8", "--corpus", str(other)]) == 0
    )
    assert "warning: resuming on other data" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (out / "tokenizer").iterdir()} == tok_files
    # a checkpoint of another run: a fork into a new directory, never spliced into this one
    fork = tmp_path / "fork"
    last = out / "checkpoints" / "step-000008"
    assert main([*base, "--max-steps", "10", "--out-dir", str(fork), "--resume", str(last)]) == 0
    capsys.readouterr()
    # ... which takes the settings of the run it comes from (it took the defaults: another model)
    bare = tmp_path / "bare-fork"
    assert main(["pretrain", "--resume", str(last), "--out-dir", str(bare), "--max-steps", "10"]) == 0
    assert f"resuming with the settings of {out / 'config.toml'}" in capsys.readouterr().out
    assert load_model(bare / "model").config == load_model(fork / "model").config
    # without --out-dir: the default directory, never the run it comes from (which it would rewind)
    monkeypatch.chdir(tmp_path)
    metrics = (out / "metrics.jsonl").read_bytes()
    assert main(["pretrain", "--resume", str(out / "checkpoints" / "step-000006"), "--max-steps", "8"]) == 0
    assert (tmp_path / "runs" / "run" / "model").is_dir() and (out / "metrics.jsonl").read_bytes() == metrics
    # a new --out-dir that holds settings of its own (no checkpoints) still forks with the source's;
    # a user's config.toml there is never overwritten, an earlier run's (stopped before a checkpoint) is
    fork_argv = ["pretrain", "--resume", str(last), "--out-dir", str(tmp_path / "mine"), "--max-steps", "10"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.toml").write_text('[model]\nmodel = "micro"\n')
    capsys.readouterr()
    assert main(fork_argv) == 2
    assert "config.toml is not an earlier run's" in capsys.readouterr().err
    (tmp_path / "mine" / ".lock").touch()
    assert main(fork_argv) == 0
    assert f"resuming with the settings of {out / 'config.toml'}" in capsys.readouterr().out
    assert (
        main(
            [
                *base,
                "--max-steps",
                "12",
                "--out-dir",
                str(out),
                "--resume",
                str(fork / "checkpoints" / "step-000010"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "is not a checkpoint of" in err and "give a new --out-dir" in err and err.count("\n") == 1


@pytest.mark.parametrize("entry", ["scratchllm.cli"])
def test_the_demo_prints_the_trained_models_samples_once_and_a_runnable_next_command(
    corpus, tmp_path, capsys, entry
):
    import importlib

    from scratchllm.hints import scratchllm_command

    out = tmp_path / "demo"
    assert (
        importlib.import_module(entry).main(
            [
                "demo",
                "--corpus",
                str(corpus),
                "--vocab-size",
                "280",
                "--max-steps",
                "3",
                "--eval-every",
                "0",
                "--val-fraction",
                "0.2",
                "--out-dir",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    [last] = [
        r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"
    ]
    assert last["step"] == 3 and last["samples"]
    for sample in last["samples"]:
        assert printed.count(repr(sample)) == 1, printed
    assert f"next: {scratchllm_command()} generate --model {out / 'model'} --prompt 'The'" in printed
