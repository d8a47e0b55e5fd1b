"""The `scratchllm` command line: argument parsing only.

Each subcommand parses its flags and calls one function of a stage module; stage modules are
imported lazily so `scratchllm --help` stays instant. A `ScratchLLMError` anywhere becomes one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence

from .errors import ScratchLLMError

OVERVIEW = """\
Stage 1, foundation: text, tokenizers, the model
  tokenizer train|encode|decode|info   train a byte-level BPE, or inspect any tokenizer
  prepare                               tokenize a corpus into a memory-mapped token file

  info                                  parameter count, size and FLOPs of a preset or model
  download                              OpenAI's GPT-2 weights from the Hugging Face hub
  export-hf                             write a model as a Hugging Face GPT-2 directory
  generate                              continue a prompt (greedy, temperature, top-k, top-p, streaming)

Stage 2, pretraining
  demo                                  the main job: tokenizer + small GPT on the built-in corpus, offline
  pretrain                              train a GPT by next-token prediction (TOML configs, resume, torchrun)
  evaluate                              loss, perplexity and bits per byte of a model on any text
  eval                                  zero-/few-shot accuracy on task files (multiple choice, generation)

Stage 3, finetuning
  finetune classify                     a new N-class head, finetuned on labelled texts (SMS spam, CSV, JSONL)
  classify                              label texts with a finetuned classifier
  finetune instruct                     an assistant: finetune on {instruction, input, output} records (LoRA too)
  respond                               answer every instruction of a file, batched (adds model_response)
  chat                                  talk with a model in the terminal (multi-turn, streamed)
  serve                                 an OpenAI-compatible HTTP API (completions, chat, streaming)
  judge                                 score responses 0-100 with a judge LLM (Ollama, any OpenAI-compatible API)

