"""The ``regtune`` command: a tiny end-to-end run, and one clear error per kind of bad input."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
from pathlib import Path

import pytest

from regtune.cli import main, parse_term
from regtune.train.callbacks import read_epoch_log
from tests.conftest import TINY_BACKBONE, write_imagefolder

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
    assert run_dir.name.startswith("imagefolder-test_efficientnet-wise_ft-s0-") and (run_dir / "metrics.json").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["selected_checkpoint"] == "checkpoints/best.ckpt"
    assert f"run directory: {run_dir}" in out


@pytest.mark.parametrize("extra, message", [
    (["--reg", "nosuch"], "unknown regularizer 'nosuch'"),
    (["--criterion", "nosuch"], "unknown criterion 'nosuch'; known: balanced_softmax, ce"),
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


def test_bad_images_are_all_named_before_training_and_the_advice_works(imagefolder: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    broken = [imagefolder / "test" / "class_1" / "2.png", imagefolder / "train" / "class_0" / "5.png",
              imagefolder / "train" / "class_2" / "0.png"]
    for path in broken:
        path.write_bytes(b"not an image")
    (imagefolder / "train" / "class_2" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    command = ["fit", *TINY, "--data-root", str(imagefolder), "--run-dir", str(tmp_path / "run")]
    code, _, err = run(capsys, *command)
    assert code == 2 and "3 image(s) of imagefolder" in err and "checked before training" in err
    for name in ("test/class_1/2.png", "train/class_0/5.png", "train/class_2/0.png"):
        assert f"{imagefolder / name}: " in err, name  # every bad file at once, by path, not the first a batch loads
    assert not (tmp_path / "run").exists()  # nothing written
    assert "Nothing has been written: replace or delete them and run the same command again" in err
    for path in broken:  # following the advice: delete them, the same command again
        path.unlink()
    code, _, _ = run(capsys, *command)
    assert code == 0 and (tmp_path / "run" / "metrics.json").is_file()


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
    # numbers as people type them: YAML 1.1 (PyYAML) would read 1e-3 as a string
    assert parse_term("delta:alpha=1e-3,beta=-2E+1,name=1e")["args"] == {"alpha": 0.001, "beta": -20.0, "name": "1e"}


def test_fit_help_groups_options_and_shows_the_config_defaults(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    headings = [line[:-1] for line in out.splitlines() if re.fullmatch(r"[a-z]+:", line)]
    assert headings == ["options", "data", "model", "optimisation", "regularization", "run"]
    help_text = " ".join(out.split())  # argparse wraps lines
    assert "--lr LR backbone learning rate (default: 0.002) [optim.lr]" in help_text
    assert ("--epochs EPOCHS training epochs (0: the linear probe alone, --recipe lp) (default: 15) "
            "[trainer.epochs]") in help_text
    assert "(default: None)" not in help_text


def test_a_flag_not_given_keeps_the_config_files_value(tmp_path: Path) -> None:
    from regtune.cli import _fit_config, build_parser

    config = tmp_path / "config.yaml"
    config.write_text("optim:\n  lr: 0.005\ntrainer:\n  epochs: 3\n")
    kept = _fit_config(build_parser().parse_args(["fit", "--config", str(config)]))
    assert kept.optim.lr == 0.005 and kept.trainer.epochs == 3
    given = _fit_config(build_parser().parse_args(["fit", "--config", str(config), "--lr", "0.1"]))
    assert given.optim.lr == 0.1 and given.trainer.epochs == 3


@pytest.mark.parametrize("argv, terminal, expected", [
    ([], False, False),  # output to a file or a pipe: per-epoch lines, no bar
    ([], True, True),  # a terminal: the config's value (a bar by default)
    (["--progress"], False, True),
    (["--no-progress"], True, False),
    (["--set", "trainer.progress_bar=true"], False, True),
])
def test_progress_bar_only_on_a_terminal_unless_asked(monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                                      terminal: bool, expected: bool) -> None:
    from regtune.cli import _fit_config, _progress_bar, build_parser

    monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal)  # where Lightning draws its bar
    args = build_parser().parse_args(["fit", *argv])
    config = _fit_config(args)
    chosen = _progress_bar(args)  # what fit() is given beside the config
    assert (config.trainer.progress_bar if chosen is None else chosen) is expected
    # where the output goes changes no result: the run's config does not record it
    assert config.trainer.progress_bar is (True if "--set" not in argv else expected)


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A 2-epoch run with a regularizer whose output goes to files, not a terminal: (run dir, stdout, stderr)."""
    root = tmp_path_factory.mktemp("piped")
    argv = [a for a in TINY if a != "--no-progress"]
    out, err = io.StringIO(), io.StringIO()  # not terminals: what `regtune fit ... > log 2>&1` writes to
    logger = logging.getLogger("regtune")  # main() configures it; a module-scoped fixture restores it itself
    saved = (list(logger.handlers), logger.propagate, logger.level)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["fit", *argv, "--epochs", "2", "--reg", "head_l2:weight=0.5", "--data-root",
                         str(write_imagefolder(root / "images")), "--run-dir", str(root / "run")])
    finally:
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
    assert code == 0, err.getvalue()
    return root / "run", out.getvalue(), err.getvalue()


def test_output_to_a_file_gets_plain_epoch_lines_led_by_the_criterion(piped_run: tuple[Path, str, str]) -> None:
    run_dir, out, err = piped_run
    assert "\r" not in out + err and "\x1b[" not in out + err  # no progress bar redrawn in the files
    lines = [line for line in err.splitlines() if "train ce" in line]
    assert [line.split()[2] for line in lines] == ["1/2", "2/2"], err
    rows = read_epoch_log(run_dir / "epochs.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    for line, row in zip(lines, rows):
        assert f"train ce {row['train/ce']:.4f} (total incl. regularizers {row['train/loss']:.4f})" in line
        assert row["train/loss"] > row["train/ce"]  # the head penalty adds to the criterion


def test_the_result_is_printed_once_with_epochs_counted_from_1(piped_run: tuple[Path, str, str]) -> None:
    run_dir, out, err = piped_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = read_epoch_log(run_dir / "epochs.csv")
    best = max(r["val/acc"] for r in rows)  # the checkpoint callback keeps the first epoch of the best (ties kept)
    assert metrics["selected_epoch"] == next(r["epoch"] for r in rows if r["val/acc"] == best)
    assert f"checkpoint of epoch {metrics['selected_epoch']}," in out
    assert out.count("test accuracy") == 1 and "test accuracy" not in err


def test_report_baseline_is_ft_else_the_default_recipe_else_asked_for() -> None:
    from types import SimpleNamespace

    from regtune.cli import _report_baseline

    def records(*methods: str) -> list[SimpleNamespace]:
        return [SimpleNamespace(method=m) for m in methods]

    assert _report_baseline(None, records("fmr", "ft", "wise_ft")) == "ft"
    assert _report_baseline(None, records("lp", "wise_ft", "lp")) == "wise_ft"  # the default's runs
    assert _report_baseline("lp", records("lp", "wise_ft")) == "lp"
    assert _report_baseline(None, records("lp", "lp")) == "lp"  # one method: nothing to compare
    with pytest.raises(ValueError, match="give --baseline NAME, one of a, b"):
        _report_baseline(None, records("a", "b"))
    with pytest.raises(ValueError, match="'ft' is not among the runs' methods: lp, wise_ft"):
        _report_baseline("ft", records("lp", "wise_ft"))
