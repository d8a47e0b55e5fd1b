"""A tokenizer in GGUF's terms (`gguf_vocab`): which of llama.cpp's tokenizers each of ours becomes.

llama.cpp runs two kinds that our models use:
- "gpt2", byte-level BPE: the tokens in GPT-2's printable view of bytes, the merges (`left right` in that
  view) and the pre-tokenizer by name (`tokenizer.ggml.pre`). llama.cpp has each split regex it supports
  built in under a name, so a regex it does not know cannot travel. GPT-2's tokenizer, one trained here with
  the gpt2 or gpt4 pattern, and a model's tokenizer.json that splits as GPT-2, Llama 3 or Qwen do, are
  of this kind.
- "llama", SentencePiece-style BPE with byte fallback (Gemma's tokenizer.json): the tokens with `▁` for a
  space, `<0xNN>` byte tokens, and scores; llama.cpp merges the adjacent pair whose token scores highest,
  so a token's score is minus the rank of the merge that makes it.
The character and word tokenizers, and Unigram or WordPiece tokenizer.json files, have no GGUF form here: a
one-line error names them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import gguf

from ..errors import ScratchLLMError
from ..text.bpe import GPT2_PATTERN, GPT4_PATTERN, BPETokenizer, token_to_unicode
from ..text.hf_tokenizer import HFTokenizer
from ..text.tokenizer import Tokenizer

# Our BPE patterns -> llama.cpp's pre-tokenizer that splits alike (cl100k's pattern is Llama 3's)
BPE_PRE = {GPT2_PATTERN: "gpt-2", GPT4_PATTERN: "llama-bpe"}
# tokenizer.json Split regexes -> llama.cpp's pre-tokenizer of that regex (llama-vocab.cpp lists them)
SPLIT_PRE = {
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}
SPACE = "▁"  # SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
T = gguf.TokenType


@dataclass
class GGUFVocab:
    """What GGUF's `tokenizer.ggml.*` keys hold; tokens and types by id (gaps become unused padding)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str  # the pre-tokenizer's name in llama.cpp
    tokens: dict[int, str]
    types: dict[int, int]
    merges: list[str] = field(default_factory=list)
    scores: dict[int, float] | None = None  # "llama" only
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = False
    add_space_prefix: bool | None = None  # "llama" only: a space before the text, as SentencePiece does


def gguf_vocab(tokenizer: Tokenizer | None) -> GGUFVocab:
    """The GGUF form of one of our tokenizers; a one-line error for a kind GGUF cannot express."""
    if isinstance(tokenizer, BPETokenizer):
        return bpe_vocab(tokenizer)
    if isinstance(tokenizer, HFTokenizer):
        return hf_vocab(tokenizer)
    if tokenizer is None:
        raise ScratchLLMError(
            "the model has no tokenizer, and a GGUF file needs one (llama.cpp and Ollama encode the prompt "
            "themselves); save the model with its tokenizer"
        )
    raise ScratchLLMError(
        f"the model's {tokenizer.kind} tokenizer {tokenizer.name!r} has no GGUF form (llama.cpp runs "
        "byte-level BPE and SentencePiece tokenizers); train the model with a BPE tokenizer (`scratchllm "
        "tokenizer train`) to take it to llama.cpp"
    )


def write_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab, vocab_size: int) -> None:
    """The tokenizer keys; ids up to the model's `vocab_size` that the tokenizer lacks (an embedding padded
    to a round size) become unused `[PADn]` tokens, as in llama.cpp's converter."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list([vocab.tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types([vocab.types.get(i, T.UNUSED) for i in range(vocab_size)])
    if vocab.scores is not None:
        writer.add_token_scores([vocab.scores.get(i, 0.0) for i in range(vocab_size)])
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for add, token_id in (
        (writer.add_bos_token_id, vocab.bos_id),
        (writer.add_eos_token_id, vocab.eos_id),
        (writer.add_pad_token_id, vocab.pad_id),
        (writer.add_unk_token_id, vocab.unk_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)


# ----------------------------------------------------------------------------------------------
# Ours: byte-level BPE (GPT-2's, or trained here)


def bpe_vocab(tokenizer: BPETokenizer) -> GGUFVocab:
    """A byte-level BPE tokenizer of ours: GPT-2's, or one trained with the gpt2 or gpt4 pattern."""
    pre = BPE_PRE.get(tokenizer.pattern)
    if pre is None:
        raise ScratchLLMError(
            f"tokenizer {tokenizer.name!r}: its pre-tokenization regex {tokenizer.pattern!r} is not one that "
            "llama.cpp knows, so GGUF cannot carry it; train the tokenizer with --pattern gpt2 or gpt4"
        )
    merges = tokenizer.merges
    if merges is None:
        raise ScratchLLMError(
            f"tokenizer {tokenizer.name!r}: some token is no merge of two others, and GGUF's BPE needs the "
            "merges; retrain the tokenizer with `scratchllm tokenizer train`"
        )
    tokens = {i: token_to_unicode(data) for data, i in tokenizer.mergeable_ranks.items()}
    types = dict.fromkeys(tokens, T.NORMAL)
    for text, i in tokenizer.special_tokens.items():
        tokens[i], types[i] = text, T.CONTROL
    eot = tokenizer.eot_id  # GPT-2's <|endoftext|> begins and ends a text
    return GGUFVocab(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        types=types,
        merges=[f"{token_to_unicode(a)} {token_to_unicode(b)}" for a, b in merges],
        bos_id=eot,
        eos_id=eot,
    )


# ----------------------------------------------------------------------------------------------
# A model's own tokenizer.json


