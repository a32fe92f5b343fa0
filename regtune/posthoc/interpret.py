"""`regtune interpret`: what a finished run gets wrong on its test split, with the class names.

The confusion matrix (PNG and CSV) and the most-confused pairs, per-class precision / recall / F1
(scikit-learn), calibration (the reliability diagram and the expected calibration error), and a gallery of the
highest-loss test images with their true and predicted class, confidence and the CAM of the predicted class. The
model sees every image in the run's evaluation frame, as in its test; the gallery's CAMs are computed in the
localization frame (the whole image squashed to a square), which the figure says.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regtune._io import atomic_write_json, atomic_write_text

__all__ = ["expected_calibration_error", "interpret_run"]

_log = logging.getLogger(__name__)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15
                               ) -> tuple[float, list[dict[str, float | None]]]:
    """ECE over ``bins`` equal-width confidence bins (Guo et al., 2017): sum over bins of (n_b / N) |acc_b - conf_b|,
    a bin holding the confidences in (lo, hi] (the first also 0). Returns the ECE and the bins (count, mean
    confidence, accuracy; ``None`` for an empty bin, ``null`` in JSON)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        members = which == b
        n = int(members.sum())
        conf = float(confidence[members].mean()) if n else None
        acc = float(correct[members].mean()) if n else None
        if n:
            ece += n / len(confidence) * abs(acc - conf)
        table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n, "confidence": conf,
                      "accuracy": acc})
    return ece, table


