"""Generation: the book's loops, and the one engine (text in, text out) for the CLI, chat, the server
and evaluation.

    config.py       GenerationConfig, the one description of the sampling settings; resolve_dtype
    sampling.py     the book's generate_text_simple and generate; penalties, top-k/top-p, logprobs
    decoder.py      Decoder: a batch of token-id prompts, a KV cache, one token per row per step
    completion.py   a row's text as its tokens arrive (UTF-8, stop strings), Completion, TextStream
    engine.py       Engine: prompts in, Completions or a stream of text out
    speculative.py  SpeculativeDecoder: a draft model proposes tokens, the model checks them in one pass
    batcher.py      Batcher: continuous batching, requests joining and leaving at token boundaries (serve)
    kernels.py      PackedLinears: CPU weights packed for oneDNN's decode kernel, the kernel probes
    fused.py        a decode step's norms, attention, int8/int4 rows and blocks in fewer calls (native)
    compiled.py     CompiledDecoding: fixed-shape steps under torch.compile (CUDA graphs on GPUs)

Penalties against repetition (Hugging Face's `repetition_penalty`, OpenAI's `presence_penalty` and
`frequency_penalty`) apply to each step's logits before sampling. Sampling never touches PyTorch's
global random state: a seeded run (same prompts, settings and batch) repeats exactly; without a seed
every run differs.
"""

from __future__ import annotations

from .compiled import CompiledDecoding
from .completion import Completion, FinishReason, TextStream, decode_piece
from .config import (
    DTYPE_NAMES,
    MAX_TOP_LOGPROBS,
    SAMPLING_FLAGS,
    GenerationConfig,
    RuntimeSettings,
    resolve_dtype,
)
from .decoder import Decoder
from .engine import Engine, Prompt, is_one_prompt
from .kernels import PackedLinears
from .sampling import (
    TokenLogprob,
    apply_penalties,
    generate,
    generate_text_simple,
    sample_next_token,
    token_logprobs,
)

__all__ = [
    "DTYPE_NAMES",
    "MAX_TOP_LOGPROBS",
    "SAMPLING_FLAGS",
    "CompiledDecoding",
    "Completion",
    "Decoder",
    "Engine",
    "FinishReason",
    "GenerationConfig",
    "PackedLinears",
    "Prompt",
    "RuntimeSettings",
    "TextStream",
    "TokenLogprob",
    "apply_penalties",
    "decode_piece",
    "generate",
    "generate_text_simple",
    "is_one_prompt",
    "resolve_dtype",
    "sample_next_token",
    "token_logprobs",
]
