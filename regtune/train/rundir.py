"""The run directory: one home for its file names, its status, finding runs, and loading what a run made.

Every run writes one directory::

    config.yaml      resolved config (``regtune fit --config config.yaml`` reproduces the run)
    split.json       item ids of the training subset and the validation carve-out
    epochs.csv       one row per epoch: losses, accuracies, every logged term, learning rates, time
    steps.csv        one row per step (or every n steps): the loss, every term and every regularizer statistic
    checkpoints/     last.ckpt (every epoch) and best.ckpt (selected checkpoint); start.safetensors (the weights
                     training started from, for WiSE-FT)
    model.safetensors  the weights that were tested, when they are not a checkpoint's own (a linear probe without
                     fine-tuning, EMA weights, a WiSE-FT interpolation, a soup); ``metrics.json`` names it
    setup/           what regularizers computed before training (Co-Tuning's relationship, DELTA's attention)
    metrics.json     final numbers (written last: its presence marks a finished run)
    curves.png       learning curves
    analysis.json    ``regtune analyze``'s measurements (and ``analysis.png``)
    localization.json  ``regtune cam --localize``'s metrics

`RunDir` knows these names; code elsewhere asks it for paths instead of spelling them. Its status is decided
here only: a run with ``metrics.json`` is *finished*, one with ``checkpoints/last.ckpt`` and no metrics was
*interrupted* (``regtune fit --resume`` continues it), one with only ``config.yaml`` *started* (no epoch finished),
anything else is *new*.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regtune.train.config import FitConfig, load_config, save_config
from regtune.train.recipes import recipe_label

if TYPE_CHECKING:  # heavy imports only where a model or a dataset is loaded
    import torch

    from regtune.data.base import ImageDataset
    from regtune.data.subset import Split

__all__ = ["RUN_STATUSES", "RunDir", "RunDirError", "default_run_dir", "find_runs", "library_versions", "make_split",
           "run_preprocessing"]

RUN_STATUSES = ("new", "started", "interrupted", "finished")


class RunDirError(FileExistsError):
    """The run directory holds a run that this call would overwrite, no run to resume, or no finished run."""


@dataclass(frozen=True)
class RunDir:
    """A run directory: the paths of what a run writes, its status, and loading its config, split and model.

    Args:
        path: The directory (need not exist yet).

    Example:
        >>> run = RunDir("runs/fashion_mnist-tf_efficientnet_lite0-ft-s0-20260101-000000")
        >>> run.metrics_path.name, run.status
        ('metrics.json', 'new')
    """

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    # -- paths --------------------------------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def split_path(self) -> Path:
        return self.path / "split.json"

    @property
    def epochs_csv(self) -> Path:
        return self.path / "epochs.csv"

    @property
    def steps_csv(self) -> Path:
        return self.path / "steps.csv"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def start_weights(self) -> Path:
        return self.checkpoints / "start.safetensors"

    @property
    def model_path(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def setup_dir(self) -> Path:
        return self.path / "setup"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def curves_png(self) -> Path:
        return self.path / "curves.png"

    @property
    def analysis_json(self) -> Path:
        return self.path / "analysis.json"

    @property
    def analysis_png(self) -> Path:
        return self.path / "analysis.png"

    def localization_json(self, source: str = "cam") -> Path:
        """``localization.json`` for the classic CAM, ``localization_<source>.json`` for another map."""
        return self.path / ("localization.json" if source == "cam" else f"localization_{source}.json")

    # -- status -------------------------------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """One of `RUN_STATUSES` (see the module docstring)."""
        if self.metrics_path.is_file():
            return "finished"
        if self.last_checkpoint.is_file():
            return "interrupted"
        if self.config_path.is_file():
            return "started"
        return "new"

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def require(self, status: str = "finished") -> RunDir:
        """Raise a clear error unless the run has ``status`` (``"finished"``, or ``"started"``: any regtune run)."""
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a regtune run directory (no config.yaml)")
        if status == "finished" and not self.finished:
            raise FileNotFoundError(f"{self.path} has no metrics.json: the run has not finished (continue it with "
                                    f"`regtune fit --resume {self.path}`)")
        return self

    def claim(self, resume: bool = False, overwrite: bool = False) -> None:
        """Make the directory ready for `fit`.

        With ``resume`` the run must be interrupted (a ``last.ckpt``, no metrics). Otherwise the directory must be
        new, or ``overwrite`` removes what it holds first.

        Raises:
            RunDirError: nothing to resume, or a run would be overwritten without ``overwrite``.
        """
        status = self.status
        if resume:
            if status == "finished":
                raise RunDirError(f"{self.path} holds a finished run (metrics.json); nothing to resume")
            if status != "interrupted":
                raise RunDirError(f"{self.path} has no checkpoints/last.ckpt to resume from")
            return
        if status != "new":
            if not overwrite:
                what = "a finished run" if status == "finished" else "an unfinished run (resume it with --resume)"
                raise RunDirError(f"{self.path} already holds {what}; choose another --run-dir, or pass --overwrite")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    # -- what the run wrote -------------------------------------------------------------------------------------------

    def config(self) -> FitConfig:
        """The run's resolved config (``config.yaml``)."""
        self.require("started")
        return load_config(self.config_path)

    def metrics(self) -> dict[str, Any]:
        """The finished run's ``metrics.json``, its ``selected_epoch`` counted from 1 (runs written before
        ``epoch_base`` existed counted from 0 and are renumbered here)."""
        self.require("finished")
        metrics = json.loads(self.metrics_path.read_text())
        if "epoch_base" not in metrics and metrics.get("selected_epoch") is not None:
            metrics["selected_epoch"] += 1
            metrics["epoch_base"] = 1
        return metrics

    def write_start(self, config: FitConfig, split: Split, ids: Any, dataset: str) -> None:
        """Write what a run starts with: its config and its split manifest."""
        from regtune.data.subset import write_manifest

        save_config(config, self.config_path)
        write_manifest(self.split_path, split, ids, dataset)

    def split(self, train_set: ImageDataset) -> Split:
        """The run's split (``split.json``) resolved against ``train_set``'s item ids."""
        from regtune.data.subset import split_from_manifest

        self.require("started")
        return split_from_manifest(self.split_path, train_set.ids, train_set.name)

    def dataset(self, split: str = "test", config: FitConfig | None = None) -> ImageDataset:
        """One split (``"train"`` / ``"test"``) of the run's dataset, read from where the run read it."""
        from regtune.data.datasets import build_dataset

        d = (config or self.config()).data
        return build_dataset(d.dataset, d.root, split, download=False)

    def selected_checkpoint(self) -> Path:
        """The checkpoint the finished run tested (``metrics.json``'s ``selected_checkpoint``)."""
        path = self.path / self.metrics()["selected_checkpoint"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} (the run's selected checkpoint) does not exist")
        return path

    def tested_weights(self) -> Path:
        """The file of the weights the finished run tested: ``model.safetensors`` where ``metrics.json`` names it
        (``model_file``), else the selected checkpoint."""
        name = self.metrics().get("model_file")
        if name is None:
            return self.selected_checkpoint()
        path = self.path / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} (the weights the run tested) does not exist")
        return path

    def load_model(self, num_classes: int, checkpoint: str | Path | None = None,
                   config: FitConfig | None = None) -> tuple[torch.nn.Module, FitConfig, Path]:
        """The run's model, built as it was trained, with the weights it was tested with, in eval mode.

        Those are the selected checkpoint's, or ``model.safetensors`` where ``metrics.json`` names it (``model_file``:
        a linear probe without fine-tuning, EMA weights, a WiSE-FT interpolation, a soup).

        The backbone is created without pretrained weights, then changed the way the run changed it before training
        (the criterion's ``adapt_model``, e.g. LM-Softmax's cosine head, and that of every regularizer that
        declares ``changes_architecture``, e.g. StochNorm's layer swap), and the checkpoint's ``model.*`` weights
        are loaded strictly. Terms that only keep copies of the model (L2-SP's anchors, DELTA's source network) are
        not rebuilt: they do not change what the model computes.

        Args:
            num_classes: Classes of the run's task.
            checkpoint: A checkpoint path relative to the run directory (default: what the run tested).
            config: The run's config, if already read.

        Returns:
            ``(model, config, path of the weights file)``.
        """
        import torch

        from regtune.models import create_backbone
        from regtune.regularizers import create_criterion, create_regularizer

        config = config or self.config()
        path = self.path / checkpoint if checkpoint is not None else self.tested_weights()
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            weights = load_file(path)  # tensors only, by design
        else:
            # weights_only: a checkpoint holds tensors and plain types (callbacks.rng_state keeps it so); nothing
            # loaded here runs code.
            state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
            weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        model = create_backbone(config.model.backbone, num_classes, pretrained="none").model
        create_criterion(config.criterion.name, **config.criterion.args).adapt_model(model)
        for spec in config.regularizers:
            term = create_regularizer(spec.name, **spec.args)
            if term.changes_architecture:
                term.adapt_model(model)
        model.load_state_dict(weights, strict=True)
        return model.eval(), config, path


