"""The `scratchllm` command line: a table of commands.

Each command is a settings dataclass (`scratchllm.config.setting` fields: help text, flags, TOML) and one
function of a stage module that takes it. The command line builds the active command's flags from its
settings, reads `--config FILE` (TOML) under them, and calls the function; stage modules are imported
only for the command that runs, so `scratchllm --help` answers at once. A `ScratchLLMError` anywhere
becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import importlib
import inspect
import os
import re
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .config import add_config_arguments, coerce, load_config, overrides_from_args
from .errors import ScratchLLMError


@dataclass(frozen=True)
class Command:
    """One command: its name as typed (a group's kind after a space, `finetune classify`), a line for
    the overview, its module with its settings class and function, and how it is run: `training`
    commands take `(config, overrides, resume=...)` (they resume and save their settings), the others
    their settings object."""

    name: str
    summary: str
    module: str
    settings: str
    run: str
    description: str = ""
    training: bool = False
    preset: str | None = None  # a training command that is its own preset (demo): no --config
    old_name: str | None = None  # kept for one release, with a notice


STAGES: dict[str, list[Command]] = {
    "Stage 1, foundation: text, tokenizers, the model": [
        Command(
            "tokenizer train",
            "train a byte-level BPE tokenizer from scratch",
            "scratchllm.text.commands",
            "TokenizerTrainSettings",
            "tokenizer_train_command",
        ),
        Command(
            "tokenizer encode",
            "print the token ids of a text",
            "scratchllm.text.commands",
            "TokenizerEncodeSettings",
            "tokenizer_encode_command",
        ),
        Command(
            "tokenizer decode",
            "print the text of token ids",
            "scratchllm.text.commands",
            "TokenizerDecodeSettings",
            "tokenizer_decode_command",
        ),
        Command(
            "tokenizer info",
            "vocabulary size, special tokens, pattern",
            "scratchllm.text.commands",
            "TokenizerInfoSettings",
            "tokenizer_info_command",
        ),
        Command(
            "prepare",
            "tokenize a corpus into a memory-mapped token file",
            "scratchllm.text.commands",
            "PrepareSettings",
            "prepare_command",
        ),
        Command(
            "info",
            "parameter count, size and FLOPs of a preset or model",
            "scratchllm.hub.info",
            "InfoSettings",
            "info_command",
        ),
        Command(
            "download",
            "OpenAI's GPT-2 weights from the Hugging Face hub",
            "scratchllm.hub.fetch",
            "DownloadSettings",
            "download_command",
        ),
        Command(
            "export-hf",
            "write a model as a Hugging Face GPT-2 directory",
            "scratchllm.hub.export",
            "ExportHFSettings",
            "export_hf_command",
        ),
        Command(
            "export-gguf",
            "write a model as one GGUF file for llama.cpp, with an Ollama Modelfile",
            "scratchllm.hub.gguf_export",
            "ExportGGUFSettings",
            "export_gguf_command",
        ),
        Command(
            "generate",
            "continue a prompt (greedy, temperature, top-k, top-p, streaming)",
            "scratchllm.generation.command",
            "GenerateSettings",
            "generate_command",
        ),
    ],
    "Stage 2, pretraining": [
        Command(
            "demo",
            "the main job: tokenizer + small GPT on the built-in corpus, offline",
            "scratchllm.train.pretrain",
            "PretrainConfig",
            "demo_command",
            description="Train a BPE tokenizer and a small GPT on the built-in corpus (Python's reference "
            "documentation), then print validation loss, perplexity and three samples. The same flags as "
            "`pretrain` change it (e.g. --corpus my.txt, --max-minutes 2).",
            training=True,
            preset="demo",
        ),
        Command(
            "pretrain",
            "train a GPT by next-token prediction (TOML configs, resume, torchrun)",
            "scratchllm.train.pretrain",
            "PretrainConfig",
            "pretrain_command",
            description="Pretrain a GPT from scratch (or continue from GPT-2) on text. Settings come from "
            "the defaults, then --config (a TOML file or a preset name: demo, shakespeare-char, "
            "shakespeare-char-muon), then the flags below.",
            training=True,
        ),
        Command(
            "perplexity",
            "loss, perplexity and bits per byte of a model on any text",
            "scratchllm.train.evaluate",
            "PerplexitySettings",
            "perplexity_command",
            old_name="evaluate",
        ),
        Command(
            "eval-tasks",
            "zero-/few-shot accuracy on task files (multiple choice, generation)",
            "scratchllm.evals.run",
            "EvalTasksSettings",
            "eval_tasks_command",
            old_name="eval",
        ),
    ],
    "Stage 3, finetuning": [
        Command(
            "finetune classify",
            "a new N-class head, finetuned on labelled texts (SMS spam, CSV, JSONL)",
            "scratchllm.finetune.classify",
            "ClassifyConfig",
            "finetune_classify_command",
            description="Finetune a model into a text classifier (the book's chapter 6): --data spam (the "
            "SMS Spam Collection, the book's balanced 70/10/20 split) or a .csv/.tsv/.jsonl/.json file with "
            "a text and a label column. Settings come from the defaults (the book's), then --config, then "
            "the flags.",
            training=True,
        ),
        Command(
            "classify",
            "label texts with a finetuned classifier",
            "scratchllm.finetune.classifier",
            "ClassifyTextsSettings",
            "classify_command",
        ),
        Command(
            "finetune instruct",
            "an assistant: finetune on {instruction, input, output} records (LoRA too)",
            "scratchllm.finetune.instruct",
            "InstructConfig",
            "finetune_instruct_command",
            description="Finetune a model on {instruction, input, output} records (the book's chapter 7): a "
            "JSON list or JSONL file, split 85/5/10 train/val/test with --split-seed (none: file order, the "
            "book's split) or given as separate files. Full finetuning, or --lora. The assistant is written "
            "to OUT/model with its prompt template; the split goes to OUT/data. Settings come from the "
            "defaults (the book's), then --config, then the flags.",
            training=True,
        ),
        Command(
            "finetune dpo",
            "align a model with preference pairs (Direct Preference Optimization; LoRA too)",
            "scratchllm.finetune.dpo",
            "DPOConfig",
            "finetune_dpo_command",
            description="Direct Preference Optimization (the book's bonus chapter): {instruction, input, "
            "chosen, rejected} records (or prompt or messages instead of instruction), split like finetune "
            "instruct, prompted with the model's template. The frozen reference (the starting model, or "
            "--ref-model) scores every pair once before training. Full finetuning, or --lora. Settings come "
            "from the defaults (the book's), then --config, then the flags.",
            training=True,
        ),
        Command(
            "finetune grpo",
            "reinforcement learning with verifiable rewards (GRPO; LoRA too)",
            "scratchllm.finetune.grpo",
            "GRPOConfig",
            "finetune_grpo_command",
            description="GRPO: sample a group of completions per prompt with the generation engine, reward "
            "each with a verifier (exact, numeric, regex or your function), and push the model toward the "
            "completions better than their group's mean, with a clipped ratio (and an optional KL penalty). "
            "Data: {prompt, answer} records, e.g. from `scratchllm data arithmetic`. Held-out prompts are "
            "answered greedily at each evaluation.",
            training=True,
        ),
        Command(
            "data arithmetic",
            "write a synthetic arithmetic task (a corpus, GRPO prompts, held-out problems)",
            "scratchllm.finetune.arithmetic",
            "ArithmeticSettings",
            "arithmetic_command",
        ),
        Command(
            "respond",
            "answer every instruction of a file, batched (adds model_response)",
            "scratchllm.finetune.respond",
            "RespondSettings",
            "respond_command",
        ),
        Command(
            "chat",
            "talk with a model in the terminal (multi-turn, streamed)",
            "scratchllm.serve.chat",
            "ChatSettings",
            "chat_command",
        ),
        Command(
            "serve",
            "an OpenAI-compatible HTTP API (completions, chat, streaming)",
            "scratchllm.serve.server",
            "ServeSettings",
            "serve_command",
        ),
        Command(
            "judge",
            "score responses 0-100 with a judge LLM (Ollama, any OpenAI-compatible API)",
            "scratchllm.evals.judge",
            "JudgeSettings",
            "judge_command",
        ),
    ],
}

COMMANDS = {c.name: c for commands in STAGES.values() for c in commands}
OLD_NAMES = {c.old_name: c.name for c in COMMANDS.values() if c.old_name}
GROUPS = {name.split()[0] for name in COMMANDS if " " in name}  # tokenizer, finetune


def overview() -> str:
    """The commands by stage, for `scratchllm --help`."""
    lines = []
    for stage, commands in STAGES.items():
        lines += [stage] + [f"  {c.name:<20} {c.summary}" for c in commands] + [""]
    return "\n".join(lines) + "\nRun `scratchllm COMMAND --help` for the settings of each command.\n"


# the name one command gives a setting that another command names otherwise: the unknown-flag error
# suggests the active command's name for it (difflib would offer an unrelated flag, or nothing)
_OTHER_NAMES = {
    "--precision": ("--dtype",),
    "--dtype": ("--precision",),
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


def _load(command: Command, name: str) -> object:
    return getattr(importlib.import_module(command.module), name)


def _active(argv: Sequence[str]) -> Command | None:
    """The command `argv` runs (its old name too), or None for the overview or a group's help."""
    words = [w for w in argv[:2] if not w.startswith("-")]
    if not words:
        return None
    first = OLD_NAMES.get(words[0], words[0])
    if first in GROUPS:
        return COMMANDS.get(" ".join([first, *words[1:2]]))
    return COMMANDS.get(first)


def build_parser(active: Command | None = None) -> argparse.ArgumentParser:
    """The parser: every command by name, and the flags of the `active` one (whose settings class is
    imported for them; the others' are not)."""
    parser = _Parser(
        prog="scratchllm",
        epilog=overview(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build a GPT-style LLM from scratch and carry it through its whole life.",
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
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in COMMANDS.values():
        group, _, kind = command.name.rpartition(" ")
        if group and group not in groups:
            kinds = [c for c in COMMANDS.values() if c.name.startswith(group + " ")]
            g = sub.add_parser(
                group,
                description="\n".join(f"{c.name}: {c.summary}" for c in kinds),
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            groups[group] = g.add_subparsers(dest="kind", required=True, metavar="KIND", parser_class=_Parser)
        target = groups[group] if group else sub
        aliases = [command.old_name] if command.old_name else []
        listed = {"help": command.summary} if group else {}  # the overview lists the top-level ones
        p = target.add_parser(kind, aliases=aliases, description=command.summary, **listed)
        if command is active:
            _add_settings(p, command)
    return parser


def _add_settings(p: argparse.ArgumentParser, command: Command) -> None:
    cls = _load(command, command.settings)
    p.description = command.description or inspect.cleandoc(cls.__doc__ or command.summary)
    if command.preset is None:
        what = (
            "a TOML file or a preset name (see `scratchllm/configs/`)" if command.training else "a TOML file"
        )
        p.add_argument("--config", help=f"settings from {what}; the flags given win over it")
    if command.training:
        p.add_argument(
            "--resume",
            nargs="?",
            const="latest",
            default=None,
            metavar="CHECKPOINT",
            help="continue a stopped run exactly: no value = the newest checkpoint in the run "
            "directory, or a step-N checkpoint directory",
        )
        p.add_argument(
            "--out", dest="out_alias", default=None, metavar="DIR", help="the run directory (--out-dir)"
        )
    add_config_arguments(p, cls, preset=command.preset)
    p.set_defaults(command_spec=command, settings_class=cls)


def run(command: Command, args: argparse.Namespace) -> int:
    """Resolve the settings (defaults <- --config <- flags) and call the command's function."""
    function = _load(command, command.run)
    if not command.training:
        settings = load_config(args.settings_class, getattr(args, "config", None), overrides_from_args(args))
        return int(function(settings) or 0)
    result = function(getattr(args, "config", None), training_overrides(args), resume=args.resume)
    from .train.distributed import leave_process_group  # torch is loaded by now

    leave_process_group()
    train = getattr(result, "train", result)  # a classifier's result holds the trainer's
    if getattr(train, "stopped", None) != "interrupted":
        return 0
    # stopped by a signal after saving its checkpoint: exit as the shell reports a killed program
    return 128 + signal.Signals[train.signal or "SIGINT"].value


def training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a training command's flags give (`--out` is `--out-dir`; both naming two
    directories is an error), checked against `--resume`."""
    overrides = overrides_from_args(args)
    if args.out_alias is not None:
        same = os.path.normpath(os.path.expanduser(overrides.get("out_dir", args.out_alias)))
        if same != os.path.normpath(os.path.expanduser(args.out_alias)):
            raise ScratchLLMError(
                f"--out {args.out_alias} and --out-dir {overrides['out_dir']} name two run directories; give "
                "one"
            )
        overrides["out_dir"] = args.out_alias
    if args.resume is not None and coerce(
        "overwrite", overrides.get("overwrite", False), bool, "command line"
    ):
        raise ScratchLLMError(
            "--resume continues the run and --overwrite true starts it over; give one of them"
        )
    return overrides


def _active_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command being run, to suggest its flags for a mistyped one."""
    for dest in ("command", "kind"):
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, dest, None)
        if sub is None or name not in sub.choices:
            break
        parser = sub.choices[name]
    return parser


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings print as `scratchllm: warning: ...`, without Python's file name and source line.
    (The format, not the printing, is replaced, so whoever records warnings still sees them.)"""

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
        return _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:  # also while torch imports, before a command runs
        print("scratchllm: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    active = _active(argv)
    parser = build_parser(active)
    args, extras = parser.parse_known_args(argv)
    if extras:
        current = _active_parser(parser, args)
        bad = next((e for e in extras if e.startswith("-")), extras[0])
        current.error(
            f"unrecognized arguments: {' '.join(extras)}{_did_you_mean(current, bad.split('=')[0])}"
        )
    if argv[0] in OLD_NAMES:
        print(
            f"scratchllm: note: `{argv[0]}` is now `{OLD_NAMES[argv[0]]}`; the old name goes in the next "
            "release",
            file=sys.stderr,
        )
    try:
        with _one_line_warnings():
            return run(args.command_spec, args)
    except ScratchLLMError as e:
        print(f"scratchllm: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `scratchllm tokenizer encode ... | head`
        return 0
    except OSError as e:
        # a full, read-only or failing disk, or no permission: the machine's state, not a bug to trace
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM):
            raise
        print(f"scratchllm: error: {e}", file=sys.stderr)
        return 1


def entry() -> None:
    """The `scratchllm` program: `main`, then exit without Python's final garbage collection over
    everything torch created at import (`gc.freeze` moves the live objects out of its sight)."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a torchrun process: its work is done and written; gloo's threads can abort one at the C++
        # teardown of the interpreter's exit (SIGABRT, "terminate called without an active exception")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    import gc

    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
