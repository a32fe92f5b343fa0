"""One fine-tuning run, end to end: data, split, model, Lightning ``Trainer``, test of the selected checkpoint.

`fit` runs in named steps: resolve the config, build the parts (data, split, model, terms, module), claim
the run directory, make the trainer, train, test the selected checkpoint, report. What the run directory holds is
described in `regtune.train.rundir`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from regtune._io import atomic_write_bytes, atomic_write_json
from regtune.analysis.imbalance import imbalance_metrics
from regtune.analysis.plots import plot_learning_curves
from regtune.data.base import CorruptImageError, ImageDataset, unreadable_images
from regtune.data.datasets import build_dataset
from regtune.data.subset import Split
from regtune.data.transforms import TransformedSubset, build_transforms
from regtune.models import create_backbone
from regtune.models.factory import Backbone
from regtune.regularizers import create_criterion, create_regularizer
from regtune.train.callbacks import (
    EpochLog,
    EpochSeed,
    MidEpochResume,
    Preemption,
    SetupArtifacts,
    StepLog,
    read_epoch_log,
)
from regtune.train.config import COSINE_HEAD_CRITERIA, PRIOR_ADJUSTED_CRITERIA, FitConfig, check_names
from regtune.train.datamodule import FineTuneData
from regtune.train.module import Evaluation, FineTuner, NonFiniteLossError
from regtune.train.rundir import (
    RunDir,
    RunDirError,
    default_run_dir,
    library_versions,
    make_split,
    run_preprocessing,
)

__all__ = ["FitResult", "RunDirError", "default_run_dir", "fit", "imbalance_advice", "train_class_counts"]

_log = logging.getLogger(__name__)

_RUN_DIR_ENV = "REGTUNE_RUN_DIR"  # process 0's run directory, for the DDP processes launched after it

_SELECT = {  # select mode -> (monitored metric, mode, what the results call it)
    "val_acc": ("val/acc", "max", "best validation accuracy (held-out split of the training subset)"),
    "val_loss": ("val/loss", "min", "lowest validation loss (held-out split of the training subset)"),
    "val_bal_acc": ("val/bal_acc", "max", ("best balanced validation accuracy, the mean per-class recall (held-out "
                                           "split of the training subset)")),
    "test_acc": ("val/acc", "max", ("best TEST accuracy over epochs (papers' protocol, optimistic: the test set "
                                    "chose the checkpoint)")),
    "last": (None, "max", "last epoch"),
}
_NEEDS_VAL = ("val_acc", "val_loss", "val_bal_acc")  # the selections made on the validation split


@dataclass
class FitResult:
    """Where a run went and what it measured."""

    run_dir: Path
    metrics: dict[str, Any]
    interrupted: bool = False


@dataclass
class _Parts:
    """What a run is built from, before any file is written."""

    train_set: ImageDataset
    test_set: ImageDataset
    split: Split
    backbone: Backbone
    preprocessing: dict[str, Any]
    datamodule: FineTuneData
    module: FineTuner


@dataclass
class _Trainer:
    """The Lightning trainer and the callbacks the later steps read."""

    trainer: pl.Trainer
    best: ModelCheckpoint
    last: ModelCheckpoint
    preemption: Preemption


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
        # FineTuner range-checks labels on the CPU in its own on_before_batch_transfer; the data module has none.
        warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningMod")
        # Lightning's all_gather still goes through the deprecated torch.distributed.nn.functional.all_gather.
        warnings.filterwarnings("ignore", message=r"torch.distributed.nn.functional.all_gather is deprecated")
        if "SLURM_JOB_ID" not in os.environ:
            # On a login node or a workstation with Slurm's client installed, a one-process run is right as it is;
            # inside a job the hint to start with srun stays (DDP needs it).
            warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not")
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


def _launched_externally() -> bool:
    """Started by an outside launcher (torchrun, SLURM's srun, ...): every process runs the same call at once."""
    return os.environ.get(_RUN_DIR_ENV) is None and (int(os.environ.get("WORLD_SIZE", "1")) > 1
                                                     or rank_zero_only.rank > 0)


def _resolve_config(config: FitConfig | None, run_dir: str | Path | None, resume: bool) -> FitConfig:
    """The run's config (a resumed run's own), its names checked before anything is written."""
    if _launched_externally() and run_dir is None:
        raise RunDirError("this process was started by a launcher (torchrun, srun: WORLD_SIZE or RANK is set), so "
                          "every process needs the same run directory: pass --run-dir")
    if resume:
        if run_dir is None:
            raise RunDirError("--resume needs the run directory to continue")
        run = RunDir(Path(run_dir).absolute())
        run.claim(resume=True)
        return run.config()
    config = config or FitConfig()
    check_names(config)
    return config


def _build_parts(config: FitConfig, resume_from: RunDir | None, test: bool = True) -> _Parts:
    """Data, split, backbone, terms and module; a missing folder or an empty class leaves no run directory behind.
    Without ``test`` the test images are never opened (a search's trials)."""
    d, t = config.data, config.trainer
    criterion = create_criterion(config.criterion.name, **config.criterion.args)
    regularizers = [create_regularizer(r.name, **r.args) for r in config.regularizers]
    train_set = build_dataset(d.dataset, d.root, "train", download=d.download)
    test_set = build_dataset(d.dataset, d.root, "test", download=d.download)
    if list(train_set.classes) != list(test_set.classes):
        raise ValueError(f"{d.dataset}: train and test splits have different classes")
    split = resume_from.split(train_set) if resume_from is not None else make_split(config, train_set)
    _check_images(train_set, test_set if test else None, split, resume_from)
    if t.select in _NEEDS_VAL and not split.val:
        raise ValueError(
            f"selection by {t.select} needs a validation split, but val_fraction={d.val_fraction} holds out no image "
            f"of the {len(split.train)} training images (at most floor(val_fraction x images of a class) per class). "
            "Raise data.val_fraction, use more data, or --select last."
        )
    backbone = create_backbone(config.model.backbone, train_set.num_classes, pretrained=config.model.pretrained,
                               head_init="normal" if config.model.head_init == "lp" else config.model.head_init,
                               drop_rate=config.model.drop_rate)  # the probe's head replaces the drawn one
    for term in regularizers:
        if term.needs_source_head:
            term.attach_source_head(backbone.source_head)
    preprocessing = run_preprocessing(backbone.model, config)
    train_tf, eval_tf = build_transforms(preprocessing, scale=d.scale, hflip=d.hflip, color_jitter=d.color_jitter,
                                         auto_augment=d.auto_augment, re_prob=d.re_prob)
    criterion.set_class_counts(torch.tensor(train_class_counts(train_set, split)))
    datamodule = FineTuneData(train_set, test_set, split, train_tf, eval_tf, batch_size=d.batch_size,
                              eval_batch_size=d.eval_batch_size, num_workers=_workers(d.num_workers),
                              validate_on_test=t.select == "test_acc", seed=t.seed,
                              with_index=any(term.needs_indices for term in regularizers),
                              pin_memory=t.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available())
    # Terms adapt the model here (snapshots, copies, layer swaps): a missing source head fails before any run
    # directory exists.
    module = FineTuner(backbone.model, criterion, regularizers, config.optim, train_set.num_classes,
                       setup_loader=datamodule.setup_dataloader, train_loader=datamodule.train_dataloader,
                       channels_last=t.channels_last, feature_stats=t.feature_stats, resuming=resume_from is not None,
                       mixup=_mixup(config, train_set.num_classes), seed=t.seed, ema_decay=t.ema_decay,
                       select_by=t.select, freeze_bn_stats=config.model.freeze_bn_stats,
                       class_names=train_set.classes)
    if config.model.head_init == "lp" and not isinstance(backbone.model.get_classifier(), torch.nn.Linear):
        raise ValueError(f"model.head_init: lp fits a linear head, but the criterion {config.criterion.name!r} "
                         f"replaced the classifier with a {type(backbone.model.get_classifier()).__name__}; use "
                         "criterion ce with the probe, or train that criterion from a random head: --recipe ft "
                         "(model.head_init: normal, no WiSE-FT)")
    return _Parts(train_set, test_set, split, backbone, preprocessing, datamodule, module)


def train_class_counts(train_set: ImageDataset, split: Split) -> list[int]:
    """Training images per class in the run's training split (its validation carve-out left out)."""
    targets = torch.as_tensor(train_set.targets)[torch.as_tensor(split.train, dtype=torch.long)]
    return torch.bincount(targets, minlength=train_set.num_classes).tolist()


IMBALANCE_ADVICE_RATIO = 3.0  # largest / smallest class of the training split from which `fit` advises


def imbalance_advice(config: FitConfig, counts: Sequence[int]) -> str | None:
    """One line of advice when the training split is imbalanced (largest / smallest class >= 3) and the run neither
    selects by balanced accuracy nor rebalances its classifier; ``None`` otherwise. It changes nothing: the run does
    what its config says."""
    present = [int(c) for c in counts if c > 0]
    if len(present) < 2 or max(present) < IMBALANCE_ADVICE_RATIO * min(present):
        return None
    t, criterion = config.trainer, config.criterion
    tips = []
    if t.select == "val_acc":
        tips.append("--select val_bal_acc chooses the checkpoint by balanced accuracy (every class counts the same)")
    rebalanced = (t.crt or t.posthoc_tau is not None or criterion.name in PRIOR_ADJUSTED_CRITERIA
                  or criterion.args.get("class_weights") is not None)
    if not rebalanced and criterion.name not in COSINE_HEAD_CRITERIA and t.epochs > 0:
        tips.append("--crt re-fits the head on class-balanced weights after training")
    if not tips:
        return None
    return (f"the training classes are imbalanced: {max(present)} to {min(present)} images per class (ratio "
            f"{max(present) / min(present):.3g}); " + "; ".join(tips) + " (docs/imbalance.md)")


def _check_images(train_set: ImageDataset, test_set: ImageDataset | None, split: Split,
                  resume_from: RunDir | None) -> None:
    """Every image the run will read (its training and validation images, the test split), decoded once before
    anything is written or trained: every unreadable file is named at once, with advice that works."""
    def where(dataset: ImageDataset, item: str) -> str:  # the file to act on (an index "split:i" without files)
        return str(Path(dataset.root) / item) if dataset.root else item

    bad = [(where(train_set, i), why) for i, why in unreadable_images(train_set, [*split.train, *split.val])]
    if test_set is not None:
        bad += [(where(test_set, i), why) for i, why in unreadable_images(test_set, range(len(test_set)))]
    if not bad:
        return
    listed = "\n".join(f"  {name}: {why}" for name, why in bad[:50]) + (
        f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else "")
    root = train_set.root
    advice = ("Restore them (the same files) and continue with `regtune fit --resume RUN`; a training image deleted "
              "instead changes the split this run was made with, so start that run again with --overwrite"
              if resume_from is not None else
              "Nothing has been written: replace or delete them and run the same command again (deleting a "
              "training image lets the split be drawn from the images that remain)")
    raise CorruptImageError(f"{len(bad)} image(s) of {train_set.name}{f' under {root}' if root else ''} cannot be "
                            f"read (checked before training):\n{listed}\n{advice}")


def _mixup(config: FitConfig, num_classes: int) -> Any:
    """timm's batch mixing (mixup and / or cutmix, soft targets without smoothing: the criterion smooths), or
    ``None``."""
    d = config.data
    if d.mixup <= 0 and d.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=d.mix_prob, switch_prob=d.mix_switch_prob,
                 mode="batch", label_smoothing=0.0, num_classes=num_classes)


