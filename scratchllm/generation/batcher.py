"""Continuous batching: requests join and leave a running batch at token boundaries.

`Batcher(engine, max_batch_size, prefill_chunk)` keeps up to `max_batch_size` sequences in the slots
of one `SlotKVCache` (model/attention.py), each at its own length. Every `step()`:

1. admits waiting requests into free slots;
2. decodes: one forward pass feeds each decoding row its last token, and each row samples its next
   one with its own settings (temperature, top-k, top-p, penalties; a seeded row has its own
   generator, seeded as the `Decoder` seeds one) and checks its own stop tokens, stop strings and
   length;
3. prefills: one forward pass feeds a chunk of the prompts being read, `prefill_chunk` tokens at most
   (first come, first served; several short prompts share a pass, padded to one length), so a long
   prompt takes several steps while the decoding rows keep getting a token in each; a prompt read to
   its end gives its first token and joins the decoding rows;
4. frees the slots of the rows that finished.

The decoding rows stay in `slots[:decoding]` (a finished row's slot is refilled by moving the last
row into it), so the decode pass reads the cache as a view. It attends over the longest row's
positions (shorter rows mask the rest), and every slot has room for as many positions as the
longest row so far (a slot-based cache, not a paged one). A request must fit its prompt and reply in
the context window (`accepts`): the engine's cropping of longer ones is not done here. Greedy rows give
the tokens the engine gives each request alone (up to the rounding of batched arithmetic); a seeded
row draws what it would draw alone, as its generator sees the same calls.

    batcher = Batcher(engine, max_batch_size=16)
    request = batcher.add(prompt_ids, GenerationConfig(max_new_tokens=50), incremental=True)
    while batcher.busy:
        batcher.step()
        for piece, logprobs in request.take_pieces(): ...
    request.completion
"""

from __future__ import annotations

import contextlib
import secrets
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ScratchLLMError
from ..model.attention import SlotKVCache
from .completion import Completion, RowText
from .config import GenerationConfig
from .engine import Engine, cache_dtype, eval_mode
from .sampling import TokenLogprob, apply_penalties, sample_next_token, token_logprobs

Piece = tuple[str, list[TokenLogprob]]  # a text piece and the logprobs of the tokens that begin in it


@dataclass(eq=False)
class Request:
    """One prompt's generation in a `Batcher`: its settings, where it stands, what it produced."""

    prompt: list[int]
    cfg: GenerationConfig
    incremental: bool  # keep the text as tokens arrive: stream pieces, watch stop strings
    stop_ids: set[int]
    text: RowText
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # (vocab,) repetition penalty: the prompt's tokens and the text's
    counts: torch.Tensor | None = None  # (vocab,) presence and frequency penalties: tokens generated
    fed: int = 0  # prompt tokens in the cache
    slot: int | None = None
    last: int = 0  # the token fed next
    pieces: list[Piece] = field(default_factory=list)  # produced since `take_pieces`
    sent_logprobs: int = 0  # logprobs handed out with pieces
    completion: Completion | None = None  # set when it finished
    cancelled: bool = False

    @property
    def remaining(self) -> int:
        """Prompt tokens not yet in the cache."""
        return len(self.prompt) - self.fed

    @property
    def rest_logprobs(self) -> list[TokenLogprob]:
        """Once finished: the completion's logprobs that no piece carried (as `TextStream`'s)."""
        if self.completion is None or self.completion.logprobs is None:
            return []
        return self.completion.logprobs[self.sent_logprobs :]

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalties: its token is the argmax of its logits."""
        return self.cfg.temperature == 0 and self.seen is None and self.counts is None

    def take_pieces(self) -> list[Piece]:
        """The text pieces produced since the last call (streaming, or with stop strings)."""
        pieces, self.pieces = self.pieces, []
        self.sent_logprobs += sum(len(lp) for _, lp in pieces)
        return pieces

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits (1, vocab), with its penalties, settings and generator."""
        cfg = self.cfg
        if self.seen is not None or self.counts is not None:
            seen = None if self.seen is None else self.seen[None]
            counts = None if self.counts is None else self.counts[None]
            logits = apply_penalties(
                logits, seen, counts, cfg.repetition_penalty, cfg.presence_penalty, cfg.frequency_penalty
            )
        token = int(sample_next_token(logits, cfg.temperature, cfg.top_k, cfg.top_p, self.generator)[0])
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        return token


