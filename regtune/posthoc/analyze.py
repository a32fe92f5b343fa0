"""`regtune analyze`: the feature statistics of a finished run on its training subset and test set.

Loads the run's selected checkpoint with the run's own config, split and evaluation transform, extracts the
penultimate features and logits, and measures feature norms, FMR entropy, MeanNN entropy and I(F;Y), margins, top-k
train/test overlap and head-weight statistics. Writes ``analysis.json`` and ``analysis.png`` into the run
directory. What each value means: docs/methods/analysis-metrics.md.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from regtune._io import atomic_write_json, atomic_write_text
from regtune.analysis.features import (
    feature_norms,
    fmr_entropy,
    head_weight_stats,
    margin_stats,
    mutual_information,
    topk_overlap,
)
from regtune.data.transforms import TransformedSubset, build_transforms
from regtune.models import forward_parts
from regtune.train.rundir import RunDir, run_preprocessing

__all__ = ["analyze_run", "compare_runs", "extract"]

MARGIN_EDGES = torch.linspace(-1.0, 1.0, 81, dtype=torch.float64)
"""Bins of the saved margin histograms (margins outside [-1, 1] are counted in the end bins), shared by all runs so
that runs compare bin by bin."""

_log = logging.getLogger(__name__)


@torch.no_grad()
def extract(model: torch.nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features, logits, labels)`` of every item of ``loader`` (model in eval mode)."""
    features, logits, labels = [], [], []
    for images, targets, *_ in loader:
        _, f, z = forward_parts(model, images)
        features.append(f.float())
        logits.append(z.float())
        labels.append(targets)
    return torch.cat(features), torch.cat(logits), torch.cat(labels)


def _subsample(features: torch.Tensor, labels: torch.Tensor, limit: int, seed: int = 0):
    if features.shape[0] <= limit:
        return features, labels
    order = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))[:limit]
    return features[order], labels[order]


def _split_stats(features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                 mi_samples: int) -> dict[str, Any]:
    f_mi, y_mi = _subsample(features, labels, mi_samples)
    margins = margin_stats(features, labels, weight)
    values = torch.tensor(margins["margins"], dtype=torch.float64).clamp(-1.0, 1.0)
    counts = torch.histogram(values, bins=MARGIN_EDGES).hist
    width = float(MARGIN_EDGES[1] - MARGIN_EDGES[0])
    return {
        "n": int(features.shape[0]),
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
        "feature_norm": feature_norms(features),
        "fmr_entropy": fmr_entropy(features),
        "entropy_mi": mutual_information(f_mi, y_mi),
        "margins": {k: v for k, v in margins.items() if k != "margins"},
        "margin_histogram": {"edges": MARGIN_EDGES.tolist(), "counts": [int(c) for c in counts.tolist()],
                             "density": (counts / max(float(counts.sum()), 1.0) / width).tolist()},
        "_margins": margins["margins"],
    }


def analyze_run(run_dir: str | Path, mi_samples: int = 2000, ks: Sequence[int] = (1, 3, 10, 30, 100, 300),
                batch_size: int = 128,
                test_limit: int | None = None) -> dict[str, Any]:
    """Measure a finished run and write ``analysis.json`` and ``analysis.png`` into it.

    Args:
        run_dir: The run directory.
        mi_samples: At most this many samples (seeded subsample) enter MeanNN / I(F;Y) (quadratic cost); the
            number used is reported.
        ks: k values of the top-k overlap (capped at D).
        batch_size: Extraction batch size.
        test_limit: Use only the first ``test_limit`` test images (a quick look; reported).
    """
    started = time.perf_counter()
    run = RunDir(run_dir).require("finished")
    config = run.config()
    d = config.data
    train_set = run.dataset("train", config)
    test_set = run.dataset("test", config)
    model, config, checkpoint = run.load_model(train_set.num_classes, config=config)
    split = run.split(train_set)
    _, eval_tf = build_transforms(run_preprocessing(model, config), scale=d.scale, hflip=d.hflip)
    test_items = range(len(test_set)) if test_limit is None else range(min(test_limit, len(test_set)))
    loaders = {"train": DataLoader(TransformedSubset(train_set, split.train, eval_tf), batch_size=batch_size),
               "test": DataLoader(TransformedSubset(test_set, test_items, eval_tf), batch_size=batch_size)}
    weight = model.get_classifier().weight.detach().float()
    extracted = {name: extract(model, loader) for name, loader in loaders.items()}
    result: dict[str, Any] = {"run_dir": str(run.path), "checkpoint": str(checkpoint), "methods": {
        "criterion": config.criterion.name, "regularizers": [r.name for r in config.regularizers]},
        "feature_dim": int(weight.shape[1]), "mi_samples_max": mi_samples, "test_limit": test_limit}
    for name, (features, logits, labels) in extracted.items():
        result[name] = _split_stats(features, logits, labels, weight, mi_samples)
    (f_tr, _, y_tr), (f_te, _, y_te) = extracted["train"], extracted["test"]
    result["topk_overlap"] = {str(k): topk_overlap(f_tr, y_tr, f_te, y_te, weight, k=k)
                              for k in sorted({min(int(k), weight.shape[1]) for k in ks})}
    result["head"] = head_weight_stats(weight)
    result["seconds"] = round(time.perf_counter() - started, 2)
    from regtune.analysis.plots import plot_run_analysis

    plot_run_analysis(result, f_te, y_te, run.analysis_png, title=run.path.name, class_names=test_set.classes)
    payload = {k: ({kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) else v)
               for k, v in result.items()}
    atomic_write_json(run.analysis_json, payload)
    _log.info("analysis of %s written (%.0f s)", run, result["seconds"])
    return result