Run `scratchllm COMMAND --help` for the flags of each command.
"""

COMMANDS = ("tokenizer", "prepare", "info", "download", "export-hf", "generate", "pretrain", "demo", "evaluate",
            "eval", "finetune", "classify", "respond", "chat", "serve", "judge")  # fmt: skip

COMPILE_HELP = (
    "decode with torch.compile over a static KV cache (CUDA graphs on GPUs): much faster "
    "tokens on a GPU after a one-off compilation per batch shape (chat and serve compile theirs "
    "at start); slower on CPUs"
)

DTYPE_HELP = (
    "weight precision; auto: bf16 on GPUs and on CPUs with native bf16, else fp32 (see benchmarks/RESULTS.md)"
)

QUANTIZE_HELP = (
    "int4: 4-bit weights in groups of 128 (CPU only): about 2x faster decoding than fp32 on CPUs "
    "without native bf16, at a small loss of quality; long prompts take longer to start "
    "(see benchmarks/RESULTS.md)"
)

Handler = Callable[[argparse.Namespace], int | None]


# the name one command gives a setting that another command names otherwise: the unknown-flag error
# suggests the active command's name for it (difflib would offer an unrelated flag, or nothing)
_OTHER_NAMES = {
    "--precision": ("--dtype",),
    "--dtype": ("--precision",),
    "--lora": ("--trainable lora",),
    "--trainable": ("--lora true",),
    "--lora-r": ("--lora-rank",),
    "--rank": ("--lora-rank",),
    "--max-tokens": ("--max-new-tokens",),
    "--steps": ("--max-steps",),
    "--out-dir": ("--out",),
    "--out": ("--out-dir",),
    "--output": ("--out", "--out-dir"),
    "--model-dir": ("--model",),
    "--text": ("--prompt",),
    "--prompt": ("--text",),
}


def _did_you_mean(parser: argparse.ArgumentParser, given: str, close_spellings: bool = True) -> str:
    """ "; did you mean --flag?" for a flag `parser` does not know: its name for the same setting,
    else (`close_spellings`) the closest spelling among its flags; "" when there is none."""
    import difflib

    flags = [o for a in parser._actions for o in a.option_strings]
    close = [o for o in _OTHER_NAMES.get(given, ()) if o.split()[0] in flags]
    if not close and close_spellings:
        close = difflib.get_close_matches(given, flags, n=1)
    return f"; did you mean {close[0]}?" if close else ""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line with exit code 2 (its default code), no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        ambiguous = re.match(r"ambiguous option: (-[^\s=]+)", message)  # `--lora` for --lora-rank, ...
        if ambiguous:
            message += _did_you_mean(self, ambiguous.group(1), close_spellings=False)
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ----------------------------------------------------------------------------------------------
# Stage 1: tokenizers and data


def _tokenizer_train(args: argparse.Namespace) -> None:
    from .text.commands import tokenizer_train

    tokenizer_train(
        corpus=args.corpus,
        vocab_size=args.vocab_size,
        out=args.out,
        special_tokens=args.special_tokens,
        pattern=args.pattern,
        encoding_errors=args.encoding_errors,
        progress=not args.quiet,
    )


def _tokenizer_encode(args: argparse.Namespace) -> None:
    from .text.commands import tokenizer_encode

    tokenizer_encode(args.tokenizer, text=args.text, file=args.file, allow_special=args.allow_special,
                     encoding_errors=args.encoding_errors)  # fmt: skip


def _tokenizer_decode(args: argparse.Namespace) -> None:
    from .text.commands import tokenizer_decode

    tokenizer_decode(args.tokenizer, ids=args.ids)


def _tokenizer_info(args: argparse.Namespace) -> None:
    from .text.commands import tokenizer_info

    tokenizer_info(args.tokenizer)


def _prepare(args: argparse.Namespace) -> None:
    from .text.prepare import prepare

    prepare(
        corpus=args.corpus,
        tokenizer=args.tokenizer,
        out=args.out,
        val_fraction=args.val_fraction,
        workers=args.workers,
        encoding_errors=args.encoding_errors,
        seed=args.seed,
        progress=not args.quiet,
    )


def _add_corpus_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--corpus",
        nargs="+",
        default=None if required else ["builtin"],
        required=required,
        metavar="SOURCE",
        help="text files, directories, globs, `builtin` (Python's bundled docs, the default) "
        "or `hf:NAME[:SPLIT]` (needs the `hf` extra and a network)",
    )
    _add_encoding_errors(p)


def _add_encoding_errors(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--encoding-errors",
        choices=["strict", "replace"],
        default="strict",
        help="what to do with bytes that are not UTF-8: stop with an error naming the file and "
        "offset (strict, default) or replace them with U+FFFD",
    )


def _add_stage1(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION", parser_class=_Parser)

    p = tsub.add_parser("train", help="train a byte-level BPE tokenizer from scratch")
    _add_corpus_args(p)
    p.add_argument(
        "--vocab-size",
        type=int,
        default=8192,
        help="target vocabulary size, specials included (default 8192)",
    )
    p.add_argument("--out", required=True, help="directory to write the tokenizer to")
    p.add_argument(
        "--special-tokens",
        nargs="*",
        default=["<|endoftext|>"],
        metavar="TOKEN",
        help="special tokens appended after the learned ones (default: <|endoftext|>)",
    )
    p.add_argument("--pattern", default="gpt2", help="pre-tokenization regex: gpt2, gpt4 or a regex string")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_tokenizer_train)

    tok_help = "gpt2, a tokenizer directory, a model directory, or GPT-2 files (encoder.json/vocab.bpe dir, .tiktoken)"
    p = tsub.add_parser("encode", help="print the token ids of a text")
    p.add_argument("--tokenizer", default="gpt2", help=tok_help)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to encode")
    src.add_argument("--file", help="a UTF-8 file to encode")
    p.add_argument("--allow-special", action="store_true", help="encode special-token strings as specials")
    _add_encoding_errors(p)
    p.set_defaults(func=_tokenizer_encode)

    p = tsub.add_parser("decode", help="print the text of token ids")
    p.add_argument("--tokenizer", default="gpt2", help=tok_help)
    p.add_argument("ids", nargs="+", help="token ids (space or comma separated)")
    p.set_defaults(func=_tokenizer_decode)

    p = tsub.add_parser("info", help="vocabulary size, special tokens, pattern")
    p.add_argument("--tokenizer", default="gpt2", help=tok_help)
    p.set_defaults(func=_tokenizer_info)

    p = sub.add_parser("prepare")
    _add_corpus_args(p)
    p.add_argument("--tokenizer", default="gpt2", help=tok_help)
    p.add_argument("--out", required=True, help="output directory (train.bin, val.bin, meta.json)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="chance of each document to be held out for validation (default 0.1; drawn per document, so "
        "the share of tokens varies; when all land on one side, the last tokens)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="tokenizer processes (0: one per CPU core and 16 MB of text); at most one per core and per MB of text",
    )
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val document split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)


# ----------------------------------------------------------------------------------------------
# Stage 1: the model (info, download, export-hf) and generation


def _info(args: argparse.Namespace) -> None:
    import json

    from .checkpoint import format_model_info, model_info

    if args.list:
        _list_presets(as_json=args.json)
        return
    info = model_info(preset=args.preset, model=args.model)
    print(json.dumps(info, indent=2) if args.json else format_model_info(info))


def _list_presets(as_json: bool) -> None:
    """`info --list`: every model preset's shape and size, from its config alone."""
    import json

    from .checkpoint import model_info
    from .model.gpt import PRESETS

    infos = {name: model_info(preset=name) for name in PRESETS}
    if as_json:
        print(json.dumps(infos, indent=2))
        return
    print(
        f"{'preset':<12} {'layers':>6} {'heads':>5} {'dims':>5} {'context':>7} {'parameters':>11} {'fp32 MB':>8}"
    )
    for name, info in infos.items():
        c = info["config"]
        print(f"{name:<12} {c['n_layers']:>6} {c['n_heads']:>5} {c['emb_dim']:>5} {c['context_length']:>7} "
              f"{info['parameters'] / 1e6:>10.1f}M {info['bytes_fp32'] / 1e6:>8.1f}")  # fmt: skip
    print("(GPT-2's vocabulary of 50257 and tied embeddings; a run's own vocabulary changes the count)")


