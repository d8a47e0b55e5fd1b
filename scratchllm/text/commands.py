"""`scratchllm tokenizer train|encode|decode|info` and `scratchllm prepare`: each command's settings
and the function that runs it."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import setting
from ..errors import ScratchLLMError
from ..fileio import atomic_dir, check_replaceable
from .bpe import BPETokenizer, check_training_args, pattern_name, resolve_pattern, train_bpe
from .corpus import CorpusSettings, load_documents, read_text_file
from .prepare import prepare
from .registry import load_tokenizer
from .tokenizer import EOT, META_FILE, Tokenizer

TOKENIZER_HELP = (
    "gpt2, a tokenizer directory, a model directory, or GPT-2 files (encoder.json/vocab.bpe dir, .tiktoken)"
)


@dataclass
class TokenizerTrainSettings:
    """`scratchllm tokenizer train`: a byte-level BPE trained on a corpus."""

    text: CorpusSettings = setting(CorpusSettings(), "the text to train on", "data")
    vocab_size: int = setting(8192, "target vocabulary size, specials included", "tokenizer")
    out: str = setting("", "directory to write the tokenizer to", "tokenizer", required=True)
    special_tokens: list[str] = setting(
        [EOT], "special tokens appended after the learned ones", "tokenizer", metavar="TOKEN"
    )
    pattern: str = setting("gpt2", "pre-tokenization regex: gpt2, gpt4 or a regex string", "tokenizer")
    quiet: bool = setting(False, "no progress bar", "tokenizer")


def tokenizer_train_command(settings: TokenizerTrainSettings) -> None:
    """Train a byte-level BPE on the corpus, write it to `out` (as a whole), print a summary."""
    if not settings.out:
        raise ScratchLLMError("tokenizer train needs --out DIR, the directory to write the tokenizer to")
    out_dir = Path(settings.out).expanduser()
    check_replaceable(out_dir, META_FILE, "tokenizer directory")  # before the training, not after
    check_training_args(settings.vocab_size, settings.special_tokens)
    resolve_pattern(settings.pattern)
    docs = load_documents(settings.text.corpus, settings.text.encoding_errors)
    texts = [d.text for d in docs]
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = train_bpe(
            texts,
            settings.vocab_size,
            settings.special_tokens,
            pattern=settings.pattern,
            progress=not settings.quiet,
            name=out_dir.name,
        )
    seconds = time.perf_counter() - start
    for w in caught:  # e.g. the corpus ran out of pairs: one readable line, not a source listing
        print(f"scratchllm: warning: {w.message}", file=sys.stderr)
    with atomic_dir(out_dir, marker=META_FILE, what="tokenizer directory") as tmp:
        tok.save(tmp)

    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(map(len, tok.encode_batch(texts)))
    print(f"trained {tok.vocab_size:,} tokens ({len(tok.special_tokens)} special) in {seconds:.2f} s")
    print(
        f"corpus: {len(docs):,} documents, {n_bytes:,} bytes -> {n_tokens:,} tokens "
        f"({n_bytes / n_tokens:.2f} bytes/token)"
    )
    print(f"saved to {out_dir}")


@dataclass
class TokenizerEncodeSettings:
    """`scratchllm tokenizer encode`: the ids of a text or of a file's text."""

    tokenizer: str = setting("gpt2", TOKENIZER_HELP, "tokenizer")
    # a str, not `str | None`: `--text none` encodes the word, as any other text
    text: str = setting("", "the text to encode", "tokenizer", exclusive="source", required=True)
    file: str | None = setting(None, "a UTF-8 file to encode", "tokenizer", exclusive="source", required=True)
    allow_special: bool = setting(False, "encode special-token strings as specials", "tokenizer")
    reading: CorpusSettings = setting(
        CorpusSettings(), "how the file's bytes are read", "tokenizer", only=("encoding_errors",)
    )


