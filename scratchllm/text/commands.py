"""`scratchllm tokenizer train|encode|decode|info`: what each subcommand does, called by cli.py."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..errors import ScratchLLMError
from .bpe import BPETokenizer, check_training_args, resolve_pattern, train_bpe
from .tokenizer import META_FILE, Tokenizer, load_tokenizer


def tokenizer_train(
    corpus: Sequence[str],
    vocab_size: int,
    out: str,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    pattern: str = "gpt2",
    encoding_errors: str = "strict",
    progress: bool = True,
) -> BPETokenizer:
    """Train a byte-level BPE on the corpus, write it to `out` (as a whole), print a summary."""
    from ..fileio import atomic_dir, check_replaceable
    from .corpus import load_documents

    out_dir = Path(out).expanduser()
    check_replaceable(out_dir, META_FILE, "tokenizer directory")  # before the training, not after
    check_training_args(vocab_size, special_tokens)
    resolve_pattern(pattern)
    docs = load_documents(corpus, encoding_errors)
    texts = [d.text for d in docs]
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = train_bpe(
            texts, vocab_size, special_tokens, pattern=pattern, progress=progress, name=out_dir.name
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
        f"corpus: {len(docs):,} documents, {n_bytes:,} bytes -> {n_tokens:,} tokens ({n_bytes / n_tokens:.2f} bytes/token)"
    )
    print(f"saved to {out_dir}")
    return tok


def tokenizer_encode(
    tokenizer: str,
    text: str | None = None,
    file: str | None = None,
    allow_special: bool = False,
    encoding_errors: str = "strict",
) -> None:
    from .corpus import read_text_file

    tok = load_tokenizer(tokenizer)
    if file is not None:
        text = read_text_file(file, encoding_errors)
    ids = tok.encode(text or "", allowed_special="all" if allow_special else frozenset())
    print(" ".join(map(str, ids)))


def tokenizer_decode(tokenizer: str, ids: Sequence[str]) -> None:
    tok = load_tokenizer(tokenizer)
    print(tok.decode(parse_ids(ids, tok.vocab_size)))


def parse_ids(args: Sequence[str], vocab_size: int) -> list[int]:
    """Token ids from command-line words, separated by spaces and/or commas, checked against the vocabulary."""
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


def tokenizer_info(tokenizer: str) -> None:
    tok = load_tokenizer(tokenizer)
    for key, value in describe(tok).items():
        print(f"{key + ':':<16}{value}")


def describe(tok: Tokenizer) -> dict[str, str]:
    from .bpe import pattern_name

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
