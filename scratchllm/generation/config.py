"""Generation settings: `GenerationConfig`, the one description of how to sample, and the weight precision."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..config import setting
from ..device import cpu_supports_bf16
from ..errors import ScratchLLMError
from ..model.quantize import QUANTIZE_MODES

MAX_TOP_LOGPROBS = 20  # alternatives per token at most (OpenAI's limit)
#: a draft model stops a round's proposals where its top probability is below this, by default (0: never;
#: the adaptive schedule already shortens rounds where guesses fail, and drafts unsure of right guesses lose
#: more to a stop than they save)
DRAFT_CONFIDENCE = 0.0
#: the most tokens a draft proposes per round, by default (up to 7, each checked token scores as alone)
DRAFT_TOKENS = 7
#: how the tokens a draft proposes per round are chosen: "adaptive" (up to draft_tokens, by how the last
#: rounds went: `speculative.DraftSchedule`) or "fixed" (always draft_tokens)
DRAFT_SCHEDULES = ("adaptive", "fixed")
DRAFT_SCHEDULE = "adaptive"


@dataclass
class GenerationConfig:
    """How to generate. The defaults are greedy decoding of up to 256 tokens. Penalties against
    repetition apply to the logits before temperature, top-k and top-p."""

    max_new_tokens: int = setting(256, "tokens to generate at most", "generation")
    temperature: float = setting(
        0.0, "0: greedy (always the most likely token); higher: more random", "sampling"
    )
    top_k: int | None = setting(
        None, "sample among the k most likely tokens only (none: no limit)", "sampling"
    )
    top_p: float = setting(
        1.0, "sample among the likeliest tokens whose probabilities sum to p (1: every token)", "sampling"
    )
    seed: int | None = setting(
        None, "seed for reproducible sampling (none: different samples every run)", "sampling"
    )
    stop: Sequence[str] = setting(
        (),
        "stop before this text (repeatable; the text ends before the first found)",
        "generation",
        repeat=True,
        metavar="TEXT",
    )
    eos_id: int | None = setting(
        None, "the end-of-sequence token id (none: the tokenizer's <|endoftext|>)", "generation"
    )
    ignore_eos: bool = setting(False, "continue past the end-of-text token", "generation")
    stop_token_ids: Sequence[int] = setting(
        (), "more token ids that end a sequence (e.g. a chat template's end of turn)", "generation"
    )
    use_cache: bool = setting(
        True,
        "KV cache; false runs the model on the whole window for every token (slower; for comparison)",
        "generation",
    )
    repetition_penalty: float = setting(
        1.0,
        "> 1 makes tokens already in the prompt or the text less likely (e.g. 1.2; 1: off; Hugging Face's "
        "rule)",
        "sampling",
    )
    presence_penalty: float = setting(
        0.0, "subtract this from the logit of every token generated so far (OpenAI's; 0: off)", "sampling"
    )
    frequency_penalty: float = setting(
        0.0, "subtract this once per time a token was generated so far (OpenAI's; 0: off)", "sampling"
    )
    logprobs: int | None = setting(
        None,
        "log-probabilities of the generated tokens (the model's own, before penalties, temperature and "
        f"filtering), each with this many most likely alternatives, 0 to {MAX_TOP_LOGPROBS} (none: no "
        "log-probabilities)",
        "generation",
    )

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

        if not _integer(self.max_new_tokens) or self.max_new_tokens < 0:
            raise bad(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not _number(self.temperature) or self.temperature < 0:
            raise bad(f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}")
        if self.top_k is not None and (not _integer(self.top_k) or self.top_k < 1):
            raise bad(f"top_k must be an integer >= 1 (or None for no limit), got {self.top_k!r}")
        if not _number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise bad(f"top_p must be a number in (0, 1] (1 keeps every token), got {self.top_p!r}")
        if not _number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty must be a number > 0 (1: none), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _number(getattr(self, name)):
                raise bad(f"{name} must be a finite number (0: none), got {getattr(self, name)!r}")
        if self.logprobs is not None and (
            not _integer(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS
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
            if any(not _integer(t) or t < 0 for t in ids):
                raise bad(f"{name} must be token ids (integers >= 0), got {getattr(self, name)!r}")
        # the range torch.Generator.manual_seed takes
        if self.seed is not None and (not _integer(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise bad(f"seed must be an integer from -2**63 to 2**64 - 1, got {self.seed!r}")

    def replace(self, **changes) -> GenerationConfig:
        """A copy with `changes` applied (and checked), e.g. `cfg.replace(temperature=0.7)`."""
        return dataclasses.replace(self, **changes)


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x: object) -> bool:
    """A finite real number, numpy floats included."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


#: The `GenerationConfig` fields every sampling command takes as flags (`setting(..., only=SAMPLING_FLAGS)`).
SAMPLING_FLAGS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RuntimeSettings:
    """Where and how a command runs a model for inference: the settings `generate`, `chat`, `serve` and
    `respond` share (each embeds the ones it takes: `setting(RuntimeSettings(), ..., only=...)`)."""

    device: str = setting("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps", "model")
    dtype: str = setting(
        "auto",
        "weight precision; auto: bf16 on GPUs and on CPUs with native bf16, else fp32 "
        "(see benchmarks/RESULTS.md)",
        "model",
        choices=("auto", *DTYPE_NAMES),
    )
    compile: bool = setting(
        False,
        "decode with torch.compile over a static KV cache (CUDA graphs on GPUs): much faster tokens on a "
        "GPU after a one-off compilation per batch shape (chat and serve compile theirs at start); slower "
        "on CPUs",
        "model",
    )
    quantize: str | None = setting(
        None,
        "int8: 8-bit weights (a scale per output channel) multiplied in int8 with 8-bit activations (each "
        "token's own range); int4: 4-bit weights in groups of 128. CPU only: faster decoding at a small loss "
        "of quality (`perplexity --quantize` measures it); long prompts take longer to start (see "
        "benchmarks/RESULTS.md)",
        "model",
        choices=QUANTIZE_MODES,
    )
    draft_model: str | None = setting(
        None,
        "speculative decoding: a small model with the same tokenizer (a directory or hub name) proposes "
        "tokens that the model checks in one pass; the same text (greedy) or the same distribution "
        "(sampling), faster at batch 1 when the draft guesses well; batches decode without it "
        "(serve: one request at a time)",
        "model",
    )
    draft_tokens: int = setting(
        DRAFT_TOKENS,
        "tokens the draft proposes per pass of the model, at most (--draft-schedule adaptive) or always "
        "(fixed; with --draft-model)",
        "model",
    )
    draft_schedule: str = setting(
        DRAFT_SCHEDULE,
        "adaptive: each round proposes one token more than the last after all were kept, one fewer after "
        "a rejection (from 3, within 1..--draft-tokens), none for 1, 2, 4, ... rounds after a rejected "
        "single guess; fixed: always --draft-tokens (with --draft-model)",
        "model",
        choices=DRAFT_SCHEDULES,
    )
    draft_confidence: float = setting(
        DRAFT_CONFIDENCE,
        "the draft stops a round's proposals where its most likely next token's probability (under the "
        "sampling settings; greedy: at temperature 1) is below this (0: never stops early; with "
        "--draft-model)",
        "model",
    )


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weight precision for generation. `auto`: bf16 on CUDA GPUs and on CPUs with native bf16
    instructions (AVX-512 BF16 / AMX), where decoding reads half the bytes per token
    (benchmarks/RESULTS.md, "Generation"); fp32 elsewhere."""
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
