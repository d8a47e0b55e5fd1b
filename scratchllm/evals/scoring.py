"""Scoring: the log-likelihood of a continuation given a context, and the two ways tasks use it.

Multiple choice (as lm-evaluation-harness scores HellaSwag, ARC, PIQA, ...): each choice is a
continuation of the same context; the model's answer is the choice with the highest summed
log-likelihood (`acc`), or the highest log-likelihood per UTF-8 byte of the choice (`acc_norm`, which
stops long choices from losing just for having more tokens).

Generation: greedy decoding through the one engine (generation.py) until a stop string; right when
the output equals an answer after `normalize_answer` (`exact_match`).

How a (context, continuation) pair becomes tokens: whitespace at the end of the context moves to
the front of the continuation (`"Answer: "` + `"B"` is scored as `"Answer:"` + `" B"`, the way
BPE tokenizers split words), both are encoded separately and concatenated, and only the
continuation's tokens are scored. A sequence longer than the context window loses tokens from the
left of its context; the continuation is always scored whole.

Two scorers: `loglikelihoods` runs every (context, continuation) as its own sequence, batched by
padding; `score_choices`, which multiple choice uses, runs the context shared by an item's choices
once and the choices on copies of its KV cache. Both put only the positions that predict
continuation tokens through the output head (for a 50k vocabulary, a large share of the work).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F

from ..errors import ScratchLLMError
from ..model.gpt import GPTModel
from ..text.tokenizer import Tokenizer
from .fewshot import FewShot
from .tasks import GenerationItem, MultipleChoiceItem
from .voting import normalize_answer, sample_answers

Progress = Callable[[int], None]  # called with the number of sequences just finished


@dataclass
class Score:
    """A continuation's summed log-likelihood (nats), whether greedy decoding would have produced
    it, how many tokens it has, and how many context tokens were cut to fit the window."""

    loglikelihood: float
    is_greedy: bool
    n_tokens: int
    truncated: int = 0


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and of its continuation (see the module docstring). An empty context
    becomes the end-of-text token, so the first continuation token has something to follow."""
    ctx, moved = encode_context(tokenizer, context)
    return ctx, tokenizer.encode(moved + continuation)


def encode_context(tokenizer: Tokenizer, context: str) -> tuple[list[int], str]:
    """The context's token ids without its trailing whitespace, and that whitespace (which goes
    in front of every continuation)."""
    stripped = context.rstrip()
    ctx = tokenizer.encode(stripped) if stripped else []
    if not ctx:
        if tokenizer.eot_id is None:
            raise ScratchLLMError("an empty context needs a tokenizer with <|endoftext|> to start from")
        ctx = [tokenizer.eot_id]
    return ctx, context[len(stripped) :]


@torch.inference_mode()
def loglikelihoods(
    model: GPTModel,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
    progress: Progress | None = None,
) -> list[Score]:
    """Score each (context ids, continuation ids) pair; results in the order of `requests`.

    Sequences run `batch_size` at a time, longest first (so batches hold similar lengths and an
    out-of-memory error comes at once), right-padded: with causal attention a real token never
    sees the padding after it. Identical requests run once.
    """
    if batch_size < 1:
        raise ScratchLLMError(f"batch size must be >= 1, got {batch_size}")
    window = model.cfg.context_length
    inputs: dict[tuple[tuple[int, ...], int], int] = {}  # identical requests run once
    unique: list[tuple[list[int], list[int], int]] = []  # (input ids, continuation ids, tokens cut)
    which: list[int] = []
    for i, (ctx, cont) in enumerate(requests):
        _check(ctx, [cont], window, f"request {i}")
        seq = [*ctx, *cont]
        cut = max(0, len(seq) - (window + 1))
        # the model reads all but the last token; the last len(cont) positions predict the continuation
        key = (tuple(seq[cut:]), len(cont))
        if key not in inputs:
            inputs[key] = len(unique)
            unique.append((seq[cut:-1], list(cont), cut))
        which.append(inputs[key])

    copies = Counter(which)
    order = sorted(range(len(unique)), key=lambda u: -len(unique[u][0]))
    results: list[Score | None] = [None] * len(unique)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            seqs = [unique[u][0] for u in batch]
            # the last len(continuation) positions predict the continuation
            hidden = model.hidden_at(
                seqs, [range(len(ids) - len(unique[u][1]), len(ids)) for u, ids in zip(batch, seqs)]
            )
            for u, score in zip(batch, _scores(model, hidden, [unique[u][1] for u in batch])):
                score.truncated = unique[u][2]
                results[u] = score
            if progress is not None:
                progress(sum(copies[u] for u in batch))
    finally:
        model.train(was_training)
    return [cast(Score, results[w]) for w in which]