class Batcher:
    """Continuous batching over an `Engine`'s model; see the module docstring. Not thread-safe: one
    thread adds, cancels and steps."""

    def __init__(self, engine: Engine, max_batch_size: int = 8, prefill_chunk: int = 256):
        for name, value in (("max_batch_size", max_batch_size), ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ScratchLLMError(f"continuous batching: {name} must be an integer >= 1, got {value!r}")
        if not self.supports(engine):
            raise ScratchLLMError("continuous batching needs an engine without a draft model or compile")
        self.engine = engine
        self.model = engine.model
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.device = self.model.tok_emb.weight.device
        self.cache: SlotKVCache | None = None  # made at the first step
        self.slots: list[Request | None] = [None] * max_batch_size
        self.decoding = 0  # the decoding rows are slots[:decoding]
        self.prefilling: list[Request] = []  # in slots past `decoding`, first come first
        self.queue: deque[Request] = deque()  # waiting for a slot
        self.steps = 0
        self._kernels = None

    @staticmethod
    def supports(engine: Engine) -> bool:
        """Whether the engine can decode this way: not with a draft model (speculative decoding) nor
        under torch.compile (fixed shapes), which decode one batch at a time."""
        return getattr(engine, "draft", None) is None and engine.compiled is None

    def accepts(self, prompt_tokens: int, cfg: GenerationConfig) -> bool:
        """Whether a prompt of this length with these settings fits: at least one token to generate, a
        KV cache, and prompt plus reply inside the context window (else the engine's own cropping applies)."""
        ctx = self.model.cfg.context_length
        return cfg.use_cache and cfg.max_new_tokens >= 1 and 1 <= prompt_tokens <= ctx - cfg.max_new_tokens

    @property
    def busy(self) -> bool:
        """Requests are waiting or running."""
        return bool(self.queue) or self.decoding > 0 or bool(self.prefilling)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self.queue)

    def add(self, prompt: Sequence[int], cfg: GenerationConfig, incremental: bool = False) -> Request:
        """Queue one prompt (token ids) for generation; `incremental`: produce text pieces as it goes
        (streaming). Stop strings always keep the text up to date."""
        cfg.validate()
        ids = self.engine.encode(list(prompt))
        if not self.accepts(len(ids), cfg):
            raise ScratchLLMError(
                f"continuous batching: a prompt of {len(ids)} tokens and max_new_tokens "
                f"{cfg.max_new_tokens} do not fit the context window of {self.model.cfg.context_length}"
            )
        incremental = incremental or bool(cfg.stop)
        if incremental and self.engine.tokenizer is None:
            raise ScratchLLMError("generation: streaming and stop strings need a tokenizer")
        request = Request(
            ids, cfg, incremental, self.engine.stop_ids(cfg), RowText(prompt_tokens=len(ids), stops=cfg.stop)
        )
        if cfg.temperature > 0:
            request.generator = torch.Generator(device=self.device)
            request.generator.manual_seed(cfg.seed if cfg.seed is not None else secrets.randbits(63))
        vocab = self.model.cfg.vocab_size
        if cfg.repetition_penalty != 1.0:
            request.seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            request.seen[torch.tensor(ids, device=self.device)] = True
        if cfg.presence_penalty or cfg.frequency_penalty:
            request.counts = torch.zeros(vocab, device=self.device)
        self.queue.append(request)
        return request

    @torch.inference_mode()
    def cancel(self, request: Request) -> None:
        """Take a request out (a client that went away): its slot is free for the next step."""
        request.cancelled = True
        if request in self.queue:
            self.queue.remove(request)
        elif request in self.prefilling:
            self.prefilling.remove(request)
            self._free(request)
        elif request.slot is not None:
            self._leave([request])

    def clear(self) -> None:
        """Drop every request (after a failed step): the batcher is empty again."""
        for request in [*self.queue, *self.prefilling, *self.slots[: self.decoding]]:
            if request is not None:
                request.cancelled = True
                request.slot = None
        self.queue.clear()
        self.prefilling.clear()
        self.slots = [None] * self.max_batch_size
        self.decoding = 0
        self.cache = None

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration (see the module docstring): admit, decode a token per row, prefill a chunk."""
        if self.cache is None:
            self.cache = self.model.new_slot_cache(self.max_batch_size, dtype=cache_dtype(self.model))
        if self._admit():  # packed again only when the weights changed
            kernels = self.engine.kernels
            self._kernels = kernels if kernels is not None and kernels.refresh() else None
        with eval_mode(self.model), self._packed():
            if self.decoding:
                self._decode()
            if self.prefilling:
                self._prefill()
        self.steps += 1

    # -- the iteration ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _packed(self) -> Iterator[None]:
        """The engine's packed CPU weights, if it has them, around the step's forward passes."""
        with self._kernels.installed() if self._kernels is not None else contextlib.nullcontext():
            yield

    def _admit(self) -> int:
        """Give waiting requests the free slots, first come first; how many got one."""
        admitted = 0
        for slot in range(self.decoding, self.max_batch_size):
            if not self.queue:
                break
            if self.slots[slot] is None:
                request = self.queue.popleft()
                self.slots[slot], request.slot = request, slot
                self.cache.lengths[slot] = 0  # type: ignore[union-attr]
                self.prefilling.append(request)
                admitted += 1
        return admitted

    def _decode(self) -> None:
        rows: list[Request] = self.slots[: self.decoding]  # type: ignore[assignment]
        tokens = torch.tensor([[r.last] for r in rows], device=self.device)
        self.cache.use(range(self.decoding))
        hidden = self.model(tokens, kv_cache=self.cache, return_hidden=True)
        finished = self._emit(rows, self.model.out_head(hidden[:, -1]).float())
        self._leave(finished)

    def _prefill(self) -> None:
        rows, width = self._prefill_plan()
        counts = [min(r.remaining, width) for r in rows]
        idx = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, n) in enumerate(zip(rows, counts)):
            idx[i, :n] = torch.tensor(r.prompt[r.fed : r.fed + n])
            r.fed += n
        self.cache.use([r.slot for r in rows], counts)
        hidden = self.model(idx.to(self.device), kv_cache=self.cache, return_hidden=True)
        ready = [i for i, r in enumerate(rows) if r.remaining == 0]
        if not ready:
            return
        at = torch.tensor([counts[i] - 1 for i in ready], device=self.device)
        last = hidden[torch.tensor(ready, device=self.device), at]
        read = [rows[i] for i in ready]
        finished = self._emit(read, self.model.out_head(last).float())
        for r in read:
            self.prefilling.remove(r)
            if r in finished:
                self._free(r)
            else:
                self._join_decoding(r)

    def _prefill_plan(self) -> tuple[list[Request], int]:
        """The prompts that the next pass reads, first come first, and the chunk width: the oldest
        prompt's next chunk sets the width, and later prompts join while the padded pass stays within
        `prefill_chunk` tokens (each feeds up to `width` tokens)."""
        first = self.prefilling[0]
        width = min(first.remaining, self.prefill_chunk)
        rows = [first]
        for r in self.prefilling[1:]:
            if (len(rows) + 1) * width > self.prefill_chunk:
                break
            rows.append(r)
        return rows, width

    def _emit(self, rows: list[Request], logits: torch.Tensor) -> list[Request]:
        """Sample each row's next token from its logits (rows, vocab); record it; the rows that finished."""
        tokens: list[int | None] = [None] * len(rows)
        plain = [i for i, r in enumerate(rows) if r.plain_greedy]
        if plain:  # greedy rows without penalties: one argmax for all
            for i, t in zip(plain, sample_next_token(logits[plain], 0.0).tolist()):
                tokens[i] = t
        finished = []
        for i, r in enumerate(rows):
            t = tokens[i] if tokens[i] is not None else r.sample(logits[i : i + 1])
            lp = None
            if r.cfg.logprobs is not None:
                chosen = torch.tensor([t], device=self.device)
                lp = token_logprobs(logits[i : i + 1], chosen, r.cfg.logprobs)[0]
            r.last = t
            if self._accept(r, t, lp):
                finished.append(r)
        return finished

    def _accept(self, r: Request, token: int, logprob: TokenLogprob | None) -> bool:
        """Add a sampled token to a row's text (`RowText.add`, as the engine does); True when the row
        finished."""
        row, cfg = r.text, r.cfg
        tokenizer = self.engine.tokenizer if r.incremental else None
        r.pieces.extend(row.add(token, logprob, r.stop_ids, cfg.max_new_tokens, tokenizer))
        if row.finish_reason is None:
            return False
        if r.incremental:
            text = row.text
        else:
            tokenizer = self.engine.tokenizer
            text = tokenizer.decode(row.token_ids) if tokenizer is not None else ""
        r.completion = row.completion(text, with_logprobs=cfg.logprobs is not None)
        return True

    # -- slots -----------------------------------------------------------------------------------

    def _free(self, r: Request) -> None:
        self.slots[r.slot] = None  # type: ignore[index]
        r.slot = None

    def _leave(self, rows: list[Request]) -> None:
        """Take decoding rows out, keeping the others in `slots[:decoding]`: the last one fills a hole."""
        for r in sorted(rows, key=lambda r: r.slot, reverse=True):  # type: ignore[arg-type, return-value]
            hole, last = r.slot, self.decoding - 1
            self._free(r)
            if hole != last:
                self._move(last, hole)
            self.decoding -= 1

    def _join_decoding(self, r: Request) -> None:
        """Put a row whose prompt was read at `slots[decoding]` (swapped with a prompt still read there)."""
        target = self.decoding
        if r.slot != target:
            other = self.slots[target]
            if other is None:
                self._move(r.slot, target)  # type: ignore[arg-type]
            else:
                self.cache.swap(r.slot, target)  # type: ignore[arg-type]
                self.slots[r.slot], other.slot = other, r.slot  # type: ignore[index]
                self.slots[target], r.slot = r, target
        self.decoding += 1

    def _move(self, src: int, dst: int) -> None:
        self.cache.move(src, dst)  # type: ignore[union-attr]
        r = self.slots[src]
        self.slots[dst], self.slots[src] = r, None
        r.slot = dst  # type: ignore[union-attr]


__all__ = ["Batcher", "Request"]
