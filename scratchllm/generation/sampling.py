"""From logits to tokens: the book's two generation loops, and the pieces every decoding step uses
(penalties against repetition, temperature / top-k / top-p sampling, log-probabilities).

The book's `generate_text_simple` (greedy) and `generate` (temperature, top-k, EOS) feed the whole
(cropped) sequence to the model for every new token: short and slow, the reference the `Decoder` is
tested against. `sample_next_token` never touches PyTorch's global random state: a seeded
`torch.Generator` reproduces a run exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


def generate_text_simple(
    model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int
) -> torch.Tensor:
    """Greedy decoding, the book's way: append the most likely next token `max_new_tokens` times.

    idx: (batch, n_tokens) token ids; returns (batch, n_tokens + max_new_tokens). Every step runs
    the model on the last `context_size` tokens (what fits its position embeddings) and keeps only
    the logits of the last position.
    """
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]  # (batch, vocab_size): only the last position predicts the next token
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)  # (batch, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
) -> torch.Tensor:
    """The book's sampling loop: keep the `top_k` most likely tokens, divide the logits by
    `temperature` (0: greedy), sample from their softmax; stop before appending `eos_id`.

    Uses PyTorch's global random generator (call `torch.manual_seed` for repeatable samples).
    With several rows it stops when every row's next token is `eos_id` (one row: the book's test).
    """
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]
        if top_k is not None:
            top_logits, _ = torch.topk(logits, top_k)
            min_val = top_logits[:, -1:]
            logits = torch.where(logits < min_val, torch.tensor(float("-inf"), device=logits.device), logits)
        if temperature > 0.0:
            probs = torch.softmax(logits / temperature, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        if eos_id is not None and bool((idx_next == eos_id).all()):
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (batch, vocab_size).

    temperature 0 is greedy (top_k and top_p change nothing then). Otherwise the logits are
    divided by the temperature, cut to the `top_k` largest (ties kept, as in the book), then to the
    smallest set of most likely tokens whose probabilities reach `top_p` (nucleus sampling; the
    most likely token always stays), and one token is drawn from the softmax of what is left.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def sampling_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float = 1.0
) -> torch.Tensor:
    """The distribution (rows, vocab_size) that `sample_next_token` draws from at `temperature` > 0:
    the softmax of the logits divided by the temperature and cut to top-k, then top-p."""
    scaled = logits.float() / temperature
    if not torch.isfinite(scaled.amax(dim=-1)).all():  # a tiny temperature overflowed: the same softmax,
        shifted = logits.float() - logits.float().amax(dim=-1, keepdim=True)  # from logits that peak at 0
        scaled = shifted / temperature
    logits = scaled
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the more likely ones before it already reach top_p
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, -torch.inf)
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)


def apply_penalties(
    logits: torch.Tensor,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> torch.Tensor:
    """Logits (batch, vocab_size) made less likely to repeat, before sampling.

    `seen` (bool, same shape) marks the tokens of each row's prompt and text so far: their logits are
    divided by `repetition_penalty` when positive and multiplied by it when negative (Keskar et al.
    2019, as in Hugging Face's `repetition_penalty`). `counts` holds how often each token was
    generated so far: `frequency_penalty` is subtracted once per occurrence and `presence_penalty`
    once for any (OpenAI's API). Penalties of 1 and 0 change nothing.
    """
    if seen is not None and repetition_penalty != 1.0:
        penalized = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if counts is not None and (presence_penalty or frequency_penalty):
        logits = logits - frequency_penalty * counts - presence_penalty * (counts > 0).to(logits.dtype)
    return logits


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the most likely tokens at its position
    (`top`: (token id, log-probability) pairs, most likely first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Per row of `logits` (rows, vocab_size): the log-probability of that row's token in `tokens`,
    with the `top` most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens.reshape(-1, 1)).squeeze(-1).tolist()
    top = min(top, logp.shape[-1])  # a vocabulary smaller than the alternatives asked for
    if top:
        values, ids = logp.topk(top, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(t, lp, tp) for t, lp, tp in zip(tokens.tolist(), chosen, tops)]
