"""The one generation engine: text in, text out, for the CLI, chat, the server and evaluation.

Three layers, each usable alone:

1. The book's teaching functions, `generate_text_simple` (greedy) and `generate` (temperature,
   top-k, EOS): a plain loop that feeds the whole (cropped) sequence to the model for every new
   token. Short and slow; the reference the engine is tested against.
2. `Decoder`, the token-level core: a batch of prompts (token ids) in, one new token per
   unfinished row per `step()` out. It left-pads prompts of different lengths and masks the
   padding (`GPTModel`'s `padding_mask`), keeps a preallocated KV cache so each step runs the
   model on one new token per row, and, once a sequence outgrows the context window, re-runs the
   model on its last `context_length` tokens, so it always equals the book's loop (which crops to
   the last `context_size` tokens and restarts positions at 0).
3. `Engine(model, tokenizer)`: strings in, `Completion`s out (text, token ids, finish reason,
   token counts). It stops at the end-of-text token or at stop strings, and streams text pieces
   that never split a UTF-8 character and never show text that may turn out to start a stop
   string.

    engine = Engine(model, tokenizer)
    [out] = engine.generate(["Every effort moves you"], GenerationConfig(max_new_tokens=20))
    for piece in engine.stream("Once upon a time", GenerationConfig(temperature=0.8, seed=1)):
        print(piece, end="", flush=True)

Each step's logits can be penalized against repetition before sampling (`apply_penalties`:
Hugging Face's `repetition_penalty`, OpenAI's `presence_penalty` and `frequency_penalty`).
Sampling never touches PyTorch's global random state: a seeded `torch.Generator` reproduces a
run exactly (same prompts, settings and batch); without a seed every run differs.
"""

from __future__ import annotations

import bisect
import codecs
import contextlib
import dataclasses
import math
import numbers
import os
import secrets
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from .device import check_compile, cpu_supports_bf16
from .errors import ScratchLLMError
from .model.attention import KVCache
from .model.gpt import GPTModel
from .text.tokenizer import AllowedSpecial, Tokenizer, load_tokenizer

FinishReason = Literal["stop", "length"]
Prompt = str | Sequence[int]

# ----------------------------------------------------------------------------------------------
# 1. The book's teaching functions


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


# ----------------------------------------------------------------------------------------------
# Settings


MAX_TOP_LOGPROBS = 20  # alternatives per token at most (OpenAI's limit)


