"""Language-model evaluation: loss, perplexity and bits per byte of any model on any text.

`next_token_loss` is the loss every language-model task trains on; `token_loss` evaluates it over a
token array in non-overlapping windows (all of them, or the first `max_windows`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..config import setting
from ..device import autocast, pick_device, resolve_precision
from ..errors import ScratchLLMError
from ..hub import load_model
from ..model.quantize import QUANTIZE_MODES
from ..text.corpus import CorpusSettings, Document, load_documents
from ..text.tokenizer import Tokenizer


def next_token_loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy of predicting `targets` (batch, T) from `inputs` (batch, T); targets equal to
    `ignore_index` (padding, masked prompts) do not count. The model computes it with its head, chunk by
    chunk, with the softmax in fp32 (`GPTModel.forward(targets=...)`, model/loss.py)."""
    return model(inputs, targets=targets, ignore_index=ignore_index)


@torch.no_grad()
def token_loss(
    model: nn.Module,
    tokens: np.ndarray | Sequence[int],
    context_length: int,
    batch_size: int = 8,
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    max_windows: int | None = None,
    device: torch.device | None = None,
    context_only: int | None = None,
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and number of predicted tokens over `tokens`, cut into
    consecutive windows of `context_length` (the last one shorter). Every token after the first is
    predicted exactly once; except the id `context_only` (say <|endoftext|> between documents), which
    is context for the tokens after it but not predicted itself."""
    device = device or next(model.parameters()).device
    n = len(tokens)
    if n < 2:
        raise ScratchLLMError(f"need at least 2 tokens to evaluate, got {n}")
    starts = list(range(0, n - 1, context_length))
    if max_windows:
        starts = starts[:max_windows]
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        group = starts[i : i + batch_size]
        # windows of equal length batch together; the short final window (if any) goes alone
        full = [s for s in group if s + context_length + 1 <= n]
        parts = [full] + [[s] for s in group if s + context_length + 1 > n]
        for part in parts:
            if not part:
                continue
            length = min(context_length, n - 1 - part[0])
            rows = np.stack([np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s in part])
            rows_t = torch.from_numpy(rows).to(device)
            targets = rows_t[:, 1:]
            if context_only is not None:
                targets = targets.masked_fill(targets == context_only, -100)
            n_targets = int((targets != -100).sum())
            if n_targets == 0:
                continue
            with amp():
                # the loss the model trains on (fused with the head: no full logits tensor), times its count
                mean = next_token_loss(model, rows_t[:, :-1], targets)
            total += float(mean) * n_targets
            count += n_targets
    return total, count


def perplexity(loss: float) -> float:
    """exp(loss), or inf where that overflows."""
    return math.exp(loss) if loss < 700 else math.inf


def evaluate_text(
    model_spec: str,
    corpus: Sequence[str],
    context_length: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "fp32",
    encoding_errors: str = "strict",
    max_tokens: int = 0,
    quantize: str | None = None,
) -> dict[str, Any]:
    """Loss and perplexity per token of the text, and bits per byte, of a model on a corpus: each
    document follows an <|endoftext|> that is context only, so every text token is predicted once.
    `quantize` "int8" or "int4": of the model quantized so (what `generate --quantize` runs)."""
    if batch_size < 1:
        raise ScratchLLMError(f"--batch-size must be >= 1, got {batch_size}")
    if context_length is not None and context_length < 1:
        raise ScratchLLMError(
            f"--context-length must be >= 1 (or left out: the model's), got {context_length}"
        )
    if max_tokens < 0:
        raise ScratchLLMError(f"--max-tokens must be >= 0 (0: all), got {max_tokens}")
    dev = pick_device(device)
    prec = resolve_precision(precision, dev)
    # fp32 weights, whatever was stored: --precision says how it computes (bf16 by autocast)
    loaded = load_model(model_spec, device=str(dev), dtype="fp32", quantize=quantize)
    if loaded.tokenizer is None:
        raise ScratchLLMError(f"model {model_spec!r} has no tokenizer; it cannot read text")
    if loaded.config.n_classes:
        raise ScratchLLMError(f"model {model_spec!r} is a classifier; evaluate language models only")
    tok = loaded.tokenizer
    ctx = context_length or loaded.config.context_length
    if ctx > loaded.config.context_length:
        raise ScratchLLMError(
            f"--context-length {ctx} exceeds the model's context length {loaded.config.context_length}"
        )
    ids, n_bytes = _join_documents(tok, load_documents(corpus, encoding_errors), max_tokens)
    total, count = token_loss(
        loaded.model,
        np.asarray(ids),
        ctx,
        batch_size,
        lambda: autocast(dev, prec),
        device=dev,
        context_only=tok.eot_id,
    )
    if count == 0:
        raise ScratchLLMError("the corpus has no text to evaluate (need at least 1 token after the first)")
    loss = total / count
    return {
        "model": str(model_spec),
        "tokens": count,
        "bytes": n_bytes,
        "loss": loss,
        "perplexity": perplexity(loss),
        "bits_per_byte": total / (math.log(2) * n_bytes),
        "context_length": ctx,
    }


def _join_documents(tok: Tokenizer, docs: Sequence[Document], max_tokens: int) -> tuple[list[int], int]:
    """The token ids of `docs` (the first `max_tokens` text tokens; 0: all), each after an <|endoftext|>
    that is context only, and the bytes of the text they predict (bits per byte divides by those)."""
    eot = tok.eot_id
    ids: list[int] = [] if eot is None else [eot]
    n_bytes = n_text = 0
    for d in docs:
        doc = tok.encode(d.text)
        if max_tokens and n_text + len(doc) >= max_tokens:
            doc = doc[: max_tokens - n_text]
            n_bytes += len(tok.decode_bytes(doc))  # the bytes of the evaluated beginning
        else:
            n_bytes += len(d.text.encode("utf-8"))
        if eot is None and not ids and doc:  # no separator: the first token is context only
            n_bytes -= len(tok.decode_bytes(doc[:1]))
        ids.extend(doc)
        n_text += len(doc)
        if max_tokens and n_text >= max_tokens:
            break
        if eot is not None:
            ids.append(eot)
    return ids, n_bytes


@dataclass
class PerplexitySettings:
    """Loss, perplexity and bits per byte of a model on any text: every token of every document is
    predicted once, after an <|endoftext|> that is context only (training's validation loss also
    predicts the <|endoftext|> between documents, so it differs slightly). For zero-/few-shot accuracy
    on task files (HellaSwag, multiple choice, generation) see `scratchllm eval-tasks`."""

    model: str = setting("", "a model directory or gpt2, gpt2-medium, ...", "model", required=True)
    text: CorpusSettings = setting(CorpusSettings(), "the text to evaluate on", "data")
    context_length: int | None = setting(None, "window length (none: the model's)", "evaluation")
    batch_size: int = setting(8, "windows per forward pass", "evaluation")
    max_tokens: int = setting(0, "evaluate only the first N tokens (0: all)", "evaluation")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps", "model")
    precision: str = setting("fp32", "fp32 (exact), bf16, fp16 or auto", "model")
    quantize: str | None = setting(
        None,
        "evaluate the model with int8 or int4 weights, as `generate --quantize` runs it (CPU only)",
        "model",
        choices=QUANTIZE_MODES,
    )
    json: bool = setting(False, "print the result as JSON", "output")


def perplexity_command(settings: PerplexitySettings) -> None:
    """`scratchllm perplexity`: print loss, perplexity and bits per byte."""
    if not settings.model:  # a TOML file can leave it out, which the flag cannot
        raise ScratchLLMError("give a model: --model MODEL (a model directory or gpt2, gpt2-medium, ...)")
    result = evaluate_text(
        settings.model,
        settings.text.corpus,
        context_length=settings.context_length,
        batch_size=settings.batch_size,
        device=settings.device,
        precision=settings.precision,
        encoding_errors=settings.text.encoding_errors,
        max_tokens=settings.max_tokens,
        quantize=settings.quantize,
    )
    if settings.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['model']}: loss {result['loss']:.4f} nats/token, perplexity "
            f"{result['perplexity']:.2f}, {result['bits_per_byte']:.4f} bits/byte over {result['tokens']:,} "
            f"tokens ({result['bytes']:,} bytes, context {result['context_length']})"
        )