def _download(args: argparse.Namespace) -> None:
    from .hub import download_command

    path = download_command(args.name, size=args.size, out=args.out, src=args.src, progress=not args.quiet)
    print(f"saved the model directory {path}")


def _export_hf(args: argparse.Namespace) -> None:
    from .hub import export_hf

    print(f"wrote a Hugging Face GPT-2 directory to {export_hf(args.model, args.out)}")


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    """info, download, export-hf."""
    from .model.gpt import PRESETS

    hub_names = "gpt2, gpt2-medium, gpt2-large, gpt2-xl (or 124M, 355M, 774M, 1558M)"
    p = sub.add_parser("info")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--list", action="store_true", help="every model preset's shape and size")
    which.add_argument("--preset", help=f"a model preset: {', '.join(PRESETS)}")
    which.add_argument(
        "--model",
        help=f"a model directory, or {hub_names}: read from the cache if downloaded, never downloaded",
    )
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=_info)

    p = sub.add_parser("download")
    p.add_argument(
        "name",
        nargs="?",
        default="gpt2",
        choices=["gpt2", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"],
        help="the model (default gpt2; --size picks among the four)",
    )
    p.add_argument("--size", choices=["124M", "355M", "774M", "1558M"], help="GPT-2 size (default 124M)")
    p.add_argument(
        "--out",
        help="model directory to write (default: the cache, ~/.cache/scratchllm/models/NAME, or under "
        "$SCRATCHLLM_HOME)",
    )
    p.add_argument(
        "--from",
        dest="src",
        metavar="DIR",
        help="convert a local Hugging Face GPT-2 directory (config.json, model.safetensors, vocab.json, "
        "merges.txt) instead of downloading",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_download)

    p = sub.add_parser("export-hf")
    p.add_argument("model", help=f"a model directory, or {hub_names}")
    p.add_argument("out", help="the directory to write")
    p.set_defaults(func=_export_hf)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags of generate, chat and respond (GenerationConfig's settings)."""
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); higher: more random")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the likeliest tokens summing to p")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="FLOAT",
                   help="> 1 makes tokens already in the prompt or the text less likely (e.g. 1.2; default 1: off)")  # fmt: skip
    p.add_argument("--presence-penalty", type=float, default=0.0, metavar="FLOAT",
                   help="subtract this from the logit of every token generated so far (OpenAI's; default 0)")  # fmt: skip
    p.add_argument("--frequency-penalty", type=float, default=0.0, metavar="FLOAT",
                   help="subtract this once per time a token was generated so far (OpenAI's; default 0)")  # fmt: skip


def _penalties(args: argparse.Namespace) -> dict[str, float]:
    return {
        "repetition_penalty": args.repetition_penalty,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
    }


