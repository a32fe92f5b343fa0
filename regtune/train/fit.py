"""One fine-tuning run, end to end: data, split, model, Lightning ``Trainer``, test of the selected checkpoint.

Every run writes one directory::

    config.yaml      resolved config (``regtune fit --config config.yaml`` reproduces the run)
    split.json       item ids of the training subset and the validation carve-out
    epochs.csv       one row per epoch: losses, accuracies, every logged term, learning rates, time
    steps.csv        one row per step (or every n steps): the loss, every term and every regularizer statistic
    checkpoints/     last.ckpt (every epoch) and best.ckpt (selected checkpoint)
    setup/           what regularizers computed before training (Co-Tuning's relationship, DELTA's attention)
    metrics.json     final numbers (written last: its presence marks a finished run)
    curves.png       learning curves
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

import regtune
from regtune._io import atomic_write_json
from regtune.analysis.plots import plot_learning_curves
from regtune.data.datasets import build_dataset, dataset_source_hint
from regtune.data.subset import split_from_manifest, stratified_split, write_manifest
from regtune.data.transforms import build_transforms
from regtune.models import check_backbone_name, create_backbone, data_config
from regtune.regularizers import create_criterion, create_regularizer
from regtune.train.callbacks import (EpochLog, EpochSeed, MidEpochResume, Preemption, SetupArtifacts, StepLog,
                                     read_epoch_log)
from regtune.train.config import FitConfig, load_config, save_config
from regtune.train.datamodule import FineTuneData
from regtune.train.module import FineTuner, NonFiniteLossError

__all__ = ["fit", "RunDirError", "FitResult", "default_run_dir"]

_log = logging.getLogger(__name__)

_RUN_DIR_ENV = "REGTUNE_RUN_DIR"  # process 0's run directory, for the DDP processes launched after it

_SELECT = {  # select mode -> (monitored metric, mode, what the results call it)
    "val_acc": ("val/acc", "max", "best validation accuracy (held-out split of the training subset)"),
    "val_loss": ("val/loss", "min", "lowest validation loss (held-out split of the training subset)"),
    "test_acc": ("val/acc", "max", "best TEST accuracy over epochs (papers' protocol, optimistic: the test set chose "
                                   "the checkpoint)"),
    "last": (None, "max", "last epoch"),
}


class RunDirError(FileExistsError):
    """The run directory holds a run that this call would overwrite, or no run to resume."""


@dataclass
class FitResult:
    """Where a run went and what it measured."""

    run_dir: Path
    metrics: dict[str, Any]
    interrupted: bool = False


def default_run_dir(config: FitConfig, root: str | Path = "runs") -> Path:
    """``runs/<dataset>-<backbone>-<terms>-s<seed>-<timestamp>``."""
    terms = "+".join(r.name for r in config.regularizers) or "ft"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{config.data.dataset}-{config.model.backbone}-{terms}-s{config.trainer.seed}-{stamp}"


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    finished = (run_dir / "metrics.json").is_file()
    started = (run_dir / "config.yaml").is_file()
    if resume:
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            raise RunDirError(f"{run_dir} has no checkpoints/last.ckpt to resume from")
        if finished:
            raise RunDirError(f"{run_dir} holds a finished run (metrics.json); nothing to resume")
        return
    if finished or started:
        if not overwrite:
            what = "a finished run" if finished else "an unfinished run (resume it with --resume)"
            raise RunDirError(f"{run_dir} already holds {what}; choose another --run-dir, or pass --overwrite")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    # Lightning 2.6 with torch 2.14 warns about its own use of a deprecated torch pytree API on every fit/test.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
        # Frozen reference networks (DELTA's source copy, LwF's online teacher) stay in eval mode on purpose.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        # Resuming writes into the run's own checkpoint directory on purpose.
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        # regtune resumes mid-epoch itself (MidEpochResume: sampler position and generator state).
        warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")
        # Under DDP the module logs epoch values that are already sums and counts reduced over the processes
        # (FineTuner._eval_sums, its epoch sums), so Lightning's own sync_dist would average equal numbers.
        warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(.*sync_dist=True\)`")
        # Lightning's all_gather still goes through the deprecated torch.distributed.nn.functional.all_gather.
        warnings.filterwarnings("ignore", message=r"torch.distributed.nn.functional.all_gather is deprecated")
        yield


@contextlib.contextmanager
def _no_uninitialized_fill() -> Iterator[None]:
    """Deterministic kernels without PyTorch's NaN-filling of every new uninitialised tensor.

    Under ``torch.use_deterministic_algorithms(True)`` (``trainer.deterministic``), PyTorch also fills each
    ``torch.empty`` result with NaN (``torch.utils.deterministic.fill_uninitialized_memory``), which is a quarter of a
    CPU training step of EfficientNet-Lite0 (profiled: ``aten::fill_`` 0.89 s of 3.56 s). It only changes what a
    kernel that reads memory it never wrote would see; the deterministic kernel choice stays, and the tests of
    same-seed reproducibility and of resume = uninterrupted pass with it off.
    """
    import torch.utils.deterministic

    previous = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = previous


def _workers(requested: int | None) -> int:
    if requested is not None:
        return requested
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores - 1)




def fit(
        config: FitConfig | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        callbacks: Sequence[pl.Callback] = (),
) -> FitResult:
    """Fine-tune, select a checkpoint, test it once, and write the run directory.

    Args:
        config: The run's settings; ``None`` uses the defaults (or, with ``resume``, the run's own config).
        run_dir: Output directory; ``None`` makes a new one under ``runs/``.
        resume: Continue the interrupted run in ``run_dir`` from its ``last.ckpt`` (the config is read from there).
        overwrite: Replace a run already in ``run_dir``.
        callbacks: Extra Lightning callbacks (progress hooks, tests).

    Returns:
        The :class:`FitResult`; ``interrupted`` is true when the run was stopped (Ctrl-C) before its end, in which
        case no metrics are written and ``regtune fit --resume`` continues it.

    Raises:
        RunDirError: ``run_dir`` holds a run and neither ``resume`` nor ``overwrite`` was given.
        NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is kept.
    """
    started = time.perf_counter()
    launched = os.environ.get(_RUN_DIR_ENV)
    # Started by an outside launcher (torchrun, SLURM's srun, ...): every process runs this same call at once, and a
    # default run directory (timestamped) could differ between them.
    external = launched is None and (int(os.environ.get("WORLD_SIZE", "1")) > 1 or rank_zero_only.rank > 0)
    if external and run_dir is None:
        raise RunDirError("this process was started by a launcher (torchrun, srun: WORLD_SIZE or RANK is set), so "
                          "every process needs the same run directory: pass --run-dir")
    if resume:
        if run_dir is None:
            raise RunDirError("--resume needs the run directory to continue")
        run_dir = Path(run_dir).absolute()
        _prepare_run_dir(run_dir, resume=True, overwrite=False)
        config = load_config(run_dir / "config.yaml")
    else:
        config = config or FitConfig()
    pl.seed_everything(config.trainer.seed, workers=True, verbose=False)
    # Names are checked before anything is written, so a typo costs no run directory.
    dataset_source_hint(config.data.dataset)
    check_backbone_name(config.model.backbone)
    criterion = create_criterion(config.criterion.name, **config.criterion.args)
    regularizers = [create_regularizer(r.name, **r.args) for r in config.regularizers]
    d, t = config.data, config.trainer
    # Data and split come before the run directory too: a missing folder or an empty class leaves nothing behind.
    train_set = build_dataset(d.dataset, d.root, "train", download=d.download)
    test_set = build_dataset(d.dataset, d.root, "test", download=d.download)
    if list(train_set.classes) != list(test_set.classes):
        raise ValueError(f"{d.dataset}: train and test splits have different classes")
    if resume or d.split_manifest:
        split = split_from_manifest(run_dir / "split.json" if resume else d.split_manifest, train_set.ids, d.dataset)
    else:
        split = stratified_split(train_set.targets, train_set.num_classes, fraction=d.fraction,
                                 per_class=d.per_class, val_fraction=d.val_fraction, seed=t.seed,
                                 class_names=train_set.classes)
    if t.select in ("val_acc", "val_loss") and not split.val:
        raise ValueError(
            f"selection by {t.select} needs a validation split, but val_fraction={d.val_fraction} holds out no image "
            f"of the {len(split.train)} training images (at most floor(val_fraction x images of a class) per class). "
            "Raise data.val_fraction, use more data, or --select last."
        )
    backbone = create_backbone(config.model.backbone, train_set.num_classes, pretrained=config.model.pretrained,
                               head_init=config.model.head_init, drop_rate=config.model.drop_rate)
    for term in regularizers:
        if term.needs_source_head:
            term.attach_source_head(backbone.source_head)
    preprocessing = data_config(backbone.model, d.img_size)
    if d.crop_pct is not None:
        preprocessing["crop_pct"] = d.crop_pct
    train_tf, eval_tf = build_transforms(preprocessing, scale=d.scale, hflip=d.hflip,
                                         color_jitter=d.color_jitter, auto_augment=d.auto_augment)
    datamodule = FineTuneData(train_set, test_set, split, train_tf, eval_tf, batch_size=d.batch_size,
                              eval_batch_size=d.eval_batch_size, num_workers=_workers(d.num_workers),
                              validate_on_test=t.select == "test_acc", seed=t.seed)
    # Terms adapt the model here (snapshots, copies, layer swaps): a missing source head fails before any run
    # directory exists.
    module = FineTuner(backbone.model, criterion, regularizers, config.optim, train_set.num_classes,
                       setup_loader=datamodule.setup_dataloader, train_loader=datamodule.train_dataloader,
                       channels_last=t.channels_last, feature_stats=t.feature_stats)
    datamodule.with_index = module.needs_indices
    module.resuming = resume

    if launched is not None and rank_zero_only.rank > 0:
        # A process that Lightning's DDP launcher started by running the same command again: the run directory is
        # the one process 0 prepared (its name may hold a timestamp), and only process 0 writes there.
        run_dir = Path(launched)
    elif external and rank_zero_only.rank > 0:
        run_dir = Path(run_dir).absolute()  # process 0 of the launch prepares it; this one only reads
    elif not resume:
        # Absolute, because Lightning reports checkpoint paths absolute.
        run_dir = (Path(run_dir) if run_dir is not None else default_run_dir(config)).absolute()
        _prepare_run_dir(run_dir, resume=False, overwrite=overwrite)
        save_config(config, run_dir / "config.yaml")
        write_manifest(run_dir / "split.json", split, train_set.ids, d.dataset)
    os.environ[_RUN_DIR_ENV] = str(run_dir)  # inherited by the processes the launcher starts

    monitor, mode, selection = _SELECT[t.select]
    ckpt_dir = run_dir / "checkpoints"
    last_ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, monitor=None,
                                save_on_train_epoch_end=True, enable_version_counter=False)
    best_ckpt = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                                save_on_train_epoch_end=True, enable_version_counter=False)
    preemption = Preemption(ckpt_dir / "last.ckpt")
    trainer = pl.Trainer(
        max_epochs=t.epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        precision=t.precision,
        deterministic=t.deterministic,
        logger=False,
        callbacks=[EpochSeed(t.seed), MidEpochResume(), EpochLog(run_dir / "epochs.csv"),
                   StepLog(run_dir / "steps.csv", t.log_every_n_steps), SetupArtifacts(run_dir / "setup"), preemption,
                   *callbacks, best_ckpt, last_ckpt],
        # best before last: last.ckpt then carries the best-checkpoint state *after* its epoch, so a resumed run
        # compares later epochs with the same best (and keeps the earlier one on ties) as an uninterrupted run.
        # EpochShuffle shards the training epoch across processes itself (and keeps its per-epoch order and
        # augmentation seeds); evaluation and set-up loaders use Shard.
        use_distributed_sampler=False,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0 if not split.val and t.select != "test_acc" else None,  # no validation images: no loop
        limit_train_batches=t.train_fraction if t.train_fraction < 1.0 else None,
        default_root_dir=str(run_dir),
    )
    _log.info("run directory: %s", run_dir)
    _log.info("%s/%s: %d train, %d val, %d test images, %d classes; backbone %s (weights: %s); input %s",
              d.dataset, "train", len(split.train), len(split.val), len(test_set), train_set.num_classes,
              backbone.name, backbone.weights, preprocessing["input_size"])
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    if main_thread:
        signal.signal(signal.SIGINT, preemption.sigint_handler)  # first Ctrl-C: stop after this batch, like SIGTERM
    try:
        with _quiet_lightning(), _no_uninitialized_fill():
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_dir / "last.ckpt") if resume else None)
    except SystemExit:
        # Lightning answers Ctrl-C by saving nothing further and calling sys.exit(1); a library call should return
        # instead, with the last epoch's checkpoint in place for --resume.
        if not trainer.interrupted:
            raise
    except NonFiniteLossError as err:
        last = ckpt_dir / "last.ckpt"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no epoch had finished, no checkpoint"
        raise NonFiniteLossError(
            f"{err}. Training stopped; {kept}. Lower the learning rate or the regularizer weights and start again "
            "(or --resume after fixing the cause)."
        ) from err
    except Exception as err:
        # A corrupt image, a dataset folder that went away, a full disk, a regularizer's failing set-up: the error
        # says what happened; this note says what is kept and how to go on. Nothing written so far is removed.
        last = ckpt_dir / "last.ckpt"
        err.add_note(
            f"training of {run_dir} stopped in epoch {trainer.current_epoch + 1}; the last checkpoint ({last}) is "
            f"kept: fix the cause and continue with `regtune fit --resume {run_dir}`" if last.is_file() else
            f"training of {run_dir} stopped before its first checkpoint; fix the cause and run the same command "
            "again with --overwrite"
        )
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, sigint)  # Lightning ignores further Ctrl-C while it shuts down
        rows = read_epoch_log(run_dir / "epochs.csv") if rank_zero_only.rank == 0 else []
        if rows:
            plot_learning_curves(rows, run_dir / "curves.png", title=f"{run_dir.name} ({t.select})")
    if trainer.interrupted:
        where = (f"in epoch {preemption.saved_at[0] + 1} after batch {preemption.saved_at[1]} (checkpoint saved)"
                 if preemption.saved_at else "at the last end-of-epoch checkpoint")
        _log.warning("interrupted %s; continue with: regtune fit --resume %s", where, run_dir)
        return FitResult(run_dir=run_dir, metrics={}, interrupted=True)

    train_time = time.perf_counter() - started
    selected = best_ckpt.best_model_path if monitor is not None else last_ckpt.last_model_path
    selected = selected or str(ckpt_dir / "last.ckpt")
    best_epoch = torch.load(selected, map_location="cpu", weights_only=False)["epoch"]
    with _quiet_lightning(), _no_uninitialized_fill():
        (result,) = trainer.test(module, datamodule=datamodule, ckpt_path=selected, verbose=False)
    metrics = {
        "test_acc": result["test/acc"],
        "test_loss": result["test/loss"],
        "test_mean_class_acc": result["test/mean_class_acc"],
        "test_class_acc": module.test_class_accuracy(),
        "selection": t.select,
        "selection_note": selection,
        "selected_epoch": int(best_epoch),
        "selected_checkpoint": str(Path(selected).relative_to(run_dir)),
        "best_val": float(best_ckpt.best_model_score) if best_ckpt.best_model_score is not None else None,
        "epochs": t.epochs,
        "num_train": len(split.train),
        "num_val": len(split.val),
        "num_test": len(test_set),
        "num_classes": train_set.num_classes,
        "dataset": d.dataset,
        "backbone": backbone.name,
        "weights": backbone.weights,
        "input_size": list(preprocessing["input_size"]),
        "preprocessing": {k: (list(v) if isinstance(v, tuple) else v) for k, v in preprocessing.items()},
        "regularizers": [r.name for r in config.regularizers],
        "criterion": config.criterion.name,
        "seed": t.seed,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "fit_time_s": round(train_time, 2),
        "resumed": resume,
        "versions": {"regtune": regtune.__version__, "torch": torch.__version__, "lightning": pl.__version__,
                     "python": platform.python_version()},
    }
    if t.select == "test_acc":
        _log.warning("selection on the TEST set (papers' protocol): test accuracy is optimistic")
    if trainer.is_global_zero:
        plot_learning_curves(read_epoch_log(run_dir / "epochs.csv"), run_dir / "curves.png",
                             title=f"{run_dir.name} ({t.select})", selected_epoch=int(best_epoch),
                             test_acc=metrics["test_acc"])
        atomic_write_json(run_dir / "metrics.json", metrics)
    _log.info("test accuracy %.4f (mean per class %.4f), checkpoint of epoch %d by %s; run directory %s",
              metrics["test_acc"], metrics["test_mean_class_acc"], best_epoch + 1, t.select, run_dir)
    return FitResult(run_dir=run_dir, metrics=metrics)