@dataclass
class GenerationConfig:
    """How to generate. The defaults are greedy decoding of up to 256 tokens."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy (always the most likely token); higher: more random
    top_k: int | None = None  # sample only among the k most likely tokens
    top_p: float = 1.0  # sample only among the most likely tokens whose probabilities sum to top_p
    seed: int | None = None  # reproducible sampling; None: different samples every run
    stop: Sequence[str] = ()  # stop strings; the text ends before the first one found
    eos_id: int | None = None  # end-of-sequence token; None: the tokenizer's <|endoftext|>
    ignore_eos: bool = False  # keep going past the end-of-sequence token
    stop_token_ids: Sequence[int] = ()  # more tokens that end a sequence (e.g. a chat end-of-turn)
    use_cache: bool = True  # KV cache; off runs the model on the whole window for every token
    # against repetition (applied to the logits before temperature, top-k and top-p):
    repetition_penalty: float = 1.0  # > 1: tokens of the prompt or the text so far less likely (HF's rule)
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far (OpenAI's)
    frequency_penalty: float = 0.0  # subtracted once for each time a token was generated so far (OpenAI's)
    # log-probabilities of the generated tokens (the model's own, before penalties, temperature and
    # filtering), each with this many most likely alternatives; None: none (Completion.logprobs)
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.stop is None:  # as OpenAI-style callers pass it
            self.stop = ()
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, Iterable):
            raise ScratchLLMError(
                f"generation settings: stop must be a string or a list of strings, got {self.stop!r}"
            )
        self.stop = tuple(self.stop)
        ids = () if self.stop_token_ids is None else self.stop_token_ids
        if not isinstance(ids, Iterable) or isinstance(ids, (str, bytes)):
            raise ScratchLLMError(
                f"generation settings: stop_token_ids must be a list of token ids, got {ids!r}"
            )
        for name in ("max_new_tokens", "top_k", "seed", "logprobs", "eos_id"):  # numpy integers too
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, (int, bool)):
                setattr(self, name, int(value))
        self.stop_token_ids = tuple(
            int(t) if isinstance(t, numbers.Integral) and not isinstance(t, bool) else t for t in ids
        )
        self.validate()

    def validate(self) -> None:
        """Raise `ScratchLLMError` naming the first out-of-range setting."""

        def bad(msg: str) -> ScratchLLMError:
            return ScratchLLMError(f"generation settings: {msg}")

        def integer(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def number(x: object) -> bool:  # numpy floats too
            return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

        if not integer(self.max_new_tokens) or self.max_new_tokens < 0:
            raise bad(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not number(self.temperature) or self.temperature < 0:
            raise bad(f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}")
        if self.top_k is not None and (not integer(self.top_k) or self.top_k < 1):
            raise bad(f"top_k must be an integer >= 1 (or None for no limit), got {self.top_k!r}")
        if not number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise bad(f"top_p must be a number in (0, 1] (1 keeps every token), got {self.top_p!r}")
        if not number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty must be a number > 0 (1: none), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not number(getattr(self, name)):
                raise bad(f"{name} must be a finite number (0: none), got {getattr(self, name)!r}")
        if self.logprobs is not None and (
            not integer(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            raise bad(
                f"logprobs must be None or an integer from 0 to {MAX_TOP_LOGPROBS} (alternatives per token), "
                f"got {self.logprobs!r}"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        for name, ids in (
            ("eos_id", [] if self.eos_id is None else [self.eos_id]),
            ("stop_token_ids", self.stop_token_ids),
        ):
            if any(not integer(t) or t < 0 for t in ids):
                raise bad(f"{name} must be token ids (integers >= 0), got {getattr(self, name)!r}")
        # the range torch.Generator.manual_seed takes
        if self.seed is not None and (not integer(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise bad(f"seed must be an integer from -2**63 to 2**64 - 1, got {self.seed!r}")

    def replace(self, **changes) -> GenerationConfig:
        """A copy with `changes` applied (and checked), e.g. `cfg.replace(temperature=0.7)`."""
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# Sampling


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
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


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


# ----------------------------------------------------------------------------------------------
# CPU kernels for decoding


class PackedLinears:
    """Every `nn.Linear` weight of a model reordered once into oneDNN's blocked layout, for CPUs.

    A decode step multiplies one activation row by every weight matrix, so its speed is how fast
    the weights stream from memory. PyTorch's default CPU matrix-vector path reads them well below
    the memory bandwidth; oneDNN's kernel on prepacked weights (the one `torch.compile`'s freezing
    picks) comes closer (benchmarks/RESULTS.md). The packed copies take as much memory again as the
    linear weights. `refresh()` rebuilds them when a weight has changed (training between
    generations; found by the version counter, the storage and eight sampled values of each weight, so
    an edit in place that touches none of those is not seen: make a new Engine then); `installed()` routes the linear layers through them, for inference only.
    Subclasses of `nn.Linear` (LoRA layers) keep their own forward.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._linears: list[nn.Linear] = []
        self._packed: list[torch.Tensor] = []
        self._key: tuple | None = None

    @staticmethod
    def supported(model: nn.Module) -> bool:
        """True when every linear weight is on the CPU, in fp32 or (with native support) bf16, and
        PyTorch has oneDNN's prepacked linear."""
        if not torch.backends.mkldnn.is_available() or not hasattr(
            torch.ops.mkldnn, "_reorder_linear_weight"
        ):
            return False
        weights = [m.weight for m in model.modules() if type(m) is nn.Linear]
        if not weights or any(w.device.type != "cpu" or w.dtype != weights[0].dtype for w in weights):
            return False
        if weights[0].dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return weights[0].dtype == torch.float32

    @torch.inference_mode()
    def refresh(self) -> bool:
        """Pack the current weights, unless nothing changed since the last call. False (and nothing
        packed) when the model no longer qualifies, e.g. after moving to a GPU."""
        if not self.supported(self.model):
            self._linears, self._packed, self._key = [], [], None
            return False
        linears = [m for m in self.model.modules() if type(m) is nn.Linear]
        key = tuple(
            (id(m), m.weight.data_ptr(), _version(m.weight), m.weight.dtype, id(m.bias), _probe(m.weight))
            for m in linears
        )
        if key != self._key:
            self._linears = linears
            self._packed = [torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 1) for m in linears]
            self._key = key
        return True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Route the linear layers through the packed weights (call `refresh()` first)."""
        for m, w in zip(self._linears, self._packed):
            m.forward = _packed_forward(w, m.bias)  # an instance attribute shadows the class's forward
        try:
            yield
        finally:
            for m in self._linears:
                m.__dict__.pop("forward", None)


def _probe(weight: torch.Tensor) -> tuple[float, ...]:
    """Eight values spread over a weight: they tell a change that the version counter misses (a copy
    through `.data`, a weight loaded under inference mode, where tensors keep no counter)."""
    flat = weight.detach().reshape(-1)
    # integer positions: float32 linspace rounds numel - 1 past the end for big weights (GPT-2's head)
    return tuple(flat[torch.arange(8) * (flat.numel() - 1) // 7].tolist())


def _version(t: torch.Tensor) -> int | None:
    """The in-place modification counter (None for inference tensors, which do not keep one)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None):
    linear = torch.ops.mkldnn._linear_pointwise

    def forward(x: torch.Tensor) -> torch.Tensor:
        return linear(x, weight, bias, "none", [], "")

    return forward