def run_preprocessing(model: torch.nn.Module, config: FitConfig) -> dict[str, Any]:
    """The run's preprocessing: the model's pretrained data config at the run's input size, with the run's
    evaluation frame (``data.crop_mode``) and crop (``data.crop_pct``, where it sets one). Training, testing and
    every later reader (predictions, exports, CAM labels) use this one."""
    from regtune.models import data_config

    preprocessing = data_config(model, config.data.img_size)
    preprocessing["crop_mode"] = config.data.crop_mode
    if config.data.crop_pct is not None:
        preprocessing["crop_pct"] = config.data.crop_pct
    return preprocessing


def make_split(config: FitConfig, train_set: ImageDataset, manifest: str | Path | None = None) -> Split:
    """The split a run of ``config`` trains on: read from ``manifest`` (or ``data.split_manifest``), else drawn.

    A drawn split is stratified per class with the config's fraction (or images per class), validation share and
    seed (`stratified_split`), or long-tailed with ``data.imbalance_ratio`` set (`longtail_split`, the head class
    keeping that budget); the same config and dataset always give the same split.
    """
    from regtune.data.subset import longtail_split, split_from_manifest, stratified_split

    d = config.data
    manifest = manifest or d.split_manifest
    if manifest:
        return split_from_manifest(manifest, train_set.ids, d.dataset)
    if d.imbalance_ratio is not None:
        return longtail_split(train_set.targets, train_set.num_classes, d.imbalance_ratio, profile=d.imbalance_profile,
                              minority=d.imbalance_minority, order=d.imbalance_order, fraction=d.fraction,
                              per_class=d.per_class, val_fraction=d.val_fraction, seed=config.trainer.seed,
                              class_names=train_set.classes)
    return stratified_split(train_set.targets, train_set.num_classes, fraction=d.fraction, per_class=d.per_class,
                            val_fraction=d.val_fraction, seed=config.trainer.seed, class_names=train_set.classes)


