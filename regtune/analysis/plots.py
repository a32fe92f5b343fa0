"""Plots of a run (matplotlib, headless)."""

from __future__ import annotations

import io
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker

from regtune._io import atomic_write_bytes

matplotlib.use("Agg")  # headless; pyplot has drawn nothing yet, so the backend can still be chosen here

__all__ = ["plot_comparison", "plot_head_sparsity", "plot_learning_curves", "plot_run_analysis"]


def _save(fig: Any, path: Path, title: str = "") -> Path:
    """Title, tight layout, PNG at 110 dpi written atomically (`regtune._io`), figure closed."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, png.getvalue())


def plot_learning_curves(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "",
                         selected_epoch: int | None = None, test_acc: float | None = None,
                         criterion: str | None = None) -> Path:
    """Loss, accuracy and learning rate per epoch (train and validation), as one PNG.

    Epochs are counted from 1, as in ``epochs.csv``, on the console and in ``metrics.json``.

    Args:
        rows: Epoch-log rows (``regtune.train.callbacks.read_epoch_log``): ``epoch``, ``train/loss``, ``val/acc``...
        path: Output PNG.
        title: Figure title (run name, selection mode).
        selected_epoch: Epoch of the tested checkpoint (``metrics.json``'s ``selected_epoch``, from 1), marked with a
            dashed line.
        test_acc: Test accuracy of that checkpoint, drawn as a star on the accuracy panel.
        criterion: Registry name of the run's criterion: its own training loss (``train/<criterion>``) is the
            loss panel's training curve, and the total with the regularizers' terms (which may be negative, as
            FMR's entropy term is) is drawn thin beside it when it differs.

    Returns:
        ``path``.
    """
    path = Path(path)
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    own = f"train/{criterion}" if criterion and any(f"train/{criterion}" in r for r in rows) else None
    for ax, metric, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        train_key = own if metric == "loss" and own else f"train/{metric}"
        for name, key, style in ((f"train {criterion}" if train_key == own else "train", train_key, "-o"),
                                 ("val", f"val/{metric}", "-s")):
            points = [(e, r[key]) for e, r in zip(epochs, rows) if key in r]
            if points:
                ax.plot(*zip(*points), style, ms=3, label=name)
        right = _total_loss_beside(ax, epochs, rows, own) if metric == "loss" and own else None
        if selected_epoch is not None:
            ax.axvline(selected_epoch, color="grey", ls="--", lw=1, label="selected")
        if metric == "acc" and test_acc is not None and selected_epoch is not None:
            ax.plot([selected_epoch], [test_acc], "*", color="crimson", ms=12, label=f"test {test_acc:.3f}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        if right is not None:  # one legend for both axes, drawn on the upper one so no curve hides it
            more = right.get_legend_handles_labels()
            handles, names = handles + more[0], names + more[1]
        (right or ax).legend(handles, names, fontsize=8)
    lr_keys = sorted({k for r in rows for k in r if k.startswith("lr/")})
    for key in lr_keys:
        axes[2].plot(epochs, [r.get(key, float("nan")) for r in rows], "-", label=key.removeprefix("lr/"))
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("learning rate (end of epoch)")
    axes[2].grid(alpha=0.3)
    if lr_keys:
        axes[2].legend()
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # epochs 1, 2, ...: no 0.5 ticks
    return _save(fig, path, title)


def _total_loss_beside(ax: Any, epochs: list[int], rows: Sequence[dict[str, Any]], own: str) -> Any:
    """The training total (criterion + regularizer terms) on its own right-hand axis, where it differs from the
    criterion's loss: FMR's term is a negative entropy, so the total can be far below zero. Returns that axis, or
    ``None`` when the total is the criterion's loss."""
    points = [(e, r["train/loss"]) for e, r in zip(epochs, rows) if "train/loss" in r]
    if not points or all(abs(r["train/loss"] - r[own]) < 1e-9 for r in rows if "train/loss" in r and own in r):
        return None
    right = ax.twinx()
    right.plot(*zip(*points), ":", color="grey", lw=1.2, label="train total (incl. regularizers, right axis)")
    right.set_ylabel("total incl. regularizers", color="grey")
    right.tick_params(axis="y", colors="grey")
    return right


def plot_run_analysis(result: dict[str, Any], test_features: Any, test_labels: Any, path: str | Path,
                      title: str = "", pca_samples: int = 2000, class_names: Sequence[str] | None = None) -> Path:
    """One figure of a run's analysis: margin histograms (train vs test), the head's weight histogram, top-k
    train/test overlap against k, and a PCA of test features coloured by class.

    Args:
        result: `regtune.posthoc.analyze.analyze_run`'s result (with the per-sample ``_margins``).
        test_features: (N, D) test features.
        test_labels: (N,) their classes.
        path: Output PNG.
        title: Figure title.
        pca_samples: At most this many test points in the PCA panel (the first ones).
        class_names: The classes' names in label order, for the PCA legend (else their indices).
    """

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
    ax.bar(edges[:-1], hist["counts"], width=[b - a for a, b in itertools.pairwise(edges)], align="edge",
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
    _pca_panel(fig, axes[3], test_features[:pca_samples], test_labels[:pca_samples], class_names)
    train, test = result["train"], result["test"]
    fig.suptitle(f"{title}  |  feature norm train {train['feature_norm']['per_sample_l2']:.2f} / test "
                 f"{test['feature_norm']['per_sample_l2']:.2f}; FMR entropy (normalised) "
                 f"{train['fmr_entropy']['normalized']:.4f} / {test['fmr_entropy']['normalized']:.4f}; "
                 f"I(F;Y) {train['entropy_mi']['mi']:.1f} / {test['entropy_mi']['mi']:.1f}", fontsize=10)
    return _save(fig, path)


_CURVES = (("feature_norm", "feature norm  mean ||f||_2"), ("fmr_entropy", "FMR channel entropy / log D"),
           ("mean_margin", "mean sample margin (cosine)"))


def _pca_panel(fig: Any, ax: Any, features: Any, labels: Any, class_names: Sequence[str] | None) -> None:
    """Test features projected on their first two principal components, coloured by class (named if given)."""
    import torch

    f = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(labels)
    centred = f - f.mean(0)
    _, s_values, v = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ v[:2].T
    explained = (s_values[:2] ** 2 / (s_values ** 2).sum()).tolist()
    scatter = ax.scatter(projected[:, 0], projected[:, 1], c=y, cmap="tab10", s=6, alpha=0.7)
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.0f}%)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.0f}%)" if len(explained) > 1 else "PC2")
    ax.set_title(f"test features, PCA ({f.shape[0]} points)")
    present = torch.unique(y).tolist()  # legend_elements gives one handle per value, in this (sorted) order
    if len(present) <= 20:
        handles, names = scatter.legend_elements(num=None)  # every class (the default picks 9 "nice" values)
        if class_names is not None:
            names = [str(class_names[int(v)]) for v in present]
        ax.legend(handles, names, title="class", fontsize=7, loc="best")
    else:
        fig.colorbar(scatter, ax=ax, label="class")