@torch.inference_mode()
def score_choices(
    model: GPTModel,
    groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    batch_size: int = 16,
    progress: Progress | None = None,
) -> list[list[Score]]:
    """Score several continuations of each context: `groups` holds (context ids, [continuation ids,
    ...]) pairs, the result one list of scores per group, equal to `loglikelihoods` on every
    (context, continuation) pair.

    The choices of a multiple-choice item share their context, so it runs once: a first pass over
    the contexts (left-padded, padding masked) fills a KV cache, which is copied to one row per
    choice for a second pass over the continuations. With HellaSwag's lengths this is about half
    the work of scoring every choice as its own sequence; with few-shot prompts, where the context
    is most of the sequence, much less. A batch holds at most `batch_size` choices. A group that
    does not fit the context window is scored choice by choice (`loglikelihoods`), so that each
    choice loses only the context tokens it must, as lm-evaluation-harness does.
    """
    if batch_size < 1:
        raise ScratchLLMError(f"batch size must be >= 1, got {batch_size}")
    window = model.cfg.context_length
    results: list[list[Score]] = [[] for _ in groups]
    shared, cut = [], []
    for g, (ctx, conts) in enumerate(groups):
        _check(ctx, conts, window, f"item {g}")
        (shared if len(ctx) + max(map(len, conts)) <= window + 1 else cut).append(g)
    if cut:
        scores = iter(
            loglikelihoods(
                model, [(groups[g][0], c) for g in cut for c in groups[g][1]], batch_size, progress
            )
        )
        for g in cut:
            results[g] = [next(scores) for _ in groups[g][1]]

    was_training = model.training
    model.eval()
    try:
        for batch in _shared_batches(groups, shared, batch_size, window):
            for g, scores in zip(batch, _score_shared_batch(model, [groups[g] for g in batch])):
                results[g] = scores
            if progress is not None:
                progress(sum(len(groups[g][1]) for g in batch))
    finally:
        model.train(was_training)
    return results


def _shared_batches(
    groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    members: list[int],
    batch_size: int,
    window: int,
) -> Iterator[list[int]]:
    """Groups longest context first, at most `batch_size` choices per batch (one group at least),
    and the longest context plus the longest continuation of a batch within the window."""
    batch: list[int] = []
    rows = longest_cont = 0
    for g in sorted(members, key=lambda g: -len(groups[g][0])):
        ctx, conts = groups[g]
        cont = max(map(len, conts))
        if batch and (
            rows + len(conts) > batch_size or len(groups[batch[0]][0]) + max(longest_cont, cont) > window + 1
        ):
            yield batch
            batch, rows, longest_cont = [], 0, 0
        batch.append(g)
        rows += len(conts)
        longest_cont = max(longest_cont, cont)
    if batch:
        yield batch


def _score_shared_batch(
    model: GPTModel, groups: list[tuple[Sequence[int], Sequence[Sequence[int]]]]
) -> list[list[Score]]:
    """One batch of `score_choices`: the contexts once, then every choice on a copy of its cache."""
    device = model.tok_emb.weight.device
    ctx_len = max(len(ctx) for ctx, _ in groups)
    conts = [list(c) for _, cs in groups for c in cs]
    owner = torch.tensor([i for i, (_, cs) in enumerate(groups) for _ in cs], device=device)
    cont_len = max(map(len, conts)) - 1  # the last continuation token is predicted, never read

    # 1. the contexts, left-padded so that every one ends at the last position
    idx = torch.zeros((len(groups), ctx_len), dtype=torch.long)
    pad = torch.ones((len(groups), ctx_len + cont_len), dtype=torch.bool)
    for i, (ctx, _) in enumerate(groups):
        idx[i, ctx_len - len(ctx) :] = torch.tensor(ctx, dtype=torch.long)
        pad[i, : ctx_len - len(ctx)] = False
    pad = pad.to(device) if not bool(pad.all()) else None
    cache = model.new_kv_cache(len(groups), ctx_len + cont_len)
    hidden = model(
        idx.to(device),
        kv_cache=cache,
        padding_mask=None if pad is None else pad[:, :ctx_len],
        return_hidden=True,
    )[:, -1:]
    hidden = hidden[owner]  # (choices, 1, d): the last context position predicts each first token

    # 2. every choice's continuation (right-padded) on a copy of its context's cache
    if cont_len:
        cache.select(owner)
        idx = torch.zeros((len(conts), cont_len), dtype=torch.long)
        for r, c in enumerate(conts):
            idx[r, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
        more = model(
            idx.to(device),
            kv_cache=cache,
            padding_mask=None if pad is None else pad[owner],
            return_hidden=True,
        )
        hidden = torch.cat([hidden, more], dim=1)  # (choices, 1 + cont_len, d)
    rows = torch.tensor([r for r, c in enumerate(conts) for _ in c], device=device)
    cols = torch.tensor([j for c in conts for j in range(len(c))], device=device)
    scores = iter(_scores(model, hidden[rows, cols], conts))
    return [[next(scores) for _ in cs] for _, cs in groups]


def _scores(model: GPTModel, hidden: torch.Tensor, targets: Sequence[Sequence[int]]) -> list[Score]:
    """Scores of continuations from the hidden states that predict their tokens, (tokens, emb_dim)
    in the order of `targets`. Only these rows go through the output head."""
    logits = model.out_head(hidden).float()
    target = torch.tensor([t for ts in targets for t in ts], device=logits.device)
    token_lp = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)
    greedy = logits.argmax(dim=-1) == target
    lengths = [len(ts) for ts in targets]
    return [
        Score(float(lp.double().sum()), bool(g.all()), len(lp))
        for lp, g in zip(token_lp.split(lengths), greedy.split(lengths))
    ]


