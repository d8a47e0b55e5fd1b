"""The `scratchllm` command line: argument parsing only.

Each subcommand parses its flags and calls one function of a stage module; stage modules are
imported lazily so `scratchllm --help` stays instant. A `ScratchLLMError` anywhere becomes one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import ScratchLLMError

OVERVIEW = """\
Stage 1, foundation: text, tokenizers, the model
  tokenizer train|encode|decode|info   train a byte-level BPE, or inspect any tokenizer
  prepare                               tokenize a corpus into a memory-mapped token file

Run `scratchllm COMMAND --help` for the flags of each command.
"""

Handler = Callable[[argparse.Namespace], int | None]


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line with exit code 2 (its default code), no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
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

    tokenizer_encode(args.tokenizer, text=args.text, file=args.file, allow_special=args.allow_special)


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
    p.add_argument(
        "--encoding-errors",
        choices=["strict", "replace"],
        default="strict",
        help="what to do with bytes that are not UTF-8: stop with an error naming the file and "
        "offset (strict, default) or replace them with U+FFFD",
    )


def _add_stage1(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="train, inspect and use tokenizers")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION", parser_class=_Parser)

    p = tsub.add_parser("train", help="train a byte-level BPE tokenizer from scratch")
    _add_corpus_args(p)
    p.add_argument("--vocab-size", type=int, default=8192, help="target vocabulary size, specials included")
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
    p.set_defaults(func=_tokenizer_encode)

    p = tsub.add_parser("decode", help="print the text of token ids")
    p.add_argument("--tokenizer", default="gpt2", help=tok_help)
    p.add_argument("ids", nargs="+", help="token ids (space or comma separated)")
    p.set_defaults(func=_tokenizer_decode)

    p = tsub.add_parser("info", help="vocabulary size, special tokens, pattern")
    p.add_argument("--tokenizer", default="gpt2", help=tok_help)
    p.set_defaults(func=_tokenizer_info)

    p = sub.add_parser("prepare", help="tokenize a corpus into a memory-mapped token file for training")
    _add_corpus_args(p)
    p.add_argument("--tokenizer", default="gpt2", help=tok_help)
    p.add_argument("--out", required=True, help="output directory (train.bin, val.bin, meta.json)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out for validation")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: one per CPU core)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val document split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)


# ----------------------------------------------------------------------------------------------
# Stage 1: the model (info, download, export-hf) and generation


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    """info, download, export-hf."""


def _add_generate_command(sub: argparse._SubParsersAction) -> None:
    """generate."""


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="scratchllm",
        description="Build a GPT-style LLM from scratch and carry it through its whole life.",
        epilog=OVERVIEW,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"scratchllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_stage1(sub)
    _add_model_commands(sub)
    _add_generate_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except ScratchLLMError as e:
        print(f"scratchllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scratchllm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `scratchllm tokenizer encode ... | head`
        return 0
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