def _plot_epoch_curves(axes: Sequence[Any], epoch_logs: Sequence[Sequence[dict[str, Any]]], names: Sequence[str],
                       colours: Sequence[str]) -> None:
    """One panel per statistic of `_CURVES`: each run's train (solid) and validation (dashed) values per epoch."""
    for ax, (key, label) in zip(axes, _CURVES):
        drawn = False
        for i, (rows, name) in enumerate(zip(epoch_logs, names)):
            for split, style in (("train", "-"), ("val", "--")):
                points = [(r["epoch"], r[f"{split}/{key}"]) for r in rows if f"{split}/{key}" in r]
                if points:
                    ax.plot(*zip(*points), style, color=colours[i % len(colours)], marker="o", ms=2.5,
                            label=f"{name} ({split})")
                    drawn = True
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no per-epoch statistics:\nfit with --feature-stats", ha="center", va="center",
                    transform=ax.transAxes)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch (train: training passes, augmented; val: eval mode)")
        ax.set_ylabel(label)
        ax.set_title(label.split("  ")[0] + " over training")
        ax.grid(alpha=0.3)


def plot_comparison(results: Sequence[dict[str, Any]], epoch_logs: Sequence[Sequence[dict[str, Any]]],
                    names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Runs side by side (e.g. FT vs FMR vs AdaRand): per-epoch feature norm, FMR entropy and sample margin (train
    solid, validation dashed; runs fitted with ``--feature-stats``), test margin histograms, top-k overlap against k
    and head-weight histograms.

    Args:
        results: Each run's ``analysis.json`` content (with ``margin_histogram``).
        epoch_logs: Each run's epoch-log rows.
        names: Legend label per run.
        path: Output PNG.
    """
    path = Path(path)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 8.6))
    _plot_epoch_curves(axes[0], epoch_logs, names, colours)
    ax = axes[1, 0]
    for i, (result, name) in enumerate(zip(results, names)):
        hist = result["test"].get("margin_histogram")
        if hist:
            ax.stairs(hist["density"], hist["edges"], color=colours[i % len(colours)], linewidth=1.6,
                      label=f"{name} (mean {result['test']['margins']['margin_mean']:.3f})")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("test sample margin: cos(f, w_y) - max_{j != y} cos(f, w_j)")
    ax.set_ylabel("density")
    ax.set_title("test margins")
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    for i, (result, name) in enumerate(zip(results, names)):
        ks = sorted(int(k) for k in result["topk_overlap"])
        ax.plot(ks, [result["topk_overlap"][str(k)]["weighted_overlap"] for k in ks], marker="o",
                color=colours[i % len(colours)], label=name)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("k (top channels per class)")
    ax.set_ylabel("weighted train/test overlap")
    ax.set_title("top-k feature overlap")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1, 2]
    for i, (result, name) in enumerate(zip(results, names)):
        hist = result["head"]["histogram"]
        total = max(sum(hist["counts"]), 1)
        widths = [b - a for a, b in zip(hist["edges"][:-1], hist["edges"][1:])]
        ax.stairs([c / total / w for c, w in zip(hist["counts"], widths)], hist["edges"],
                  color=colours[i % len(colours)], linewidth=1.6,
                  label=f"{name} ({100 * result['head']['negative_share']:.0f}% < 0)")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("head weight w_ck")
    ax.set_ylabel("density (log)")
    ax.set_title("head weights")
    ax.legend(fontsize=7)
    return _save(fig, path, title)


def plot_head_sparsity(points: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Classification and localization against head sparsity (the CAM study's figure), one point per run.

    Args:
        points: ``{"name", "sparsity", "accuracy"}`` and optionally ``"localization"`` (MaxBoxAccV2) per run.
        path: Output PNG.
    """
    path = Path(path)
    order = sorted(points, key=lambda p: p["sparsity"])
    fig, ax = plt.subplots(figsize=(7, 4.4))
    x = [100 * p["sparsity"] for p in order]
    ax.plot(x, [100 * p["accuracy"] for p in order], "-o", color="tab:blue", label="accuracy (analysed test images)")
    located = [(100 * p["sparsity"], 100 * p["localization"]) for p in order if p.get("localization") is not None]
    if located:
        ax.plot(*zip(*located), "-s", color="tab:red", label="MaxBoxAccV2")
    for xi, p in zip(x, order):
        ax.annotate(p["name"], (xi, 100 * p["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("head sparsity: % of |w_ck| < threshold")
    ax.set_ylabel("%")
    ax.set_title(title or "accuracy (and localization) vs head sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