def _check(ctx: Sequence[int], conts: Sequence[Sequence[int]], window: int, where: str) -> None:
    if not ctx:
        raise ScratchLLMError(
            f"{where}: the context has no tokens; start it with <|endoftext|> (see encode_context)"
        )
    for cont in conts:
        if not cont:
            raise ScratchLLMError(f"{where}: a continuation has no tokens; every choice needs text")
        if len(cont) > window:
            raise ScratchLLMError(
                f"{where}: a continuation has {len(cont)} tokens, more than the context window of "
                f"{window}; shorten the choice or use a model with a longer context"
            )


def score_multiple_choice(
    model: GPTModel,
    tokenizer: Tokenizer,
    items: Sequence[MultipleChoiceItem],
    fewshot: FewShot,
    batch_size: int = 16,
    progress: Progress | None = None,
    first_index: int = 0,
) -> list[dict]:
    """Per-item results: the log-likelihood and byte count of every choice, the predictions by
    summed and by per-byte log-likelihood, and whether each is right. `first_index` is the items'
    position in the task (it seeds their few-shot examples)."""
    groups = []
    for i, item in enumerate(items):
        ctx, moved = encode_context(tokenizer, fewshot.context(item, first_index + i))
        groups.append((ctx, [tokenizer.encode(moved + fewshot.target_delimiter + c) for c in item.choices]))
    out = []
    for i, (item, item_scores) in enumerate(zip(items, score_choices(model, groups, batch_size, progress))):
        lls = [s.loglikelihood for s in item_scores]
        n_bytes = [len(c.encode("utf-8")) for c in item.choices]
        pred = _argmax(lls)
        pred_norm = _argmax([ll / b for ll, b in zip(lls, n_bytes)])
        out.append(
            {
                "index": first_index + i,
                "line": item.line,
                "label": item.label,
                "loglikelihoods": lls,
                "bytes": n_bytes,
                "tokens": [s.n_tokens for s in item_scores],
                "is_greedy": [s.is_greedy for s in item_scores],
                "pred": pred,
                "pred_norm": pred_norm,
                "acc": float(pred == item.label),
                "acc_norm": float(pred_norm == item.label),
                "truncated": max(s.truncated for s in item_scores),
            }
        )
    return out


def score_generation(
    engine,  # generation.Engine (imported lazily by the caller)
    items: Sequence[GenerationItem],
    fewshot: FewShot,
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    batch_size: int = 16,
    progress: Progress | None = None,
    first_index: int = 0,
    samples: int = 0,
    sample_config: Any = None,
) -> list[dict]:
    """Greedy completions of every item's prompt through `engine`, compared with its answers; with
    `samples` N, also N completions sampled with `sample_config` (a `GenerationConfig`), picked by majority
    vote and best-of-N (voting.py).

    Prompts are cut from the left to leave room for `max_new_tokens` in the context window, and
    run in batches of similar length."""
    from ..generation import GenerationConfig

    window = engine.model.cfg.context_length
    if max_new_tokens >= window:
        raise ScratchLLMError(
            f"max_new_tokens {max_new_tokens} leaves no room for the prompt in the context window of {window}"
        )
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop=tuple(stop))
    prompts, cuts = [], []
    for i, item in enumerate(items):
        try:
            ids = engine.encode(fewshot.context(item, first_index + i))
        except ScratchLLMError as e:  # an empty prompt: say which item
            raise ScratchLLMError(f"the task item on line {item.line}: {e}") from None
        keep = window - max_new_tokens
        cuts.append(max(0, len(ids) - keep))
        prompts.append(ids[-keep:])
    outputs: list[str] = [""] * len(items)
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))
    for batch in _chunks(order, batch_size):
        for i, completion in zip(batch, engine.generate([prompts[i] for i in batch], config)):
            outputs[i] = completion.text
        if progress is not None:
            progress(len(batch))
    accepted = [{normalize_answer(a) for a in item.answers} for item in items]
    sampled: list[dict] = [{} for _ in items]
    if samples:
        config = sample_config.replace(max_new_tokens=max_new_tokens, stop=tuple(stop))
        sampled = sample_answers(engine, prompts, accepted, samples, config, batch_size, progress)
    out = []
    for i, (item, text) in enumerate(zip(items, outputs)):
        out.append(
            {
                "index": first_index + i,
                "line": item.line,
                "answers": list(item.answers),
                "output": text,
                "exact_match": float(normalize_answer(text) in accepted[i]),
                "truncated": cuts[i],
                **sampled[i],
            }
        )
    return out


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima


def _chunks(seq: Sequence[int], n: int) -> Iterator[Sequence[int]]:
    if n < 1:
        raise ScratchLLMError(f"batch size must be >= 1, got {n}")
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


__all__ = [
    "Score",
    "encode_context",
    "encode_pair",
    "loglikelihoods",
    "normalize_answer",
    "score_choices",
    "score_generation",
    "score_multiple_choice",
]
