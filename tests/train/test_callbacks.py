"""Callbacks: epochs counted from 1 in the logs (older 0-based logs renumbered), the epoch line, atomic writes, and
the seeds drawn from regtune.data.seeds."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from regtune.data.seeds import epoch_seed, order_seed, sample_seed
from regtune.data.transforms import TransformedSubset
from regtune.train.callbacks import EpochLog, EpochSeed, SetupArtifacts, StepLog, _write_csv, read_epoch_log
from regtune.train.datamodule import EpochShuffle

OLD_LOG = "epoch,step,time_s,train/loss\n0,3,1.5,0.9\n1,6,1.25,0.7\n2,9,1.0,0.5\n"  # as runs wrote it until now


def test_a_0_based_log_of_an_older_run_is_read_counted_from_1(tmp_path: Path) -> None:
    (tmp_path / "epochs.csv").write_text(OLD_LOG)
    rows = read_epoch_log(tmp_path / "epochs.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["step"] for r in rows] == [3, 6, 9]
    assert rows[1] == {"epoch": 2, "step": 6, "time_s": 1.25, "train/loss": 0.7}
    (tmp_path / "new.csv").write_text(OLD_LOG.replace("\n0,", "\n3,"))  # epochs 3, 1, 2: no 0, taken as they are
    assert [r["epoch"] for r in read_epoch_log(tmp_path / "new.csv")] == [3, 1, 2]


def test_resuming_an_older_run_renumbers_its_log_and_drops_the_unfinished_epochs(tmp_path: Path) -> None:
    (tmp_path / "epochs.csv").write_text(OLD_LOG)
    (tmp_path / "steps.csv").write_text("epoch,step,train/loss\n0,1,1.0\n0,2,0.9\n1,3,0.8\n1,4,0.7\n")
    trainer = SimpleNamespace(current_epoch=2, global_step=3)  # two epochs finished; a checkpoint of step 3
    EpochLog(tmp_path / "epochs.csv").on_train_start(trainer, None)
    StepLog(tmp_path / "steps.csv").on_train_start(trainer, None)
    assert (tmp_path / "epochs.csv").read_text().splitlines() == [
        "epoch,step,time_s,train/loss", "1,3,1.5,0.9", "2,6,1.25,0.7"]
    assert [(r["epoch"], r["step"]) for r in read_epoch_log(tmp_path / "steps.csv")] == [(1, 1), (1, 2), (2, 3)]


def test_epoch_line_leads_with_the_criterion_and_labels_the_total() -> None:
    row = {"epoch": 3, "time_s": 12.34, "lr/backbone": 0.02, "train/loss": -289.9, "train/ce": 0.41,
           "train/acc": 0.8, "val/loss": 0.5, "val/acc": 0.75}
    assert EpochLog._line(row, 15, criterion="ce", regularized=True) == (
        "epoch   3/15  train ce 0.4100 (total incl. regularizers -289.9000) acc 0.8000  val loss 0.5000 acc 0.7500  "
        "lr 2.00e-02  12.3s")
    plain = {k: v for k, v in row.items() if k != "train/ce"} | {"train/loss": 0.41}  # no regularizer: loss = ce
    assert EpochLog._line(plain, 15, criterion="ce", regularized=False).startswith(
        "epoch   3/15  train ce 0.4100 acc 0.8000  val loss")


def test_logs_are_replaced_whole_through_the_atomic_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "epochs.csv"
    _write_csv(path, [{"epoch": 1, "step": 3}])
    before = path.read_text()

    def die(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("regtune._io.os.replace", die)
    with pytest.raises(OSError, match="disk full"):
        _write_csv(path, [{"epoch": 1, "step": 3}, {"epoch": 2, "step": 6}])
    term = SimpleNamespace(artifacts=lambda: {"relationship": torch.ones(2, 3)})
    with pytest.raises(OSError, match="disk full"):
        SetupArtifacts(tmp_path / "setup").on_train_start(SimpleNamespace(is_global_zero=True),
                                                          SimpleNamespace(regularizers={"co_tuning": term}))
    assert path.read_text() == before and sorted(p.name for p in tmp_path.rglob("*")) == ["epochs.csv", "setup"]
    monkeypatch.undo()
    SetupArtifacts(tmp_path / "setup").on_train_start(SimpleNamespace(is_global_zero=True),
                                                      SimpleNamespace(regularizers={"co_tuning": term}))
    torch.testing.assert_close(torch.load(tmp_path / "setup" / "co_tuning.pt")["relationship"], torch.ones(2, 3))


def test_epoch_seed_seeds_the_global_generators() -> None:
    EpochSeed(seed=3).on_train_epoch_start(SimpleNamespace(current_epoch=4), None)
    drawn = random.random(), np.random.rand(), torch.initial_seed()
    assert drawn == (random.Random(epoch_seed(3, 4)).random(), np.random.RandomState(epoch_seed(3, 4)).rand(),
                     epoch_seed(3, 4))


def test_training_order_and_worker_seeds_come_from_the_seeds_module() -> None:
    sampler = EpochShuffle(20, seed=3)
    sampler.set_epoch(2)
    assert sampler.generator.initial_seed() == epoch_seed(3, 2)  # the DataLoader's worker base seeds
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(order_seed(3, 2))).tolist()
    assert [i for _, i in sampler] == expected


def test_augmentation_is_seeded_with_the_sample_seed() -> None:
    data = TransformedSubset([(0, 0)] * 5, range(5), lambda _: torch.initial_seed(), seed=5)
    assert data[(1, 3)][0] == sample_seed(5, 1, 3)
