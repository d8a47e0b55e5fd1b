"""The one generation engine: text in, text out, for the CLI, chat, the server and evaluation.

`Engine(model, tokenizer)` takes strings (or token ids) and returns `Completion`s (text, token ids,
finish reason, token counts). It runs a `Decoder` over the batch, stops each row at the end-of-text
token or at stop strings, and streams text pieces that never split a UTF-8 character and never show
text that may turn out to start a stop string.

    engine = Engine(model, tokenizer)
    [out] = engine.generate(["Every effort moves you"], GenerationConfig(max_new_tokens=20))
    for piece in engine.stream("Once upon a time", GenerationConfig(temperature=0.8, seed=1)):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from ..checkpoint import LoadedModel
from ..device import check_compile
from ..errors import ScratchLLMError
from ..hub import load_model
from ..model.gpt import GPTModel
from ..text.registry import load_tokenizer
from ..text.tokenizer import AllowedSpecial, Tokenizer
from .compiled import CompiledDecoding
from .completion import Completion, RowText, TextStream
from .config import DRAFT_CONFIDENCE, DRAFT_SCHEDULE, DRAFT_TOKENS, MAX_TOP_LOGPROBS, GenerationConfig
from .decoder import Decoder
from .kernels import PackedLinears
from .sampling import TokenLogprob, token_logprobs
from .speculative import (
    SpeculationStats,
    SpeculativeDecoder,
    check_draft,
    check_draft_confidence,
    check_draft_schedule,
    check_draft_settings,
    check_draft_tokens,
    load_draft,
)

Prompt = str | Sequence[int]


class Engine:
    """Text generation for one model and tokenizer; see the module docstring.

    `generate(prompts, config)` returns one `Completion` per prompt (the prompts run as one
    batch); `stream(prompt, config)` yields text pieces as they are generated. A prompt is a string
    (encoded with `allowed_special`, by default none: special-token strings stay plain text) or a
    list of token ids. The model runs in eval mode under `torch.inference_mode` and is put back in
    its previous mode afterwards. Not thread-safe: serve one request at a time per engine.

    With a `draft` model (same tokenizer, smaller), a batch of one prompt decodes speculatively
    (speculative.py): the draft proposes `draft_tokens` tokens, the target checks them in one pass.
    Batches, `use_cache=False` and prompts longer than the context window decode without it.
    `last_speculation` holds the counts of the latest generation's speculation (None: it had none).
    """

    def __init__(
        self,
        model: GPTModel,
        tokenizer: Tokenizer | str | os.PathLike | None = None,
        *,
        allowed_special: AllowedSpecial = frozenset(),
        prepack: bool | None = None,
        compile: bool = False,
        draft: GPTModel | None = None,
        draft_tokens: int = DRAFT_TOKENS,
        draft_confidence: float = DRAFT_CONFIDENCE,
        draft_schedule: str = DRAFT_SCHEDULE,
    ):
        """`tokenizer`: a `Tokenizer`, or what `load_tokenizer` takes (a name such as "gpt2", a directory).
        `prepack`: decode with `PackedLinears` (None: wherever supported, i.e. on CPUs).
        `compile`: decode with `CompiledDecoding` (torch.compile; CUDA graphs on GPUs), for GPUs and
        long generations: the first generation of each batch size pays the compilation.
        `draft`: a small model over the same token ids for speculative decoding, `draft_tokens` the
        most tokens it proposes per round (`draft_schedule` "adaptive": fewer while its guesses fail;
        "fixed": always that many), fewer where its top probability falls below `draft_confidence`."""
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
        self.draft = draft
        self.draft_tokens = check_draft_tokens(draft_tokens)
        self.draft_confidence = check_draft_confidence(draft_confidence)
        self.draft_schedule = check_draft_schedule(draft_schedule)
        self.draft_kernels = None
        self.last_speculation: SpeculationStats | None = None
        if draft is not None:
            if compile:
                raise ScratchLLMError("a draft model does not combine with compile: leave one of them out")
            check_draft(model, draft)
            self.draft_kernels = (
                PackedLinears(draft) if use_packed and PackedLinears.supported(draft) else None
            )

    @classmethod
    def load(
        cls,
        spec: str,
        device: str = "cpu",
        dtype: torch.dtype | str | None = None,
        compile: bool = False,
        quantize: str | None = None,
        draft_model: str | None = None,
        draft_tokens: int = DRAFT_TOKENS,
        draft_confidence: float = DRAFT_CONFIDENCE,
        draft_schedule: str = DRAFT_SCHEDULE,
    ) -> Engine:
        """An engine for a model directory or a hub name (`gpt2`, `gpt2-medium`, ...). `quantize`
        "int4": int4 weights (CPU only; model/quantize.py). `draft_model`: a directory or hub name of a
        draft for speculative decoding (`from_loaded`)."""
        check_draft_settings(draft_tokens, draft_confidence, draft_schedule)  # before the (slow) loads
        loaded = load_model(spec, device=device, dtype=dtype, quantize=quantize)
        return cls.from_loaded(
            loaded,
            spec,
            compile=compile,
            draft_model=draft_model,
            draft_tokens=draft_tokens,
            draft_confidence=draft_confidence,
            draft_schedule=draft_schedule,
        )

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedModel,
        spec: str,
        compile: bool = False,
        draft_model: str | None = None,
        draft_tokens: int = DRAFT_TOKENS,
        draft_confidence: float = DRAFT_CONFIDENCE,
        draft_schedule: str = DRAFT_SCHEDULE,
    ) -> Engine:
        """An engine for a loaded model (`spec`: where it came from, for errors), with its draft loaded
        from `draft_model` on the model's device and in its dtype (not quantized)."""
        check_draft_settings(draft_tokens, draft_confidence, draft_schedule)
        if loaded.tokenizer is None:
            raise ScratchLLMError(f"model {spec!r} has no tokenizer files; save the model with its tokenizer")
        draft = None
        if draft_model:
            weights = next(loaded.model.parameters())
            draft = load_draft(
                draft_model, loaded.model, loaded.tokenizer, device=weights.device, dtype=weights.dtype
            )
        return cls(
            loaded.model,
            loaded.tokenizer,
            compile=compile,
            draft=draft,
            draft_tokens=draft_tokens,
            draft_confidence=draft_confidence,
            draft_schedule=draft_schedule,
        )

    # -- public API ------------------------------------------------------------------------------

    def encode(self, prompt: Prompt, allowed_special: AllowedSpecial | None = None) -> list[int]:
        """The token ids of a prompt (text, or ids checked against the vocabulary). Text gets the
        tokenizer's beginning-of-sequence token first when its model expects one (Llama, Gemma);
        `allowed_special`: the special tokens its text may hold (None: the engine's setting)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ScratchLLMError(
                    "generation: a text prompt needs a tokenizer; give token ids or a tokenizer"
                )
            allowed = self.allowed_special if allowed_special is None else allowed_special
            ids = self.tokenizer.encode(prompt, allowed_special=allowed)
            bos = getattr(self.tokenizer, "bos_id", None)
            if getattr(self.tokenizer, "add_bos", False) and bos is not None and ids[:1] != [bos]:
                ids = [bos, *ids]
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
                    f"generation: scoring a prompt of {len(one)} tokens needs them in one context window of "
                    f"{ctx}"
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
            with eval_mode(self.model), torch.inference_mode():
                hidden = self.model.hidden_at(seqs, [range(len(one) - 1) for one in seqs])
                scored = token_logprobs(self.model.out_head(hidden), targets, top)
            at = 0
            for i in rows:
                n = len(ids[i]) - 1
                out[i], at = [None, *scored[at : at + n]], at + n
            start = end
        return out

    def warm_up(self, max_batch_size: int = 1) -> list[int]:
        """Do now what the first generation would otherwise wait for: on CPUs, pack the weights and
        pick each product's kernel (`PackedLinears.refresh`, which builds scratchllm/native the first
        time); with `compile`, compile (and on GPUs record) the decode step for every cache shape that
        batches of up to `max_batch_size` prompts use. Returns those cache batch sizes ([] without
        `compile`)."""
        for kernels in (self.kernels, self.draft_kernels):
            if kernels is not None:
                kernels.refresh()
        if self.compiled is None:
            return []
        sizes = sorted({CompiledDecoding.batch_rows(n) for n in range(1, max_batch_size + 1)})
        for n in sizes:  # steps 2 and 3 compile the step and record the CUDA graph; 4 replays it
            self.generate([[0]] * n, GenerationConfig(max_new_tokens=4, ignore_eos=True))
        return sizes

    def stop_ids(self, cfg: GenerationConfig) -> set[int]:
        """The ids that end a sequence under `cfg`: the config's, and (unless `ignore_eos`) the end of
        text, which for a model with a generation config of its own are all its end-of-turn ids."""
        ids = set(cfg.stop_token_ids)
        if not cfg.ignore_eos:
            if cfg.eos_id is not None:
                ids.add(cfg.eos_id)
            elif self.tokenizer is not None:
                ids |= {self.tokenizer.eot_id, *getattr(self.tokenizer, "stop_ids", ())} - {None}
        return ids

    # -- the loop --------------------------------------------------------------------------------

    def _run(
        self, prompts: list[list[int]], cfg: GenerationConfig, result: list[Completion], incremental: bool
    ) -> Iterator[tuple[int, str, list[TokenLogprob]]]:
        """Yield (row, text piece, logprobs of the tokens that begin in it) while generating (pieces
        only when `incremental`); fill `result`."""
        if incremental and self.tokenizer is None:
            raise ScratchLLMError("generation: streaming and stop strings need a tokenizer")
        rows = [RowText(prompt_tokens=len(p), stops=cfg.stop) for p in prompts]
        with eval_mode(self.model), eval_mode(self.draft):
            if cfg.max_new_tokens > 0 and prompts:
                dec = self._decoder(prompts, cfg)
                self.last_speculation = dec.stats if isinstance(dec, SpeculativeDecoder) else None
                yield from self._decode(dec, rows, cfg, incremental)
        for row in rows:
            if incremental:
                text = row.text
            else:
                text = self.tokenizer.decode(row.token_ids) if self.tokenizer else ""
            result.append(row.completion(text, with_logprobs=cfg.logprobs is not None))

    def _decoder(self, prompts: list[list[int]], cfg: GenerationConfig) -> Decoder | SpeculativeDecoder:
        """A speculative decoder for one prompt when there is a draft, else the `Decoder`."""
        if (
            self.draft is not None
            and len(prompts) == 1
            and cfg.use_cache
            and len(prompts[0]) <= self.model.cfg.context_length
        ):
            return SpeculativeDecoder(
                self.model,
                self.draft,
                prompts[0],
                cfg,
                draft_tokens=self.draft_tokens,
                draft_confidence=self.draft_confidence,
                draft_schedule=self.draft_schedule,
                kernels=self.kernels,
                draft_kernels=self.draft_kernels,
                cache_dtype=cache_dtype(self.model),
            )
        return Decoder(
            self.model,
            prompts,
            cfg,
            kernels=self.kernels,
            cache_dtype=cache_dtype(self.model),
            compiled=self.compiled,
        )

    def _decode(
        self, dec: Decoder | SpeculativeDecoder, rows: list[RowText], cfg: GenerationConfig, incremental: bool
    ) -> Iterator[tuple[int, str, list[TokenLogprob]]]:
        """Step `dec` until every row has finished (a stop token, a stop string or the length limit),
        keeping each row's tokens, logprobs and (when `incremental`) text, and yielding its pieces."""
        stop_ids = self.stop_ids(cfg)
        while dec.active:
            tokens = dec.step()
            done = []
            for i, (r, t) in enumerate(zip(dec.active, tokens)):
                row = rows[r]
                logprob = dec.last_logprobs[i] if cfg.logprobs is not None else None
                tokenizer = self.tokenizer if incremental else None
                for piece, logprobs in row.add(t, logprob, stop_ids, cfg.max_new_tokens, tokenizer):
                    yield r, piece, logprobs
                if row.finish_reason is not None:
                    done.append(r)
            dec.finish(done)


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
    """`config` (default: the defaults) with keyword `overrides`, each checked."""
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


def cache_dtype(model: nn.Module) -> torch.dtype | None:
    """fp32 keys/values for bf16 weights on CPUs (attention in bf16 is slower there), else None (the
    weights' type)."""
    p = next(model.parameters())
    return torch.float32 if p.device.type == "cpu" and p.dtype == torch.bfloat16 else None


@contextlib.contextmanager
def eval_mode(model: nn.Module | None) -> Iterator[None]:
    """The model (if any) in eval mode inside the block, then back in the mode it was in."""
    if model is None:
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
