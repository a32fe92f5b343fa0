"""Plots of a run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_learning_curves"]


def plot_learning_curves(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "",
                         selected_epoch: int | None = None, test_acc: float | None = None) -> Path:
    """Loss, accuracy and learning rate per epoch (train and validation), as one PNG.

    Args:
        rows: Epoch-log rows (``regtune.train.callbacks.read_epoch_log``): ``epoch``, ``train/loss``, ``val/acc``...
        path: Output PNG.
        title: Figure title (run name, selection mode).
        selected_epoch: 0-based epoch of the tested checkpoint, marked with a dashed line.
        test_acc: Test accuracy of that checkpoint, drawn as a star on the accuracy panel.

    Returns:
        ``path``.
    """
    path = Path(path)
    epochs = [r["epoch"] + 1 for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric, label in ((axes[0], "loss", "cross-entropy / total loss"), (axes[1], "acc", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            key = f"{split}/{metric}"
            points = [(e, r[key]) for e, r in zip(epochs, rows) if key in r]
            if points:
                ax.plot(*zip(*points), style, ms=3, label=split)
        if selected_epoch is not None:
            ax.axvline(selected_epoch + 1, color="grey", ls="--", lw=1, label="selected")
        if metric == "acc" and test_acc is not None and selected_epoch is not None:
            ax.plot([selected_epoch + 1], [test_acc], "*", color="crimson", ms=12, label=f"test {test_acc:.3f}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    lr_keys = sorted({k for r in rows for k in r if k.startswith("lr/")})
    for key in lr_keys:
        axes[2].plot(epochs, [r.get(key, float("nan")) for r in rows], "-", label=key.removeprefix("lr/"))
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("learning rate (end of epoch)")
    axes[2].grid(alpha=0.3)
    if lr_keys:
        axes[2].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
