"""`scratchllm pretrain`: next-token prediction on a corpus, wired into the one trainer.

The flow of one run directory (`out_dir`):
  tokenizer/   the tokenizer (GPT-2's, a given one, or a byte-level BPE trained on the corpus right here)
  data/        the corpus tokenized once into memory-mapped train/val files (text/prepare.py), unless
               `data` points at a directory prepared earlier
  checkpoints/ resumable checkpoints; best/ and model/ are plain model directories
  metrics.jsonl, loss.png, config.toml (the resolved settings)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import dump_toml, load_config, setting
from ..device import pick_device, resolve_precision
from ..errors import ScratchLLMError
from ..fileio import CHECKPOINTS_DIR, DATA_META_FILE, METRICS_FILE, TOKENIZER_META_FILE
from ..generation import Engine, GenerationConfig
from ..hints import next_hint, quote
from ..hub import check_model_spec
from ..model import registry
from ..model.gpt import count_parameters
from ..model.registry import DEFAULT_ARCHITECTURE, architecture_of_preset, get_architecture, preset_config
from ..text.sampling import TokenWindows
from ..text.tokenizer import Tokenizer
from .autosize import AUTO, check_auto, resolve_auto
from .distributed import init_distributed
from .evaluate import next_token_loss, perplexity, token_loss
from .pretrain_data import TRAINED_HERE, resolve_data, resolve_tokenizer
from .rundir import PLOT_FILE, RUN_CONFIG_FILE, check_run_start, run_lock, settings_to_resume
from .setup import setup_model
from .task import Task, TrainResult
from .trainer import Trainer
from .trainer_config import TrainerConfig

# model settings that --init-from cannot change (context_length may shrink, drop_rate may change)
ARCHITECTURE_KEYS = (
    "emb_dim",
    "n_layers",
    "n_heads",
    "qkv_bias",
    "tie_weights",
    "gelu",
    "n_kv_groups",
    "head_dim",
    "hidden_dim",
    "n_experts",
    "n_experts_per_tok",
    "moe_hidden_dim",
    "sliding_window",
    "rope_base",
)
MODEL_KEYS = ("context_length", "drop_rate", *ARCHITECTURE_KEYS)


@dataclass
class PretrainConfig(TrainerConfig):
    """Everything `scratchllm pretrain` needs; TOML sections [data], [model], [train], [eval], [system],
    [run]."""

    corpus: list[str] = setting(
        ["builtin"],
        "text sources: files, directories, globs, builtin, hf:NAME[:SPLIT]",
        "data",
        path=("builtin",),
    )
    data: str | None = setting(
        None, "a directory written by `scratchllm prepare` (instead of --corpus)", "data", path=True
    )
    tokenizer: str = setting(
        "train",
        "train (a BPE on the corpus), char (one id per character), gpt2, or a tokenizer/model dir; "
        "with --data: the prepared data's own (train and char have nothing to train on), unless a "
        "tokenizer is named",
        "data",
        path=(*TRAINED_HERE, "gpt2"),
    )
    vocab_size: int = setting(8192, "vocabulary of the BPE trained when tokenizer = train", "data")
    val_fraction: float = setting(
        0.1,
        "chance of each document to be held out for validation (drawn per document, so the share of "
        "tokens varies; when all land on one side, the last tokens)",
        "data",
    )
    encoding_errors: str = setting("strict", "non-UTF-8 bytes: strict (error) or replace", "data")
    workers: int = setting(
        0, "tokenizer processes for preparing the corpus (0: one per core and 16 MB of text)", "data"
    )
    model: str = setting(
        "micro",
        "model preset: a size (nano, micro, mini, small-cpu) of --arch, a named shape such as gpt2-medium "
        "or qwen3-0.6b (see `scratchllm info --list`), or auto: the size, context and batch that suit "
        "--max-minutes on this machine and corpus (train/autosize.py)",
        "model",
    )
    arch: str | None = setting(
        None,
        "model family: gpt2, llama3, qwen3, qwen3-moe or gemma3 (none: the named preset's, gpt2 for sizes)",
        "model",
    )
    init_from: str | None = setting(
        None, "continue from a model directory or GPT-2 (gpt2, gpt2-medium, ...)", "model", path="dir"
    )
    context_length: int | None = setting(
        None, "tokens per training sequence (default: the preset's)", "model"
    )
    emb_dim: int | None = setting(None, "override the preset's embedding size", "model")
    n_layers: int | None = setting(None, "override the preset's number of transformer blocks", "model")
    n_heads: int | None = setting(None, "override the preset's number of attention heads", "model")
    drop_rate: float | None = setting(None, "override the preset's dropout rate", "model")
    qkv_bias: bool | None = setting(None, "override: biases in the query/key/value projections", "model")
    tie_weights: bool | None = setting(
        None, "override: share the token embedding with the output head", "model"
    )
    gelu: str | None = setting(
        None,
        "override (gpt2): GELU as tanh (GPT-2's approximation) or exact (with erf, as nanoGPT); none: the "
        "preset's",
        "model",
    )
    n_kv_groups: int | None = setting(
        None, "override (llama3, qwen3, gemma3): key/value heads shared by the query heads", "model"
    )
    head_dim: int | None = setting(None, "override (not gpt2): the width of one attention head", "model")
    hidden_dim: int | None = setting(None, "override (not gpt2): the gated MLP's width", "model")
    n_experts: int | None = setting(None, "override (qwen3-moe): experts per block", "model")
    n_experts_per_tok: int | None = setting(None, "override (qwen3-moe): experts each token uses", "model")
    moe_hidden_dim: int | None = setting(None, "override (qwen3-moe): one expert's MLP width", "model")
    sliding_window: int | None = setting(
        None, "override (gemma3): positions a query of a local layer sees", "model"
    )
    rope_base: float | None = setting(None, "override (not gpt2): the rotary embeddings' base", "model")
    sample_prompts: list[str] = setting(
        ["The", "A function", "In Python,"], "prompts sampled at each evaluation", "eval"
    )
    sample_tokens: int = setting(40, "tokens generated per sample (0: no samples)", "eval")
    sample_temperature: float = setting(0.8, "sampling temperature (0: greedy)", "eval")
    sample_top_k: int = setting(40, "sample among the k most likely tokens", "eval")

    def model_overrides(self) -> dict[str, Any]:
        """The model settings given (not None), which change the preset's or `init_from`'s."""
        return {k: getattr(self, k) for k in MODEL_KEYS if getattr(self, k) is not None}

    def model_config(self, **changes: Any) -> Any:
        """The config of a new model: the preset (a size of `arch`, or a named shape), the overrides,
        then `changes`; a setting the family does not have is an error that says so."""
        arch = self.arch or (None if architecture_of_preset(self.model) else DEFAULT_ARCHITECTURE)
        overrides = self.model_overrides()
        family = arch or architecture_of_preset(self.model) or DEFAULT_ARCHITECTURE
        known = {f.name for f in dataclasses.fields(get_architecture(family).config_class)}
        foreign = sorted(set(overrides) - known)
        if foreign:
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in foreign)
            raise ScratchLLMError(f"{flags}: not a setting of {family} models; leave it out or pick --arch")
        return preset_config(self.model, arch, **overrides, **changes)

    def validate(self) -> None:
        """The trainer's checks, then the data and model settings'."""
        super().validate()
        if not 0.0 < self.val_fraction < 1.0:
            raise ScratchLLMError(
                f"training settings: val_fraction must be in (0, 1), got {self.val_fraction}"
            )
        if not self.corpus and not self.data:  # e.g. a preset made for one corpus, which it cannot ship
            raise ScratchLLMError("no training text: give --corpus (files, a directory, builtin) or --data")
        if self.data and not Path(self.data).expanduser().exists():
            raise ScratchLLMError(
                f"--data {self.data} does not exist; make it with `scratchllm prepare --out {self.data}`"
            )
        spec = self.tokenizer
        if (
            spec not in (*TRAINED_HERE, "gpt2")
            and not spec.startswith("tiktoken:")
            and not Path(spec).expanduser().exists()
        ):
            raise ScratchLLMError(
                f"--tokenizer {spec}: no such tokenizer; give train (a BPE trained on the corpus), char, "
                "gpt2, tiktoken:NAME, or a tokenizer or model directory"
            )
        # pretraining has no epochs to count steps from: said now, not after the data is made
        if not (self.max_steps or self.max_tokens):
            raise ScratchLLMError("training settings: max_steps is 0; give --max-steps or --max-tokens")
        resolve_precision(self.precision, pick_device(self.device))  # fp16 on a CPU, say, fails now
        if self.init_from:  # checked now, before the model is loaded (or downloaded)
            check_model_spec(self.init_from)
            fixed = [k for k in ARCHITECTURE_KEYS if getattr(self, k) is not None]
            if fixed:
                raise ScratchLLMError(
                    f"--init-from {self.init_from} fixes the model's architecture, which {', '.join(fixed)} "
                    f"would change; leave {'it' if len(fixed) == 1 else 'them'} out of the flags and the "
                    f"config file (or set to none: --{fixed[0].replace('_', '-')} none)"
                )
        else:  # an unknown preset or a bad model setting fails now, before any tokenizer training
            check_auto(self)
            (dataclasses.replace(self, model="nano") if self.model == AUTO else self).model_config()
        if self.encoding_errors not in ("strict", "replace"):
            raise ScratchLLMError(
                f"training settings: encoding_errors must be strict or replace, got {self.encoding_errors!r}"
            )

    def check_flags(self, flags: dict[str, Any]) -> None:
        """Also: flags that the data and model settings would silently ignore."""
        super().check_flags(flags)
        if self.data and "corpus" in flags:
            raise ScratchLLMError(
                f"--corpus and --data {self.data} both give the training text; give one (--data: prepared "
                "already)"
            )
        if self.init_from:
            for flag in ("model", "arch"):
                if flag in flags:
                    raise ScratchLLMError(
                        f"--{flag} {getattr(self, flag)} and --init-from {self.init_from}: the run takes the "
                        f"shape of the model it starts from; leave out --{flag}"
                    )
            if flags.get("tokenizer") in TRAINED_HERE or "vocab_size" in flags:
                raise ScratchLLMError(
                    f"--init-from {self.init_from} keeps its model's tokenizer; leave out "
                    "--tokenizer/--vocab-size"
                )
        elif "vocab_size" in flags and (self.data or self.tokenizer != "train"):
            uses = f"--data {self.data}'s tokenizer" if self.data else f"--tokenizer {self.tokenizer}"
            raise ScratchLLMError(
                f"--vocab-size sizes the BPE that --tokenizer train trains; {uses} has its own vocabulary"
            )


class LanguageModelTask(Task):
    """Next-token prediction on token windows: random windows for training (a pure function of the
    micro-batch index), fixed sequential windows for validation so evaluations compare."""

    def __init__(
        self,
        train_tokens: Any,
        val_tokens: Any,
        context_length: int,
        batch_size: int,
        seed: int,
        eval_batches: int,
        world_size: int = 1,
        tokenizer: Tokenizer | None = None,
        sample_prompts: list[str] | None = None,
        sample_tokens: int = 0,
        sample_temperature: float = 0.8,
        sample_top_k: int | None = 40,
    ):
        self.train_tokens = train_tokens
        self.val_tokens = val_tokens
        self.context_length = context_length
        self.batch_size = batch_size
        self.seed = seed
        self.eval_batches = eval_batches
        self.world_size = world_size  # evaluations cover the same windows whatever the process count
        self.tokenizer = tokenizer
        self.sample_prompts = sample_prompts or []
        self.sample_tokens = sample_tokens
        self.sample_temperature = sample_temperature
        self.sample_top_k = sample_top_k
        # fail early, with a clear message, when a split is shorter than one window
        TokenWindows(train_tokens, context_length, batch_size)
        if len(val_tokens) < 2:
            raise ScratchLLMError(
                f"the validation split has {len(val_tokens)} tokens; use more text or a larger val_fraction"
            )
        self._windows: dict[tuple[int, int], TokenWindows] = {}

    def train_batch(
        self, index: int, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (rank, world_size)
        if key not in self._windows:
            self._windows[key] = TokenWindows(
                self.train_tokens, self.context_length, self.batch_size, self.seed, "random", rank, world_size
            )
        return self._windows[key].batch(index)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return next_token_loss(model, *batch)

    def tokens_per_step(self, cfg: TrainerConfig, world_size: int) -> int:
        return self.batch_size * self.context_length * cfg.grad_accum * world_size

    def evaluate(
        self, model: nn.Module, amp: Callable[[], contextlib.AbstractContextManager]
    ) -> dict[str, float]:
        """Validation loss over `eval_batches` global batches of consecutive windows (0: the whole split),
        and the training loss over as many windows from the start of the training split, for comparison."""
        device = next(model.parameters()).device
        windows = self.eval_batches * self.batch_size * self.world_size or None
        val_sum, val_n = token_loss(
            model, self.val_tokens, self.context_length, self.batch_size, amp, windows, device
        )
        n_val_windows = -(-(len(self.val_tokens) - 1) // self.context_length)
        train_sum, train_n = token_loss(
            model,
            self.train_tokens,
            self.context_length,
            self.batch_size,
            amp,
            windows or n_val_windows,
            device,
        )
        val = val_sum / val_n
        return {"train_loss": train_sum / train_n, "val_loss": val, "val_ppl": perplexity(val)}

    def samples(self, model: nn.Module) -> list[str]:
        if not (self.sample_tokens and self.sample_prompts and self.tokenizer is not None):
            return []
        gen = GenerationConfig(
            max_new_tokens=self.sample_tokens,
            temperature=self.sample_temperature,
            top_k=self.sample_top_k,
            seed=self.seed,
        )
        # no prepacked copy of the weights: they change between evaluations
        outs = Engine(model, self.tokenizer, prepack=False).generate(self.sample_prompts, gen)
        return [p + o.text for p, o in zip(self.sample_prompts, outs)]


# ----------------------------------------------------------------------------------------------
# wiring


def build_model(cfg: PretrainConfig, tokenizer: Tokenizer | None) -> tuple[nn.Module, Tokenizer | None]:
    """A fresh model from the preset (+ overrides) for `tokenizer`, or the weights of `init_from` with
    their tokenizer (None when they have no tokenizer files)."""
    if cfg.init_from:
        loaded = setup_model(
            cfg.init_from,
            drop_rate=cfg.drop_rate,
            context_length=cfg.context_length,
            require_tokenizer=False,
            flag="--init-from",
        )
        return loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise ValueError("a model made from a preset needs the run's tokenizer (its vocabulary size)")
    return registry.build_model(cfg.model_config(vocab_size=tokenizer.vocab_size)), None


def pretrain(
    cfg: PretrainConfig, resume: str | None = None, run_config_toml: str | None = None
) -> TrainResult:
    """Run a pretraining job end to end (see the module docstring); returns the trainer's result."""
    cfg.validate()
    out_dir = Path(cfg.out_dir)
    outputs = {} if cfg.data else {"data": (DATA_META_FILE, "prepared data directory")}
    if cfg.tokenizer in TRAINED_HERE and not (cfg.data or cfg.init_from):
        outputs["tokenizer"] = (TOKENIZER_META_FILE, "tokenizer directory")
    checkpoint = check_run_start(out_dir, resume, cfg.overwrite, outputs)  # before the tokenizer and the data
    dist = init_distributed(cfg.device)
    with run_lock(out_dir, dist.is_main):  # until every output is written
        torch.manual_seed(cfg.seed)  # the same initial weights on every process

        init_model, init_tok = (None, None)
        if cfg.init_from:
            init_model, init_tok = build_model(cfg, None)
            if init_tok is None and cfg.tokenizer in TRAINED_HERE and not cfg.data:
                raise ScratchLLMError(
                    f"--init-from {cfg.init_from} has no tokenizer files, and one trained here would not "
                    "match its embeddings; give the tokenizer it was trained with: --tokenizer DIR (or gpt2)"
                )
        tokenizer = resolve_tokenizer(cfg, out_dir, dist, init_tok, checkpoint)
        data = resolve_data(cfg, tokenizer, out_dir, dist, resuming=checkpoint is not None)
        if cfg.model == AUTO:  # the chosen shape replaces auto in the saved settings, so a resume keeps it
            cfg = resolve_auto(cfg, data.train, tokenizer.vocab_size, dist.world_size, checkpoint is not None)
        model = init_model if init_model is not None else build_model(cfg, tokenizer)[0]
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ScratchLLMError(
                f"the tokenizer has {tokenizer.vocab_size} ids, more than the model's vocab_size "
                f"{model.cfg.vocab_size}"
            )
        context = cfg.context_length or model.cfg.context_length
        task = LanguageModelTask(
            data.train,
            data.val,
            context,
            cfg.batch_size,
            cfg.seed,
            cfg.eval_batches,
            dist.world_size,
            tokenizer,
            cfg.sample_prompts,
            cfg.sample_tokens,
            cfg.sample_temperature,
            cfg.sample_top_k,
        )
        if dist.is_main:
            print(
                f"model: {count_parameters(model) / 1e6:.2f}M parameters ({model.cfg.n_layers} layers, "
                f"{model.cfg.n_heads} heads, {model.cfg.emb_dim} dims, context {context}); data: "
                f"{len(data.train):,} train / {len(data.val):,} val tokens; tokenizer {tokenizer.name} "
                f"({tokenizer.vocab_size} ids)"
            )
        extra = {"trained_by": "scratchllm pretrain"}
        toml = run_config_toml or dump_toml(cfg)
        trainer = Trainer(model, task, cfg, tokenizer=tokenizer, extra=extra, dist=dist, run_config_toml=toml)
        return trainer.fit(resume)


