"""`regtune analyze` on a finished tiny run: the numbers are those of the run's own model on its own split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from regtune.cli import main
from regtune.posthoc.analyze import analyze_run, compare_runs, extract
from regtune.train.callbacks import read_epoch_log
from regtune.train.config import apply_overrides
from regtune.train.fit import fit
from regtune.train.rundir import RunDir
from tests.conftest import write_imagefolder
from tests.train.test_fit import tiny_config


def test_analyze_a_finished_run(tmp_path: Path, capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.axes

    root = write_imagefolder(tmp_path / "data", classes=3, train_per_class=10, test_per_class=4)
    run = fit(tiny_config(root, epochs=2), run_dir=tmp_path / "run")
    legends: list[list[str]] = []
    legend = matplotlib.axes.Axes.legend

    def recording(self: matplotlib.axes.Axes, *args: object, **kwargs: object) -> object:
        made = legend(self, *args, **kwargs)
        legends.append([t.get_text() for t in made.get_texts()])
        return made

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", recording)
    result = analyze_run(run.run_dir, mi_samples=20)
    assert ["class_0", "class_1", "class_2"] in legends  # the PCA panel's legend names the classes
    saved = json.loads((run.run_dir / "analysis.json").read_text())
    assert (run.run_dir / "analysis.png").stat().st_size > 20_000
    assert saved["train"]["n"] == run.metrics["num_train"] and saved["test"]["n"] == run.metrics["num_test"]
    # the analysed model is the tested checkpoint: same test accuracy
    assert saved["test"]["accuracy"] == pytest.approx(run.metrics["test_acc"], abs=1e-6)
    assert saved["train"]["entropy_mi"]["n"] == 20 and saved["test"]["entropy_mi"]["n"] == 12  # subsample, all
    d = saved["feature_dim"]
    assert set(saved["topk_overlap"]) == {str(min(k, d)) for k in (1, 3, 10, 30, 100, 300)}
    assert 0 <= saved["topk_overlap"]["10"]["overlap"] <= 1
    hist = saved["test"]["margin_histogram"]  # every test margin counted once, density integrates to 1
    assert sum(hist["counts"]) == saved["test"]["n"]
    assert sum(v * (b - a) for v, a, b in zip(hist["density"], hist["edges"][:-1], hist["edges"][1:])) == \
        pytest.approx(1.0)
    assert "_margins" not in saved["train"] and len(result["train"]["_margins"]) == run.metrics["num_train"]
    # the analysed head is the selected checkpoint's (not the fresh model's)
    model, _, checkpoint = RunDir(run.run_dir).load_model(3)
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    head = state["model." + model.pretrained_cfg["classifier"] + ".weight"]
    assert saved["head"]["l1"] == pytest.approx(float(head.abs().sum()), rel=1e-6)
    assert saved["feature_dim"] == model.num_features == head.shape[1]
    assert main(["analyze", str(run.run_dir), "--mi-samples", "10"]) == 0
    assert "FMR entropy" in capsys.readouterr().out


def test_analyze_refuses_unfinished_runs(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match="not finished"):
        RunDir(tmp_path).load_model(3)


def test_feature_stats_per_epoch_and_side_by_side_comparison(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_imagefolder(tmp_path / "data", classes=3, train_per_class=10, test_per_class=4)
    runs = []
    for name, l1 in (("ft", None), ("head_l1", 0.5)):
        # A small learning rate: the tiny model must not diverge, or the entropy is ~1e-9 and only float noise.
        config = apply_overrides(tiny_config(root, epochs=2, feature_stats=True), {"optim.lr": 0.005})
        if l1 is not None:
            config = apply_overrides(config, {"regularizers": [{"name": "head_l1", "args": {"weight": l1}}]})
        runs.append(fit(config, run_dir=tmp_path / name).run_dir)
    rows = read_epoch_log(runs[0] / "epochs.csv")
    assert len(rows) == 2
    for key in ("train/feature_norm", "train/fmr_entropy", "train/mean_margin", "train/class_margin_deg",
                "val/feature_norm", "val/fmr_entropy", "val/mean_margin"):
        assert key in rows[0], key
    assert 0 < rows[0]["train/fmr_entropy"] <= 1 and -2 <= rows[0]["val/mean_margin"] <= 2
    # the validation numbers are those of the model of that epoch on the validation images: recompute the last one
    model, config, _ = RunDir(runs[0]).load_model(3, checkpoint="checkpoints/last.ckpt")
    from regtune.analysis.features import feature_norms, fmr_entropy
    from regtune.data.datasets import build_dataset
    from regtune.data.subset import split_from_manifest
    from regtune.data.transforms import TransformedSubset, build_transforms
    from regtune.models import data_config

    train_set = build_dataset("imagefolder", root, "train")
    split = split_from_manifest(runs[0] / "split.json", train_set.ids, "imagefolder")
    preprocessing = {**data_config(model, 32), "crop_pct": config.data.crop_pct}
    _, eval_tf = build_transforms(preprocessing, scale=config.data.scale, hflip=config.data.hflip)
    features, _, _ = extract(model, DataLoader(TransformedSubset(train_set, split.val, eval_tf), batch_size=16))
    assert rows[-1]["val/feature_norm"] == pytest.approx(feature_norms(features)["per_sample_l2"], rel=1e-4)
    assert rows[-1]["val/fmr_entropy"] > 1e-3
    assert rows[-1]["val/fmr_entropy"] == pytest.approx(fmr_entropy(features)["normalized"], rel=1e-5)
    # analyze both runs and compare them
    assert main(["analyze", *map(str, runs), "--mi-samples", "10", "--compare", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "analysis_compare.md").read_text()
    assert "| ft |" in table and "| head_l1 |" in table
    for png in ("analysis_compare.png", "head_sparsity.png"):
        assert (tmp_path / "cmp" / png).stat().st_size > 20_000
    # --reuse keeps the analysis already written
    before = (runs[0] / "analysis.json").stat().st_mtime_ns
    assert main(["analyze", str(runs[0]), "--reuse", "--compare", str(tmp_path / "cmp2")]) == 0
    assert (runs[0] / "analysis.json").stat().st_mtime_ns == before
    with pytest.raises(FileNotFoundError, match="regtune analyze"):
        compare_runs([tmp_path / "data"], tmp_path / "cmp3")
