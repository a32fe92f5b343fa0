"""Callbacks: per-epoch reseeding (exact resume), the per-epoch CSV log and one line per epoch."""

from __future__ import annotations

import csv
import io
import logging
import math
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from regtune._io import atomic_write_bytes, atomic_write_text
from regtune.data.seeds import epoch_seed

__all__ = [
    "EpochLog",
    "EpochSeed",
    "MidEpochResume",
    "Preemption",
    "SetupArtifacts",
    "StepLog",
    "StopWhen",
    "read_epoch_log",
    "rng_state",
    "set_rng_state",
    "sigterm_handled",
]

_log = logging.getLogger(__name__)


class EpochSeed(pl.Callback):
    """Reseed torch, NumPy and ``random`` at the start of every training epoch.

    An epoch's data order, augmentation and dropout then depend only on ``(seed, epoch)``, not on what ran before
    it (validation loaders, a sanity check, a restart), so a run resumed from the checkpoint of epoch k continues
    exactly as the uninterrupted run did. The seed is `regtune.data.seeds.epoch_seed`.
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


def rng_state() -> dict[str, Any]:
    """The global generators' states: Python's ``random``, NumPy's, torch's CPU and (when used) CUDA's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain types and tensors only: checkpoints load with torch.load(weights_only=True).
    state: dict[str, Any] = {"python": random.getstate(),
                             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                       float(gauss)),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class MidEpochResume(pl.Callback):
    """Make a checkpoint written in the middle of an epoch resume exactly where it stopped.

    With the per-sample augmentation seeds of `TransformedSubset`, the data of a
    batch depends only on ``(seed, epoch, items)``, and the global generators carry only what the model draws
    (dropout, random-feature draws). So the state of an epoch after ``k`` batches is: the weights, optimizer and
    regularizer state (in the checkpoint already), Lightning's batch count, and the global generators' state after
    batch ``k``, which this callback records at every batch end and stores in the checkpoint. On a restart in the
    middle of an epoch it restores those generators and makes the training sampler skip the ``k`` batches already
    trained on (Lightning's loop continues its count at ``k``). Must come after `EpochSeed`.
    """

    def __init__(self) -> None:
        self._rng: dict[str, Any] | None = None
        self._restore: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._rng = rng_state()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rng = None  # an end-of-epoch checkpoint restarts at the next epoch's seed

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng} if self._rng is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore = state_dict.get("rng")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restore, self._restore = self._restore, None
        if not trainer.fit_loop.restarted_mid_epoch:
            return
        if restore is None:
            raise RuntimeError(
                "this checkpoint was written in the middle of an epoch without regtune's random-generator state "
                "(MidEpochResume), so the epoch cannot be continued exactly; resume from an end-of-epoch checkpoint"
            )
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if not hasattr(sampler, "resume"):
            raise RuntimeError(f"a mid-epoch restart needs regtune's EpochShuffle sampler, not {type(sampler)}")
        sampler.resume(trainer.current_epoch, done * loader.batch_size)
        set_rng_state(restore)
        _log.info("resuming epoch %d after batch %d", trainer.current_epoch + 1, done)