# ----------------------------------------------------------------------------------------------
# Compiled decoding (fixed shapes, CUDA graphs)


class CompiledDecoding:
    """One-token decode steps under `torch.compile`, over caches in static mode (`KVCache.freeze`).

    An eager step launches a few hundred small kernels from Python (about 15 per block); on a GPU
    that, not the arithmetic, sets the decoding speed of GPT-2 sized models (benchmarks/RESULTS.md).
    With every shape and buffer fixed, the compiler fuses the step, and on CUDA
    (`mode="reduce-overhead"`) records it once as a CUDA graph that each later step replays. The
    first step of each cache batch size compiles (seconds to a minute); batches are padded to the
    next power of two (`batch_rows`), so a server batching 1 to 8 requests compiles 4 shapes, and
    one cache of `context_length` slots per shape is kept for later generations to reuse.
    """

    def __init__(self, model: GPTModel, mode: str | None = "auto", compile: bool = True):
        """`mode`: torch.compile's mode; "auto" is "reduce-overhead" (CUDA graphs) on CUDA, else the
        default. `compile=False` runs the same fixed-shape steps eagerly (to test or debug them)."""
        self.model = model
        self.mode = mode
        self.compile = compile
        self._caches: dict[tuple[int, torch.dtype | None], KVCache] = {}
        self._step: Callable[[GPTModel, KVCache], torch.Tensor] | None = None

    @staticmethod
    def batch_rows(n: int) -> int:
        """Cache rows for a batch of `n` prompts: the next power of two."""
        return 1 << max(n - 1, 0).bit_length()

    def cache(self, batch_size: int, dtype: torch.dtype | None = None) -> KVCache:
        """The (reset) cache for this batch size, allocated and marked static on first use."""
        device = self.model.tok_emb.weight.device
        cache = self._caches.get((batch_size, dtype))
        if cache is None or cache.k[0].device != device:
            with torch.inference_mode(False):  # plain tensors, updated in place by the compiled step
                cache = self.model.new_kv_cache(batch_size, self.model.cfg.context_length, dtype=dtype)
                cache.freeze()  # allocates the static-mode buffers
            for t in (*cache.k, *cache.v, cache.slot, cache.valid, cache.positions, cache.tokens):
                torch._dynamo.mark_static_address(t)  # CUDA graphs read them in place, never copied
            self._caches[(batch_size, dtype)] = cache
        cache.reset()
        return cache

    def step(self, cache: KVCache) -> torch.Tensor:
        """fp32 logits (batch, vocab) of the tokens in `cache.tokens`; advances the cache's slot."""
        if self._step is None:
            mode = self.mode
            if mode == "auto":
                mode = "reduce-overhead" if cache.k[0].device.type == "cuda" else None
            self._step = (
                torch.compile(_static_step, mode=mode, fullgraph=True, dynamic=False)
                if self.compile
                else _static_step
            )
        if self.compile and cache.k[0].device.type == "cuda":
            # a new step: the previous step's outputs (already sampled from) may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        return self._step(self.model, cache)


def _static_step(model: GPTModel, cache: KVCache) -> torch.Tensor:
    hidden = model(cache.tokens, kv_cache=cache, return_hidden=True)
    return model.out_head(hidden[:, -1]).float()


# ----------------------------------------------------------------------------------------------
# 2. The token-level core