def default_run_dir(config: FitConfig, root: str | Path = "runs") -> Path:
    """``runs/<dataset>-<backbone>-<method>-s<seed>-<timestamp>``, the method being the baseline
    (`regtune.train.recipes.recipe_label`) and the regularizers, e.g. ``wise_ft+fmr``."""
    recipe = recipe_label(config.to_dict())
    terms = "+".join(([recipe] if recipe != "ft" else []) + [r.name for r in config.regularizers]) or "ft"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{config.data.dataset}-{config.model.backbone}-{terms}-s{config.trainer.seed}-{stamp}"


def find_runs(paths: Iterable[str | Path], status: str = "finished") -> list[RunDir]:
    """Run directories among ``paths`` and below them (sorted per path), those with ``status``.

    A path that is itself a run directory is taken as it is; otherwise every run under it is found.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    found: list[RunDir] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such run directory (give run directories or folders holding them)")
        candidates = [path] if (path / "config.yaml").is_file() else \
            [p.parent for p in sorted(path.rglob("config.yaml"))]
        found += [RunDir(p) for p in candidates if RunDir(p).status == status]
    return found


def library_versions() -> dict[str, str]:
    """Versions of what decides a run's numbers, as ``metrics.json`` records them: the same code on two machines with
    other timm, torchvision, NumPy or Pillow versions (augmentation, resizing, weight loading) can give other digits."""
    import platform
    from importlib.metadata import version

    import numpy
    import PIL
    import timm
    import torch
    import torchvision

    import regtune

    return {"regtune": regtune.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "lightning": version("lightning"), "numpy": numpy.__version__,
            "pillow": PIL.__version__, "python": platform.python_version()}