def _generate(args: argparse.Namespace) -> None:
    import time

    from .device import pick_device
    from .generation import Engine, resolve_dtype

    cfg = _sampling_config(args).replace(ignore_eos=args.ignore_eos, use_cache=not args.no_cache)
    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompt]
    device = pick_device(args.device)
    engine = Engine.load(
        args.model,
        device=str(device),
        dtype=resolve_dtype(args.dtype, device),
        compile=args.compile,
        quantize=args.quantize,
    )
    start = time.perf_counter()
    if args.stream:
        if len(prompts) > 1:
            raise ScratchLLMError(
                "--stream takes one --prompt; leave it out to run several prompts as a batch"
            )
        stream = engine.stream(prompts[0], cfg)
        if args.echo:
            print(prompts[0], end="", flush=True)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        completions = [stream.completion] if stream.completion else []
    else:
        completions = engine.generate(prompts, cfg)
        for i, (prompt, c) in enumerate(zip(prompts, completions)):
            if len(prompts) > 1:
                print(f"{'' if i == 0 else chr(10)}--- {i + 1}/{len(prompts)}")
            print((prompt if args.echo else "") + c.text)
    if not args.quiet:
        seconds = time.perf_counter() - start
        n = sum(c.completion_tokens for c in completions)
        reasons = ", ".join(sorted({c.finish_reason for c in completions}))
        print(
            f"[{n} tokens in {seconds:.2f} s, {n / max(seconds, 1e-9):.1f} tokens/s, finish: {reasons}; "
            f"{device.type}, {args.quantize or str(next(engine.model.parameters()).dtype).removeprefix('torch.')}]",
            file=sys.stderr,
        )


def _add_generate_command(sub: argparse._SubParsersAction) -> None:
    """generate."""
    from .model.quantize import QUANTIZE_MODES

    p = sub.add_parser(
        "generate",
        description="Continue one prompt (or several, as a batch) with a model directory or GPT-2. "
        "Greedy by default; --temperature > 0 samples. The text goes to stdout, a summary to stderr.",
    )
    p.add_argument("--model", default="gpt2", help="a model directory, or gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                   "(downloaded and converted on first use); default gpt2")  # fmt: skip
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="the text to continue; `-` reads stdin; repeat for a batch")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most (default 100)")
    add_sampling_args(p)
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="continue past the end-of-text token")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--echo", action="store_true", help="print the prompt before the generated text")
    p.add_argument("--no-cache", action="store_true", help="no KV cache (slower; for comparison)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help=DTYPE_HELP)  # fmt: skip
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default=None, help=QUANTIZE_HELP)
    p.add_argument("--quiet", action="store_true", help="no summary line on stderr")
    p.set_defaults(func=_generate)


# ----------------------------------------------------------------------------------------------
# Training commands (pretrain, demo, finetune classify, finetune instruct): one shape


def _add_training_command(
    sub: argparse._SubParsersAction,
    name: str,
    config_cls: type,
    run: str,
    *,
    description: str,
    made: str,
    help: str | None = None,
    config_flag: bool = True,
) -> None:
    """A command driven by a config dataclass: --config (TOML file or preset), --resume, --out (alias of
    --out-dir) and one flag per setting. `run` is "module:function" (imported on use), called as
    function(config, overrides, resume=...)."""
    from .config import add_config_arguments

    # a top-level command is listed by OVERVIEW; a finetune kind in `scratchllm finetune --help`
    p = sub.add_parser(name, description=description, **({"help": help} if help else {}))
    if config_flag:
        p.add_argument("--config", help="a TOML file or a preset name (see `scratchllm/configs/`)")
    p.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
        help="continue a stopped run exactly: no value = the newest checkpoint in the run directory, "
        "or a step-N checkpoint directory",
    )  # fmt: skip
    p.add_argument("--out", dest="out_alias", default=None, metavar="DIR",
                   help=f"run directory (same as --out-dir); {made} is written to DIR/model")  # fmt: skip
    add_config_arguments(p, config_cls, preset=None if config_flag else name)
    p.set_defaults(func=functools.partial(_run_training, run))


def _run_training(run: str, args: argparse.Namespace) -> int:
    """Run a training command; a run stopped by a signal (after saving its checkpoint) exits with
    128 + the signal's number, as the shell reports it, so that scripts can tell it from a finished run."""
    import signal

    module, function = run.split(":")
    command = getattr(importlib.import_module(module, __package__), function)
    from .config import coerce

    overrides = training_overrides(args)
    if args.resume is not None and coerce(
        "overwrite", overrides.get("overwrite", False), bool, "command line"
    ):
        raise ScratchLLMError(
            "--resume continues the run and --overwrite true starts it over; give one of them"
        )
    result = command(getattr(args, "config", None), overrides, resume=args.resume)
    train = getattr(result, "train", result)  # a classifier's result holds the trainer's
    if getattr(train, "stopped", None) != "interrupted":
        return 0
    return 128 + signal.Signals[train.signal or "SIGINT"].value