def hf_vocab(tokenizer: HFTokenizer) -> GGUFVocab:
    """A model's tokenizer.json: byte-level BPE ("gpt2") or SentencePiece-style BPE ("llama")."""
    spec = json.loads(tokenizer.tokenizer.to_str())
    model = spec.get("model") or {}
    where = f"tokenizer {tokenizer.name!r}"
    if model.get("type") != "BPE":
        raise ScratchLLMError(
            f"{where}: a {model.get('type')} tokenizer.json has no GGUF form here (byte-level BPE and "
            "SentencePiece-style BPE have); export the model with export-hf instead"
        )
    vocab = {str(text): int(i) for text, i in model["vocab"].items()}
    merges = [" ".join(m) if isinstance(m, list) else str(m) for m in model.get("merges") or []]
    added = {int(t["id"]): t for t in spec.get("added_tokens") or []}
    if model.get("byte_fallback"):
        result = _sentencepiece_vocab(spec, vocab, merges, added, where)
    else:
        result = _byte_level_vocab(spec, vocab, merges, added, where)
    result.bos_id, result.eos_id, result.pad_id = tokenizer.bos_id, tokenizer.eot_id, tokenizer.pad_id
    result.add_bos = tokenizer.add_bos
    return result


def _byte_level_vocab(
    spec: Mapping[str, Any], vocab: dict[str, int], merges: list[str], added: dict[int, dict], where: str
) -> GGUFVocab:
    pre = split_pre_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise ScratchLLMError(
            f"{where}: its pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} is not one that "
            "llama.cpp knows (GPT-2's, Llama 3's or Qwen's split), so GGUF cannot hold it; export-hf keeps it"
        )
    tokens = {i: text for text, i in vocab.items()}
    types = dict.fromkeys(tokens, T.NORMAL)
    _add_added_tokens(tokens, types, added)
    return GGUFVocab(model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges)


def split_pre_name(pre_tokenizer: Any) -> str | None:
    """llama.cpp's name for a byte-level tokenizer.json's pre-tokenizer: GPT-2's `ByteLevel` with its own
    regex, or one `Split` by a known regex followed by `ByteLevel`; None for any other."""
    if not isinstance(pre_tokenizer, dict):
        return None
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    if not steps or not all(isinstance(s, dict) for s in steps):
        return None
    *splits, last = steps
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space"):
        return None
    if not splits:
        return "gpt-2" if last.get("use_regex", True) else None
    split = splits[0]
    regex = (split.get("pattern") or {}).get("Regex")
    if len(splits) != 1 or split.get("type") != "Split" or split.get("invert") or last.get("use_regex"):
        return None
    return SPLIT_PRE.get(regex) if split.get("behavior") == "Isolated" else None


def _sentencepiece_vocab(
    spec: Mapping[str, Any], vocab: dict[str, int], merges: list[str], added: dict[int, dict], where: str
) -> GGUFVocab:
    prepend = _spaces_become_marks(spec)
    if prepend is None:
        raise ScratchLLMError(
            f"{where}: a byte-fallback BPE tokenizer.json whose spaces do not become {SPACE!r} (by a Replace "
            "normalizer or a Metaspace pre-tokenizer) has no GGUF form; export-hf keeps it"
        )
    tokens = {i: text for text, i in vocab.items()}
    unk = (spec.get("model") or {}).get("unk_token")
    types = {i: _piece_type(text, unk) for i, text in tokens.items()}
    scores = dict.fromkeys(tokens, 0.0)
    for rank, merge in enumerate(merges):
        merged = vocab.get(merge.replace(" ", "", 1))
        if merged is not None and scores[merged] == 0.0:  # the first merge that makes it
            scores[merged] = -float(rank + 1)
    _add_added_tokens(tokens, types, added)
    return GGUFVocab(
        model="llama",
        pre="default",
        tokens=tokens,
        types=types,
        scores=scores,
        unk_id=vocab.get(unk) if unk is not None else None,
        add_space_prefix=prepend,
    )


def _spaces_become_marks(spec: Mapping[str, Any]) -> bool | None:
    """For a SentencePiece-style tokenizer.json: whether a `▁` is put before the text (None: spaces do not
    become `▁` at all, which llama.cpp's tokenizer of this kind always does)."""
    normalizers = _steps(spec.get("normalizer"), "normalizers")
    marks = any(
        n.get("type") == "Replace"
        and (n.get("pattern") or {}).get("String") == " "
        and n.get("content") == SPACE
        for n in normalizers
    )
    prepend = any(n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in normalizers)
    for pre in _steps(spec.get("pre_tokenizer"), "pretokenizers"):
        if pre.get("type") == "Metaspace" and pre.get("replacement", SPACE) == SPACE:
            marks = True
            scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
            prepend = prepend or scheme != "never"
    return prepend if marks else None


def _steps(spec: Any, key: str) -> list[dict]:
    """A normalizer or pre-tokenizer as its list of steps (a Sequence's, or itself)."""
    if not isinstance(spec, dict):
        return []
    steps = spec.get(key) if spec.get("type") == "Sequence" else [spec]
    return [s for s in steps or [] if isinstance(s, dict)]


def _piece_type(text: str, unk: str | None) -> int:
    if text == unk:
        return T.UNKNOWN
    return T.BYTE if _BYTE_TOKEN.fullmatch(text) else T.NORMAL


def _add_added_tokens(tokens: dict[int, str], types: dict[int, int], added: dict[int, dict]) -> None:
    """tokenizer.json's added tokens: special ones are control tokens, the others user-defined text."""
    for i, token in added.items():
        tokens[i] = str(token["content"])
        types[i] = T.CONTROL if token.get("special") else T.USER_DEFINED