class Decoder:
    """Generate tokens for a batch of prompts, one step at a time.

        dec = Decoder(model, [[15496, 11], [464]], max_new_tokens=20)
        while dec.active:
            for row, token in zip(dec.active, dec.step()):
                ...
            dec.finish(rows_that_are_done)

    `step()` returns the next token of every active row (in `active` order, rows named by their
    index in `prompts`); `finish(rows)` takes rows out of the batch. The decoder stops a row by
    itself only after `max_new_tokens`. Prompts longer than the context window keep their last
    `context_length` tokens (with a warning).

    `compiled`: run the one-token steps through a `CompiledDecoding` (fixed shapes, torch.compile,
    CUDA graphs on GPUs). Its cache keeps every row, so finished rows stay in the batch (their
    results are dropped) instead of leaving it.
    """

    def __init__(
        self,
        model: GPTModel,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logprobs: int | None = None,
        use_cache: bool = True,
        kernels: PackedLinears | None = None,
        cache_dtype: torch.dtype | None = None,
        compiled: CompiledDecoding | None = None,
    ):
        if not prompts:
            raise ScratchLLMError("generation: no prompts given")
        # the same checks as the engine's settings
        GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seed, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                         frequency_penalty=frequency_penalty, logprobs=logprobs)  # fmt: skip
        ctx = model.cfg.context_length
        vocab = model.cfg.vocab_size
        self.model = model
        self.context_length = ctx
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.use_cache = use_cache
        self.cache_dtype = cache_dtype
        self.compiled = compiled if use_cache else None
        # compiled: the compiler picks the kernels (so nothing is packed)
        use_kernels = kernels is not None and self.compiled is None
        self.kernels = kernels if use_kernels and kernels.refresh() else None
        self.device = model.tok_emb.weight.device
        self.history: list[deque[int]] = []  # per row: the last context_length tokens
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
            self.history.append(deque(p[-ctx:], maxlen=ctx))
        if len(too_long) == 1:
            ((i, n),) = too_long
            warnings.warn(
                f"prompt {i} has {n} tokens, more than the context window of {ctx}; using its last {ctx} tokens",
                stacklevel=2,
            )
        elif too_long:  # one warning per batch, not one per prompt
            warnings.warn(
                f"{len(too_long)} of {len(prompts)} prompts have more tokens than the context window of {ctx} "
                f"(the longest {max(n for _, n in too_long)}); using the last {ctx} tokens of each",
                stacklevel=2,
            )
        self.active: list[int] = list(range(len(prompts)))
        self.steps = 0
        # what the penalties look at, one row per prompt: the tokens of the whole prompt and the text
        # so far (repetition), how often each token was generated (presence, frequency)
        self.penalties = (repetition_penalty, presence_penalty, frequency_penalty)
        self._seen: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        if repetition_penalty != 1.0:
            self._seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=self.device)
            for i, p in enumerate(prompts):
                self._seen[i, torch.tensor([int(t) for t in p], device=self.device)] = True
        if presence_penalty or frequency_penalty:
            self._counts = torch.zeros(len(prompts), vocab, device=self.device)
        self.logprobs = logprobs
        self.last_logprobs: list[TokenLogprob] = []  # with `logprobs`: the last step's, per active row
        self.generator: torch.Generator | None = None
        if temperature > 0:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        self._cache: KVCache | None = None
        self._pad: torch.Tensor | None = None  # (batch, cache.max_len) bool, False at left padding
        self._last: torch.Tensor | None = None  # (batch,) the tokens sampled last, fed next
        # compiled: the cache rows of the active rows (the cache keeps finished rows; row = prompt index)
        self._rows = torch.arange(len(prompts), device=self.device) if self.compiled is not None else None

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
        if self.steps >= self.max_new_tokens:
            raise RuntimeError("Decoder.step(): max_new_tokens already generated")
        with self.kernels.installed() if self.kernels is not None else contextlib.nullcontext():
            cache = self._cache
            if not self.use_cache:
                logits = self.model.out_head(self._prefill(with_cache=False)[:, -1]).float()
            elif self._last is None or cache is None or cache.pos >= cache.max_len:
                # the first step, or the window is full: (re)start from each row's last window
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
        raw = logits  # logprobs are the model's own, before the penalties
        penalized = self._seen is not None or self._counts is not None
        if penalized:
            rows = torch.tensor(self.active, device=self.device)
            seen = None if self._seen is None else self._seen[rows]
            counts = None if self._counts is None else self._counts[rows]
            logits = apply_penalties(logits, seen, counts, *self.penalties)
        tokens = sample_next_token(logits, self.temperature, self.top_k, self.top_p, self.generator)
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
        if self.logprobs is not None:
            self.last_logprobs = token_logprobs(raw, tokens, self.logprobs)
        return out

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
        to_feed = self.max_new_tokens - self.steps - 1
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


# ----------------------------------------------------------------------------------------------
# 3. The text-level engine


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