def training_overrides(args: argparse.Namespace) -> dict:
    """The settings a training command's flags give (`--out` is `--out-dir`; both naming two
    directories is an error)."""
    from .config import overrides_from_args

    overrides = overrides_from_args(args)
    if args.out_alias is not None:
        same = os.path.normpath(os.path.expanduser(overrides.get("out_dir", args.out_alias)))
        if same != os.path.normpath(os.path.expanduser(args.out_alias)):
            raise ScratchLLMError(
                f"--out {args.out_alias} and --out-dir {overrides['out_dir']} name two run directories; give one"
            )
        overrides["out_dir"] = args.out_alias
    return overrides


# ----------------------------------------------------------------------------------------------
# Stage 2: pretraining and evaluation


def _evaluate(args: argparse.Namespace) -> None:
    from .train.evaluate import evaluate_command

    evaluate_command(
        args.model,
        args.corpus,
        context_length=args.context_length,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        encoding_errors=args.encoding_errors,
        max_tokens=args.max_tokens,
        quantize=args.quantize,
        as_json=args.json,
    )


def _add_stage2(sub: argparse._SubParsersAction) -> None:
    from .model.quantize import QUANTIZE_MODES
    from .train.pretrain import PretrainConfig

    _add_training_command(
        sub, "pretrain", PretrainConfig, ".train.pretrain:pretrain_command",
        description="Pretrain a GPT from scratch (or continue from GPT-2) on text. Settings come from the "
        "defaults, then --config (a TOML file or a preset name: demo, shakespeare-char, shakespeare-char-muon), then the flags below.",
        made="the trained model",
    )  # fmt: skip
    _add_training_command(
        sub, "demo", PretrainConfig, ".train.pretrain:demo",
        description="Train a BPE tokenizer and a small GPT on the built-in corpus (Python's reference "
        "documentation), then print validation loss, perplexity and three samples. The same flags as "
        "`pretrain` change it (e.g. --corpus my.txt, --max-minutes 2).",
        made="the trained model", config_flag=False,
    )  # fmt: skip

    p = sub.add_parser(
        "evaluate",
        description="Loss, perplexity and bits per byte of a model on any text: every token of every "
        "document is predicted once, after an <|endoftext|> that is context only (training's validation "
        "loss also predicts the <|endoftext|> between documents, so it differs slightly). For zero-/few-shot "
        "accuracy on task files (HellaSwag, multiple choice, generation) see `scratchllm eval`.",
    )
    p.add_argument("--model", required=True, help="a model directory or gpt2, gpt2-medium, ...")
    _add_corpus_args(p)
    p.add_argument("--context-length", type=int, default=None, help="window length (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--max-tokens", type=int, default=0, help="evaluate only the first N tokens (0: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="fp32", help="fp32 (default, exact), bf16, fp16 or auto")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                   help="evaluate the model with int4 weights, as `generate --quantize int4` runs it (CPU only)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_evaluate)


# ----------------------------------------------------------------------------------------------
# Evaluation beyond loss: zero-shot and few-shot tasks


def _eval(args: argparse.Namespace) -> None:
    from .evals import EvalSettings, eval_command

    def unescape(text: str) -> str:  # let `--separator '\n\n'` mean two newlines
        return text.replace("\\n", "\n").replace("\\t", "\t")

    settings = EvalSettings(
        shots=args.shots,
        fewshot_file=args.fewshot_file,
        holdout=args.holdout,
        seed=args.seed,
        separator=unescape(args.separator),
        target_delimiter=unescape(args.target_delimiter),
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        stop=tuple(unescape(s) for s in args.stop) if args.stop else ("\n",),
        format=args.format,
    )
    eval_command(
        args.model,
        args.task,
        settings,
        out=args.out,
        device=args.device,
        precision=args.precision,
        as_json=args.json,
        progress=not args.quiet,
    )


