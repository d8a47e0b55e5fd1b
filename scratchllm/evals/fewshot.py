"""K-shot prompts: K solved examples from a pool, then the item to solve.

    examples[0].context + target_delimiter + examples[0].target + separator
    ...
    examples[K-1].context + target_delimiter + examples[K-1].target + separator
    item.context

The pool is a separate file, a held-out part of the task file, or the task's other items; the item
being scored is never one of its own examples (an example equal to it, same context and target,
is skipped too, so a pool that overlaps the task cannot leak the answer). Examples are drawn with a
random generator seeded by (seed, item index), so an item's prompt does not depend on `--limit`,
the batch size or the other items.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ScratchLLMError
from .tasks import Item


@dataclass
class FewShot:
    """Builds the K-shot context of each item; `shots=0` gives the item's own context."""

    pool: Sequence[Item] = ()
    shots: int = 0
    seed: int = 1234
    separator: str = "\n\n"
    target_delimiter: str = " "

    def __post_init__(self) -> None:
        if self.shots < 0:
            raise ScratchLLMError(f"shots must be >= 0, got {self.shots}")
        # an example that occurs twice in the pool is shown at most once
        self._index: dict[tuple[str, str], int] = {}
        self._examples: list[Item] = []
        for ex in self.pool:
            if _key(ex) not in self._index:
                self._index[_key(ex)] = len(self._examples)
                self._examples.append(ex)
        if self.shots and len(self._examples) < self.shots:
            raise ScratchLLMError(
                f"{self.shots}-shot prompts need at least {self.shots} examples, the pool has "
                f"{len(self._examples)} distinct ones; give fewer --shots or a bigger pool (--fewshot-file, "
                "--holdout)"
            )

    def examples(self, item: Item, index: int) -> list[Item]:
        """The K examples for the item at position `index` of the task (the seed's second half)."""
        if not self.shots:
            return []
        own = self._index.get(_key(item))  # the item itself, when the pool holds it
        available = len(self._examples) - (own is not None)
        if available < self.shots:
            raise ScratchLLMError(
                f"item {index} (line {item.line}): only {available} pool examples differ from it, "
                f"{self.shots}-shot needs {self.shots}; give fewer --shots or a bigger pool"
            )
        rng = random.Random(f"{self.seed}:{index}")
        # drawing one more than K when the item is in the pool leaves K that are not the item
        drawn = rng.sample(range(len(self._examples)), self.shots + (own is not None))
        return [self._examples[j] for j in drawn if j != own][: self.shots]

    def render(self, example: Item) -> str:
        """One solved example: its context, the delimiter, its answer."""
        return example.context + self.target_delimiter + example.target

    def context(self, item: Item, index: int) -> str:
        """The prompt the model sees for the item: K solved examples, then the item's context."""
        parts = [self.render(ex) for ex in self.examples(item, index)]
        return self.separator.join([*parts, item.context])


def _key(item: Item) -> tuple[str, str]:
    return (item.context, item.target)