def decode_piece(utf8: codecs.IncrementalDecoder, raw: bytes) -> tuple[str, int]:
    """Feed a token's bytes to an incremental UTF-8 decoder ("replace" errors); return the text it
    releases and how many of its first characters stand for earlier bytes: a character begun by
    earlier tokens that this one broke (its U+FFFD comes first). A token that completes such a
    character releases it whole, counted as this token's (it begins where the character does)."""
    held = utf8.getstate()[0]
    piece = utf8.decode(raw)
    if not held:
        return piece, 0
    broken = held.decode("utf-8", "replace")
    alone = codecs.getincrementaldecoder("utf-8")("replace").decode(raw)
    return piece, len(broken) if piece == broken + alone else 0


@dataclass
class Completion:
    """One prompt's result. `finish_reason` is "stop" (end-of-sequence token or stop string) or
    "length" (max_new_tokens reached). `token_ids` are the generated tokens, without the
    end-of-sequence token; the text stops before a stop string."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    stop: str | int | None = None  # what stopped it: the stop string, or the end token's id
    # with `logprobs`: one per token of `token_ids` that the text covers (the tokens of a stop string
    # after the text's end are left out); the end-of-sequence token's, when one ended the text, apart
    logprobs: list[TokenLogprob] | None = None
    stop_logprob: TokenLogprob | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class _Row:
    """One sequence's text state while generating."""

    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (only kept up to date when streaming or watching stop strings)
    emitted: int = 0  # characters of `text` already handed out
    nbytes: int = 0  # bytes of the generated tokens already fed to the UTF-8 decoder
    utf8: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    finish_reason: FinishReason | None = None
    stop: str | int | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stop_logprob: TokenLogprob | None = None
    starts: list[int] = field(default_factory=list)  # where each token's text begins in `text`
    sent: int = 0  # logprobs already handed out with streamed pieces

    def piece_logprobs(self) -> list[TokenLogprob]:
        """The logprobs not yet handed out of the tokens whose text begins in the text handed out."""
        end = bisect.bisect_left(self.starts, self.emitted, lo=self.sent)
        new, self.sent = self.logprobs[self.sent : end], max(self.sent, end)
        return new


class TextStream(Iterator[str]):
    """The text pieces of one streamed completion; `completion` is set once the stream ends.

    With `logprobs` set, `piece_logprobs` holds, after each piece, the logprobs of the tokens whose
    text begins in it; once the stream ends, `rest_logprobs` holds those of the completion's tokens not
    yet handed out (a token whose text is empty). Together they are `completion.logprobs`, in order."""

    def __init__(self, events: Iterator[tuple[int, str, list[TokenLogprob]]], result: list[Completion]):
        self._events = events
        self._result = result
        self._sent = 0
        self.completion: Completion | None = None
        self.piece_logprobs: list[TokenLogprob] = []

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            _, piece, self.piece_logprobs = next(self._events)
        except StopIteration:
            self.piece_logprobs = []
            self.completion = self._result[0] if self._result else None
            raise
        self._sent += len(self.piece_logprobs)
        return piece

    @property
    def rest_logprobs(self) -> list[TokenLogprob]:
        """Once the stream has ended: the completion's logprobs that no piece carried."""
        if self.completion is None or self.completion.logprobs is None:
            return []
        return self.completion.logprobs[self._sent :]

    def close(self) -> None:
        """Stop generating early (the model is released; `completion` stays None)."""
        close = getattr(self._events, "close", None)
        if close is not None:
            close()