def tokenizer_encode_command(settings: TokenizerEncodeSettings) -> None:
    """Print the token ids of `text` or of a file's text."""
    tok = load_tokenizer(settings.tokenizer)
    text = settings.text
    if settings.file is not None:
        text = read_text_file(settings.file, settings.reading.encoding_errors)
    ids = tok.encode(text, allowed_special="all" if settings.allow_special else frozenset())
    print(" ".join(map(str, ids)))


@dataclass
class TokenizerDecodeSettings:
    """`scratchllm tokenizer decode`: the text of token ids."""

    tokenizer: str = setting("gpt2", TOKENIZER_HELP, "tokenizer")
    ids: list[str] = setting([], "token ids (space or comma separated)", "tokenizer", positional="+")


def tokenizer_decode_command(settings: TokenizerDecodeSettings) -> None:
    """Print the text of token ids given as command-line words."""
    tok = load_tokenizer(settings.tokenizer)
    print(tok.decode(parse_ids(settings.ids, tok.vocab_size)))


def parse_ids(args: Sequence[str], vocab_size: int) -> list[int]:
    """Token ids from command-line words, separated by spaces and/or commas, checked against the
    vocabulary."""
    ids = []
    for word in " ".join(args).replace(",", " ").split():
        try:
            i = int(word)
        except ValueError:
            raise ScratchLLMError(
                f"{word!r} is not a token id: give integers separated by spaces or commas"
            ) from None
        if not 0 <= i < vocab_size:
            raise ScratchLLMError(f"token id {i} is out of range: this tokenizer has ids 0..{vocab_size - 1}")
        ids.append(i)
    return ids


@dataclass
class TokenizerInfoSettings:
    """`scratchllm tokenizer info`: what a tokenizer is."""

    tokenizer: str = setting("gpt2", TOKENIZER_HELP, "tokenizer")


def tokenizer_info_command(settings: TokenizerInfoSettings) -> None:
    """Print what `describe` says of a tokenizer."""
    tok = load_tokenizer(settings.tokenizer)
    for key, value in describe(tok).items():
        print(f"{key + ':':<16}{value}")


def describe(tok: Tokenizer) -> dict[str, str]:
    """A tokenizer's kind, name, size, special tokens, pattern (BPE) and fingerprint, for people."""
    info = {
        "kind": tok.kind,
        "name": tok.name,
        "vocab size": f"{tok.vocab_size:,}",
        "special tokens": ", ".join(f"{s} = {i}" for s, i in tok.special_tokens.items()) or "none",
    }
    if isinstance(tok, BPETokenizer):
        info["pattern"] = pattern_name(tok.pattern)
    info["fingerprint"] = tok.fingerprint()
    return info


@dataclass
class PrepareSettings:
    """`scratchllm prepare`: a corpus tokenized once into memory-mapped token files (text/prepare.py)."""

    text: CorpusSettings = setting(CorpusSettings(), "the text to tokenize", "data")
    tokenizer: str = setting("gpt2", TOKENIZER_HELP, "data")
    out: str = setting("", "output directory (train.bin, val.bin, meta.json)", "data", required=True)
    val_fraction: float = setting(
        0.1,
        "chance of each document to be held out for validation (drawn per document, so the share of "
        "tokens varies; when all land on one side, the last tokens)",
        "data",
    )
    workers: int = setting(
        0,
        "tokenizer processes (0: one per CPU core and 16 MB of text); at most one per core and per MB of "
        "text",
        "data",
    )
    seed: int = setting(1337, "seed of the train/val document split", "data")
    quiet: bool = setting(False, "no progress bar", "data")


def prepare_command(settings: PrepareSettings) -> None:
    """Tokenize the corpus into `out` (`prepare`, which prints its own summary)."""
    if not settings.out:
        raise ScratchLLMError("prepare needs --out DIR, the directory to write the token files to")
    prepare(
        corpus=settings.text.corpus,
        tokenizer=settings.tokenizer,
        out=settings.out,
        val_fraction=settings.val_fraction,
        workers=settings.workers,
        encoding_errors=settings.text.encoding_errors,
        seed=settings.seed,
        progress=not settings.quiet,
    )
