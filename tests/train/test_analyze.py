"""`regtune analyze` on a finished tiny run: the numbers are those of the run's own model on its own split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from regtune.cli import main
from regtune.train.analyze import analyze_run, load_run_model
from regtune.train.fit import fit
from tests.conftest import write_imagefolder
from tests.train.test_fit import tiny_config


def test_analyze_a_finished_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_imagefolder(tmp_path / "data", classes=3, train_per_class=10, test_per_class=4)
    run = fit(tiny_config(root, epochs=2), run_dir=tmp_path / "run")
    result = analyze_run(run.run_dir, mi_samples=20)
    saved = json.loads((run.run_dir / "analysis.json").read_text())
    assert (run.run_dir / "analysis.png").stat().st_size > 20_000
    assert saved["train"]["n"] == run.metrics["num_train"] and saved["test"]["n"] == run.metrics["num_test"]
    # the analysed model is the tested checkpoint: same test accuracy
    assert saved["test"]["accuracy"] == pytest.approx(run.metrics["test_acc"], abs=1e-6)
    assert saved["train"]["entropy_mi"]["n"] == 20 and saved["test"]["entropy_mi"]["n"] == 12  # subsample, all
    assert set(saved["topk_overlap"]) == {"10", "50"} and 0 <= saved["topk_overlap"]["10"]["overlap"] <= 1
    assert "_margins" not in saved["train"] and len(result["train"]["_margins"]) == run.metrics["num_train"]
    # the analysed head is the selected checkpoint's (not the fresh model's)
    model, _, checkpoint = load_run_model(run.run_dir, 3)
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    head = state["model." + model.pretrained_cfg["classifier"] + ".weight"]
    assert saved["head"]["l1"] == pytest.approx(float(head.abs().sum()), rel=1e-6)
    assert saved["feature_dim"] == model.num_features == head.shape[1]
    assert main(["analyze", str(run.run_dir), "--mi-samples", "10"]) == 0
    assert "FMR entropy" in capsys.readouterr().out


def test_analyze_refuses_unfinished_runs(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match="not finished"):
        load_run_model(tmp_path, 3)
