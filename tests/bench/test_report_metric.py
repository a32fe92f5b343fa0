"""Reports by another metric than test accuracy: balanced accuracy, macro-F1, shot groups; older runs without them."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from regtune.bench.aggregate import RESULT_METRICS, RunRecord, collect_runs, markdown_report, summarize, write_report
from regtune.bench.cells import cell_label, split_cell
from regtune.cli import main

CELL = (("data.dataset", "toy"), ("data.fraction", 0.01))


def _metrics(acc: float, bal: float, f1: float, few: float | None) -> dict[str, Any]:
    return {"test_acc": acc, "test_mean_class_acc": bal, "test_bal_acc": bal, "test_macro_f1": f1,
            "test_groups": {"many": 0.9, "medium": 0.6, "few": few, "thresholds": [10, 2],
                            "classes": {"many": ["a"], "medium": ["b"], "few": ["c"] if few is not None else []}}}


def _records() -> list[RunRecord]:
    # ft: balanced 60, 62 %; fmr: 66, 65 % -> paired differences +6, +3 points, mean +4.5
    values = {"ft": [(0.80, 0.60, 0.55, 0.20), (0.81, 0.62, 0.57, 0.30)],
              "fmr": [(0.79, 0.66, 0.61, 0.40), (0.80, 0.65, 0.60, 0.50)]}
    return [RunRecord(method, CELL, seed, _metrics(*v), Path(f"/runs/{method}/s{seed}"))
            for method, vs in values.items() for seed, v in enumerate(vs)]


def test_summaries_compare_the_chosen_metric() -> None:
    by_method = {s.method: s for s in summarize(_records(), baseline="ft", metric="test_bal_acc")}
    assert by_method["ft"].values == pytest.approx({0: 60.0, 1: 62.0})
    assert by_method["fmr"].difference.mean == pytest.approx(4.5)  # (6 + 3) / 2 points
    few = {s.method: s for s in summarize(_records(), baseline="ft", metric="test_few_acc")}
    assert few["fmr"].mean == pytest.approx(45.0) and few["fmr"].difference.mean == pytest.approx(20.0)
    f1 = {s.method: s for s in summarize(_records(), baseline="ft", metric="test_macro_f1")}
    assert f1["ft"].mean == pytest.approx(56.0)  # F1 in percent, as the accuracies
    with pytest.raises(ValueError, match="unknown metric"):
        summarize(_records(), metric="test_f1")


def test_runs_without_the_metric_are_left_out_and_none_with_it_is_an_error(caplog: pytest.LogCaptureFixture) -> None:
    old = RunRecord("ft", CELL, 2, {"test_acc": 0.7, "test_mean_class_acc": 0.6}, Path("/runs/ft/s2"))
    by_method = {s.method: s for s in summarize([*_records(), old], baseline="ft", metric="test_bal_acc")}
    assert sorted(by_method["ft"].values) == [0, 1]
    assert "1 of 5 runs have no test_bal_acc" in caplog.text
    assert sorted({s.method: s for s in summarize([*_records(), old])}["ft"].values) == [0, 1, 2]  # test_acc: all
    with pytest.raises(ValueError, match="none of the 1 runs has test_bal_acc"):
        summarize([old], metric="test_bal_acc")


def test_markdown_names_the_metric() -> None:
    text = markdown_report(summarize(_records(), baseline="ft", metric="test_bal_acc"), "ft", "test_bal_acc")
    assert text.startswith("Metric: `test_bal_acc`, balanced test accuracy")
    assert "**test_bal_acc (%)**" in text and "| fmr | **65.50 ± 0.71 (2)** |" in text
    assert "**Paired difference to ft** in test_bal_acc (points;" in text


def _fake_run(run_dir: Path, seed: int, metrics: dict[str, Any], lr: float = 0.02) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "data": {"dataset": "toy", "fraction": 0.01}, "trainer": {"seed": seed}, "optim": {"lr": lr},
        "criterion": {"name": "ce"}, "regularizers": []}))
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def test_report_command_with_metric_and_older_runs(tmp_path: Path) -> None:
    for seed, record in enumerate(_records()[:2]):
        _fake_run(tmp_path / "ft" / f"s{seed}", seed, record.metrics)
    for seed, record in enumerate(_records()[2:]):
        _fake_run(tmp_path / "gentle" / f"s{seed}", seed, record.metrics, lr=0.005)
    _fake_run(tmp_path / "ft" / "s2", 2, {"test_acc": 0.7})  # a run from before the imbalance metrics
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "ft"), f"gentle={tmp_path / 'gentle'}", "--out", str(out),
                 "--metric", "test_bal_acc"]) == 0
    assert (out / "summary.md").read_text().startswith("Metric: `test_bal_acc`")
    with open(out / "summary.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert float(rows["gentle"]["diff_mean"]) == pytest.approx(4.5) and rows["ft"]["seeds"] == "0 1"
    with open(out / "results.csv", newline="") as f:
        results = list(csv.DictReader(f))
    assert set(RESULT_METRICS) <= set(results[0]) and len(results) == 5
    older = next(r for r in results if r["seed"] == "2")
    assert older["test_acc"] == "0.7" and older["test_bal_acc"] == "" and older["test_few_acc"] == ""
    newer = next(r for r in results if r["method"] == "gentle" and r["seed"] == "0")
    assert float(newer["test_few_acc"]) == 0.4 and float(newer["test_macro_f1"]) == 0.61
    for name in ("accuracy.png", "paired_differences.png"):
        assert (out / name).stat().st_size > 10_000


def test_a_mistyped_metric_is_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path), "--out", str(tmp_path / "r"), "--metric", "test_f1"])
    assert "invalid choice: 'test_f1'" in capsys.readouterr().err


def test_write_report_default_metric_is_test_accuracy(tmp_path: Path) -> None:
    paths = write_report(_records(), tmp_path, baseline="ft")
    assert paths["summary_md"].read_text().startswith("Metric: `test_acc`, test accuracy")


def test_a_report_of_long_tailed_runs_says_the_test_set_is_the_datasets_own(tmp_path: Path) -> None:
    records = []
    for i, record in enumerate(_records()):
        run_dir = tmp_path / "runs" / str(i)
        run_dir.mkdir(parents=True)
        settings = {"imbalance_ratio": 100.0, "imbalance_profile": "exp"} if i % 2 else {"fraction": 0.05}
        (run_dir / "split.json").write_text(json.dumps({"settings": settings}))
        records.append(RunRecord(record.method, record.cell, record.seed, record.metrics, run_dir))
    text = write_report(records, tmp_path / "report", baseline="ft")["summary_md"].read_text()
    assert "long-tailed (exp rho = 100" in text and "The test set is the dataset's own" in text
    balanced = write_report(_records(), tmp_path / "balanced", baseline="ft")["summary_md"].read_text()
    assert "long-tailed" not in balanced  # runs without a split.json, or balanced ones: no note


def test_long_tailed_runs_are_a_cell_of_their_own_that_says_so(tmp_path: Path) -> None:
    """Runs whose ratio is set in the base config, not on an axis (a search's finals, `regtune report`)."""
    for name, ratio in (("lt", 100.0), ("lt_odd", 12.5), ("balanced", None)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        data = {"dataset": "fashion_mnist", "fraction": 0.05, "imbalance_ratio": ratio}
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"data": data, "trainer": {"seed": 0}}))
        (run_dir / "metrics.json").write_text(json.dumps(_metrics(0.8, 0.6, 0.5, 0.2)))
    cells = {r.run_dir.name: r.cell for r in collect_runs(sorted(tmp_path.iterdir()))}
    assert cells["lt"] == (("data.dataset", "fashion_mnist"), ("data.fraction", 0.05), ("data.imbalance_ratio", 100))
    assert cell_label(cells["lt"]) == "fashion_mnist 5% imbalance_ratio=100"
    assert cell_label(cells["lt_odd"]) == "fashion_mnist 5% imbalance_ratio=12.5"
    assert split_cell(cells["lt"])[2] == "training data of the head class (%)"  # the plots' axis
    assert cells["balanced"] == (("data.dataset", "fashion_mnist"), ("data.fraction", 0.05))
