"""Classification metrics and their pictures: accuracy, per-class precision / recall / F1, the
confusion matrix (text and PNG), and the book's loss and accuracy curves (figures 6.16 and 6.17).

Conventions: confusion-matrix rows are the true class, columns the predicted one. A class never
predicted has precision 0 (not NaN), and a class with no examples recall 0, so averages stay finite.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts: entry [t, p] is how many examples of class t were predicted p."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return m


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, their macro averages and the confusion matrix."""
    m = confusion_matrix(y_true, y_pred, len(labels))
    tp = np.diag(m).astype(float)
    predicted, actual = m.sum(0).astype(float), m.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    total = int(m.sum())
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "n": total,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(actual[i]),
            }
            for i, name in enumerate(labels)
        },
        "macro_f1": float(f1.mean()),
        "confusion": m.tolist(),
        "labels": list(labels),
    }


def format_report(metrics: Mapping[str, Any], title: str = "") -> str:
    """The metrics as a small text table plus the confusion matrix."""
    labels = metrics["labels"]
    width = max(8, *(len(n) for n in labels))
    lines = [title] if title else []
    lines.append(
        f"accuracy {metrics['accuracy'] * 100:.2f}% on {metrics['n']} examples, macro F1 "
        f"{metrics['macro_f1']:.4f}"
    )
    lines.append(f"  {'class':<{width}}  precision  recall     f1  support")
    for name in labels:
        c = metrics["per_class"][name]
        lines.append(
            f"  {name:<{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['f1']:.4f}  {c['support']:7d}"
        )
    lines.append("  confusion matrix (rows: true class, columns: predicted)")
    lines.append("  " + " " * width + "  " + "  ".join(f"{n:>{width}}" for n in labels))
    for name, row in zip(labels, metrics["confusion"]):
        lines.append(f"  {name:<{width}}  " + "  ".join(f"{v:>{width}d}" for v in row))
    return "\n".join(lines)


def plot_confusion(
    matrices: Mapping[str, Sequence[Sequence[int]]], labels: Sequence[str], path: str | os.PathLike
) -> None:
    """One heat map per entry of `matrices` (e.g. before / after finetuning), side by side, as a PNG."""
    import matplotlib  # a heavy import, made only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(labels)
    size = max(3.2, 0.55 * k + 2)
    fig, axes = plt.subplots(1, len(matrices), figsize=(size * len(matrices), size), dpi=110, squeeze=False)
    for ax, (title, matrix) in zip(axes[0], matrices.items()):
        m = np.asarray(matrix)
        ax.imshow(m, cmap="Blues", vmin=0, vmax=max(1, int(m.max())))
        for t in range(k):
            for p in range(k):
                ax.text(
                    p,
                    t,
                    str(m[t, p]),
                    ha="center",
                    va="center",
                    color="white" if m[t, p] > m.max() / 2 else "black",
                    fontsize=9,
                )
        ax.set_xticks(range(k), labels, rotation=45 if k > 4 else 0)
        ax.set_yticks(range(k), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        acc = np.trace(m) / max(1, m.sum())
        ax.set_title(f"{title} ({acc * 100:.1f}%)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_curves(
    records: Sequence[Mapping[str, Any]], path: str | os.PathLike, examples_per_step: int = 0
) -> None:
    """The book's two figures in one PNG: training and validation loss, and accuracy, against steps
    (with examples seen on a top axis) from the trainer's metrics records."""
    import matplotlib  # a heavy import, made only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if r.get("kind") == "eval"]
    train = [r for r in records if r.get("kind") == "train" and "loss" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    ax_loss.plot(
        [r["step"] for r in train], [r["loss"] for r in train], label="training loss (batches)", color="0.75"
    )
    for ax, key, name in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        for split, style, color in (("train", "-", "C0"), ("val", "-.", "C1")):
            pts = [(r["step"], r[f"{split}_{key}"]) for r in evals if f"{split}_{key}" in r]
            if pts:
                label = {"train": "training", "val": "validation"}[split]
                ax.plot(
                    *zip(*pts),
                    linestyle=style,
                    color=color,
                    marker="o",
                    markersize=3,
                    label=f"{label} {name}",
                )
        ax.set_xlabel("steps")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        if examples_per_step:
            top = ax.secondary_xaxis(
                "top", functions=(lambda s: s * examples_per_step, lambda e: e / examples_per_step)
            )
            top.set_xlabel("examples seen")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
