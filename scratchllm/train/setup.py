"""A model set up for training, the one way every stage does it.

`setup_model` loads a model directory or a hub model with fp32 weights, whatever precision was stored
(bf16 weights would round most updates away), checks that it is a model the stage can train, sets its
dropout and, for a LoRA finetune, folds the adapters it may already have into its weights and wraps its
linear layers in new ones, which then learn alone (model/lora.py). A stage's own changes (a
classifier's new head, which weights `--trainable` frees) stay in the stage.

    loaded = setup_model("runs/demo/model", drop_rate=0.0, lora=LoRASpec(rank=16, alpha=16))

`LoRASettings` are the LoRA settings that every finetune's config shares (its `[lora]` section).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.nn as nn

from ..checkpoint import LoadedModel
from ..config import setting
from ..errors import ScratchLLMError
from ..hub import load_model
from ..model.gpt import GPTModel
from ..model.lora import DEFAULT_TARGETS, apply_lora, mark_only_lora_trainable, merge_lora

# the book's appendix E (a GPT-2 classifier: rank 16, alpha 16), and what instruction finetuning always used
LORA_RANK = 16
LORA_ALPHA = 16.0


@dataclass(frozen=True)
class LoRASpec:
    """The adapters to train: rank r, the scale alpha (the detour adds alpha * x A B, the book's form),
    the linear layers they wrap (names or name endings) and dropout on their input."""

    rank: int = LORA_RANK
    alpha: float = LORA_ALPHA
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0


@dataclass
class LoRASettings:
    """The LoRA settings of a finetune's config (inherited first: `class C(LoRASettings, TrainerConfig)`)."""

    lora: bool = setting(
        False,
        "train low-rank adapters instead of the weights (a classifier's head learns too); merged into "
        "the saved model",
        "lora",
    )
    lora_rank: int = setting(
        LORA_RANK, "LoRA rank r (adds r x (in + out) parameters per adapted layer)", "lora"
    )
    lora_alpha: float = setting(
        LORA_ALPHA, "LoRA scale alpha: the detour adds alpha * x A B (the book's form)", "lora"
    )
    lora_targets: list[str] = setting(
        list(DEFAULT_TARGETS),
        "linear layers to adapt, by name or name ending (attention: qkv, out_proj; the MLP: ff.layers.0 and "
        "ff.layers.2 for GPT-2, gate, up, down for the other families)",
        "lora",
    )
    lora_dropout: float = setting(0.0, "dropout on the LoRA input", "lora")

    def lora_spec(self) -> LoRASpec | None:
        """The adapters these settings ask for, or None without LoRA."""
        if not self.lora:
            return None
        return LoRASpec(self.lora_rank, self.lora_alpha, tuple(self.lora_targets), self.lora_dropout)

    def check_lora(self, what: str) -> None:
        """A one-line error, prefixed `what` ("finetune settings"), for LoRA settings that cannot work."""
        if not self.lora:
            return
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ScratchLLMError(
                f"{what}: lora_rank must be >= 1 and lora_alpha > 0, got {self.lora_rank}, {self.lora_alpha}"
            )
        if not 0 <= self.lora_dropout < 1:
            raise ScratchLLMError(f"{what}: lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_targets:
            raise ScratchLLMError(f"{what}: lora_targets is empty; name the layers to adapt (e.g. qkv)")


def setup_model(
    source: str | os.PathLike | LoadedModel,
    *,
    drop_rate: float | None = None,
    lora: LoRASpec | None = None,
    also_trained: Sequence[str] = (),
    prepare: Callable[[LoadedModel], None] | None = None,
    context_length: int | None = None,
    context_flag: str = "--context-length",
    allow_classifier: bool = False,
    require_tokenizer: bool = True,
    flag: str = "--model",
    device: str = "cpu",
) -> LoadedModel:
    """`source` (a model directory, a hub name, or a model loaded already) with fp32 weights, ready to train.

    Checks, each a one-line error that names `flag` and the model: a classifier where a language model is
    needed (unless `allow_classifier`), a model without tokenizer files (with `require_tokenizer`), a
    `context_length` (given as `context_flag`) longer than the model's. `drop_rate`: the dropout rate of
    every dropout layer (None keeps the model's). `prepare(loaded)`: the stage's own change, made after
    the dropout and before the adapters (a new classifier head: they can wrap it, and their random
    initialization follows its). `lora`: the model's own adapters fold into its weights, new ones wrap
    `lora.targets`, and only they and the modules named in `also_trained` learn. Returns the loaded
    model, changed in place."""
    if isinstance(source, LoadedModel):
        loaded = source
        loaded.model.float()
        where = f"{flag} {source.path or 'model'}"
    else:
        loaded = load_model(source, device=device, dtype="fp32")
        where = f"{flag} {source}"
    model = loaded.model
    if model.cfg.n_classes and not allow_classifier:
        raise ScratchLLMError(f"{where} is a classifier, not a language model")
    if require_tokenizer and loaded.tokenizer is None:
        raise ScratchLLMError(f"{where} has no tokenizer files; save the model with its tokenizer")
    if context_length is not None and context_length > model.cfg.context_length:
        raise ScratchLLMError(
            f"{context_flag} {context_length} exceeds the context length of {where} "
            f"({model.cfg.context_length})"
        )
    if drop_rate is not None:
        _set_dropout(model, drop_rate)
    if prepare is not None:
        prepare(loaded)
    if lora is not None:
        merge_lora(model)  # a LoRA-finetuned model's own adapters fold into its weights: new ones train
        apply_lora(model, lora.rank, lora.alpha, lora.targets, lora.dropout)
        mark_only_lora_trainable(model, also=also_trained)
    return loaded


def _set_dropout(model: GPTModel, rate: float) -> None:
    """Every dropout of `model` at `rate`: its layers, and the rate its fast attention passes as a number."""
    model.cfg = model.cfg.replace(drop_rate=rate)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = rate
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = rate


__all__ = ["LORA_ALPHA", "LORA_RANK", "LoRASettings", "LoRASpec", "setup_model"]
