"""What the generation tests share: a byte-level tokenizer, tiny models, the book's greedy loop as the
reference, and a decoder driven to the end."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from scratchllm.generation import CompiledDecoding, Decoder, Engine, GenerationConfig, generate_text_simple
from scratchllm.model.gpt import GPTConfig, GPTModel
from scratchllm.text.tokenizer import EOT, Tokenizer

CTX = 24


class ByteTokenizer(Tokenizer):
    """Ids 0-255 are single bytes (so one character may take several tokens), 256 is <|endoftext|>."""

    kind = "test-bytes"

    def __init__(self) -> None:
        self.name = "bytes"
        self.special_tokens = {EOT: 256}

    @property
    def vocab_size(self) -> int:
        return 257

    def encode(self, text: str, allowed_special: Any = frozenset()) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(EOT.encode() if i == 256 else bytes([i]) for i in ids)

    def _files(self) -> dict[str, bytes]:
        return {}

    def _meta(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _load(cls, directory: Path, meta: dict[str, Any]) -> ByteTokenizer:
        return cls()


def tiny_model(
    seed: int = 0, ctx: int = CTX, vocab: int = 257, layers: int = 2, tie_weights: bool = True
) -> GPTModel:
    """A small GPT in eval mode whose next-token choices are clear (few near ties). Untied
    (`tie_weights=False`), its replies vary more: a random tied model mostly repeats its last token."""
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=vocab,
        context_length=ctx,
        emb_dim=32,
        n_heads=4,
        n_layers=layers,
        drop_rate=0.0,
        tie_weights=tie_weights,
    )
    model = GPTModel(cfg).eval()
    with torch.no_grad():  # sharper next-token distributions than GPT-2's tiny initial weights give
        model.tok_emb.weight.mul_(10)
    return model


def book_greedy(model: GPTModel, prompt: list[int], n: int) -> list[int]:
    """The `n` tokens the book's greedy loop appends to `prompt`: the reference."""
    out = generate_text_simple(model, torch.tensor([prompt]), n, model.cfg.context_length)
    return out[0, len(prompt) :].tolist()


def decode_all(model: GPTModel, prompts: list[list[int]], n: int, **kw) -> list[list[int]]:
    """`n` tokens per prompt from a `Decoder` with these settings (`GenerationConfig`'s fields)."""
    dec = Decoder(model, prompts, GenerationConfig(max_new_tokens=n, **kw))
    out: list[list[int]] = [[] for _ in prompts]
    while dec.active and dec.steps < n:
        for r, t in zip(dec.active, dec.step()):
            out[r].append(t)
    return out


def prompts_of(lengths: list[int], seed: int = 0, vocab: int = 256) -> list[list[int]]:
    """Random prompts of these lengths."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def static_engine(model: GPTModel, compile: bool = False) -> Engine:
    """An engine whose one-token steps run over a static-mode cache, eagerly unless `compile`."""
    engine = Engine(model, ByteTokenizer(), compile=True)
    engine.compiled = CompiledDecoding(model, compile=compile)
    return engine