def _add_eval_command(sub: argparse._SubParsersAction) -> None:
    """eval."""
    p = sub.add_parser(
        "eval",
        description="Score a model on a JSON Lines task file, zero-shot or with K solved examples in the "
        "prompt. Multiple choice (HellaSwag's ctx/endings/label, or context/choices/answer): the choice "
        "with the highest log-likelihood wins (acc), or per byte of the choice (acc_norm). Generation "
        "(prompt/answer): greedy output up to a stop string, exact match after normalising case and "
        "whitespace. For loss and perplexity on plain text see `scratchllm evaluate`.",
    )
    p.add_argument(
        "--model", required=True, help="a model directory, or gpt2, gpt2-medium, gpt2-large, gpt2-xl"
    )
    p.add_argument(
        "--task", required=True, metavar="FILE.jsonl", help="the task file, one JSON object per line"
    )
    p.add_argument(
        "--shots", type=int, default=0, metavar="K", help="solved examples before each item (default 0)"
    )
    p.add_argument(
        "--fewshot-file",
        metavar="FILE.jsonl",
        help="draw examples from this file (same format) instead of the task's other items",
    )
    p.add_argument(
        "--holdout",
        type=int,
        default=0,
        metavar="N",
        help="use the task's first N items as the example pool and score the rest",
    )
    p.add_argument("--seed", type=int, default=1234, help="seed for drawing the examples (default 1234)")
    p.add_argument(
        "--separator", default="\\n\\n", help="text between examples (default: a blank line, \\n\\n)"
    )
    p.add_argument(
        "--target-delimiter", default=" ", help="text between a context and its answer (default: a space)"
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "hellaswag", "choice", "generation"],
        help="the task format (default: from the first line's fields)",
    )
    p.add_argument(
        "--limit", type=int, default=None, metavar="N", help="score only the first N items (quick runs)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="sequences per forward pass (multiple choice) or prompts per batch (generation); default 16",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation: tokens to generate at most")
    p.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="generation: stop at this text (repeatable; default: a newline, \\n)",
    )
    p.add_argument("--out", metavar="FILE.json", help="write the summary and per-item scores as JSON")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="fp32", help="fp32 (default, exact), bf16, fp16 or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval)


# ----------------------------------------------------------------------------------------------
# Stage 3: classifier finetuning and classification


