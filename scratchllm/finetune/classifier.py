"""Using a classifier that `scratchllm finetune classify` made: texts in, labels and class probabilities out.

A text becomes token ids (shown through the classifier's text template, truncated to its maximum length),
texts of a batch are right-padded with the pad id, and the class logits are read at the last real token
(`pooling = "last"`) or averaged over the real tokens (`"mean"`). Training (classify.py) reads its
batches through the same functions.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..config import setting
from ..errors import ScratchLLMError
from ..fileio import atomic_write_text, check_output_file
from ..hub import load_model
from ..model.gpt import GPTModel
from .data import read_texts


def encode_texts(tokenizer: Any, texts: Sequence[str], template: str, max_length: int) -> list[list[int]]:
    """Token ids of each text (shown through `template`), truncated to its first `max_length` tokens."""
    shown = [template.replace("{text}", t) for t in texts]
    return [ids[:max_length] for ids in tokenizer.encode_batch(shown)]


def collate(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (ids (B, T), lengths (B,))."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return ids, lengths


def pooled_logits(
    model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor, pooling: str = "last"
) -> torch.Tensor:
    """Class logits (B, n_classes) of right-padded texts. The head runs at every position (cheap for a
    few classes) so that the call goes through the model's forward (DDP, torch.compile); pooling logits
    equals pooling hidden states because the head is affine."""
    logits = model(ids)  # (B, T, n_classes)
    if pooling == "last":
        return logits[torch.arange(ids.shape[0], device=ids.device), lengths - 1]
    real = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).to(logits.dtype)
    return (logits * real[..., None]).sum(1) / lengths[:, None].to(logits.dtype)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    pooling: str = "last",
    batch_size: int = 32,
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Float32 logits (n, n_classes) on the CPU, in the order of `seqs`. Texts of similar length are
    batched together so little compute goes to padding."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: torch.Tensor | None = None
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, lengths = collate([seqs[i] for i in rows], pad_id)
        with amp():
            logits = pooled_logits(model, ids.to(device), lengths.to(device), pooling).float().cpu()
        if out is None:
            out = torch.empty(len(seqs), logits.shape[1])
        out[rows] = logits
    if out is None:
        raise ScratchLLMError("nothing to classify")
    return out


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]  # class name -> probability

    @property
    def score(self) -> float:
        return self.probabilities[self.label]


class Classifier:
    """A finetuned classifier: texts in, labels and class probabilities out.

    clf = Classifier.load("runs/classify/model")
    clf.predict(["You won a prize! Call now", "see you at 6"])   # [Prediction(label='spam', ...), ...]
    """

    def __init__(self, model: GPTModel, tokenizer: Any, extra: dict[str, Any]):
        labels = extra.get("labels")
        if not model.cfg.n_classes or not isinstance(labels, list) or len(labels) != model.cfg.n_classes:
            raise ScratchLLMError(
                "not a classifier: the model has no class head with label names; "
                "make one with `scratchllm finetune classify`"
            )
        if tokenizer is None:
            raise ScratchLLMError("the classifier has no tokenizer files; save it with its tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.labels = [str(n) for n in labels]
        self.pooling = extra.get("pooling", "last")
        self.pad_id = int(extra.get("pad_id", tokenizer.eot_id or 0))
        self.max_length = int(extra.get("max_length") or model.cfg.context_length)
        self.text_template = extra.get("text_template", "{text}")

    @classmethod
    def load(cls, spec: str, device: str = "auto", dtype: torch.dtype | str | None = None) -> Classifier:
        loaded = load_model(spec, device=device, dtype=dtype)
        return cls(loaded.model, loaded.tokenizer, loaded.extra)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ScratchLLMError(
                    f"text {i + 1} is a {type(t).__name__}, not a string; give texts to classify"
                )
            if not t.strip():
                raise ScratchLLMError(f"text {i + 1} is empty; give some text to classify")
        return encode_texts(self.tokenizer, texts, self.text_template, self.max_length)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Class probabilities (n_texts, n_classes), columns in `self.labels` order."""
        logits = predict_logits(self.model, self.encode(texts), self.pad_id, self.pooling, batch_size)
        return torch.softmax(logits, -1).numpy()

    def predict(self, texts: Sequence[str] | str, batch_size: int = 32) -> list[Prediction]:
        if isinstance(texts, str):
            texts = [texts]
        probs = self.predict_proba(texts, batch_size)
        return [
            Prediction(self.labels[int(p.argmax())], {n: float(v) for n, v in zip(self.labels, p)})
            for p in probs
        ]


