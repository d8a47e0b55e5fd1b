from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from scratchllm.cli import main
from scratchllm.config import tomllib
from scratchllm.errors import ScratchLLMError
from scratchllm.model.registry import SIZE_NAMES
from scratchllm.train.autosize import (
    Candidate,
    candidate_configs,
    choose,
    effective_tokens,
    estimate_speed,
    probe,
)
from scratchllm.train.pretrain import PretrainConfig

# the presets' sizes at this repo's 8192-id BPE, with speeds of the order a 2-core CPU trains them at
LADDER = [
    Candidate("nano", 128, 16, 630_000, 5_000.0),
    Candidate("micro", 256, 16, 1_900_000, 2_000.0),
    Candidate("mini", 256, 16, 6_900_000, 600.0),
    Candidate("small-cpu", 256, 16, 14_000_000, 300.0),
]
FAST = ["--eval-batches", "2", "--sample-tokens", "0", "--progress", "false", "--device", "cpu"]


def test_effective_tokens_count_new_text_fully_and_repeats_less_up_to_a_ceiling():
    assert effective_tokens(5_000, 10_000) == 5_000
    assert effective_tokens(10_000, 10_000) == 10_000
    values = [effective_tokens(e * 10_000, 10_000, repeat_epochs=4.0) for e in (2, 4, 8, 100, 10_000)]
    assert values == sorted(values) and all(b - a > 0 for a, b in itertools.pairwise(values))
    assert 10_000 * 4.99 < values[-1] <= 10_000 * 5  # at most N (1 + R)
    assert values[0] < 20_000  # a second epoch is worth less than new text


def test_the_rule_grows_the_model_with_the_budget_and_never_past_what_the_corpus_supports():
    budgets = [10, 60, 300, 900, 3_600, 36_000, 360_000]
    for corpus in (100_000, 300_000, 1_000_000, 100_000_000):
        sizes = [choose(LADDER, s, corpus).candidate.params for s in budgets]
        assert sizes == sorted(sizes), (corpus, sizes)
    for seconds in budgets:
        sizes = [choose(LADDER, seconds, n).candidate.params for n in (10_000, 100_000, 1_000_000, 10**8)]
        assert sizes == sorted(sizes), (seconds, sizes)
    assert choose(LADDER, 1, 100_000).candidate.size == "nano"  # nothing fits: the smallest
    assert choose(LADDER, 10**7, 10**9).candidate.size == "small-cpu"
    # a large model's first steps are worth less than a small model's many
    assert [choose(LADDER, s, 10**8).candidate.size for s in (60, 600, 1800)] == ["nano", "micro", "mini"]
    # a small corpus caps the model however long the budget: repeats stop paying
    assert choose(LADDER, 10**7, 20_000).candidate.size == "micro"
    with pytest.raises(ValueError):
        choose([], 60, 1_000)


def test_the_probe_measures_the_smallest_shape_and_estimates_the_rest_when_out_of_time():
    cfg = PretrainConfig(device="cpu", precision="fp32", max_minutes=1.0)
    configs = candidate_configs(cfg, vocab_size=512)
    assert [size for size, _, _ in configs] == list(SIZE_NAMES)
    tokens = np.random.default_rng(0).integers(0, 512, 5_000).astype(np.uint16)
    found = probe(configs, tokens, cfg, max_seconds=0.0)
    assert [c.probed for c in found] == [True, False, False, False]
    assert all(c.tokens_per_s > 0 for c in found)
    speeds = [c.tokens_per_s for c in found]
    assert speeds == sorted(speeds, reverse=True)  # more FLOPs per token, fewer tokens per second
    params = [c.params for c in found]
    assert params == sorted(params) and params[0] > 64 * 512  # counted from the real shapes (meta device)


def test_speeds_of_unprobed_shapes_follow_their_flops():
    def speed(flops):  # 20 us per token whatever the shape, and 1 ns per FLOP
        return 1 / (2e-5 + 1e-9 * flops)

    assert estimate_speed([(1e6, 1000.0)], 4e6) == pytest.approx(250.0)  # one shape: in proportion
    two = [(1e6, speed(1e6)), (4e6, speed(4e6))]
    assert estimate_speed(two, 15e6) == pytest.approx(speed(15e6))
    assert estimate_speed([(1e6, 500.0), (4e6, 800.0)], 15e6) == pytest.approx(800.0 * 4 / 15)  # noise


def test_auto_needs_a_time_budget():
    with pytest.raises(ScratchLLMError, match="--model auto sizes the model to a time budget"):
        PretrainConfig(model="auto").validate()
    PretrainConfig(model="auto", max_minutes=1.0).validate()


def test_auto_trains_the_shape_it_prints_and_a_resume_keeps_it(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--corpus", "builtin", "--vocab-size", "512", "--out-dir", str(out), *FAST]
    assert main([*argv, "--model", "auto", "--max-minutes", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert "auto: nano (" in printed and "auto: why:" in printed and "probe:" in printed
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["model"]["model"] == "nano" and saved["model"]["context_length"] == 128  # nano's own
    assert 0 < saved["train"]["max_minutes"] <= 0.05  # the budget less the probe's time
    shape = json.loads((out / "model" / "config.json").read_text())["model"]

    resumed = ["pretrain", "--out-dir", str(out), "--resume", "--max-minutes", "0.08", *FAST]
    assert main(resumed) == 0
    assert "auto:" not in capsys.readouterr().out  # no second probe: the saved shape
    assert json.loads((out / "model" / "config.json").read_text())["model"] == shape

    assert main([*resumed, "--model", "auto"]) == 2
    assert "the run keeps the shape it chose" in capsys.readouterr().err


def test_auto_without_a_budget_is_a_one_line_error(tmp_path, capsys):
    assert main(["pretrain", "--model", "auto", "--out-dir", str(tmp_path / "r"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--max-minutes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
