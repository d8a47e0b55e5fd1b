"""The loss figure: train and validation loss against steps, with tokens seen on a second axis (the book's
figure 5.12), redrawn from metrics.jsonl records at every evaluation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any


def plot_losses(records: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Write a PNG of train (`kind == "train"`, key `loss`) and validation (`kind == "eval"`, key `val_loss`)
    losses to `path`."""
    # matplotlib takes a while to import: only runs that plot pay it
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train = [(r["step"], r["tokens"], r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    val = [
        (r["step"], r["tokens"], r["val_loss"])
        for r in records
        if r.get("kind") == "eval" and "val_loss" in r
    ]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    if train:
        ax.plot([s for s, _, _ in train], [v for _, _, v in train], label="training loss")
    if val:
        ax.plot(
            [s for s, _, _ in val],
            [v for _, _, v in val],
            linestyle="-.",
            marker="o",
            markersize=3,
            label="validation loss",
        )
    ax.set_xlabel("steps")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if train or val:  # a stage without a validation loss (GRPO) has nothing to label before its first log
        ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    points = sorted({(s, t) for s, t, _ in train + val})
    if len(points) >= 2 and points[-1][0] > 0:
        # tokens grow linearly with steps at a fixed batch, so a linear map labels the top axis
        tokens_per_step = points[-1][1] / points[-1][0]
        top = ax.secondary_xaxis(
            "top", functions=(lambda s: s * tokens_per_step, lambda t: t / tokens_per_step)
        )
        top.set_xlabel("tokens seen")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
