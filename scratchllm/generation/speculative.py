"""Speculative decoding: a small draft model proposes tokens, the target model checks them in one pass.

Leviathan, Kalman and Matias 2023 ("Fast Inference from Transformers via Speculative Decoding") and
Chen et al. 2023 ("Accelerating Large Language Model Decoding with Speculative Sampling"). At batch 1 a
decoding step reads every weight of the model to produce one token; reading them once for k + 1
positions costs hardly more. So each round:

1. the draft proposes k tokens d1..dk one at a time (with its own KV cache), each drawn from its
   distribution q_i under the same settings as the target (temperature, top-k, top-p, penalties;
   greedy: its most likely token); with a `draft_confidence`, it stops early where q_i's largest
   probability falls below it (a guess the target would likely reject costs a draft step for
   nothing), so that j <= k tokens are proposed. k is `draft_tokens` (the "fixed" schedule) or, by
   default ("adaptive"), follows the rounds so far within 1..draft_tokens: one more after a full round
   that was all kept, one fewer after a rejection, none for a while after a rejected single guess
   (`DraftSchedule`), so that rounds grow while the draft follows the text and shrink where it does not
   (each row of a check costs a little, on CPUs more than a little, and a guess past the first wrong one
   is never kept);
2. the target runs once over the last token and d1..dj (j + 1 positions, with its KV cache), which
   gives its distributions p_1..p_(j+1) of the next token after each of them;
3. d_i is kept with probability min(1, p_i(d_i) / q_i(d_i)) (greedy: if it is p_i's most likely
   token); at the first rejection the round's last token is drawn from max(0, p_i - q_i), normalized,
   and if all j are kept, a bonus token is drawn from p_(j+1);
4. both KV caches forget the rejected tokens (`KVCache.truncate`).

A round emits 1 to k + 1 tokens, each distributed exactly as the target alone samples it (the schedule
looks only at rounds already done, so it does not change that): greedy decoding gives the target's own
tokens (up to floating-point rounding: the target scores k + 1 positions in one pass). The draft
needs the target's tokenizer (`check_draft`); a draft with a shorter context window sees only the
latest part of the text. Once the text fills the target's window, decoding goes on without the draft,
as the `Decoder` does (each token from the last `context_length` ones). Sliding-window layers (Gemma 3)
keep every position in the caches here, so that they can go back.

A GPT-2 draft proposing greedily (no penalties) where its steps take the fused forward runs its k steps in
one native call (`fused.gpt_greedy_proposals`): the same tokens, without the interpreter between steps.

`SpeculativeDecoder` has the `Decoder`'s interface for one prompt, so the `Engine` runs it through its
usual per-token loop (stop tokens, stop strings, max_new_tokens end a row inside a round).
"""

from __future__ import annotations

import contextlib
import functools
import secrets
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ScratchLLMError
from ..hub import load_model
from ..model.attention import KVCache
from ..model.gpt import GPTModel
from ..text.tokenizer import Tokenizer
from .config import DRAFT_CONFIDENCE, DRAFT_SCHEDULE, DRAFT_SCHEDULES, DRAFT_TOKENS, GenerationConfig
from .fused import gpt_greedy_proposals
from .kernels import PackedLinears
from .sampling import TokenLogprob, apply_penalties, sampling_probs, token_logprobs

MAX_DRAFT_TOKENS = 32
DRAFT_START = 3  # what an adaptive schedule's first round proposes at most
MAX_DRAFT_PAUSE = 16  # rounds, at most, that an adaptive schedule goes on without a failing draft
# texts both tokenizers must split alike (a few ids are checked besides)
PROBES = (
    "Hello, world! The quick brown fox jumps over 13 lazy dogs.\n",
    "\tdef f(x):\n\t\treturn x ** 2  # ok",
)


@dataclass
class SpeculationStats:
    """How a speculative generation went: target passes (`rounds`), draft tokens proposed and
    accepted, tokens produced (the rounds' tokens, some of them after a stop)."""

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """The share of proposed tokens the target kept (0 when none was proposed)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens per target pass (1 for plain decoding)."""
        return self.tokens / self.rounds if self.rounds else 0.0

    def describe(self) -> str:
        """One line: accepted / proposed and tokens per target pass."""
        return (
            f"draft: {self.accepted}/{self.proposed} proposals accepted ({self.acceptance_rate:.0%}), "
            f"{self.tokens_per_round:.2f} tokens per target pass"
        )