def _batches_done_mid_epoch(trainer: pl.Trainer) -> int:
    """Training batches done in the current epoch when it is partly trained; 0 before its first batch or once all
    its batches are done (its end-of-epoch hooks and checkpoints then belong to the epoch, not to a restart)."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    return done if 0 < done < trainer.num_training_batches else 0


def sigterm_handled() -> bool:
    """Whether a handler listens for SIGTERM (a training's, Lightning's): raising it then asks for the end-of-batch
    stop, where its default action would kill the process."""
    return signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)


class Preemption(pl.Callback):
    """On SIGTERM (or a first Ctrl-C) stop at the end of the current training batch and save a resumable checkpoint.

    Lightning sets its SIGTERM flag and raises at the end of the batch; this callback then writes ``path`` (the
    run's ``last.ckpt``) with the loop's batch count and `MidEpochResume`'s state, so ``regtune fit --resume``
    continues with the next batch. A stop while an epoch validates lets Lightning finish that epoch (its logs and
    end-of-epoch checkpoint) and stop there; any other error saves nothing here. Use `sigint_handler` for
    Ctrl-C: the first press asks for the same stop, a second one interrupts at once.

    Args:
        path: The checkpoint to write.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.saved_at: tuple[int, int] | None = None  # (epoch, batches done) of the checkpoint written, if any
        self._pressed = False

    def sigint_handler(self, signum: int, frame: Any) -> None:
        if self._pressed or not sigterm_handled():
            raise KeyboardInterrupt  # a second press, or no trainer is listening: stop now
        self._pressed = True
        _log.warning("stopping at the end of this batch (press Ctrl-C again to stop at once)")
        signal.raise_signal(signal.SIGTERM)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or not trainer.training or trainer.sanity_checking:
            return
        done = _batches_done_mid_epoch(trainer)
        if not done:
            # Nothing trained in this epoch yet; or all of it, with its end-of-epoch hooks (logs, checkpoints) not
            # run: the last end-of-epoch checkpoint stays, and a resume trains this epoch again to the same result.
            return
        trainer.save_checkpoint(self.path)
        self.saved_at = (trainer.current_epoch, done)
        _log.warning("stopped in epoch %d after batch %d of %d; checkpoint saved to %s", trainer.current_epoch + 1,
                     done, trainer.num_training_batches, self.path)


class StopWhen(pl.Callback):
    """Ask for the SIGTERM stop (`Preemption`: end of this batch, resumable checkpoint) once ``stop()`` answers true.

    A scheduler's signal that arrives before the training loop listens (while the data, the linear probe or the
    first batch are set up) would otherwise be lost with Lightning's flag, which it resets when training starts;
    the caller remembers it, and this asks again at the start of every training batch until the stop is honoured.

    Args:
        stop: Whether a stop was asked for (`regtune.cluster`'s signal handler records it).
    """

    def __init__(self, stop: Callable[[], bool]) -> None:
        self.stop = stop
        self._warned = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self.stop() or trainer.received_sigterm:
            return
        if not sigterm_handled():
            # Lightning listens only in the main thread; SIGTERM's default action would kill the process
            if not self._warned:
                _log.warning("a stop was asked for, but no SIGTERM handler listens (not the main thread): the run "
                             "goes on to its end")
                self._warned = True
            return
        signal.raise_signal(signal.SIGTERM)  # Lightning's handler sets its flag; the batch ends, then it stops


class EpochLog(pl.Callback):
    """Append one row per epoch to ``path`` (CSV) and log one line per epoch.

    Rows hold the epoch (counted from 1, as on the console and in ``metrics.json``'s ``selected_epoch``; Lightning's
    ``current_epoch`` and its checkpoints' ``epoch`` are that minus 1), the step, wall time of the epoch, each
    group's learning rate and every epoch-level metric. On resume, rows of epochs at or after the restored epoch are
    dropped first, so the file never holds an epoch twice. Each write replaces the file atomically.

    The line leads with the criterion's training loss (``train ce 0.41``); with regularizers the total that was
    minimised follows, labelled (``total incl. regularizers -289.9``): it can be negative (FMR adds a negative
    entropy), which is right but reads as a bug when shown as "the loss".

    Args:
        path: The CSV file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._start = 0.0
        self._carried = 0.0  # seconds the epoch had run before a mid-epoch checkpoint that this run resumes from

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after a resumed run's checkpoint is restored, so current_epoch is the next epoch to train.
        written = _read_csv(self.path)
        # current_epoch (0-based) is the number of finished epochs. A log of an older run (0-based) is renumbered.
        kept = [r for r in _one_based(written) if int(r["epoch"]) <= trainer.current_epoch]
        if kept != written:
            _write_csv(self.path, kept)
        # An epoch resumed in its middle counts the time it had run before the interruption (the restart's own
        # costs are left out). Lightning does not call on_train_epoch_start for that epoch again.
        self._start = time.perf_counter() - self._carried
        self._carried = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        mid_epoch = _batches_done_mid_epoch(trainer) > 0
        checkpoint["regtune_epoch_elapsed_s"] = time.perf_counter() - self._start if mid_epoch else 0.0

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._carried = float(checkpoint.get("regtune_epoch_elapsed_s", 0.0))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The module's own training means (every process takes part in their reduction).
        means = pl_module.epoch_means() if hasattr(pl_module, "epoch_means") else {}
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        row: dict[str, Any] = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step,
                               "time_s": round(time.perf_counter() - self._start, 3)}
        for group in trainer.optimizers[0].param_groups:
            row[f"lr/{group.get('name', 'group')}"] = group["lr"]
        values = {k.removesuffix("_epoch"): float(v) for k, v in trainer.callback_metrics.items()
                  if not k.endswith("_step")}
        values.update(means)
        row.update(sorted(values.items()))
        rows = read_epoch_log(self.path) + [row]
        _write_csv(self.path, rows)
        _log.info(self._line(row, trainer.max_epochs, criterion=getattr(pl_module, "criterion_name", "loss"),
                             regularized=bool(getattr(pl_module, "regularizers", None))))

    @staticmethod
    def _line(row: dict[str, Any], epochs: int | None, criterion: str = "loss", regularized: bool = False) -> str:
        """``epoch k/N  train <criterion> x [(total incl. regularizers y)] acc a  val loss v acc w  lr r  t s``."""
        def get(key: str) -> str:
            value = row.get(key)
            return "  -   " if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

        lr = row.get("lr/backbone", next((v for k, v in row.items() if k.startswith("lr/")), float("nan")))
        # Without regularizers the module logs the criterion only as the total (train/loss): the same number.
        headline = f"train/{criterion}" if regularized and f"train/{criterion}" in row else "train/loss"
        total = f" (total incl. regularizers {get('train/loss')})" if headline != "train/loss" else ""
        return (f"epoch {row['epoch']:>3}/{epochs}  train {criterion} {get(headline)}{total} acc {get('train/acc')}  "
                f"val loss {get('val/loss')} acc {get('val/acc')}  lr {lr:.2e}  {row['time_s']:.1f}s")


class StepLog(pl.Callback):
    """Per-step values of every logged term (the module's ``step_values``: ``train/<name>``, its stats) in a CSV,
    written once per epoch.

    Rows are kept in memory during an epoch and appended at its end (no file I/O in the step loop). Their ``epoch``
    counts from 1, as in ``epochs.csv``. On resume, rows after the restored step are dropped first.

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
        written = _read_csv(self.path)
        kept = [r for r in _one_based(written) if int(r["step"]) <= trainer.global_step]
        if kept != written:
            _write_csv(self.path, kept)
        self._rows = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps or not trainer.is_global_zero:
            return
        row: dict[str, Any] = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
        # detached tensors and floats; GPU values stay there until the epoch's end (reading one now makes the host wait)
        row.update(pl_module.step_values)
        self._rows.append(row)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._rows:
            _write_csv(self.path, read_epoch_log(self.path) + _on_host(self._rows))
            self._rows = []

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Rows of the steps trained before a stop (a resume drops any after its checkpoint's step).
        self.on_train_epoch_end(trainer, pl_module)


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
            buffer = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in artifacts.items()}, buffer)
            atomic_write_bytes(path, buffer.getvalue())
            _log.info("set-up of %s written to %s", name, path)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (union of their keys as the header) atomically (`regtune._io.atomic_write_text`)."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """The rows as written (values as floats, ``epoch`` and ``step`` as ints); empty if the file is absent."""
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


def _on_host(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with their tensor values as Python floats, read from each device in one transfer."""
    slots = [(i, k, v) for i, row in enumerate(rows) for k, v in row.items() if isinstance(v, torch.Tensor)]
    out = [dict(row) for row in rows]
    for device in {v.device for _, _, v in slots}:
        mine = [(i, k, v) for i, k, v in slots if v.device == device]
        values = torch.stack([v.reshape(()).to(torch.float64) for _, _, v in mine]).tolist()
        for (i, k, _), value in zip(mine, values):
            out[i][k] = value
    return out


def _one_based(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with epochs counted from 1: a log holding an epoch 0 was written counting from 0 and is shifted."""
    if not any(r.get("epoch") == 0 for r in rows):
        return rows
    return [{**r, "epoch": r["epoch"] + 1} if "epoch" in r else r for r in rows]


def read_epoch_log(path: str | Path) -> list[dict[str, Any]]:
    """Rows of ``epochs.csv`` or ``steps.csv`` (values as floats, ``epoch`` and ``step`` as ints), epochs counted
    from 1; empty if the file is absent.

    Runs written before epochs were counted from 1 everywhere have 0-based epochs; such a log always holds an epoch
    0 (its first epoch's row, kept through any resume), which never occurs in a 1-based log, so its epochs are
    shifted by one here. One case cannot be told apart: an old ``steps.csv`` that keeps fewer than one row per
    epoch (``log_every_n_steps`` above the batches of an epoch) may lack epoch 0, and is then read as it is.
    """
    return _one_based(_read_csv(Path(path)))
