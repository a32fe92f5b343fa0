"""The ``regtune`` command: a tiny end-to-end run, and one clear error per kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regtune.cli import main, parse_term
from tests.conftest import TINY_BACKBONE

TINY = ["--dataset", "imagefolder", "--backbone", TINY_BACKBONE, "--pretrained", "none", "--img-size", "32",
        "--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--no-progress", "--accelerator", "cpu",
        "--val-fraction", "0.2", "--set", "data.fraction=null"]


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fit_end_to_end_then_refuses_to_overwrite(imagefolder: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    code, out, _ = run(capsys, "fit", *TINY, "--data-root", str(imagefolder), "--run-dir", str(run_dir))
    assert code == 0 and "test accuracy:" in out and f"run directory: {run_dir}" in out
    metrics = (run_dir / "metrics.json").read_text()
    assert json.loads(metrics)["backbone"] == TINY_BACKBONE
    code, _, err = run(capsys, "fit", *TINY, "--data-root", str(imagefolder), "--run-dir", str(run_dir))
    assert code == 2 and "already holds a finished run" in err and "--overwrite" in err
    assert (run_dir / "metrics.json").read_text() == metrics


def test_default_run_dir_is_relative_to_the_working_directory(imagefolder: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "fit", *TINY, "--data-root", str(imagefolder))
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("imagefolder-test_efficientnet-ft-s0-") and (run_dir / "metrics.json").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["selected_checkpoint"] == "checkpoints/best.ckpt"
    assert f"run directory: {run_dir}" in out


@pytest.mark.parametrize("extra, message", [
    (["--reg", "nosuch"], "unknown regularizer 'nosuch'"),
    (["--criterion", "nosuch"], "unknown criterion 'nosuch'; known: ce"),
    (["--dataset", "nosuch"], "unknown dataset 'nosuch'; known: aircraft, cars, cub200"),
    (["--backbone", "resnet5O"], "unknown backbone 'resnet5O'. Close matches: resnet50"),
    (["--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["--set", "data.fraction=1.5"], "fraction must be in (0, 1]"),
])
def test_bad_names_are_clear_errors_and_write_nothing(imagefolder: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture, extra: list[str],
                                                      message: str) -> None:
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "fit", *TINY, "--data-root", str(imagefolder), "--run-dir", str(run_dir), *extra)
    assert code == 2 and message in err
    assert not run_dir.exists()


def test_missing_dataset_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "fit", *TINY, "--data-root", str(tmp_path / "nowhere"), "--run-dir",
                       str(tmp_path / "run"))
    assert code == 2 and str(tmp_path / "nowhere") in err and "train" in err
    assert not (tmp_path / "run").exists()  # fixing --data-root and running the same command again just works


def test_fraction_leaving_a_class_empty(imagefolder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "fit", *TINY[:-2], "--fraction", "0.01", "--data-root", str(imagefolder),
                       "--run-dir", str(tmp_path / "run"))
    assert code == 2 and "keeps no image of class 0" in err and "fraction >=" in err
    assert not (tmp_path / "run").exists()


def test_corrupt_image_is_named(imagefolder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (imagefolder / "test" / "class_1" / "2.png").write_bytes(b"not an image")
    code, _, err = run(capsys, "fit", *TINY, "--data-root", str(imagefolder), "--run-dir", str(tmp_path / "run"))
    assert code == 2 and "test/class_1/2.png" in err
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()  # training's checkpoint survives


def test_resume_without_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "fit", "--resume", str(tmp_path))
    assert code == 2 and "no checkpoints/last.ckpt" in err


def test_list_datasets(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "list", "datasets")
    assert code == 0 and out.split() == ["aircraft", "cars", "cub200", "dtd", "fashion_mnist", "flowers102",
                                         "imagefolder", "pets"]


def test_parse_term() -> None:
    assert parse_term("fmr:beta=50,mode=provided,lambda_max=null") == {
        "name": "fmr", "args": {"beta": 50, "mode": "provided", "lambda_max": None}}
    assert parse_term("ce") == {"name": "ce", "args": {}}
    # lists keep their commas: DELTA's layers
    assert parse_term("delta:layers=[layer1.2.conv3,layer4.2.conv3],alpha=0.1,layers2=[-1]") == {
        "name": "delta", "args": {"layers": ["layer1.2.conv3", "layer4.2.conv3"], "alpha": 0.1, "layers2": [-1]}}
