"""The default against the linear probe on the images where the probe was first measured (issue 17): every 5th
test image of Fashion-MNIST (2,000), a fixed-C probe (C = 0.1, as first measured) beside the runs' own models.

    for s in 0 1 2; do regtune fit --seed $s --run-dir runs/default128/wise_ft-s$s
                       regtune fit --recipe lp --seed $s --run-dir runs/default128/lp-s$s; done
    python benchmarks/probe_check.py runs/default128 --out benchmarks/results/default_fmnist1_128/probe_check.json

For each seed S it reads ``DIR/wise_ft-sS`` (any fine-tuned run) and ``DIR/lp-sS`` (a probe run, whose cached
training features give the fixed-C probe), and scores each run's tested weights on the same 2,000 images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from regtune.data.datasets import build_dataset
from regtune.data.transforms import TransformedSubset, build_transforms
from regtune.train.probe import extract_features, fit_linear_probe
from regtune.train.rundir import RunDir, run_preprocessing


def _features(run: RunDir, dataset, indices: list[int]) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The run's tested model and its penultimate features of ``indices`` (the run's evaluation transform)."""
    config = run.config()
    model, config, _ = run.load_model(len(dataset.classes), config=config)
    _, eval_tf = build_transforms(run_preprocessing(model, config), scale=config.data.scale, hflip=0.0)
    loader = torch.utils.data.DataLoader(TransformedSubset(dataset, indices, eval_tf), batch_size=128)
    features, labels = extract_features(model, loader)
    return model, features, labels


def _accuracy(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((features @ weight.T + bias).argmax(1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="folder with wise_ft-sS and lp-sS run directories")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--every", type=int, default=5, help="score every N-th test image")
    parser.add_argument("--C", type=float, default=0.1, help="the fixed-C probe's inverse strength")
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    args = parser.parse_args()
    rows: dict[int, dict[str, float]] = {}
    for seed in args.seeds:
        tuned, probe = RunDir(args.runs / f"wise_ft-s{seed}"), RunDir(args.runs / f"lp-s{seed}")
        test = build_dataset("fashion_mnist", probe.config().data.root, "test")
        indices = list(range(0, len(test), args.every))
        row = {}
        for name, run in (("default", tuned), ("lp", probe)):
            model, features, labels = _features(run, test, indices)
            head = model.get_classifier()
            row[name] = _accuracy(head.weight, head.bias, features, labels)
        with np.load(probe.path / "probe_features.npz", allow_pickle=False) as cache:
            fixed = fit_linear_probe(torch.from_numpy(cache["train_x"]), torch.from_numpy(cache["train_y"]), None,
                                     None, len(test.classes), Cs=(args.C,))
        row[f"probe_C{args.C:g}"] = _accuracy(fixed.weight, fixed.bias, features, labels)  # lp's features: pretrained
        rows[seed] = row
        print(f"seed {seed}: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in row.items()), flush=True)
    means = {k: float(np.mean([r[k] for r in rows.values()])) for k in rows[args.seeds[0]]}
    print("mean: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in means.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"every": args.every, "C": args.C, "seeds": rows, "mean": means}, indent=1))


if __name__ == "__main__":
    main()