def _claim_run_dir(config: FitConfig, parts: _Parts, run_dir: str | Path | None, resume: bool,
                   overwrite: bool) -> RunDir:
    """The run directory of this process: prepared and started by process 0, only read by the others."""
    launched = os.environ.get(_RUN_DIR_ENV)
    if launched is not None and rank_zero_only.rank > 0:
        # A process that Lightning's DDP launcher started by running the same command again: the run directory is
        # the one process 0 prepared (its name may hold a timestamp), and only process 0 writes there.
        run = RunDir(launched)
    elif _launched_externally() and rank_zero_only.rank > 0:
        run = RunDir(Path(run_dir).absolute())  # process 0 of the launch prepares it; this one only reads
    elif resume:
        run = RunDir(Path(run_dir).absolute())  # claimed when the config was read
    else:
        # Absolute, because Lightning reports checkpoint paths absolute.
        run = RunDir((Path(run_dir) if run_dir is not None else default_run_dir(config)).absolute())
        run.claim(overwrite=overwrite)
        run.write_start(config, parts.split, parts.train_set.ids, config.data.dataset)
    os.environ[_RUN_DIR_ENV] = str(run.path)  # inherited by the processes the launcher starts
    return run


def _make_trainer(config: FitConfig, run: RunDir, split: Split, callbacks: Sequence[pl.Callback],
                  progress_bar: bool | None) -> _Trainer:
    t = config.trainer
    monitor, mode, _ = _SELECT[t.select]
    if t.ema_decay is not None and monitor is not None and t.select != "test_acc":
        monitor = monitor.replace("val/", "select/")  # the epoch whose preferred weights (EMA or raw) score best
    last = ModelCheckpoint(dirpath=run.checkpoints, filename="last", save_top_k=1, monitor=None,
                           save_on_train_epoch_end=True, enable_version_counter=False)
    best = ModelCheckpoint(dirpath=run.checkpoints, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                           save_on_train_epoch_end=True, enable_version_counter=False)
    preemption = Preemption(run.last_checkpoint)
    with _quiet_lightning():
        trainer = _trainer(t, run, split, preemption, [*callbacks, best, last], progress_bar)
    return _Trainer(trainer, best, last, preemption)