def summarize(result: TrainResult) -> str:
    """What a user wants to see when a run ends: the numbers and where everything went."""
    m = result.metrics
    out = result.out_dir
    tok_s = result.tokens / max(result.seconds, 1e-9)
    lines = [
        f"{result.stopped}: {result.steps:,} steps, {result.tokens:,} tokens in {result.seconds:.0f} s of "
        f"training ({tok_s:,.0f} tokens/s)",
    ]
    if "val_loss" in m:
        lines.append(
            f"validation loss {m['val_loss']:.3f}, perplexity {m['val_ppl']:.1f} "
            f"(train loss {m.get('train_loss', float('nan')):.3f}; best validation loss {result.best:.3f})"
        )
    lines.append(f"model: {out / 'model'}   best: {out / 'best'}   loss plot: {out / PLOT_FILE}")
    lines.append(
        f"metrics: {out / METRICS_FILE}   checkpoints: {out / CHECKPOINTS_DIR}   settings: "
        f"{out / RUN_CONFIG_FILE}"
    )
    return "\n".join(lines)


def pretrain_command(
    config: str | None, overrides: dict[str, Any], resume: str | None = None, preset: bool = False
) -> TrainResult:
    """`scratchllm pretrain`: resolve the settings, train, print the summary. `preset`: `config` names
    a shipped preset (never a file of that name in the current directory)."""
    config, preset, overrides = settings_to_resume(PretrainConfig, config, overrides, resume, preset)
    cfg = load_config(PretrainConfig, config, overrides, preset=preset)
    cfg.check_flags(overrides)
    result = pretrain(cfg, resume)
    if init_distributed(cfg.device).is_main:
        print(summarize(result))
    return result


def demo_command(
    config: str | None = None, overrides: dict[str, Any] | None = None, resume: str | None = None
) -> TrainResult:
    """The README's main job: the `demo` preset (or `config`; offline, built-in corpus). The trained
    model's samples are those the last evaluation printed, just above the summary."""
    result = pretrain_command(config or "demo", overrides or {}, resume, preset=config is None)
    if init_distributed("auto" if not overrides else overrides.get("device", "auto")).is_main:
        model = quote(result.out_dir / "model")
        print("\n" + next_hint(f"generate --model {model} --prompt 'The' --temperature 0.8 --top-k 40"))
    return result