def predict(loaded: Any, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, Any]]:
    """`{"label", "probabilities"}` for each text, from a `checkpoint.LoadedModel` classifier (what
    `scratchllm.load(DIR).classify(texts)` returns)."""
    clf = Classifier(loaded.model, loaded.tokenizer, loaded.extra)
    return [
        {"label": p.label, "probabilities": p.probabilities} for p in clf.predict(list(texts), batch_size)
    ]


@dataclass
class ClassifyTextsSettings:
    """Print the predicted label and its probability for each text, or classify the records of --file
    (.jsonl, .csv, .tsv, .json) into --out (JSONL: each record plus `label` and `probabilities`)."""

    model: str = setting(
        "", "a classifier model directory (from `finetune classify`)", "model", required=True
    )
    texts: list[str] = setting([], "texts to classify", "data", positional="*", metavar="TEXT")
    file: str | None = setting(None, "a table of texts to classify", "data")
    out: str | None = setting(None, "the JSONL file to write (default: print the records)", "data")
    text_column: str = setting(
        "text", "column or JSON key of the text in --file (without a header: its 0-based position)", "data"
    )
    header: str = setting(
        "true",
        "whether a CSV/TSV --file starts with a row of column names",
        "data",
        choices=("true", "false"),
    )
    batch_size: int = setting(32, "texts per forward pass", "model")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps", "model")


def classify_command(settings: ClassifyTextsSettings) -> None:
    """`scratchllm classify`: texts from the command line (one line each: label, probability, text), or
    a table `file` into `out` (JSONL: each input record plus `label` and `probabilities`)."""
    texts, file, out, batch_size = settings.texts, settings.file, settings.out, settings.batch_size
    if bool(texts) == bool(file):
        what = (
            "texts and --file: give one of them"
            if texts
            else "nothing to classify: give texts, or --file IN.jsonl"
        )
        raise ScratchLLMError(what)
    if out and not file:
        raise ScratchLLMError("--out needs --file")
    if batch_size < 1:
        raise ScratchLLMError(f"--batch-size must be >= 1, got {batch_size}")
    if out:
        check_output_file(out, inputs={"--file": file})
    clf = Classifier.load(settings.model, device=settings.device)
    if texts:
        preds = clf.predict(list(texts), batch_size)
        width = max(len(n) for n in clf.labels)
        for text, p in zip(texts, preds):
            print(f"{p.label:<{width}}  {p.score:.4f}  {text}")
        return
    # `--header true|false`, as the flag has always been spelled
    rows = read_texts(file, settings.text_column, settings.header == "true")  # type: ignore[arg-type]
    preds = clf.predict([t for t, _ in rows], batch_size)
    lines = []
    for (_, record), p in zip(rows, preds):
        rec = dict(record)
        if "label" in rec:  # a given label is kept beside the prediction
            rec["given_label"] = rec.pop("label")
        rec.update(label=p.label, probabilities=p.probabilities)
        lines.append(json.dumps(rec, ensure_ascii=False))
    if out:
        atomic_write_text(out, "\n".join(lines) + "\n")
        counts: dict[str, int] = {}
        for p in preds:
            counts[p.label] = counts.get(p.label, 0) + 1
        print(f"classified {len(preds)} texts into {out}: {dict(sorted(counts.items()))}")
    else:
        print("\n".join(lines))