def _trainer(t: Any, run: RunDir, split: Split, preemption: Preemption, callbacks: list[pl.Callback],
             progress_bar: bool | None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=t.epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        precision=t.precision,
        deterministic=t.deterministic,
        logger=False,
        callbacks=[EpochSeed(t.seed), MidEpochResume(), EpochLog(run.epochs_csv),
                   StepLog(run.steps_csv, t.log_every_n_steps), SetupArtifacts(run.setup_dir), preemption,
                   *callbacks],
        # best before last: last.ckpt then carries the best-checkpoint state *after* its epoch, so a resumed run
        # compares later epochs with the same best (and keeps the earlier one on ties) as an uninterrupted run.
        # EpochShuffle shards the training epoch across processes itself (and keeps its per-epoch order and
        # augmentation seeds); evaluation and set-up loaders use Shard.
        use_distributed_sampler=False,
        enable_progress_bar=t.progress_bar if progress_bar is None else progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0 if not split.val and t.select != "test_acc" else None,  # no validation images: no loop
        limit_train_batches=t.train_fraction if t.train_fraction < 1.0 else None,
        default_root_dir=str(run.path),
        plugins=_cluster_plugins(),
    )


def _cluster_plugins() -> list[Any]:
    """Under Slurm, Lightning's own environment without its auto-requeue: that one saves an extra checkpoint in the
    middle of a step and requeues a script that would start the run afresh. regtune stops at the end of a batch on
    SIGTERM, and ``--executor slurm`` (`regtune.cluster`) requeues tasks that continue their runs."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def _train(config: FitConfig, parts: _Parts, run: RunDir, made: _Trainer, resume: bool) -> bool:
    """Train until the last epoch or an interruption (returned true); errors say what is kept and how to go on."""
    trainer = made.trainer
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    if main_thread:
        signal.signal(signal.SIGINT, made.preemption.sigint_handler)  # first Ctrl-C: stop after this batch
    try:
        with _quiet_lightning(), _no_uninitialized_fill():
            # weights_only: a run directory may come from someone else; loading its checkpoint runs no code
            trainer.fit(parts.module, datamodule=parts.datamodule,
                        ckpt_path=str(run.last_checkpoint) if resume else None, weights_only=True)
    except SystemExit:
        # Lightning answers Ctrl-C by saving nothing further and calling sys.exit(1); a library call should return
        # instead, with the last epoch's checkpoint in place for --resume.
        if not trainer.interrupted:
            raise
    except NonFiniteLossError as err:
        last = run.last_checkpoint
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no epoch had finished, no checkpoint"
        raise NonFiniteLossError(
            f"{err}. Training stopped; {kept}. Lower the learning rate or the regularizer weights and start again "
            "(or --resume after fixing the cause)."
        ) from err
    except Exception as err:
        # A corrupt image, a dataset folder that went away, a full disk, a regularizer's failing set-up: the error
        # says what happened; this note says what is kept and how to go on. Nothing written so far is removed.
        last = run.last_checkpoint
        err.add_note(
            f"training of {run} stopped in epoch {trainer.current_epoch + 1}; the last checkpoint ({last}) is "
            f"kept: fix the cause and continue with `regtune fit --resume {run}`" if last.is_file() else
            f"training of {run} stopped before its first checkpoint; fix the cause and run the same command "
            "again with --overwrite"
        )
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, sigint)  # Lightning ignores further Ctrl-C while it shuts down
        rows = read_epoch_log(run.epochs_csv) if rank_zero_only.rank == 0 else []
        if rows:
            plot_learning_curves(rows, run.curves_png, title=f"{run.path.name} ({config.trainer.select})",
                                 criterion=config.criterion.name)
    if trainer.interrupted:
        saved = made.preemption.saved_at
        where = (f"in epoch {saved[0] + 1} after batch {saved[1]} (checkpoint saved)" if saved
                 else "at the last end-of-epoch checkpoint")
        _log.warning("interrupted %s; continue with: regtune fit --resume %s", where, run)
    return trainer.interrupted


def _prepare_start(config: FitConfig, parts: _Parts, run: RunDir, model: torch.nn.Module) -> None:
    """Before the first step (not on resume): the linear probe's head (``model.head_init: lp``), then the starting
    weights WiSE-FT interpolates from (``checkpoints/start.safetensors``)."""
    if config.model.head_init == "lp":
        _probe(config, parts, run, model)
    if config.trainer.wise_alphas and rank_zero_only.rank == 0:
        _save_weights(model, run.start_weights, parts.train_set.classes)


def _eval_loader(parts: _Parts, indices: Sequence[int]) -> torch.utils.data.DataLoader:
    """Training-split items in order with the evaluation transform, all of them in every process (not sharded): the
    probe's features and WiSE-FT's validation."""
    dm = parts.datamodule
    return torch.utils.data.DataLoader(TransformedSubset(parts.train_set, indices, dm.eval_transform),
                                       batch_size=dm.eval_batch_size, num_workers=dm.num_workers)


def _probe(config: FitConfig, parts: _Parts, run: RunDir, model: torch.nn.Module) -> dict[str, Any]:
    """Fit the linear probe on the frozen model's features of the training images (evaluation transform), choose
    its strength on the validation images, install it as the head; ``probe.json`` records it.

    Every process extracts all features (no sharding): each then fits the same probe."""
    from regtune.train.probe import adapt_batchnorm, linear_probe, set_head

    m = config.model
    loader = functools.partial(_eval_loader, parts)
    started = time.perf_counter()
    device = next(model.parameters()).device
    adapted = m.lp_adapt_bn and adapt_batchnorm(model, loader(parts.split.train), device)
    result = linear_probe(model, loader(parts.split.train), loader(parts.split.val) if parts.split.val else None,
                          parts.train_set.num_classes, Cs=m.lp_cs, max_iter=m.lp_max_iter, select=m.lp_select,
                          cache=run.path / "probe_features.npz", device=device)
    set_head(model, result)
    record = {"C": result.C, "val_acc": {str(c): a for c, a in result.val_acc.items()},
              "val_loss": {str(c): v for c, v in result.val_loss.items()}, "train_acc": result.train_acc,
              "batchnorm_adapted": adapted,
              "time_s": round(time.perf_counter() - started, 2)}
    if rank_zero_only.rank == 0:
        atomic_write_json(run.path / "probe.json", record)
    _log.info("linear probe: C = %g, validation accuracy %s, %.1f s", result.C,
              f"{result.val_acc[result.C]:.4f}" if result.val_acc else "n/a", record["time_s"])
    return record


def _probe_only(config: FitConfig, parts: _Parts, run: RunDir, made: _Trainer, test: bool) -> dict[str, Any]:
    """A linear-probe run (``trainer.epochs: 0``): the probe on the frozen backbone, tested once (if ``test``)."""
    module = parts.module
    module.to(made.trainer.strategy.root_device)
    probe = _probe(config, parts, run, module.model)
    rebalanced = _rebalance(config, parts, run, module.model)
    result = {**_evaluate(parts, made, test), **rebalanced}
    if made.trainer.is_global_zero:
        _save_weights(module.model, run.model_path, parts.train_set.classes)
    best_val = probe["val_acc"].get(str(probe["C"]))  # the probe's C is chosen on validation whatever `select` says
    return {**result, "selected": None, "epoch": None, "ema_selected": False, "wise": None,
            "model_file": run.model_path.name, "best_val": best_val}


def _selected_checkpoint(config: FitConfig, run: RunDir, made: _Trainer) -> str:
    monitor = _SELECT[config.trainer.select][0]
    selected = made.best.best_model_path if monitor is not None else made.last.last_model_path
    return selected or str(run.last_checkpoint)


def _val_score(parts: _Parts, made: _Trainer) -> Evaluation:
    """Loss, accuracy and balanced accuracy of the module's model on the validation split, at the run's precision;
    every process evaluates all of it."""
    return parts.module.score(_eval_loader(parts, parts.split.val), made.trainer.strategy.root_device,
                              made.trainer.precision_plugin.forward_context)


def _wise(config: FitConfig, parts: _Parts, run: RunDir, made: _Trainer,
          end: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """WiSE-FT: each ``(1 - a) * start + a * end`` on the validation split; the best by the run's selection (balanced
    accuracy for ``select: val_bal_acc`` then loss; loss for ``val_loss`` then accuracy; else accuracy then loss;
    ties to the earlier ``a``) is returned with the record of all."""
    from safetensors.torch import load_file

    from regtune.train.averaging import interpolate_states

    start = load_file(run.start_weights)
    end = {k: v.detach().cpu().clone() for k, v in end.items()}  # not the live weights the mixes overwrite
    scores = []
    for alpha in config.trainer.wise_alphas:
        parts.module.model.load_state_dict(interpolate_states(start, end, alpha))
        scores.append(_val_score(parts, made))
        _log.info("WiSE-FT alpha %.2f: validation accuracy %.4f, balanced %.4f, loss %.4f", alpha, scores[-1].acc,
                  scores[-1].bal_acc, scores[-1].loss)
    chosen_by = config.trainer.select if config.trainer.select in ("val_bal_acc", "val_loss") else "val_acc"
    order = {"val_bal_acc": lambda s: (-s.bal_acc, s.loss), "val_loss": lambda s: (s.loss, -s.acc),
             "val_acc": lambda s: (-s.acc, s.loss)}[chosen_by]
    best = min(range(len(scores)), key=lambda i: (*order(scores[i]), i))
    alpha = config.trainer.wise_alphas[best]
    record = {"alphas": list(config.trainer.wise_alphas), "val_acc": [s.acc for s in scores],
              "val_bal_acc": [s.bal_acc for s in scores], "val_loss": [s.loss for s in scores],
              "chosen_by": chosen_by, "alpha": alpha}
    return record, interpolate_states(start, end, alpha)


def _evaluate(parts: _Parts, made: _Trainer, test: bool) -> dict[str, Any]:
    """The chosen weights on the validation split (``val/acc``, ``val/bal_acc``, ``val/loss``) and, if ``test``, once on
    the test set."""
    val = _val_score(parts, made) if parts.split.val else None
    result: dict[str, Any] = {f"val/{key}": getattr(val, key) if val is not None else None
                              for key in ("acc", "bal_acc", "loss")}
    if test:
        with _quiet_lightning(), _no_uninitialized_fill():
            (tested,) = made.trainer.test(parts.module, datamodule=parts.datamodule, verbose=False)
        result.update(tested)
    return result


def _test(config: FitConfig, parts: _Parts, run: RunDir, made: _Trainer, test: bool) -> dict[str, Any]:
    """Test once the weights selection chose: the selected checkpoint's, its EMA's where validation preferred them,
    their WiSE-FT interpolation where asked for. Returns the results (validation, and test if ``test``) with what was
    chosen."""
    selected = _selected_checkpoint(config, run, made)
    checkpoint = torch.load(selected, map_location="cpu", weights_only=True)  # tensors and plain types only
    module = parts.module
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    module.on_load_checkpoint(checkpoint)
    weights = module.selected_weights(config.trainer.select)
    ema = module.ema is not None and (module.ema_selected or config.trainer.select == "last")
    wise = None
    if config.trainer.wise_alphas:
        wise, weights = _wise(config, parts, run, made, weights)
    module.model.load_state_dict(weights)
    rebalanced = _rebalance(config, parts, run, module.model)
    result = _evaluate(parts, made, test)
    own = not ema and wise is None and not rebalanced  # the checkpoint's own weights were tested
    if not own and made.trainer.is_global_zero:
        _save_weights(module.model, run.model_path, parts.train_set.classes)
    return {**result, "selected": selected, "epoch": int(checkpoint["epoch"]), "ema_selected": ema, "wise": wise,
            **rebalanced, "model_file": None if own else run.model_path.name,
            "best_val": float(made.best.best_model_score) if made.best.best_model_score is not None else None}


def _rebalance(config: FitConfig, parts: _Parts, run: RunDir, model: torch.nn.Module) -> dict[str, Any]:
    """The class-imbalance corrections of the chosen weights, in order: classifier re-training on the frozen
    backbone with class-balanced weights (``trainer.crt``), then post-hoc logit adjustment (``trainer.posthoc_tau``).
    Both change the head itself, so every use of the model (test, predict, export) sees them. Returns what was done
    (``{"crt": ..., "posthoc_logit_adjustment": ...}``, empty when neither is asked for)."""
    t = config.trainer
    done: dict[str, Any] = {}
    if t.crt:
        from regtune.train.probe import linear_probe, set_head

        m = config.model
        device = next(model.parameters()).device
        loader = functools.partial(_eval_loader, parts)
        result = linear_probe(model, loader(parts.split.train), loader(parts.split.val) if parts.split.val else None,
                              parts.train_set.num_classes, Cs=m.lp_cs, max_iter=m.lp_max_iter, select="best",
                              device=device, balanced=True)
        set_head(model, result)
        done["crt"] = {"C": result.C, "val_bal_acc": {str(c): a for c, a in result.val_acc.items()}}
        _log.info("cRT: the head re-trained class-balanced on the frozen backbone, C = %g (validation balanced "
                  "accuracy %s)", result.C, f"{result.val_acc[result.C]:.4f}" if result.val_acc else "n/a")
    if t.posthoc_tau is not None:
        from regtune.regularizers.imbalance import posthoc_logit_adjustment

        head = model.get_classifier()
        counts = torch.tensor(train_class_counts(parts.train_set, parts.split), dtype=torch.float64)
        log_prior = (counts / counts.sum()).log()
        with torch.no_grad():  # b - tau log pi: the logits W f + b - tau log pi, folded into the bias
            head.bias.copy_(posthoc_logit_adjustment(head.bias.double(), log_prior, t.posthoc_tau).to(head.bias))
        done["posthoc_logit_adjustment"] = {"tau": t.posthoc_tau, "train_class_counts": counts.long().tolist()}
        _log.info("post-hoc logit adjustment: tau %g times the log training prior subtracted from the head's bias",
                  t.posthoc_tau)
    return done


def _save_weights(model: torch.nn.Module, path: Path, class_names: Sequence[str]) -> None:
    """The model's weights as safetensors (tensors only, the class names in its metadata), whole or not at all:
    ``model.safetensors`` when no checkpoint holds the tested weights as they are, ``checkpoints/start.safetensors``
    for WiSE-FT."""
    from regtune.models.weights import weights_file_bytes

    path.parent.mkdir(parents=True, exist_ok=True)  # checkpoints/ does not exist yet before the first epoch
    atomic_write_bytes(path, weights_file_bytes(model.state_dict(), list(class_names)))


def _metrics(config: FitConfig, parts: _Parts, run: RunDir, result: dict[str, Any], resume: bool,
             started: float, trained: float) -> dict[str, Any]:
    """What ``metrics.json`` holds."""
    d, t = config.data, config.trainer
    epoch = result["epoch"]
    tested = "test/acc" in result
    train_counts = train_class_counts(parts.train_set, parts.split)
    class_names = [str(c) for c in parts.train_set.classes]
    return {
        **({"test_acc": result["test/acc"],
            "test_loss": result["test/loss"],
            "test_mean_class_acc": result["test/mean_class_acc"],  # = test_bal_acc (its older name)
            "test_class_acc": parts.module.test_class_accuracy(),
            # test_bal_acc, test_macro_f1, test_class_acc_by_name, test_groups (many / medium / few-shot)
            **imbalance_metrics(parts.module.test_confusion(), train_counts, class_names)} if tested else {}),
        "tested": tested,  # False: a search's trial, chosen on validation, never tested
        "val_acc": result["val/acc"],  # the tested weights (after EMA / WiSE-FT) on the validation split
        "val_bal_acc": result["val/bal_acc"],
        "val_loss": result["val/loss"],
        "selection": t.select,
        "selection_note": _SELECT[t.select][2],
        "selected_epoch": epoch + 1 if epoch is not None else None,
        "epoch_base": 1,  # epochs counted from 1 here, in epochs.csv and on the console (older runs: from 0)
        # Lightning resolves links in its checkpoint paths; the run's own path may go through one (runs/ -> /scratch)
        "selected_checkpoint": (str(Path(result["selected"]).resolve().relative_to(run.path.resolve()))
                                if result["selected"] else None),
        "best_val": result["best_val"],
        "model_file": result["model_file"],
        "probe": json.loads((run.path / "probe.json").read_text()) if config.model.head_init == "lp" else None,
        "ema": {"decay": t.ema_decay, "selected": result["ema_selected"]} if t.ema_decay is not None else None,
        "wise": result["wise"],
        "crt": result.get("crt"),
        "posthoc_logit_adjustment": result.get("posthoc_logit_adjustment"),
        "epochs": t.epochs,
        "num_train": len(parts.split.train),
        "num_val": len(parts.split.val),
        "num_test": len(parts.test_set),
        "num_classes": parts.train_set.num_classes,
        "class_names": class_names,  # the head's output order; test_class_acc's too
        "train_class_counts": train_counts,  # training images per class (the split's, validation left out)
        "dataset": d.dataset,
        "backbone": parts.backbone.name,
        "weights": parts.backbone.weights,
        "input_size": list(parts.preprocessing["input_size"]),
        "preprocessing": {k: (list(v) if isinstance(v, tuple) else v) for k, v in parts.preprocessing.items()},
        "regularizers": [r.name for r in config.regularizers],
        "criterion": config.criterion.name,
        "seed": t.seed,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "fit_time_s": round(trained, 2),
        "resumed": resume,
        "versions": library_versions(),
    }


def _report(config: FitConfig, run: RunDir, metrics: dict[str, Any], made: _Trainer) -> None:
    """Write ``metrics.json`` (last: it marks the run finished) and the learning curves with the selected epoch."""
    if config.trainer.select == "test_acc":
        _log.warning("selection on the TEST set (papers' protocol): test accuracy is optimistic")
    if made.trainer.is_global_zero:
        if config.trainer.epochs > 0:  # a probe alone has no epochs to plot
            plot_learning_curves(read_epoch_log(run.epochs_csv), run.curves_png,
                                 title=f"{run.path.name} ({config.trainer.select})", criterion=config.criterion.name,
                                 selected_epoch=metrics["selected_epoch"], test_acc=metrics.get("test_acc"))
        atomic_write_json(run.metrics_path, metrics)
    # The result itself is the caller's to print (the CLI prints it once).
    _log.debug("test accuracy %s, validation accuracy %s, checkpoint of epoch %s; run directory %s",
               metrics.get("test_acc"), metrics["val_acc"], metrics["selected_epoch"], run)


def fit(
        config: FitConfig | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        callbacks: Sequence[pl.Callback] = (),
        progress_bar: bool | None = None,
        test: bool = True,
) -> FitResult:
    """Fine-tune, select a checkpoint, test it once, and write the run directory.

    Args:
        config: The run's settings; ``None`` uses the defaults (or, with ``resume``, the run's own config).
        run_dir: Output directory; ``None`` makes a new one under ``runs/``.
        resume: Continue the interrupted run in ``run_dir`` from its ``last.ckpt`` (the config is read from there).
        overwrite: Replace a run already in ``run_dir``.
        callbacks: Extra Lightning callbacks (progress hooks, tests).
        progress_bar: Show Lightning's progress bar; ``None`` follows ``trainer.progress_bar`` (a resumed run's own
            config). It changes no result, so it is not part of the config written for the run.
        test: Test the chosen weights once. ``False`` (a search's trials, chosen on validation): the test images are
            never opened, and ``metrics.json`` holds the chosen weights' validation accuracy and no test metric.

    Returns:
        The `FitResult`; ``interrupted`` is true when the run was stopped (Ctrl-C) before its end, in which
        case no metrics are written and ``regtune fit --resume`` continues it.

    Raises:
        RunDirError: ``run_dir`` holds a run and neither ``resume`` nor ``overwrite`` was given.
        NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is kept.
    """
    started = time.perf_counter()
    config = _resolve_config(config, run_dir, resume)
    if not test and config.trainer.select == "test_acc":
        raise ValueError("a run that is not tested cannot select on the test set (trainer.select: test_acc); "
                         "select on val_acc, val_bal_acc or val_loss")
    pl.seed_everything(config.trainer.seed, workers=True, verbose=False)
    parts = _build_parts(config, RunDir(Path(run_dir).absolute()) if resume else None, test)
    run = _claim_run_dir(config, parts, run_dir, resume, overwrite)
    if not resume and config.trainer.epochs > 0 and (config.model.head_init == "lp" or config.trainer.wise_alphas):
        parts.module.prepare = lambda model: _prepare_start(config, parts, run, model)
    made = _make_trainer(config, run, parts.split, callbacks, progress_bar)
    d = config.data
    _log.info("run directory: %s", run)
    _log.info("%s/%s: %d train, %d val, %d test images, %d classes; backbone %s (weights: %s); input %s",
              d.dataset, "train", len(parts.split.train), len(parts.split.val), len(parts.test_set),
              parts.train_set.num_classes, parts.backbone.name, parts.backbone.weights,
              parts.preprocessing["input_size"])
    advice = imbalance_advice(config, train_class_counts(parts.train_set, parts.split))
    if advice:
        _log.info(advice)
    if config.trainer.epochs == 0:
        result = _probe_only(config, parts, run, made, test)
    elif _train(config, parts, run, made, resume):
        return FitResult(run_dir=run.path, metrics={}, interrupted=True)
    else:
        result = _test(config, parts, run, made, test)
    trained = time.perf_counter() - started
    metrics = _metrics(config, parts, run, result, resume, started, trained)
    _report(config, run, metrics, made)
    return FitResult(run_dir=run.path, metrics=metrics)