class Engine:
    """Text generation for one model and tokenizer; see the module docstring.

    `generate(prompts, config)` returns one `Completion` per prompt (the prompts run as one
    batch); `stream(prompt, config)` yields text pieces as they are generated. A prompt is a string
    (encoded with `allowed_special`, by default none: special-token strings stay plain text) or a
    list of token ids. The model runs in eval mode under `torch.inference_mode` and is put back in
    its previous mode afterwards. Not thread-safe: serve one request at a time per engine.
    """

    def __init__(
        self,
        model: GPTModel,
        tokenizer: Tokenizer | str | os.PathLike | None = None,
        *,
        allowed_special: AllowedSpecial = frozenset(),
        prepack: bool | None = None,
        compile: bool = False,
    ):
        """`tokenizer`: a `Tokenizer`, or what `load_tokenizer` takes (a name such as "gpt2", a directory).
        `prepack`: decode with `PackedLinears` (None: wherever supported, i.e. on CPUs).
        `compile`: decode with `CompiledDecoding` (torch.compile; CUDA graphs on GPUs), for GPUs and
        long generations: the first generation of each batch size pays the compilation."""
        if getattr(model.cfg, "n_classes", 0):
            raise ScratchLLMError("generation needs a language model; this model has a classifier head")
        self.model = model
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self.allowed_special = allowed_special
        use_packed = (
            PackedLinears.supported(model) if prepack is None else prepack and PackedLinears.supported(model)
        )
        if compile:
            check_compile(model.tok_emb.weight.device)
        self.compiled = CompiledDecoding(model) if compile else None
        self.kernels = PackedLinears(model) if use_packed and not compile else None

    @classmethod
    def load(
        cls,
        spec: str,
        device: str = "cpu",
        dtype: torch.dtype | str | None = None,
        compile: bool = False,
        quantize: str | None = None,
    ) -> Engine:
        """An engine for a model directory or a hub name (`gpt2`, `gpt2-medium`, ...). `quantize`
        "int4": int4 weights (CPU only; model/quantize.py)."""
        from .checkpoint import load_model

        loaded = load_model(spec, device=device, dtype=dtype, quantize=quantize)
        if loaded.tokenizer is None:
            raise ScratchLLMError(f"model {spec!r} has no tokenizer files; save the model with its tokenizer")
        return cls(loaded.model, loaded.tokenizer, compile=compile)

    # -- public API ------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """The token ids of a prompt (text, or ids checked against the vocabulary)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ScratchLLMError(
                    "generation: a text prompt needs a tokenizer; give token ids or a tokenizer"
                )
            ids = self.tokenizer.encode(prompt, allowed_special=self.allowed_special)
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise ScratchLLMError(
                    f"generation: a prompt must be text or a list of token ids, got {prompt!r:.60}"
                ) from None
        if not ids:
            raise ScratchLLMError("generation: the prompt is empty; give at least one token of text")
        vocab = self.model.cfg.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ScratchLLMError(
                f"generation: token id {bad} is outside the model's vocabulary 0..{vocab - 1}"
            )
        return ids

    def generate(
        self, prompts: Prompt | Sequence[Prompt], config: GenerationConfig | None = None, **overrides
    ) -> list[Completion]:
        """Complete every prompt (one batch); keyword overrides change single settings of `config`."""
        cfg = _config(config, overrides)
        if is_one_prompt(prompts):
            prompts = [prompts]  # type: ignore[list-item]
        try:
            prompts = list(prompts)  # type: ignore[arg-type]
        except TypeError:
            raise ScratchLLMError(
                "generation: give a prompt (text or a list of token ids) or a list of prompts, "
                f"got {type(prompts).__name__}"
            ) from None
        if not prompts:
            raise ScratchLLMError("generation: the list of prompts is empty")
        ids = [self.encode(p) for p in prompts]
        result: list[Completion] = []
        for _ in self._run(ids, cfg, result, incremental=bool(cfg.stop)):
            pass
        return result

    def stream(self, prompt: Prompt, config: GenerationConfig | None = None, **overrides) -> TextStream:
        """Text pieces of one completion as they are generated; they concatenate to its text.
        The returned stream's `completion` (finish reason, token counts) is set at the end."""
        cfg = _config(config, overrides)
        if self.tokenizer is None:
            raise ScratchLLMError("generation: streaming needs a tokenizer to turn tokens into text")
        result: list[Completion] = []
        return TextStream(self._run([self.encode(prompt)], cfg, result, incremental=True), result)

    def prompt_logprobs(self, prompt: Prompt, top: int = 0) -> list[TokenLogprob | None]:
        """How likely the model finds each token of `prompt` after the ones before it (one forward
        pass; the first token has none, so None), with the `top` most likely tokens at each position.
        What scoring a text needs (the server's `echo` with `logprobs`)."""
        return self.score_prompts([prompt], top)[0]

    def score_prompts(
        self, prompts: Sequence[Prompt], top: int = 0, max_tokens: int = 2048
    ) -> list[list[TokenLogprob | None]]:
        """`prompt_logprobs` for several prompts, batched: prompts of similar length share a forward
        pass (padded at the end, which causal attention never lets earlier positions see), up to
        `max_tokens` padded tokens per pass to bound the logits' memory."""
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ScratchLLMError(
                f"prompt_logprobs: top must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}"
            )
        ids = [self.encode(p) for p in prompts]
        ctx = self.model.cfg.context_length
        for one in ids:
            if len(one) > ctx:
                raise ScratchLLMError(
                    f"generation: scoring a prompt of {len(one)} tokens needs them in one context window of {ctx}"
                )
        device = self.model.tok_emb.weight.device
        out: list[list[TokenLogprob | None]] = [[] for _ in ids]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths pad little
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * len(ids[order[end]]) <= max_tokens:
                end += 1
            rows = order[start:end]
            seqs = [ids[i] for i in rows]
            # every position but the last predicts a prompt token; only those go through the output head
            targets = torch.tensor([t for one in seqs for t in one[1:]], dtype=torch.long, device=device)
            with _eval_mode(self.model), torch.inference_mode():
                hidden = self.model.hidden_at(seqs, [range(len(one) - 1) for one in seqs])
                scored = token_logprobs(self.model.out_head(hidden), targets, top)
            at = 0
            for i in rows:
                n = len(ids[i]) - 1
                out[i], at = [None, *scored[at : at + n]], at + n
            start = end
        return out

    def warm_up(self, max_batch_size: int = 1) -> list[int]:
        """With `compile`: compile (and on GPUs record) the decode step for every cache shape that
        batches of up to `max_batch_size` prompts use, so that no later request waits for it.
        Returns those cache batch sizes ([] without `compile`)."""
        if self.compiled is None:
            return []
        sizes = sorted({CompiledDecoding.batch_rows(n) for n in range(1, max_batch_size + 1)})
        for n in sizes:  # steps 2 and 3 compile the step and record the CUDA graph; 4 replays it
            self.generate([[0]] * n, GenerationConfig(max_new_tokens=4, ignore_eos=True))
        return sizes

    # -- the loop --------------------------------------------------------------------------------

    def _stop_ids(self, cfg: GenerationConfig) -> set[int]:
        ids = set(cfg.stop_token_ids)
        if not cfg.ignore_eos:
            eos = (
                cfg.eos_id if cfg.eos_id is not None else (self.tokenizer.eot_id if self.tokenizer else None)
            )
            if eos is not None:
                ids.add(eos)
        return ids

    def _run(
        self, prompts: list[list[int]], cfg: GenerationConfig, result: list[Completion], incremental: bool
    ) -> Iterator[tuple[int, str, list[TokenLogprob]]]:
        """Yield (row, text piece, logprobs of the tokens that begin in it) while generating (pieces
        only when `incremental`); fill `result`."""
        if incremental and self.tokenizer is None:
            raise ScratchLLMError("generation: streaming and stop strings need a tokenizer")
        stop_ids = self._stop_ids(cfg)
        stops = cfg.stop
        longest_stop = max((len(s) for s in stops), default=0)
        rows = [_Row(prompt_tokens=len(p)) for p in prompts]
        with _eval_mode(self.model):
            if cfg.max_new_tokens > 0 and prompts:
                dec = Decoder(
                    self.model,
                    prompts,
                    max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature,
                    top_k=cfg.top_k,
                    top_p=cfg.top_p,
                    seed=cfg.seed,
                    repetition_penalty=cfg.repetition_penalty,
                    presence_penalty=cfg.presence_penalty,
                    frequency_penalty=cfg.frequency_penalty,
                    logprobs=cfg.logprobs,
                    use_cache=cfg.use_cache,
                    kernels=self.kernels,
                    cache_dtype=_cache_dtype(self.model),
                    compiled=self.compiled,
                )
                while dec.active:
                    tokens = dec.step()
                    done = []
                    for i, (r, t) in enumerate(zip(dec.active, tokens)):
                        row = rows[r]
                        if t in stop_ids:
                            row.finish_reason, row.stop = "stop", t
                            if cfg.logprobs is not None:
                                row.stop_logprob = dec.last_logprobs[i]
                        else:
                            row.token_ids.append(t)
                            if cfg.logprobs is not None:
                                row.logprobs.append(dec.last_logprobs[i])
                            if incremental:
                                piece = self._advance(row, stops, longest_stop)
                                if piece:
                                    yield r, piece, row.piece_logprobs()
                            if row.finish_reason is None and len(row.token_ids) >= cfg.max_new_tokens:
                                row.finish_reason = "length"
                        if row.finish_reason is not None:
                            done.append(r)
                            if incremental:
                                piece = self._flush(row)
                                if piece:
                                    yield r, piece, row.piece_logprobs()
                    dec.finish(done)
        for row in rows:
            if row.finish_reason is None:  # max_new_tokens == 0
                row.finish_reason = "length"
            text = (
                row.text if incremental else (self.tokenizer.decode(row.token_ids) if self.tokenizer else "")
            )
            logprobs = None
            if cfg.logprobs is not None:
                # a stop string cut the text: keep the tokens that begin before the cut
                kept = bisect.bisect_left(row.starts, len(row.text)) if isinstance(row.stop, str) else None
                logprobs = row.logprobs[:kept]
            result.append(
                Completion(
                    text,
                    row.token_ids,
                    row.finish_reason,
                    row.prompt_tokens,
                    row.stop,
                    logprobs=logprobs,
                    stop_logprob=row.stop_logprob,
                )
            )

    def _advance(self, row: _Row, stops: tuple[str, ...], longest_stop: int) -> str:
        """Decode the row's new token into `row.text`, end it at a stop string, and return the
        text that is now safe to show."""
        data = self.tokenizer.decode_bytes(row.token_ids)  # type: ignore[union-attr]
        new = data[row.nbytes :]
        row.nbytes = len(data)
        before = len(row.text)
        piece, earlier = decode_piece(row.utf8, new)
        row.starts.append(before + earlier)
        row.text += piece
        if stops:
            # a stop string may begin in text decoded earlier (up to longest_stop - 1 characters back)
            start = max(0, before - longest_stop + 1)
            hits = [(i, s) for s in stops if (i := row.text.find(s, start)) >= 0]
            if hits:
                i, s = min(hits)
                row.text = row.text[:i]
                row.finish_reason, row.stop = "stop", s
                return ""  # _flush hands out the rest
            # hold back an ending that could still grow into a stop string
            end = len(row.text) - _partial_stop(row.text, stops, longest_stop)
        else:
            end = len(row.text)
        piece = row.text[row.emitted : end]
        row.emitted = max(row.emitted, end)
        return piece

    @staticmethod
    def _flush(row: _Row) -> str:
        """The row's remaining text once it has finished (a dangling partial character becomes U+FFFD)."""
        if row.stop is None or isinstance(row.stop, int):
            row.text += row.utf8.decode(b"", final=True)
        piece = row.text[row.emitted :]
        row.emitted = len(row.text)
        return piece