def _finetune_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The subcommands of the `finetune` group, created on first use so each finetune (classify,
    instruct) adds its own kind to the one group."""
    existing = sub.choices.get("finetune")
    if existing is not None:
        return next(a for a in existing._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.add_parser(
        "finetune",
        description="Finetune a pretrained model (a model directory or GPT-2) with the one trainer.",
    )
    return p.add_subparsers(dest="finetune_command", required=True, metavar="KIND", parser_class=_Parser)


def _classify(args: argparse.Namespace) -> None:
    from .finetune.classify import classify_command

    classify_command(args.model, args.texts, file=args.file, out=args.out, text_column=args.text_column,
                     header=args.header == "true", batch_size=args.batch_size, device=args.device)  # fmt: skip


def _add_classify_commands(sub: argparse._SubParsersAction) -> None:
    """finetune classify, classify."""
    from .finetune.classify import ClassifyConfig

    _add_training_command(
        _finetune_subparsers(sub), "classify", ClassifyConfig, ".finetune.classify:finetune_classify_command",
        help="replace the output head by an N-class head and finetune on labelled texts",
        description="Finetune a model into a text classifier (the book's chapter 6): --data spam (the SMS "
        "Spam Collection, the book's balanced 70/10/20 split) or a .csv/.tsv/.jsonl/.json file with a text "
        "and a label column. Settings come from the defaults (the book's), then --config, then the flags.",
        made="the classifier",
    )  # fmt: skip

    p = sub.add_parser(
        "classify",
        description="Print the predicted label and its probability for each text, or classify the records "
        "of --file (.jsonl, .csv, .tsv, .json) into --out (JSONL: each record plus `label` and `probabilities`).",
    )
    p.add_argument("--model", required=True, help="a classifier model directory (from `finetune classify`)")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    p.add_argument("--file", help="a table of texts to classify")
    p.add_argument("--out", help="the JSONL file to write (default: print the records)")
    p.add_argument("--text-column", default="text",
                   help="column or JSON key of the text in --file (without a header: its 0-based position)")  # fmt: skip
    p.add_argument("--header", choices=["true", "false"], default="true",
                   help="whether a CSV/TSV --file starts with a row of column names")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.set_defaults(func=_classify)


# ----------------------------------------------------------------------------------------------
# Stage 3: instruction finetuning and responses


def _respond(args: argparse.Namespace) -> None:
    from .finetune.instruct import respond

    respond(args.model, args.data, args.out, template=args.template, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            seed=args.seed, device=args.device, dtype=args.dtype, progress=not args.quiet,
            quantize=args.quantize, **_penalties(args))  # fmt: skip


def _add_instruct_commands(sub: argparse._SubParsersAction) -> None:
    """finetune instruct, respond."""
    from .finetune.instruct import InstructConfig
    from .finetune.templates import template_names
    from .model.quantize import QUANTIZE_MODES

    _add_training_command(
        _finetune_subparsers(sub), "instruct", InstructConfig, ".finetune.instruct:instruct_command",
        help="finetune a model to follow instructions (a personal assistant)",
        description="Finetune a model on {instruction, input, output} records (the book's chapter 7): a JSON "
        "list or JSONL file, split 85/5/10 train/val/test with --split-seed (none: file order, the book's "
        "split) or given as separate files. Full finetuning, or --lora. The assistant is written to "
        "OUT/model with its prompt template; the split goes to OUT/data. Settings come from the defaults "
        "(the book's), then --config, then the flags.",
        made="the assistant",
    )  # fmt: skip

    p = sub.add_parser(
        "respond",
        description="Run each {instruction, input} record of --data (JSON list or JSONL) through the model, "
        "batched and greedy by default, and write the records with a `model_response` field to --out "
        "(JSON, or JSONL for a .jsonl name). The prompt template is the one stored with the model.",
    )
    p.add_argument("--model", required=True, help="an assistant model directory (from `finetune instruct`)")
    p.add_argument("--data", required=True, metavar="FILE", help="instruction records (.json list or .jsonl)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the records with responses")
    p.add_argument("--template", choices=template_names(), default=None,
                   help="prompt template (default: the model's own, else alpaca)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per response at most (256)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    add_sampling_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help=DTYPE_HELP)  # fmt: skip
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default=None, help=QUANTIZE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_respond)


# ----------------------------------------------------------------------------------------------
# Stage 3: chat, the OpenAI-compatible server, the LLM judge


def _sampling_config(args: argparse.Namespace):
    from .generation import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop or (), **_penalties(args))  # fmt: skip


def _chat(args: argparse.Namespace) -> None:
    from .serve.chat import chat_command

    chat_command(args.model, _sampling_config(args), template=args.template, system=args.system,
                 device=args.device, dtype=args.dtype, compile=args.compile, quantize=args.quantize)  # fmt: skip


def _serve(args: argparse.Namespace) -> None:
    from .serve.server import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
          template=args.template, max_batch_size=args.max_batch_size, default_max_tokens=args.default_max_tokens,
          device=args.device, dtype=args.dtype, log_level=args.log_level, compile=args.compile,
          quantize=args.quantize)  # fmt: skip


def _judge(args: argparse.Namespace) -> int:
    from .serve.judge import judge_command

    return judge_command(args.responses, args.judge_url, args.judge_model, out=args.out,
                         response_key=args.response_key, template=args.template, api_key=args.api_key,
                         timeout=args.timeout, retries=args.retries, max_tokens=args.max_tokens or None,
                         workers=args.workers, resume=args.resume, progress=not args.quiet)  # fmt: skip


def _add_serve_commands(sub: argparse._SubParsersAction) -> None:
    """chat, serve, judge."""
    from .finetune.templates import template_names
    from .model.quantize import QUANTIZE_MODES

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="a model directory (an assistant from `finetune instruct`), "
                       "or gpt2, gpt2-medium, ...")  # fmt: skip
        p.add_argument("--template", choices=template_names(), default=None,
                       help="prompt template (default: the model's own, else alpaca)")  # fmt: skip
        p.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:N, mps")
        p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help=DTYPE_HELP)  # fmt: skip
        p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
        p.add_argument("--quantize", choices=QUANTIZE_MODES, default=None, help=QUANTIZE_HELP)

    p = sub.add_parser(
        "chat",
        description="An interactive chat: type a message, the reply streams back. The conversation is "
        "rendered with the model's prompt template and its oldest turns are dropped when it outgrows the "
        "context window. /reset starts over, /exit (or Ctrl-D) quits; Ctrl-C stops a reply. Reads lines "
        "from stdin, so it also works piped.",
    )
    model_args(p)
    p.add_argument("--system", default=None, help="a system message (default: the template's own, if any)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most (default 256)")
    add_sampling_args(p)
    p.add_argument("--stop", action="append", metavar="TEXT", help="also stop before this text (repeatable)")
    p.set_defaults(func=_chat)

    p = sub.add_parser(
        "serve",
        description="Serve a model over OpenAI's API: GET /v1/models, POST /v1/completions (raw text), POST "
        "/v1/chat/completions (rendered with the prompt template), streaming as server-sent events. Any "
        "OpenAI client works with base_url http://HOST:PORT/v1. Requests queue for the model; waiting "
        "ones with equal settings run as one batch.",
    )
    model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` (default: $SCRATCHLLM_API_KEY, else no key)")  # fmt: skip
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the directory's "
                   "name, or its run's for a run's model/ or best/: runs/assistant/model is assistant)")  # fmt: skip
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together at most (8)")
    p.add_argument("--default-max-tokens", type=int, default=None,
                   help="cap for chat replies without max_tokens (default: the rest of the context window)")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info: one line per request)")  # fmt: skip
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "judge",
        description="Score each response of --responses (records with instruction, input, output and "
        "model_response, as written by `scratchllm respond`) against the reference output with a judge "
        "model, using the book's prompt. Writes per-item JSON plus the average; exits 1 if some items got "
        "no score (they are listed in the output).",
    )
    p.add_argument("--responses", required=True, metavar="FILE", help="records to score (.json, .jsonl)")
    p.add_argument("--judge-url", required=True, metavar="URL",
                   help="the judge's OpenAI-compatible base URL, e.g. http://localhost:11434/v1 (Ollama) or "
                   "http://127.0.0.1:8000/v1 (scratchllm serve)")  # fmt: skip
    p.add_argument("--judge-model", required=True, metavar="NAME", help="the judge model's name, e.g. llama3")
    p.add_argument("--out", default=None, metavar="FILE", help="result JSON (default: FILE-judged.json)")
    p.add_argument("--response-key", default="model_response", help="the field holding the response")
    p.add_argument("--template", choices=template_names(), default="alpaca",
                   help="how the input is shown to the judge (default alpaca, the book's format_input)")  # fmt: skip
    p.add_argument("--api-key", default=None, help="the judge's API key (default: $SCRATCHLLM_JUDGE_API_KEY)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--retries", type=int, default=4, help="retries of a failed request (default 4)")
    p.add_argument("--max-tokens", type=int, default=256, help="reply length cap sent to the judge (0: none)")
    p.add_argument("--workers", type=int, default=1, help="requests in flight at once (default 1)")
    p.add_argument("--resume", action="store_true", help="keep the scores already in --out, judge the rest")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_judge)


# ----------------------------------------------------------------------------------------------


def build_parser(commands: bool = True) -> argparse.ArgumentParser:
    """The command line's parser. `commands=False` leaves out the commands' own flags (whose settings
    classes import torch): enough for `scratchllm --help` and `--version`, which then answer at once."""
    parser = _Parser(
        prog="scratchllm",
        description="Build a GPT-style LLM from scratch and carry it through its whole life.",
        epilog=OVERVIEW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"scratchllm {__version__}")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=_Parser,
        help="one of those listed below",
    )
    if not commands:
        for name in COMMANDS:
            sub.add_parser(name)
        return parser
    _add_stage1(sub)
    _add_model_commands(sub)
    _add_generate_command(sub)
    _add_stage2(sub)
    _add_eval_command(sub)
    _add_classify_commands(sub)
    _add_instruct_commands(sub)
    _add_serve_commands(sub)
    return parser


def _active_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command being run, to suggest its flags for a mistyped one."""
    for dest in ("command", "tokenizer_command", "finetune_command"):
        name = getattr(args, dest, None)
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None:
            break
        if name in sub.choices:
            parser = sub.choices[name]
    return parser


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings print as `scratchllm: warning: ...`, without Python's file name and source line.
    (The format, not the printing, is replaced, so whoever records warnings still sees them.)"""
    import warnings

    def one_line(message, category, filename, lineno, line=None) -> str:
        return f"scratchllm: warning: {message}\n"

    saved = warnings.formatwarning
    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = saved


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # also while torch imports, before a command runs
        print("scratchllm: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(commands=bool(argv) and argv[0] not in ("-h", "--help", "--version"))
    args, extras = parser.parse_known_args(argv)
    if extras:
        active = _active_parser(parser, args)
        bad = next((e for e in extras if e.startswith("-")), extras[0])
        active.error(f"unrecognized arguments: {' '.join(extras)}{_did_you_mean(active, bad.split('=')[0])}")
    try:
        with _one_line_warnings():
            code = args.func(args)
    except ScratchLLMError as e:
        print(f"scratchllm: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `scratchllm tokenizer encode ... | head`
        return 0
    except OSError as e:
        import errno

        # a full, read-only or failing disk, or no permission: the machine's state, not a bug to trace
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM):
            raise
        print(f"scratchllm: error: {e}", file=sys.stderr)
        return 1
    return int(code or 0)


def entry() -> None:
    """The `scratchllm` program: `main`, then exit without Python's final garbage collection over
    everything torch (and torch._dynamo) created at import, which takes 1-1.5 s of every command.
    (`gc.freeze` moves the live objects out of the collector's sight; the process ends anyway.)"""
    code = main()
    import gc

    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
