"""Byte-level BPE: trained from scratch here, encoded through tiktoken's engine.

A byte-level BPE tokenizer is three things:
- a pre-tokenization regex that cuts text into pieces (words with their leading space, numbers,
  punctuation runs, whitespace); tokens never cross a piece boundary;
- `mergeable_ranks`: byte string -> id. Every single byte is a token, so any text can be spelled;
  the other tokens were learned by merging frequent adjacent pairs, and a lower id means learned
  earlier;
- special tokens (`<|endoftext|>`) with ids after the learned ones; they never come out of text
  unless the caller allows them, so `decode(encode(s)) == s` for every string (that is valid
  Unicode: lone surrogates cannot be UTF-8 and become U+FFFD, as in tiktoken).

encode.py holds `BPETokenizer` (encoding through tiktoken's engine, and a readable pure-Python
encoder that gives identical ids); train.py, `train_bpe`, which learns the ranks from a corpus;
files.py, the two on-disk formats (tiktoken's, and OpenAI's encoder.json + vocab.bpe).
"""

from .encode import (
    BATCH_MIN_CHARS,
    BATCH_THREADS,
    GPT2_PATTERN,
    GPT4_PATTERN,
    PATTERNS,
    BPETokenizer,
    bpe_merge,
    pattern_name,
    pieces_pattern,
    resolve_pattern,
)
from .files import (
    ENCODER_FILE,
    MERGES_FILE,
    TIKTOKEN_FILE,
    bytes_to_unicode,
    dump_tiktoken_ranks,
    read_encoder_files,
    read_merges_file,
    read_tiktoken_file,
    token_to_unicode,
    unicode_to_bytes,
    unicode_to_token,
)
from .train import check_training_args, count_pretokens, train_bpe

__all__ = [
    "BATCH_MIN_CHARS",
    "BATCH_THREADS",
    "ENCODER_FILE",
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "MERGES_FILE",
    "PATTERNS",
    "TIKTOKEN_FILE",
    "BPETokenizer",
    "bpe_merge",
    "bytes_to_unicode",
    "check_training_args",
    "count_pretokens",
    "dump_tiktoken_ranks",
    "pattern_name",
    "pieces_pattern",
    "read_encoder_files",
    "read_merges_file",
    "read_tiktoken_file",
    "resolve_pattern",
    "token_to_unicode",
    "train_bpe",
    "unicode_to_bytes",
    "unicode_to_token",
]
