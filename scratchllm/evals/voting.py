"""Inference-time scaling for generation tasks: sample N answers per item, then pick one.

- Self-consistency (majority vote): the answer most samples agree on, after normalising case and
  whitespace (`majority_vote`). Sampling explores; agreement filters out the unlucky draws.
- Best-of-N by the verifier: right if any sample is (what a checker that can verify answers, say a unit
  test or a calculator, would pick: an upper bound for the others, pass@N).
- Best-of-N by the model's confidence: the sample with the highest mean log-probability per token.

`sample_answers` runs the samples through the one engine (each item's prompt repeated N times in a
batch, so rows draw different tokens from one seeded generator) and scores the three picks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any


def normalize_answer(text: str) -> str:
    """Lower case, whitespace runs become one space, no leading or trailing space."""
    return " ".join(text.lower().split())


def majority_vote(answers: Sequence[str]) -> str | None:
    """The most common answer after normalising case and whitespace (`normalize_answer`); a tie goes to
    the one seen first; None for no answers. Returns the normalised form."""
    normalized = [normalize_answer(a) for a in answers]
    if not normalized:
        return None
    counts = Counter(normalized)
    return max(normalized, key=lambda a: (counts[a], -normalized.index(a)))


def sample_answers(
    engine: Any,
    prompts: Sequence[Sequence[int]],
    accepted: Sequence[set[str]],
    n: int,
    config: Any,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """For each prompt (token ids), `n` sampled completions with `config` (a `GenerationConfig` with a
    temperature and a seed), and whether the majority vote, the verifier's pick and the most confident
    sample are among the item's `accepted` (normalised) answers."""
    config = config.replace(logprobs=0)
    per_batch = max(1, batch_size // n)
    out: list[dict[str, Any]] = []
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start : start + per_batch]
        completions = engine.generate([p for p in chunk for _ in range(n)], config)
        for k, ok in enumerate(accepted[start : start + per_batch]):
            mine = completions[k * n : (k + 1) * n]
            texts = [c.text for c in mine]
            confidence = [_mean_logprob(c) for c in mine]
            vote = majority_vote(texts)
            most_sure = texts[max(range(n), key=lambda i: (confidence[i], -i))]
            out.append(
                {
                    "samples": texts,
                    "majority_answer": vote,
                    "majority_match": float(vote in ok),
                    "best_of_n_verifier": float(any(normalize_answer(t) in ok for t in texts)),
                    "best_of_n_logprob": float(normalize_answer(most_sure) in ok),
                }
            )
        if progress is not None:
            progress(len(chunk))
    return out


def _mean_logprob(completion: Any) -> float:
    """The mean log-probability of a completion's tokens (its end-of-sequence token's too, when one ended
    it); -inf for an empty one."""
    values = [t.logprob for t in completion.logprobs or ()]
    if completion.stop_logprob is not None:
        values.append(completion.stop_logprob.logprob)
    return sum(values) / len(values) if values else float("-inf")


SAMPLED_METRICS = ("majority_match", "best_of_n_verifier", "best_of_n_logprob")

__all__ = ["SAMPLED_METRICS", "majority_vote", "normalize_answer", "sample_answers"]
