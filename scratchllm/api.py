"""`scratchllm.load(...)`: a loaded model with the everyday verbs, over the same engine as the CLI."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .checkpoint import LoadedModel, load_model, read_config
from .device import pick_device
from .errors import ScratchLLMError
from .finetune.classifier import predict
from .generation import Completion, Engine, GenerationConfig, Prompt, is_one_prompt, resolve_dtype
from .hub import resolve_model
from .model.gpt import count_parameters


class LLM:
    """A model directory (or GPT-2) ready to use: `generate`, `stream`, `complete` (with details),
    `classify`."""

    def __init__(self, loaded: LoadedModel, compile: bool = False):
        """`compile`: generate with `CompiledDecoding` (torch.compile, CUDA graphs; for GPUs)."""
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.extra = loaded.extra
        self._engine: Engine | None = None
        self.compile = compile

    @classmethod
    def load(
        cls,
        spec: str | os.PathLike,
        device: str = "auto",
        dtype: torch.dtype | str = "auto",
        compile: bool = False,
        quantize: str | None = None,
    ) -> LLM:
        """A model directory, or `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl` (downloaded once).
        `dtype` "auto" is what the CLI uses: for generation bf16 where the hardware runs it fast, else
        fp32; fp32 for classifiers. `compile`: generate with `CompiledDecoding` (for GPUs).
        `quantize` "int4": int4 weights, for faster decoding on CPUs (model/quantize.py)."""
        if not isinstance(spec, (str, os.PathLike)):
            raise ScratchLLMError(
                f"load: give a model directory or a GPT-2 name such as 'gpt2', got {type(spec).__name__}"
            )
        dev = pick_device(device)
        spec = resolve_model(spec)  # once: a hub name is fetched or found in the cache here
        if dtype == "auto" and read_config(spec)[0].n_classes:
            dtype = torch.float32  # classifiers: the exact probabilities `scratchllm classify` prints
        elif isinstance(dtype, str):
            dtype = resolve_dtype(dtype, dev)
        return cls(load_model(spec, device=dev, dtype=dtype, quantize=quantize), compile=compile)

    @property
    def engine(self) -> Engine:
        """The generation engine, made on first use (a classifier has none)."""
        if self._engine is None:
            if self.config.n_classes:
                raise ScratchLLMError("this model is a classifier: use .classify(texts), not text generation")
            self._engine = Engine(self.model, self.tokenizer, compile=self.compile)
        return self._engine

    def complete(
        self, prompts: Prompt | Sequence[Prompt], config: GenerationConfig | None = None, **settings: Any
    ) -> list[Completion]:
        """Completions with token counts and finish reasons (one per prompt; prompts run as a batch)."""
        return self.engine.generate(prompts, config, **settings)

    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        config: GenerationConfig | None = None,
        n: int = 1,
        **settings: Any,
    ) -> str | list[str] | list[list[str]]:
        """The text that continues `prompt` (text or token ids), or a list of texts for a list of
        prompts (one batch). `n` > 1: that many samples of each prompt (a list per prompt; with a
        temperature, else they are all the greedy text), e.g. for `majority_vote`.
        Settings: `GenerationConfig`'s, e.g. max_new_tokens, temperature, top_k, top_p, seed, stop,
        repetition_penalty."""
        prompts = [prompt] if is_one_prompt(prompt) else list(prompt)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ScratchLLMError(f"generate: n must be an integer >= 1, got {n!r}")
        texts = [c.text for c in self.complete([p for p in prompts for _ in range(n)], config, **settings)]
        per_prompt = [texts[i * n : (i + 1) * n] for i in range(len(prompts))] if n > 1 else texts
        return per_prompt[0] if is_one_prompt(prompt) else per_prompt

    def stream(
        self, prompt: Prompt, config: GenerationConfig | None = None, **settings: Any
    ) -> Iterator[str]:
        """Text pieces as they are generated."""
        return self.engine.stream(prompt, config, **settings)

    def classify(self, texts: str | Sequence[str]) -> list[dict[str, Any]]:
        """Labels and class probabilities of a finetuned classifier (see `scratchllm finetune classify`)."""
        if not self.config.n_classes:
            raise ScratchLLMError("this model is a language model, not a classifier; finetune one first")
        try:
            batch = [texts] if isinstance(texts, str) else list(texts)  # any iterable: numpy, pandas, ...
        except TypeError:
            batch = None
        if batch is None or isinstance(texts, bytes):
            raise ScratchLLMError(f"classify: give a text or a list of texts, got {type(texts).__name__}")
        return predict(self.loaded, batch)

    def __repr__(self) -> str:
        kind = f"classifier ({self.config.n_classes} classes)" if self.config.n_classes else "language model"
        return f"LLM({self.loaded.path}, {kind}, {count_parameters(self.model) / 1e6:.1f}M parameters)"


#: `scratchllm.load(...)`: load a model directory or GPT-2 for use (`LLM.load`, one signature to keep).
load = LLM.load