def compare_runs(run_dirs: Sequence[str | Path], out: str | Path, names: Sequence[str] | None = None
                 ) -> dict[str, Path]:
    """Side-by-side figures and a table of runs already analysed (``analysis.json``).

    Writes into ``out``: ``analysis_compare.png`` (per-epoch feature norm / entropy / margin curves of runs fitted
    with ``--feature-stats``, test margin histograms, top-k overlap against k, head-weight histograms),
    ``head_sparsity.png`` (test accuracy, and MaxBoxAccV2 where ``localization.json`` exists, against head
    sparsity) and ``analysis_compare.md``.
    """
    from regtune.analysis.plots import plot_comparison, plot_head_sparsity
    from regtune.train.callbacks import read_epoch_log

    runs = [RunDir(d) for d in run_dirs]
    names = list(names) if names is not None else [run.path.name for run in runs]
    if len(names) != len(runs):
        raise ValueError(f"{len(names)} names for {len(runs)} runs")
    results = []
    for run in runs:
        if not run.analysis_json.is_file():
            raise FileNotFoundError(f"{run} has no analysis.json: run `regtune analyze {run}` first")
        results.append(json.loads(run.analysis_json.read_text()))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    logs = [read_epoch_log(run.epochs_csv) for run in runs]
    paths = {"figure": plot_comparison(results, logs, names, out / "analysis_compare.png",
                                       title="  vs  ".join(names))}
    points, lines = [], [("| run | test acc | feature norm (train / test) | FMR entropy / log D (test) | "
                          "I(F;Y) (train / test) | mean margin (test) | class margin (deg) | weighted top-10 overlap"
                          " | head sparsity | head negative | MaxBoxAccV2 |"), "|" + "---|" * 11]
    for run, name, r in zip(runs, names, results):
        located_json = run.localization_json()
        loc = json.loads(located_json.read_text()) if located_json.is_file() else None
        points.append({"name": name, "sparsity": r["head"]["sparsity"], "accuracy": r["test"]["accuracy"],
                       "localization": loc["max_box_acc_v2"] if loc else None})
        overlap = r["topk_overlap"].get("10", {}).get("weighted_overlap", float("nan"))
        located = "" if loc is None else f"{100 * loc['max_box_acc_v2']:.2f}"
        lines.append(
            f"| {name} | {100 * r['test']['accuracy']:.2f} | {r['train']['feature_norm']['per_sample_l2']:.2f} / "
            f"{r['test']['feature_norm']['per_sample_l2']:.2f} | {r['test']['fmr_entropy']['normalized']:.4f} | "
            f"{r['train']['entropy_mi']['mi']:.1f} / {r['test']['entropy_mi']['mi']:.1f} | "
            f"{r['test']['margins']['margin_mean']:.3f} | {r['train']['margins']['class_margin_deg']:.1f} | "
            f"{overlap:.3f} | {100 * r['head']['sparsity']:.1f}% | {100 * r['head']['negative_share']:.1f}% | "
            f"{located} |")
    paths["sparsity"] = plot_head_sparsity(points, out / "head_sparsity.png")
    atomic_write_text(out / "analysis_compare.md",
                      "I(F;Y) values compare only at the same N and D (see each run's analysis.json).\n\n"
                      + "\n".join(lines)
        + "\n")
    paths["table"] = out / "analysis_compare.md"
    return paths
