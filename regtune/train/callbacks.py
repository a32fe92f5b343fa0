"""Callbacks: per-epoch reseeding (exact resume), the per-epoch CSV log and one line per epoch."""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

__all__ = ["EpochSeed", "EpochLog", "StepLog", "SetupArtifacts", "epoch_seed", "read_epoch_log"]

_log = logging.getLogger(__name__)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch: a fixed function of the run's seed and the epoch index."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**32)


class EpochSeed(pl.Callback):
    """Reseed torch, NumPy and ``random`` at the start of every training epoch.

    An epoch's data order, augmentation and dropout then depend only on ``(seed, epoch)``, not on what ran before
    it (validation loaders, a sanity check, a restart), so a run resumed from the checkpoint of epoch k continues
    exactly as the uninterrupted run did.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run resumed from a checkpoint written at the end of an epoch starts the next epoch without calling
        # on_train_epoch_start (Lightning treats it as restarting on that epoch's end), so seed here as well.
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed = epoch_seed(self.seed, trainer.current_epoch)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device
        # DataLoader workers derive their seeds from torch's generator when the iterator is created, after this hook.


class EpochLog(pl.Callback):
    """Append one row per epoch to ``path`` (CSV) and log one line per epoch.

    Rows hold the epoch, the step, wall time of the epoch, each group's learning rate and every epoch-level metric.
    On resume, rows of epochs at or after the restored epoch are dropped first, so the file never holds an epoch
    twice. Each write replaces the file atomically.

    Args:
        path: The CSV file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after a resumed run's checkpoint is restored, so current_epoch is the next epoch to train.
        rows = read_epoch_log(self.path)
        kept = [r for r in rows if int(r["epoch"]) < trainer.current_epoch]
        if len(kept) != len(rows):
            _write_csv(self.path, kept)
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        row: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step,
                               "time_s": round(time.perf_counter() - self._start, 3)}
        for group in trainer.optimizers[0].param_groups:
            row[f"lr/{group.get('name', 'group')}"] = group["lr"]
        for key, value in sorted(trainer.callback_metrics.items()):
            if key.endswith("_step"):
                continue
            row[key.removesuffix("_epoch")] = float(value)
        rows = read_epoch_log(self.path) + [row]
        _write_csv(self.path, rows)
        _log.info(self._line(row, trainer.max_epochs))

    @staticmethod
    def _line(row: dict[str, Any], epochs: int | None) -> str:
        def get(key: str) -> str:
            value = row.get(key)
            return "  -   " if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

        lr = row.get("lr/backbone", next((v for k, v in row.items() if k.startswith("lr/")), float("nan")))
        return (f"epoch {row['epoch'] + 1:>3}/{epochs}  train loss {get('train/loss')} acc {get('train/acc')}  "
                f"val loss {get('val/loss')} acc {get('val/acc')}  lr {lr:.2e}  {row['time_s']:.1f}s")

class StepLog(pl.Callback):
    """Per-step values of every logged term (``train/<name>_step``) in a CSV, written once per epoch.

    Rows are kept in memory during an epoch and appended at its end (no file I/O in the step loop). On resume, rows
    after the restored step are dropped first.

    Args:
        path: The CSV file.
        every_n_steps: Keep one row every this many steps.
    """

    def __init__(self, path: str | Path, every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self._rows: list[dict[str, Any]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = read_epoch_log(self.path)
        kept = [r for r in rows if int(r["step"]) <= trainer.global_step]
        if len(kept) != len(rows):
            _write_csv(self.path, kept)
        self._rows = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps or not trainer.is_global_zero:
            return
        row: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for key, value in trainer.callback_metrics.items():
            if key.endswith("_step"):
                row[key.removesuffix("_step")] = float(value)
        self._rows.append(row)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rows:
            _write_csv(self.path, read_epoch_log(self.path) + self._rows)
            self._rows = []


class SetupArtifacts(pl.Callback):
    """Write what the regularizers' set-up computed to ``<run_dir>/setup/<term>.pt`` once training starts.

    Co-Tuning's relationship, DELTA's channel attention: a person can inspect them, and pass the file to a later run
    (``relationship_file=`` / ``attention_file=``) to skip the computation.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for name, term in getattr(pl_module, "regularizers", {}).items():
            artifacts = term.artifacts()
            if not artifacts:
                continue
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{name}.pt"
            tmp = path.with_name(path.name + ".tmp")
            torch.save({k: v.detach().cpu() for k, v in artifacts.items()}, tmp)
            os.replace(tmp, path)
            _log.info("set-up of %s written to %s", name, path)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (union of their keys as the header) atomically: temporary file, then rename."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_epoch_log(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an epoch log (values as floats, ``epoch`` and ``step`` as ints); empty if the file is absent."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    out = []
    for row in rows:
        parsed: dict[str, Any] = {}
        for key, value in row.items():
            if value in ("", None):
                continue
            parsed[key] = int(value) if key in ("epoch", "step") else float(value)
        out.append(parsed)
    return out