@torch.no_grad()
def _test_outputs(predictor: Any, dataset: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (N, C) and labels (N,) of the whole test split, in the run's evaluation frame."""
    from torch.utils.data import DataLoader

    from regtune.data.transforms import TransformedSubset

    loader = DataLoader(TransformedSubset(dataset, range(len(dataset)), predictor.transform), batch_size=batch_size)
    probs, labels = [], []
    for images, targets in loader:
        probs.append(predictor.probabilities(images))
        labels.append(torch.as_tensor(targets))
    return torch.cat(probs).double().numpy(), torch.cat(labels).numpy()


def _csv(rows: list[list[Any]]) -> str:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue()


def interpret_run(run_dir: str | Path, out: str | Path | None = None, top_losses: int = 12, bins: int = 15,
                  batch_size: int = 128) -> dict[str, Any]:
    """Write the run's error analysis into ``out`` (default ``RUN/interpret``) and return its summary
    (``interpret.json``)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    from regtune.predict import load

    predictor = load(run_dir)
    run = predictor.run
    out = Path(out) if out is not None else run.path / "interpret"
    out.mkdir(parents=True, exist_ok=True)
    dataset = run.dataset("test", run.config())
    probs, labels = _test_outputs(predictor, dataset, batch_size)
    classes, predicted = predictor.classes, probs.argmax(1)
    matrix = confusion_matrix(labels, predicted, labels=range(len(classes)))
    atomic_write_text(out / "confusion_matrix.csv", _csv(
        [["true \\ predicted", *classes], *[[c, *map(int, row)] for c, row in zip(classes, matrix)]]))
    pairs = sorted(((int(matrix[t, p]), classes[t], classes[p]) for t in range(len(classes))
                    for p in range(len(classes)) if t != p and matrix[t, p] > 0), reverse=True)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=range(len(classes)), zero_division=0)
    per_class = [{"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                 for c, p, r, f, s in zip(classes, precision, recall, f1, support)]
    atomic_write_text(out / "per_class.csv", _csv([["class", "precision", "recall", "f1", "support"]] + [
        [row["class"], f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", row["support"]]
        for row in per_class]))
    confidence = probs.max(1)
    ece, table = expected_calibration_error(confidence, predicted == labels, bins)
    losses = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
    worst = [int(i) for i in np.argsort(-losses, kind="stable")[:top_losses]]
    plot_confusion(matrix, classes, out / "confusion_matrix.png")
    plot_reliability(table, ece, out / "reliability.png")
    plot_top_losses(predictor, dataset, worst, probs, losses, out / "top_losses.png")
    summary = {"run_dir": str(run.path), "n": len(labels), "accuracy": float((predicted == labels).mean()),
               "ece": ece, "bins": table, "most_confused": [
                   {"true": t, "predicted": p, "count": n} for n, t, p in pairs[:10]],
               "per_class": per_class, "top_losses": [
                   {"item": dataset.ids[i], "true": classes[labels[i]], "predicted": classes[predicted[i]],
                    "confidence": float(confidence[i]), "loss": float(losses[i])} for i in worst]}
    atomic_write_json(out / "interpret.json", summary)
    return summary


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    """The confusion matrix with the class names (counts; rows: true class), scikit-learn's display."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    size = min(4 + 0.45 * len(classes), 30)
    figure, ax = plt.subplots(figsize=(size + 1, size))
    ConfusionMatrixDisplay(matrix, display_labels=classes).plot(
        ax=ax, xticks_rotation="vertical", colorbar=True, include_values=len(classes) <= 30, values_format="d")
    ax.set_title(f"test confusion matrix ({int(matrix.sum())} images, accuracy "
                 f"{100 * np.trace(matrix) / max(matrix.sum(), 1):.2f} %)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_reliability(table: list[dict[str, float]], ece: float, path: Path) -> None:
    """Reliability diagram: accuracy per confidence bin against the diagonal, the bins' counts below."""
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centres = [(b["lo"] + b["hi"]) / 2 for b in table]
    width = table[0]["hi"] - table[0]["lo"]
    top.bar(centres, [b["accuracy"] if b["count"] else 0 for b in table], width=width * 0.95, color="tab:blue",
            edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    confidences = [b["confidence"] if b["count"] else np.nan for b in table]
    top.plot(centres, confidences, "o", color="crimson", ms=4, label="mean confidence")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"reliability diagram (ECE {100 * ece:.2f} %)")
    top.legend(fontsize=8, loc="upper left")
    bottom.bar(centres, [b["count"] for b in table], width=width * 0.95, color="grey")
    bottom.set_xlabel("confidence of the predicted class")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_top_losses(predictor: Any, dataset: Any, items: list[int], probs: np.ndarray, losses: np.ndarray,
                    path: Path) -> None:
    """The highest-loss test images: true / predicted class, confidence and loss, and the predicted class's CAM
    (localization frame) beside each; a head without CAMs (a ViT) gets the image alone, said on the figure."""
    from regtune.analysis.cam import NotAGapLinearHead
    from regtune.analysis.localization import normalize_cam
    from regtune.posthoc.cams import cam_maps, localization_transform

    plt = _pyplot()
    size = int(predictor.preprocessing["input_size"][-1])
    squash = localization_transform(predictor.model, size)
    columns = 4
    rows = max(1, -(-len(items) // columns))
    figure, axes = plt.subplots(rows, 2 * columns, figsize=(2.2 * 2 * columns, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, i in enumerate(items):
        picture, target = dataset[i]
        predicted = int(probs[i].argmax())
        shown = np.asarray(picture.resize((size, size)))
        try:
            cam = cam_maps(predictor.model, squash(picture)[None].to(predictor.device),
                           torch.tensor([predicted]))["map"][0]
            heat = normalize_cam(cam, (size, size))
        except NotAGapLinearHead:
            heat = None
        image_ax, cam_ax = axes[k // columns, 2 * (k % columns)], axes[k // columns, 2 * (k % columns) + 1]
        image_ax.imshow(shown)
        image_ax.set_title(f"true {predictor.classes[target][:16]}\npred {predictor.classes[predicted][:16]} "
                           f"({probs[i, predicted]:.2f})\nloss {losses[i]:.2f}", fontsize=7)
        cam_ax.imshow(shown)
        if heat is not None:
            cam_ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        cam_ax.set_title("CAM of pred" if heat is not None else "no CAM (head\nnot GAP + linear)", fontsize=7)
    figure.suptitle(f"highest-loss test images (classified in the run's evaluation frame, "
                    f"{predictor.preprocessing.get('crop_mode', 'center')}; CAMs on the whole image squashed to "
                    f"{size}x{size})", fontsize=8)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / figure.get_figheight()))
    figure.savefig(path, dpi=110)
    plt.close(figure)
