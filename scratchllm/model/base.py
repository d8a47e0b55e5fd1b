"""What every model family shares: config checks and (de)serialization, and the language-model plumbing
around the blocks (tied head, KV cache, hidden states at chosen positions, token-id checks).

A family's config is a dataclass that inherits `ModelConfig`; its model inherits `CausalLM` and
writes only what makes it that family: its blocks and `forward` (model/gpt.py, model/transformer.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn as nn

from ..errors import ScratchLLMError
from .attention import KVCache, SlotKVCache
from .loss import head_loss

C = TypeVar("C", bound="ModelConfig")


@dataclasses.dataclass
class ModelConfig:
    """Checks and dict round trips for a family's config dataclass (its fields are the family's)."""

    OTHER_NAMES: ClassVar[Mapping[str, str]] = {}  # what other codebases call our keys: the usual slips

    def check_ints(self, names: Sequence[str], minimum: int | None = 1) -> None:
        """Each named field is an integer (not a bool), at least `minimum` unless it is None."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ScratchLLMError(f"model config: {name} must be an integer, got {value!r}")
            if minimum is not None and value < minimum:
                raise ScratchLLMError(f"model config: {name} must be >= {minimum}, got {value}")

    def check_bools(self, names: Sequence[str]) -> None:
        """Each named field is true or false (numpy bools and 0/1 too); stored as a Python bool."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, str) or value not in (True, False):
                raise ScratchLLMError(f"model config: {name} must be true or false, got {value!r}")
            setattr(self, name, bool(value))

    def check_common(self) -> None:
        """The checks every family's config needs: its name, a dropout rate in [0, 1), n_classes >= 0."""
        if not isinstance(self.architecture, str):
            raise ScratchLLMError(f"model config: architecture must be a string, got {self.architecture!r}")
        if isinstance(self.drop_rate, bool) or not isinstance(self.drop_rate, numbers.Real):
            raise ScratchLLMError(f"model config: drop_rate must be a number, got {self.drop_rate!r}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ScratchLLMError(f"model config: drop_rate must be in [0, 1), got {self.drop_rate}")
        self.check_ints(["n_classes"], minimum=0)

    def to_dict(self) -> dict:
        """The settings as a plain dict (what config.json holds; `from_dict` reads it back)."""
        d = dataclasses.asdict(self)
        return {"architecture": d.pop("architecture"), **d}

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        """A config from `to_dict`'s keys (those left out keep their defaults); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            close = [
                cls.OTHER_NAMES.get(k) or next(iter(difflib.get_close_matches(k, names, n=1)), None)
                for k in unknown
            ]
            close = [c for c in close if c]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ScratchLLMError(
                f"model config: unknown keys {unknown}{hint}; valid keys are {sorted(names)}"
            )
        return cls(**d)

    def replace(self: C, **changes: Any) -> C:
        """A copy with `changes` applied (and checked), e.g. `cfg.replace(drop_rate=0.0)`."""
        return dataclasses.replace(self, **changes)


class CausalLM(nn.Module):
    """The parts of a decoder-only language model that do not depend on its blocks. A subclass sets
    `cfg`, `tok_emb`, `trf_blocks`, `final_norm` and `out_head` and implements `forward`."""

    cfg: Any
    tok_emb: nn.Embedding
    out_head: nn.Module

    @property
    def n_kv_heads(self) -> int:
        """The key/value heads a KV cache stores per layer."""
        return self.cfg.n_heads

    def tie_weights(self) -> None:
        """Share the token-embedding matrix with the LM head when the config asks for it."""
        if self.cfg.tie_weights and not self.cfg.n_classes:
            self.out_head.weight = self.tok_emb.weight

    @property
    def weights_tied(self) -> bool:
        """The head shares the token-embedding matrix (a quantized head has no `weight`: never tied)."""
        return getattr(self.out_head, "weight", None) is self.tok_emb.weight

    def cache_windows(self) -> list[int]:
        """Per layer, the sliding window its attention has (0: none): a cache keeps that many positions."""
        return [0] * self.cfg.n_layers

    def new_kv_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        bounded: bool = True,
    ) -> KVCache:
        """An empty key/value cache for `batch_size` sequences of up to `max_len` positions (default:
        the context length), preallocated per layer in `dtype` (default: the weights') on their device.
        It holds the key/value heads only, and (`bounded`) for sliding-window layers their window only."""
        cfg = self.cfg
        p = self.tok_emb.weight
        return KVCache(
            cfg.n_layers,
            batch_size,
            self.n_kv_heads,
            cfg.head_dim,
            min(max_len or cfg.context_length, cfg.context_length),
            device=p.device,
            dtype=dtype or p.dtype,
            windows=self.cache_windows() if bounded else None,
        )

    def new_slot_cache(
        self, n_slots: int, dtype: torch.dtype | None = None, capacity: int = 256
    ) -> SlotKVCache:
        """An empty `SlotKVCache` for continuous batching: `n_slots` sequences of up to the context length
        each (`capacity` positions allocated at first), in `dtype` (default: the weights'); sliding-window
        layers keep every position too."""
        cfg, p = self.cfg, self.tok_emb.weight
        return SlotKVCache(
            cfg.n_layers,
            n_slots,
            self.n_kv_heads,
            cfg.head_dim,
            cfg.context_length,
            device=p.device,
            dtype=dtype or p.dtype,
            capacity=capacity,
        )

    def _outputs(
        self,
        x: torch.Tensor,
        return_hidden: bool,
        targets: torch.Tensor | None,
        ignore_index: int,
    ) -> torch.Tensor:
        """The last blocks' output x through the final norm, then the hidden states, the loss against
        `targets` (`loss.head_loss`: no fp32 logits materialized) or the logits."""
        x = self.final_norm(x)
        if return_hidden:
            return x
        if targets is not None:
            return head_loss(self.out_head, x, targets, ignore_index)
        return self.out_head(x)

    def hidden_at(self, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]) -> torch.Tensor:
        """The final-norm hidden states at `positions[i]` of each token sequence `seqs[i]`, concatenated in
        order: shape (total positions, emb_dim). The sequences run as one batch padded at the end, which
        causal attention never lets a real token see; gathering only the positions that matter lets a
        scorer put just those through the output head (for a large vocabulary, much of the work)."""
        if not seqs or len(seqs) != len(positions) or not all(seqs):
            raise ValueError("hidden_at needs one position list per sequence, and no empty sequence")
        device = self.tok_emb.weight.device
        batch = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
        for r, s in enumerate(seqs):
            batch[r, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        rows = torch.tensor([r for r, p in enumerate(positions) for _ in p], dtype=torch.long, device=device)
        cols = torch.tensor([c for p in positions for c in p], dtype=torch.long, device=device)
        return self(batch.to(device), return_hidden=True)[rows, cols]


def check_token_ids(in_idx: object, model_name: str) -> None:
    """A model's input is a (batch, T) tensor of token ids; anything else gets a message saying how."""
    if not isinstance(in_idx, torch.Tensor) or in_idx.dim() != 2:
        got = f"shape {tuple(in_idx.shape)}" if isinstance(in_idx, torch.Tensor) else type(in_idx).__name__
        raise ScratchLLMError(
            f"{model_name} takes a tensor of token ids of shape (batch, T), got {got}; "
            "for one sequence use torch.tensor([ids]) or ids.unsqueeze(0)"
        )


__all__ = ["CausalLM", "ModelConfig", "check_token_ids"]
