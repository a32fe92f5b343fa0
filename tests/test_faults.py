"""Fault injection: each fault gives a clear error that says what to do, and nothing already written is lost.

Cases here: a training image that turns corrupt in the middle of training; the dataset folder that disappears
during a run; a full disk while a checkpoint is written; a regularizer whose set-up fails; a config or report
written while the disk fills; SIGTERM / SIGINT to a running `regtune fit` process. Elsewhere: NaN in the loss
(``tests/train/test_fit.py::test_nan_loss_stops_and_keeps_last_checkpoint``),
a missing dataset folder, a corrupt test image and a fraction that empties a class (``tests/test_cli.py``), a bench
grid killed between runs and inside a run (``tests/bench/test_grid.py::test_killed_grid_reruns_only_the_missing_runs``).
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from regtune.cli import main
from regtune.data.base import CorruptImageError
from regtune.regularizers import Regularizer, TrainStep, register_regularizer
from regtune.regularizers import base as reg_base
from regtune.train.callbacks import read_epoch_log
from regtune.train.config import FitConfig, TermSpec, load_config, save_config
from regtune.train.fit import fit
from tests.train.test_fit import tiny_config


class _AtEpochEnd(pl.Callback):
    """Runs ``action`` once, when epoch ``epoch`` (0-based) has ended and its checkpoints are written."""

    def __init__(self, epoch: int, action) -> None:
        self.epoch, self.action, self.done = epoch, action, False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch + 1 and not self.done:
            self.done = True
            self.action()


def _written(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory except the logs that grow, by relative path."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in ("epochs.csv", "steps.csv", "curves.png")}


def _last_epoch(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"]


def test_image_corrupted_during_training(imagefolder: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    victim = imagefolder / "train" / "class_2" / "3.png"
    original = victim.read_bytes()
    saved: dict[str, bytes] = {}

    def corrupt() -> None:
        saved.update(_written(run_dir))
        victim.write_bytes(b"\x89PNG truncated")

    with pytest.raises(CorruptImageError, match="class_2/3.png") as caught:
        fit(tiny_config(imagefolder, epochs=3), run_dir=run_dir, callbacks=[_AtEpochEnd(0, corrupt)])
    note = "\n".join(caught.value.__notes__)
    assert "stopped in epoch 2" in note and f"regtune fit --resume {run_dir}" in note
    assert _written(run_dir) == saved  # the first epoch's checkpoints, config and split are untouched
    assert _last_epoch(run_dir) == 0 and not (run_dir / "metrics.json").exists()
    # resuming before the file is fixed names it before any step, and says how to go on
    with pytest.raises(CorruptImageError, match="(?s)train/class_2/3.png.*Restore them .* --resume"):
        fit(run_dir=run_dir, resume=True)
    assert _written(run_dir) == saved
    # fixing the file and resuming finishes the run as if nothing had happened
    victim.write_bytes(original)
    resumed = fit(run_dir=run_dir, resume=True)
    clean = fit(tiny_config(imagefolder, epochs=3), run_dir=tmp_path / "clean")
    assert resumed.metrics["test_acc"] == clean.metrics["test_acc"]
    assert resumed.metrics["test_loss"] == clean.metrics["test_loss"]
    # the resumed run selects the clean run's checkpoint (regression: last.ckpt used to be written before the
    # best-checkpoint callback had seen its epoch, so a resumed run could keep another epoch on ties)
    assert resumed.metrics["selected_epoch"] == clean.metrics["selected_epoch"]
    assert resumed.metrics["best_val"] == clean.metrics["best_val"]


def test_dataset_folder_disappears_during_a_run(imagefolder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    from regtune.train import fit as fit_module

    run_dir = tmp_path / "run"
    moved = tmp_path / "moved"
    save_config(tiny_config(imagefolder, epochs=2), tmp_path / "config.yaml")
    real_fit = fit_module.fit

    def fit_while_the_folder_moves(*args, **kwargs):
        return real_fit(*args, callbacks=[_AtEpochEnd(0, lambda: shutil.move(imagefolder, moved))], **kwargs)

    # through the CLI: exit code 2, the error names the missing file, the note says how to continue
    monkeypatch.setattr(fit_module, "fit", fit_while_the_folder_moves)
    code = main(["fit", "--config", str(tmp_path / "config.yaml"), "--run-dir", str(run_dir)])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2 and str(imagefolder) in err and f"regtune fit --resume {run_dir}" in err
    assert _last_epoch(run_dir) == 0 and (run_dir / "split.json").is_file()
    shutil.move(moved, imagefolder)
    assert main(["fit", "--resume", str(run_dir)]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2


def test_disk_full_while_writing_a_checkpoint(imagefolder: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from fsspec.implementations.local import LocalFileOpener

    run_dir = tmp_path / "run"
    saved: dict[str, bytes] = {}
    real_write = LocalFileOpener.write

    def full_disk() -> None:
        saved.update(_written(run_dir))

        def write(self, data):  # half the bytes reach the disk, then it is full
            real_write(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(LocalFileOpener, "write", write)

    with pytest.raises(OSError, match="No space left") as caught:
        fit(tiny_config(imagefolder, epochs=3), run_dir=run_dir, callbacks=[_AtEpochEnd(0, full_disk)])
    monkeypatch.undo()
    assert "--resume" in "\n".join(caught.value.__notes__)
    # the checkpoints of epoch 1 are intact (not half-written) and no temporary file is left beside them
    assert _written(run_dir) == saved and _last_epoch(run_dir) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert fit(run_dir=run_dir, resume=True).metrics["epochs"] == 3


def test_regularizer_setup_failure_is_named(imagefolder: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reg_base, "_REGULARIZERS", dict(reg_base._REGULARIZERS))

    @register_regularizer("toy_broken_setup")
    class Broken(Regularizer):
        needs_setup_pass = True

        def setup(self, model: torch.nn.Module, loader: object) -> None:
            raise ValueError("statistics pass found no image of class 2")

        def forward(self, step: TrainStep) -> torch.Tensor:
            return step.features.sum() * 0

    base = tiny_config(imagefolder, epochs=2)
    config = FitConfig(data=base.data, model=base.model, optim=base.optim, trainer=base.trainer,
                       regularizers=(TermSpec("toy_broken_setup"),))
    with pytest.raises(RuntimeError, match="setup of regularizer 'toy_broken_setup' failed: statistics pass") as c:
        fit(config, run_dir=tmp_path / "run")
    assert "before its first checkpoint" in "\n".join(c.value.__notes__)
    assert load_config(tmp_path / "run" / "config.yaml") == config  # what was written stays, readable
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    assert read_epoch_log(tmp_path / "run" / "epochs.csv") == []


def test_config_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    save_config(FitConfig(), path)
    before = path.read_bytes()

    def die(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("regtune._io.os.replace", die)
    with pytest.raises(OSError):
        save_config(tiny_config(tmp_path, epochs=7), path)
    assert path.read_bytes() == before  # the old config, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # and no temporary file left


def test_reports_are_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from regtune._io import atomic_write_json

    path = atomic_write_json(tmp_path / "metrics.json", {"test_acc": 0.5})
    real_write = __import__("io").TextIOWrapper.write

    def half_then_full(self, text):
        real_write(self, text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    # The handle is the writer's to close (it wraps the real one): no context manager here.
    monkeypatch.setattr("regtune._io.open", lambda *a, **k: _HalfWriter(open(*a, **k), half_then_full),  # noqa: SIM115
                        raising=False)
    with pytest.raises(OSError, match="No space"):
        atomic_write_json(path, {"test_acc": 0.75, "padding": "x" * 1000})
    assert json.loads(path.read_text()) == {"test_acc": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


class _HalfWriter:
    """A file whose ``write`` is replaced (a disk that fills up in the middle of a write)."""

    def __init__(self, handle, write) -> None:
        self.handle, self._write = handle, write

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()

    def write(self, text: str) -> None:
        self._write(self.handle, text)

    def flush(self) -> None:
        self.handle.flush()

    def fileno(self) -> int:
        return self.handle.fileno()


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_signal_mid_run_stops_cleanly_and_resumes_to_the_same_result(imagefolder: Path, tmp_path: Path,
                                                                     signal_name: str) -> None:
    """A real `regtune fit` process gets SIGTERM / SIGINT after its first epoch's checkpoint: it exits with 130 and
    the resume hint, and `--resume` ends with the metrics of a run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    config = tiny_config(imagefolder, epochs=25)  # long enough to be signalled in the middle
    save_config(config, tmp_path / "config.yaml")
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "regtune.cli", "fit", "--config", str(tmp_path / "config.yaml"),
                                "--run-dir", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").is_file() and time.time() < deadline:
        time.sleep(0.2)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file(), process.communicate(timeout=60)[0][-2000:]
    process.send_signal(getattr(signal, signal_name))
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-2000:]
    assert f"resume with: regtune fit --resume {run_dir}" in output
    assert not (run_dir / "metrics.json").exists() and _last_epoch(run_dir) < 24
    if signal_name == "SIGINT":
        return  # the same stop as SIGTERM; the comparison below is made once
    resumed = fit(run_dir=run_dir, resume=True)
    clean = fit(config, run_dir=tmp_path / "clean")
    for key in ("test_acc", "test_loss", "selected_epoch", "best_val"):
        assert resumed.metrics[key] == clean.metrics[key], key
