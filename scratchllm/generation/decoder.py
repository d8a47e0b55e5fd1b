"""The token-level core: a batch of prompts (token ids) in, one new token per unfinished row per step out.

`Decoder` left-pads prompts of different lengths and masks the padding (`GPTModel`'s
`padding_mask`), keeps a preallocated KV cache so each step runs the model on one new token per row,
and, once a sequence outgrows the context window, re-runs the model on its last `context_length`
tokens, so it always equals the book's loop (which crops to the last `context_size` tokens and
restarts positions at 0).
"""

from __future__ import annotations

import contextlib
import secrets
import warnings
from collections import deque
from collections.abc import Iterable, Sequence

import torch

from ..errors import ScratchLLMError
from ..model.attention import KVCache
from ..model.gpt import GPTModel
from .compiled import CompiledDecoding
from .config import GenerationConfig
from .kernels import PackedLinears
from .sampling import TokenLogprob, apply_penalties, sample_next_token, token_logprobs


class Decoder:
    """Generate tokens for a batch of prompts, one step at a time.

        dec = Decoder(model, [[15496, 11], [464]], GenerationConfig(max_new_tokens=20))
        while dec.active:
            for row, token in zip(dec.active, dec.step()):
                ...
            dec.finish(rows_that_are_done)

    `step()` returns the next token of every active row (in `active` order, rows named by their
    index in `prompts`); `finish(rows)` takes rows out of the batch. The decoder stops a row by
    itself only after `max_new_tokens` (end tokens and stop strings are the `Engine`'s). Prompts
    longer than the context window keep their last `context_length` tokens (with a warning).

    `kernels`: decode through these prepacked CPU weights. `cache_dtype`: the KV cache's dtype
    (None: the weights'). `compiled`: run the one-token steps through a `CompiledDecoding` (fixed
    shapes, torch.compile, CUDA graphs on GPUs); its cache keeps every row, so finished rows stay in
    the batch (their results are dropped) instead of leaving it.
    """

    def __init__(
        self,
        model: GPTModel,
        prompts: Sequence[Sequence[int]],
        config: GenerationConfig,
        *,
        kernels: PackedLinears | None = None,
        cache_dtype: torch.dtype | None = None,
        compiled: CompiledDecoding | None = None,
    ):
        if not prompts:
            raise ScratchLLMError("generation: no prompts given")
        config.validate()  # a config changed after it was made is checked again
        self.model = model
        self.config = config
        self.context_length = model.cfg.context_length
        self.cache_dtype = cache_dtype
        self.compiled = compiled if config.use_cache else None
        # compiled: the compiler picks the kernels (so nothing is packed)
        use_kernels = kernels is not None and self.compiled is None
        self.kernels = kernels if use_kernels and kernels.refresh() else None
        self.device = model.tok_emb.weight.device
        # per row: the last context_length tokens
        self.history: list[deque[int]] = _windows(prompts, model.cfg.vocab_size, self.context_length)
        self.active: list[int] = list(range(len(prompts)))
        self.steps = 0
        self._seen, self._counts = self._penalty_tables(prompts)
        self.last_logprobs: list[TokenLogprob] = []  # with `logprobs`: the last step's, per active row
        self.generator: torch.Generator | None = None
        if config.temperature > 0:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(config.seed if config.seed is not None else secrets.randbits(63))
        self._cache: KVCache | None = None
        self._pad: torch.Tensor | None = None  # (batch, cache.max_len) bool, False at left padding
        self._last: torch.Tensor | None = None  # (batch,) the tokens sampled last, fed next
        # compiled: the cache rows of the active rows (the cache keeps finished rows; row = prompt index)
        self._rows = torch.arange(len(prompts), device=self.device) if self.compiled is not None else None

    def _penalty_tables(
        self, prompts: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the penalties look at, one row per prompt: the tokens of the whole prompt and the text
        so far (repetition), how often each token was generated (presence, frequency)."""
        cfg, vocab = self.config, self.model.cfg.vocab_size
        seen = counts = None
        if cfg.repetition_penalty != 1.0:
            seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=self.device)
            for i, p in enumerate(prompts):
                seen[i, torch.tensor([int(t) for t in p], device=self.device)] = True
        if cfg.presence_penalty or cfg.frequency_penalty:
            counts = torch.zeros(len(prompts), vocab, device=self.device)
        return seen, counts

    def finish(self, rows: Iterable[int]) -> None:
        """Take rows (indices into the prompts) out of the batch."""
        rows = set(rows)
        keep = [i for i, r in enumerate(self.active) if r not in rows]
        if len(keep) == len(self.active):
            return
        self.active = [self.active[i] for i in keep]
        if self.compiled is not None:
            self._rows = torch.tensor(self.active, device=self.device)  # cache row = prompt index
            return
        if self._cache is not None and self.active:
            index = torch.tensor(keep, device=self.device)
            self._cache.select(index)
            self._last = self._last[index]
            if self._pad is not None:
                self._pad = self._pad[index]
                if bool(self._pad.all()):
                    self._pad = None

    @torch.inference_mode()
    def step(self) -> list[int]:
        """Run the model once and return the next token of every active row."""
        if not self.active:
            return []
        cfg = self.config
        if self.steps >= cfg.max_new_tokens:
            raise RuntimeError("Decoder.step(): max_new_tokens already generated")
        logits = raw = self._next_logits()  # logprobs are the model's own, before the penalties
        penalized = self._seen is not None or self._counts is not None
        if penalized:
            rows = torch.tensor(self.active, device=self.device)
            seen = None if self._seen is None else self._seen[rows]
            counts = None if self._counts is None else self._counts[rows]
            logits = apply_penalties(
                logits, seen, counts, cfg.repetition_penalty, cfg.presence_penalty, cfg.frequency_penalty
            )
        tokens = sample_next_token(logits, cfg.temperature, cfg.top_k, cfg.top_p, self.generator)
        if penalized:
            if self._seen is not None:
                self._seen[rows, tokens] = True
            if self._counts is not None:
                self._counts[rows, tokens] += 1
        if self._rows is not None:  # compiled: the next input of every cache row
            if self._last is None:
                self._last = torch.zeros(self._cache.batch_size, dtype=torch.long, device=self.device)
            self._last = self._last.index_copy(0, self._rows, tokens)  # the other rows keep theirs
        else:
            self._last = tokens
        self.steps += 1
        out = tokens.tolist()
        for r, t in zip(self.active, out):
            self.history[r].append(t)
        if cfg.logprobs is not None:
            self.last_logprobs = token_logprobs(raw, tokens, cfg.logprobs)
        return out

    def _next_logits(self) -> torch.Tensor:
        """fp32 logits (active rows, vocab) of the next token: a prefill of each row's window at the
        first step, without a cache, or once the window is full; else one cached step."""
        with self.kernels.installed() if self.kernels is not None else contextlib.nullcontext():
            cache = self._cache
            if not self.config.use_cache:
                logits = self.model.out_head(self._prefill(with_cache=False)[:, -1]).float()
            elif self._last is None or cache is None or cache.pos >= cache.max_len:
                logits = self.model.out_head(self._prefill(with_cache=True)[:, -1]).float()
            elif self.compiled is not None:
                cache.tokens.copy_(self._last[:, None])
                logits = self.compiled.step(cache)
                cache.pos += 1
            else:
                pad = None if self._pad is None else self._pad[:, : cache.pos + 1]
                hidden = self.model(self._last[:, None], kv_cache=cache, padding_mask=pad, return_hidden=True)
                logits = self.model.out_head(hidden[:, -1]).float()
        if self._rows is not None and len(self._rows) < len(logits):
            logits = logits[self._rows]  # compiled: finished rows are still computed; drop them
        return logits

    def _prefill(self, with_cache: bool) -> torch.Tensor:
        """Run the model on every active row's window (left-padded); return the final hidden states."""
        if self.compiled is not None:
            # every row, finished or not (the cache keeps its batch size), plus copies of the first
            # to fill the cache's power-of-two batch
            rows = list(self.history)
            rows += [rows[0]] * (self.compiled.batch_rows(len(rows)) - len(rows))
        else:
            rows = [self.history[r] for r in self.active]
        lengths = [len(h) for h in rows]
        n, longest = len(rows), max(lengths)
        # tokens still to feed after this step; the cache needs room for them, up to the window
        to_feed = self.config.max_new_tokens - self.steps - 1
        max_len = min(self.context_length, longest + max(to_feed, 0)) if with_cache else longest
        if self.compiled is not None:
            max_len = self.context_length  # one cache shape, so one compiled graph per batch size
        idx = torch.zeros((n, longest), dtype=torch.long)
        pad = None
        if min(lengths) < longest:
            pad = torch.ones((n, max_len), dtype=torch.bool)
        for i, h in enumerate(rows):
            idx[i, longest - len(h) :] = torch.tensor(h, dtype=torch.long)
            if pad is not None:
                pad[i, : longest - len(h)] = False
        idx = idx.to(self.device, non_blocking=True)
        self._pad = pad.to(self.device) if pad is not None else None
        if not with_cache:
            return self.model(idx, padding_mask=self._pad, return_hidden=True)
        if self.compiled is not None:
            cache = self._cache = self.compiled.cache(n, self.cache_dtype)
        else:
            cache = self._cache
            if cache is None or cache.batch_size != n or cache.max_len != max_len:
                cache = self._cache = self.model.new_kv_cache(n, max_len, dtype=self.cache_dtype)
            cache.reset()
        pad = None if self._pad is None else self._pad[:, :longest]
        hidden = self.model(idx, kv_cache=cache, padding_mask=pad, return_hidden=True)
        if self.compiled is not None:
            cache.freeze(self._pad)
        return hidden


def _windows(prompts: Sequence[Sequence[int]], vocab: int, ctx: int) -> list[deque[int]]:
    """Each prompt's last `ctx` tokens, checked against the vocabulary; one warning for those cut."""
    windows: list[deque[int]] = []
    too_long: list[tuple[int, int]] = []  # (prompt index, tokens)
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise ScratchLLMError(f"generation: prompt {i} is empty; give at least one token")
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise ScratchLLMError(
                f"generation: prompt {i} has token id {bad}, outside the vocabulary 0..{vocab - 1}"
            )
        if len(p) > ctx:
            too_long.append((i, len(p)))
        windows.append(deque(p[-ctx:], maxlen=ctx))
    if len(too_long) == 1:
        ((i, n),) = too_long
        warnings.warn(
            f"prompt {i} has {n} tokens, more than the context window of {ctx}; using its last {ctx} tokens",
            stacklevel=3,  # the caller of Decoder()
        )
    elif too_long:  # one warning per batch, not one per prompt
        warnings.warn(
            f"{len(too_long)} of {len(prompts)} prompts have more tokens than the context window of {ctx} "
            f"(the longest {max(n for _, n in too_long)}); using the last {ctx} tokens of each",
            stacklevel=3,
        )
    return windows
