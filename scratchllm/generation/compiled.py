"""Compiled decoding: one-token steps with fixed shapes under `torch.compile` (CUDA graphs on GPUs)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.attention import KVCache
from ..model.gpt import GPTModel


class CompiledDecoding:
    """One-token decode steps under `torch.compile`, over caches in static mode (`KVCache.freeze`).

    An eager step launches a few hundred small kernels from Python; on a GPU that, not the
    arithmetic, sets the decoding speed of GPT-2 sized models (benchmarks/RESULTS.md). With every
    shape and buffer fixed, the compiler fuses the step, and on CUDA (`mode="reduce-overhead"`)
    records it once as a CUDA graph that each later step replays. The first step of each cache batch
    size compiles; batches are padded to the next power of two (`batch_rows`), so a server batching
    1 to 8 requests compiles 4 shapes, and one cache of `context_length` slots per shape is kept for
    later generations to reuse.
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
                cache = self.model.new_kv_cache(
                    batch_size, self.model.cfg.context_length, dtype=dtype, bounded=False
                )
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