def _partial_stop(text: str, stops: tuple[str, ...], longest_stop: int) -> int:
    """Length of the longest ending of `text` that is a proper beginning of a stop string."""
    for k in range(min(longest_stop - 1, len(text)), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


def is_one_prompt(prompts: object) -> bool:
    """A text, or one sequence of token ids (a list, a 1-D array or tensor), rather than a batch."""
    if isinstance(prompts, str):
        return True
    if getattr(prompts, "ndim", None) == 1:  # numpy arrays, tensors: of ids (not of texts)
        first = next(iter(prompts), None)  # type: ignore[call-overload]
        first = first.item() if hasattr(first, "item") else first
        return first is None or (isinstance(first, numbers.Integral) and not isinstance(first, bool))
    return (
        isinstance(prompts, (list, tuple))
        and bool(prompts)
        and isinstance(prompts[0], numbers.Integral)
        and not isinstance(prompts[0], bool)
    )


def _config(config: GenerationConfig | None, overrides: dict) -> GenerationConfig:
    if config is not None and not isinstance(config, GenerationConfig):
        raise ScratchLLMError(
            f"generation: config must be a GenerationConfig, got {type(config).__name__}; "
            "give settings as keywords (max_new_tokens=50) or GenerationConfig(**settings)"
        )
    cfg = config or GenerationConfig()
    if overrides:
        names = {f.name for f in dataclasses.fields(GenerationConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ScratchLLMError(f"generation settings: unknown {unknown}; valid are {sorted(names)}")
        cfg = cfg.replace(**overrides)
    return cfg


def _cache_dtype(model: nn.Module) -> torch.dtype | None:
    """fp32 keys/values for bf16 weights on CPUs (attention in bf16 is slower there), else the weights' type."""
    p = next(model.parameters())
    return torch.float32 if p.device.type == "cpu" and p.dtype == torch.bfloat16 else None


DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weight precision for generation. `auto`: bf16 on CUDA GPUs and on CPUs with native bf16
    instructions (AVX-512 BF16 / AMX), where decoding reads half the bytes per token and runs about
    1.6x faster than fp32 (benchmarks/RESULTS.md, "Generation"); fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPE_NAMES:
        raise ScratchLLMError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPE_NAMES)}")
    if name == "fp16" and device.type == "cpu":
        raise ScratchLLMError("fp16 is not supported for generation on CPU; use fp32 or bf16")
    return DTYPE_NAMES[name]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


__all__ = [
    "CompiledDecoding",
    "Completion",
    "Decoder",
    "Engine",
    "GenerationConfig",
    "PackedLinears",
    "TextStream",
    "TokenLogprob",
    "apply_penalties",
    "decode_piece",
    "generate",
    "generate_text_simple",
    "resolve_dtype",
    "sample_next_token",
    "token_logprobs",
]
