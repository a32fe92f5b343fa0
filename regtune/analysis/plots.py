"""Plots of a run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_learning_curves", "plot_run_analysis"]


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


def plot_run_analysis(result: dict[str, Any], test_features: Any, test_labels: Any, path: str | Path,
                      title: str = "", pca_samples: int = 2000) -> Path:
    """One figure of a run's analysis: margin histograms (train vs test), the head's weight histogram, top-k
    train/test overlap against k, and a PCA of test features coloured by class.

    Args:
        result: :func:`regtune.train.analyze.analyze_run`'s result (with the per-sample ``_margins``).
        test_features: (N, D) test features.
        test_labels: (N,) their classes.
        path: Output PNG.
        title: Figure title.
        pca_samples: At most this many test points in the PCA panel (the first ones).
    """
    import torch

    path = Path(path)
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    ax = axes[0]
    for split, colour in (("train", "tab:blue"), ("test", "tab:orange")):
        margins = result[split]["_margins"]
        ax.hist(margins, bins=40, alpha=0.55, color=colour, density=True,
                label=f"{split} (mean {result[split]['margins']['margin_mean']:.3f})")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("sample margin: cos(f, w_y) - max_{j != y} cos(f, w_j)")
    ax.set_ylabel("density")
    ax.set_title(f"margins (class margin {result['train']['margins']['class_margin_deg']:.1f} deg)")
    ax.legend(fontsize=8)
    ax = axes[1]
    hist = result["head"]["histogram"]
    edges = hist["edges"]
    ax.bar(edges[:-1], hist["counts"], width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge",
           color="tab:gray")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("head weight w_ck")
    ax.set_ylabel("count")
    ax.set_title(f"head: {100 * result['head']['negative_share']:.0f}% negative, "
                 f"{100 * result['head']['sparsity']:.0f}% |w| < {result['head']['zero_threshold']:g}")
    ax = axes[2]
    ks = sorted(int(k) for k in result["topk_overlap"])
    ax.plot(ks, [result["topk_overlap"][str(k)]["overlap"] for k in ks], marker="o", label="overlap")
    ax.plot(ks, [result["topk_overlap"][str(k)]["weighted_overlap"] for k in ks], marker="s", label="weighted")
    ax.set_ylim(0, 1.05)
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("k (top channels per class)")
    ax.set_ylabel("train/test overlap")
    ax.set_title("top-k weighted feature overlap")
    ax.legend(fontsize=8)
    ax = axes[3]
    f = torch.as_tensor(test_features[:pca_samples], dtype=torch.float64)
    y = torch.as_tensor(test_labels[:pca_samples])
    centred = f - f.mean(0)
    _, s_values, v = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ v[:2].T
    explained = (s_values[:2] ** 2 / (s_values ** 2).sum()).tolist()
    scatter = ax.scatter(projected[:, 0], projected[:, 1], c=y, cmap="tab10", s=6, alpha=0.7)
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.0f}%)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.0f}%)" if len(explained) > 1 else "PC2")
    ax.set_title(f"test features, PCA ({f.shape[0]} points)")
    if len(torch.unique(y)) <= 20:
        ax.legend(*scatter.legend_elements(), title="class", fontsize=7, loc="best")
    else:
        fig.colorbar(scatter, ax=ax, label="class")
    train, test = result["train"], result["test"]
    fig.suptitle(f"{title}  |  feature norm train {train['feature_norm']['per_sample_l2']:.2f} / test "
                 f"{test['feature_norm']['per_sample_l2']:.2f}; FMR entropy (normalised) "
                 f"{train['fmr_entropy']['normalized']:.4f} / {test['fmr_entropy']['normalized']:.4f}; "
                 f"I(F;Y) {train['entropy_mi']['mi']:.1f} / {test['entropy_mi']['mi']:.1f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