def check_draft(
    model: GPTModel,
    draft: GPTModel,
    tokenizer: Tokenizer | None = None,
    draft_tokenizer: Tokenizer | None = None,
    name: str = "the draft",
) -> None:
    """Raise `ScratchLLMError` unless `draft` can propose tokens for `model`: a language model over the
    same token ids (equal vocabularies; tokenizers, when given, that split text and decode ids alike)."""

    def refuse(why: str) -> ScratchLLMError:
        return ScratchLLMError(
            f"draft model {name}: {why}; speculative decoding needs a draft with the target's tokenizer "
            "(train one with --tokenizer set to the target's directory)"
        )

    if getattr(draft.cfg, "n_classes", 0):
        raise refuse("it has a classifier head, not a language model's")
    if draft.cfg.vocab_size != model.cfg.vocab_size:
        raise refuse(f"its vocabulary has {draft.cfg.vocab_size} ids, the target's {model.cfg.vocab_size}")
    if (
        tokenizer is None
        or draft_tokenizer is None
        or tokenizer.fingerprint() == draft_tokenizer.fingerprint()
    ):
        return
    if draft_tokenizer.vocab_size != tokenizer.vocab_size:
        raise refuse(
            f"its tokenizer has {draft_tokenizer.vocab_size} ids, the target's {tokenizer.vocab_size}"
        )
    for text in PROBES:
        if draft_tokenizer.encode(text) != tokenizer.encode(text):
            raise refuse(f"its tokenizer splits {text[:20]!r} into other ids")
    n = tokenizer.vocab_size
    for i in sorted({0, 1, 255 % n, n // 2, n - 1}):
        if draft_tokenizer.decode_bytes([i]) != tokenizer.decode_bytes([i]):
            raise refuse(f"token id {i} stands for other text")
    if draft_tokenizer.eot_id != tokenizer.eot_id:
        raise refuse(f"its end-of-text id is {draft_tokenizer.eot_id}, the target's {tokenizer.eot_id}")


def load_draft(
    spec: str,
    model: GPTModel,
    tokenizer: Tokenizer | None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> GPTModel:
    """Load a draft model (a directory or a hub name) for `model` and check that it fits (`check_draft`)."""
    loaded = load_model(spec, device=device, dtype=dtype)
    if loaded.tokenizer is None:
        raise ScratchLLMError(
            f"draft model {spec!r} has no tokenizer files; save it with its tokenizer, so that it can be "
            "checked against the target's"
        )
    check_draft(model, loaded.model, tokenizer, loaded.tokenizer, repr(str(spec)))
    return loaded.model


def check_draft_confidence(c: object) -> float:
    """The probability under which the draft stops proposing, checked (0: never stops early)."""
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < 1:
        raise ScratchLLMError(f"draft_confidence must be a number from 0 up to (not including) 1, got {c!r}")
    return float(c)


def check_draft_tokens(k: object) -> int:
    """The number of tokens a draft proposes per round, checked."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise ScratchLLMError(f"draft_tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {k!r}")
    return k


def check_draft_schedule(schedule: object) -> str:
    """How the tokens a round proposes are chosen (`DRAFT_SCHEDULES`), checked."""
    if schedule not in DRAFT_SCHEDULES:
        raise ScratchLLMError(f"draft_schedule must be one of {', '.join(DRAFT_SCHEDULES)}, got {schedule!r}")
    return str(schedule)


def check_draft_settings(
    draft_tokens: object, draft_confidence: object, draft_schedule: object = DRAFT_SCHEDULE
) -> None:
    """The draft settings checked, before anything is loaded."""
    check_draft_tokens(draft_tokens)
    check_draft_confidence(draft_confidence)
    check_draft_schedule(draft_schedule)


class DraftSchedule:
    """How many tokens each round's draft proposes. "fixed": always `most`. "adaptive": from DRAFT_START,
    one more after a full round that was all kept (at most `most`), one fewer after a rejection (at least
    1), so that rounds grow while the draft follows the text and shrink where it does not; and a rejected
    single guess pauses the draft for 1, 2, 4, ... rounds (at most MAX_DRAFT_PAUSE; a kept guess starts
    over at 1), which decode as without it."""

    def __init__(self, most: int, adaptive: bool = True):
        self.most, self.adaptive = most, adaptive
        self.length = min(most, DRAFT_START) if adaptive else most  # what a round proposes, unpaused
        self.pause = 0  # rounds left without the draft
        self.backoff = 0  # the latest pause

    def next(self) -> int:
        """The tokens the next round may propose (0: a paused round)."""
        if self.pause:
            self.pause -= 1
            return 0
        return self.length

    def update(self, proposed: int, accepted: int) -> None:
        """A round that proposed `proposed` tokens (fewer than `next()` said where a stop or a limit cut
        it short) and kept `accepted` of them."""
        if not self.adaptive or not proposed:
            return
        if accepted:
            self.backoff = 0
        if accepted == proposed:
            if proposed == self.length:  # a round cut short keeps its length
                self.length = min(self.most, self.length + 1)
        elif self.length > 1:
            self.length -= 1
        else:
            self.backoff = self.pause = min(MAX_DRAFT_PAUSE, 2 * self.backoff or 1)


class _CachedModel:
    """A model with a KV cache (batch 1) over the text from `offset` on (a draft with a short window
    moves it), holding the first `cache.pos` of those tokens; its prepacked `kernels` (refreshed here)
    are installed by the decoder around each round."""

    def __init__(
        self, model: GPTModel, kernels: PackedLinears | None, cache_dtype: torch.dtype | None, max_len: int
    ):
        self.model = model
        self.kernels = kernels if kernels is not None and kernels.refresh() else None
        self.max_len = min(model.cfg.context_length, max_len)
        self.cache = model.new_kv_cache(1, self.max_len, dtype=cache_dtype, bounded=False)
        self.offset = 0
        self.device = model.tok_emb.weight.device

    @functools.cached_property
    def greedy(self) -> Callable[[list[int], KVCache, int, float], list[int] | None] | None:
        """A GPT-2 draft's greedy proposals in one native call where its steps take the fused forward
        (`fused.gpt_greedy_proposals`), else None; made at first use, since only the draft proposes."""
        fused = self.kernels is not None and self.kernels.fuses(self.model)
        return gpt_greedy_proposals(self.model) if fused else None

    def logits(self, text: list[int], extra: Sequence[int] = (), last: int = 1) -> torch.Tensor:
        """Feed the tokens of `text` followed by `extra` that the cache does not hold yet; return the
        fp32 logits (last, vocab_size) of the next token after each of the `last` tokens fed."""
        start = self.offset + self.cache.pos
        parts = [text[start:], list(extra[max(0, start - len(text)) :])]
        if len(parts[0]) <= 1 or not parts[1]:
            parts = [parts[0] + parts[1]]
        # else the text first (a prompt), as plain decoding feeds it: the keys and values of the tokens
        # after it, and so the verdicts on a draft's, then match one-token-at-a-time decoding
        hidden = []
        for ids in parts:
            idx = torch.tensor([ids], dtype=torch.long, device=self.device)
            hidden.append(self.model(idx, kv_cache=self.cache, return_hidden=True))
        return self.model.out_head(torch.cat(hidden, dim=1)[0, -last:]).float()

    def window_logits(self, text: list[int]) -> torch.Tensor:
        """Without the cache: the logits (1, vocab_size) after the last `context_length` tokens of
        `text`, their positions counted from 0 (the book's crop)."""
        idx = torch.tensor([text[-self.model.cfg.context_length :]], dtype=torch.long, device=self.device)
        return self.model.out_head(self.model(idx, return_hidden=True)[0, -1:]).float()

    def keep(self, n: int) -> None:
        """Keep only what the cache holds of the first `n` tokens of the text."""
        self.cache.truncate(min(self.cache.pos, max(0, n - self.offset)))

    def restart(self, offset: int) -> None:
        """Empty the cache; it starts again at token `offset` of the text."""
        self.offset = offset
        self.cache.reset()


class SpeculativeDecoder:
    """Generate tokens for one prompt with a draft model; the `Decoder`'s interface (see the module
    docstring for the algorithm).

        dec = SpeculativeDecoder(model, draft, prompt_ids, GenerationConfig(max_new_tokens=20))
        while dec.active:
            token = dec.step()[0]
            ...  # dec.finish([0]) ends it early

    `step()` hands out the tokens of a round one at a time (running a new round when they are used
    up); `stats` counts proposals and acceptances. `kernels`, `draft_kernels`: prepacked CPU weights
    of each model; `cache_dtype`: the KV caches' dtype (None: each model's weights').
    """

    def __init__(
        self,
        model: GPTModel,
        draft: GPTModel,
        prompt: Sequence[int],
        config: GenerationConfig,
        *,
        draft_tokens: int = DRAFT_TOKENS,
        draft_confidence: float = DRAFT_CONFIDENCE,
        draft_schedule: str = DRAFT_SCHEDULE,
        kernels: PackedLinears | None = None,
        draft_kernels: PackedLinears | None = None,
        cache_dtype: torch.dtype | None = None,
    ):
        config.validate()
        check_draft(model, draft)
        self.config = config
        self.k = check_draft_tokens(draft_tokens)
        self.confidence = check_draft_confidence(draft_confidence)
        self.schedule = DraftSchedule(self.k, check_draft_schedule(draft_schedule) == "adaptive")
        self.tokens = [int(t) for t in prompt]
        if not self.tokens:
            raise ScratchLLMError("generation: the prompt is empty; give at least one token")
        self.active = [0]
        self.steps = 0
        self.last_logprobs: list[TokenLogprob] = []
        self.stats = SpeculationStats()
        room = len(self.tokens) + config.max_new_tokens
        self.target = _CachedModel(model, kernels, cache_dtype, room)
        self.draft = _CachedModel(draft, draft_kernels, cache_dtype, room)
        self.device = self.target.device
        self.vocab_size = model.cfg.vocab_size
        self.generator: torch.Generator | None = None
        if config.temperature > 0:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(config.seed if config.seed is not None else secrets.randbits(63))
        self._seen = self._counts = None  # what the penalties look at: the text's tokens, the generated ones'
        if config.repetition_penalty != 1.0:
            self._seen = torch.zeros(1, self.vocab_size, dtype=torch.bool, device=self.device)
            self._seen[0, torch.tensor(self.tokens, device=self.device)] = True
        if config.presence_penalty or config.frequency_penalty:
            self._counts = torch.zeros(1, self.vocab_size, device=self.device)
        self._pending: deque[tuple[int, TokenLogprob | None]] = deque()  # the round's tokens not handed out

    def finish(self, rows: Sequence[int]) -> None:
        """Stop (row 0 is the only one)."""
        if 0 in rows:
            self.active = []
            self._pending.clear()

    @torch.inference_mode()
    def step(self) -> list[int]:
        """The next token, as a list of one (empty once finished)."""
        if not self.active:
            return []
        if self.steps >= self.config.max_new_tokens:
            raise RuntimeError("SpeculativeDecoder.step(): max_new_tokens already generated")
        if not self._pending:
            with self._kernels_installed():
                self._round()
        token, logprob = self._pending.popleft()
        self.steps += 1
        if logprob is not None:
            self.last_logprobs = [logprob]
        return [token]

    @contextlib.contextmanager
    def _kernels_installed(self) -> Iterator[None]:
        """Route both models' linear layers through their prepacked weights (a shared set once)."""
        sets = {id(k): k for k in (self.target.kernels, self.draft.kernels) if k is not None}
        with contextlib.ExitStack() as stack:
            for kernels in sets.values():
                stack.enter_context(kernels.installed())
            yield

    # -- a round ---------------------------------------------------------------------------------

    def _round(self) -> None:
        """Propose, verify, keep: extend the text by 1 to k + 1 tokens and queue them."""
        text, cfg = self.tokens, self.config
        n = len(text)
        if n > self.target.max_len:  # the window is full: one token at a time from its last tokens
            k, drafts, q = 0, [], None
            raw = self.target.window_logits(text)
        else:
            k = min(self.schedule.next(), cfg.max_new_tokens - self.steps - 1, self.target.max_len - n)
            k = min(k, self.draft.max_len - self.draft.max_len // 2)  # what fits a cropped draft window
            drafts, q = self._propose(k) if k > 0 else ([], None)
            raw = self.target.logits(text, drafts, last=len(drafts) + 1)
        logits = self._penalized(raw, drafts)
        if self.generator is None:
            accepted, token = _verify_greedy(logits, drafts)
        else:
            accepted, token = self._verify_sampled(logits, drafts, q)
        self.schedule.update(len(drafts), accepted)
        new = [*drafts[:accepted], token]
        text.extend(new)
        self.target.keep(len(text) - 1)  # every token but the newest, which the next round feeds
        self.draft.keep(len(text) - 1)
        self._count(new)
        logprobs: list[TokenLogprob | None] = [None] * len(new)
        if cfg.logprobs is not None:  # the target's own, before penalties
            logprobs = token_logprobs(raw[: len(new)], torch.tensor(new, device=self.device), cfg.logprobs)
        self._pending.extend(zip(new, logprobs))
        self.stats.rounds += 1
        self.stats.proposed += len(drafts)
        self.stats.accepted += accepted
        self.stats.tokens += len(new)

    def _propose(self, k: int) -> tuple[list[int], torch.Tensor | None]:
        """The draft's k tokens and (sampling) the distributions (k, vocab_size) they were drawn from."""
        text, draft, cfg = self.tokens, self.draft, self.config
        if len(text) - draft.offset + k - 1 > draft.max_len:  # the draft's window is full: crop
            draft.restart(len(text) - max(1, draft.max_len // 2))
        if (
            self.generator is None
            and self._seen is None
            and self._counts is None
            and draft.greedy is not None
        ):
            proposals = draft.greedy(text[draft.offset + draft.cache.pos :], draft.cache, k, self.confidence)
            if proposals is not None:  # else (a long text to feed, ...) the steps below
                return proposals, None
        tokens: list[int] = []
        probs = []
        for _ in range(k):
            logits = self._penalized(draft.logits(text, tokens), tokens)
            if self.generator is None:
                if self.confidence and float(torch.softmax(logits, -1).max()) < self.confidence:
                    break
                tokens.append(int(logits.argmax()))
            else:
                q = sampling_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
                # the stop depends on the text so far only, so each kept token's distribution stays exact
                if self.confidence and float(q.max()) < self.confidence:
                    break
                tokens.append(int(torch.multinomial(q, 1, generator=self.generator)))
                probs.append(q)
        return tokens, torch.cat(probs) if probs else None

    def _verify_sampled(
        self, logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None
    ) -> tuple[int, int]:
        """Speculative sampling: how many drafts to keep, and the token after them."""
        cfg, k = self.config, len(drafts)
        p = sampling_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
        accepted = 0
        if k:
            rows, ids = torch.arange(k, device=self.device), torch.tensor(drafts, device=self.device)
            u = torch.rand(k, generator=self.generator, device=self.device)
            keep = u * q[rows, ids] < p[rows, ids]  # with probability min(1, p / q)
            accepted = int(keep.long().cumprod(0).sum())
        dist = p[accepted]
        if accepted < k:  # the rejected position: what p has beyond q
            residual = (p[accepted] - q[accepted]).clamp(min=0)
            dist = residual if float(residual.sum()) > 0 else dist  # p == q up to rounding
        return accepted, int(torch.multinomial(dist, 1, generator=self.generator))

    def _penalized(self, logits: torch.Tensor, proposals: Sequence[int]) -> torch.Tensor:
        """`logits` (n, vocab_size) of n consecutive positions after the text so far and `proposals`,
        the last row after all of them, with the penalties the text up to each position calls for."""
        cfg = self.config
        if self._seen is None and self._counts is None:
            return logits
        n = logits.shape[0]
        counts = torch.zeros(len(proposals) + 1, self.vocab_size, device=self.device)
        if proposals:  # row i: how often each token occurs in the first i proposals
            ids = torch.tensor(list(proposals), device=self.device)
            counts[1:] = F.one_hot(ids, self.vocab_size).float().cumsum(0)
        counts = counts[len(proposals) + 1 - n :]
        seen = None if self._seen is None else self._seen | (counts > 0)
        generated = None if self._counts is None else self._counts + counts
        return apply_penalties(
            logits, seen, generated, cfg.repetition_penalty, cfg.presence_penalty, cfg.frequency_penalty
        )

    def _count(self, tokens: list[int]) -> None:
        """Add a round's tokens to what the penalties look at."""
        if self._seen is None and self._counts is None:
            return
        ids = torch.tensor(tokens, device=self.device)
        if self._seen is not None:
            self._seen[0, ids] = True
        if self._counts is not None:
            self._counts[0].index_add_(0, ids, torch.ones(len(tokens), device=self.device))


def _verify_greedy(logits: torch.Tensor, drafts: list[int]) -> tuple[int, int]:
    """Greedy: keep the drafts while each is the target's most likely token; then the target's own."""
    best = logits.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == best[accepted]:
        accepted += 1
    return accepted, best[accepted]


__all__ = [
    "MAX_DRAFT_TOKENS",
    "DraftSchedule",
    "SpeculationStats",
    "SpeculativeDecoder",
    "check_draft",
    "check_draft_confidence",
    "check_draft_schedule",
    "check_draft_settings",
    "check_draft_tokens",
    "load_draft",
]
