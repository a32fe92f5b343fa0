"""The LightningModule: a backbone with its head, one criterion and any number of regularizers."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from torch import nn

from regtune.analysis.imbalance import balanced_accuracy, class_recall
from regtune.data.seeds import mix_seed
from regtune.data.transforms import seeded_rng
from regtune.models import forward_parts
from regtune.regularizers import Criterion, Regularizer, TrainStep, capture_outputs
from regtune.regularizers._utils import all_reduce_sum, labels_verified
from regtune.regularizers.functional import channel_entropy, class_margin, cosine_logits, sample_margins
from regtune.train.config import OptimConfig

__all__ = ["Evaluation", "FineTuner", "FiniteGuard", "NonFiniteLossError", "lr_factor"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the term."""


class FiniteGuard:
    """Raises `NonFiniteLossError` for a non-finite training loss without making a GPU wait at every step.

    Reading a GPU value on the host waits for every kernel queued so far: checking each step's loss that way in the
    middle of the step (before its backward is queued) stalls the host and leaves the GPU idle between steps. On a
    GPU the check is therefore deferred: the loss's finiteness is copied to pinned host memory behind a CUDA event,
    and `resolve` reads it at the next step or before anything is written or evaluated (checkpoint, validation,
    epoch means, end of training), when the event has long passed. The one bad update is never saved. On the CPU
    the check is immediate and free.

    Args:
        defer: Defer the check; ``None`` defers on CUDA only (tests force it on the CPU).
    """

    def __init__(self, defer: bool | None = None) -> None:
        self.defer = defer
        self._pending: tuple[torch.Tensor, Any, dict[str, torch.Tensor], str] | None = None

    def watch(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], where: str) -> None:
        """Check ``loss`` (now or later); ``terms`` and ``where`` (the step, epoch and batch) go into the error."""
        self.resolve()
        finite = torch.isfinite(loss.detach())
        if not (self.defer if self.defer is not None else loss.device.type == "cuda"):
            self._raise_unless(bool(finite), terms, where)
            return
        cuda = loss.device.type == "cuda"
        host = torch.empty((), dtype=torch.bool, pin_memory=cuda)
        host.copy_(finite, non_blocking=cuda)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        self._pending = (host, event, {k: v.detach() for k, v in terms.items()}, where)

    def resolve(self) -> None:
        """Raise now if the last watched loss was not finite."""
        if self._pending is None:
            return
        host, event, terms, where = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        self._raise_unless(bool(host), terms, where)

    @staticmethod
    def _raise_unless(finite: bool, terms: dict[str, torch.Tensor], where: str) -> None:
        if not finite:
            bad = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
            raise NonFiniteLossError(f"non-finite training loss at {where}: {bad}")


class Evaluation(NamedTuple):
    """A model's scores on a whole evaluation split."""

    loss: float  # mean cross-entropy
    acc: float  # accuracy
    bal_acc: float  # balanced accuracy: mean per-class recall over the classes with items


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, optim: OptimConfig) -> float:
    """Learning-rate multiplier at optimisation ``step`` (0-based): linear warm-up, then the schedule."""
    warmup = round(optim.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if optim.scheduler == "constant":
        return 1.0
    if optim.scheduler == "step":
        epoch = step // max(steps_per_epoch, 1)
        return optim.gamma ** sum(epoch >= m for m in optim.milestones)
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _unique_names(terms: Sequence[Regularizer]) -> list[str]:
    names: list[str] = []
    for term in terms:
        base = getattr(term, "registry_name", type(term).__name__.lower())
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def _step_value(value: torch.Tensor | float) -> torch.Tensor | float:
    """A ``stats()`` value for the step log: a tensor detached and cloned where it lives, a number as a float."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else float(value)


class FineTuner(pl.LightningModule):
    """Fine-tunes ``model`` with ``criterion`` plus the sum of ``regularizers``.

    The model is reached only through `regtune.models.forward_parts` (``forward_features``,
    ``forward_head(pre_logits=True)``, the classifier), so any timm backbone works. Every term is logged by name
    (``train/<name>``), with each regularizer's ``stats()`` (``train/<name>/<key>``).

    Args:
        model: timm model with a ``num_classes``-way head.
        criterion: The classification loss.
        regularizers: Terms added to the loss; each follows the `Regularizer` contract.
        optim: Optimizer and schedule settings.
        num_classes: Classes of the task (for per-class test accuracy).
        setup_loader: Called with no argument, returns the loader that regularizers' ``setup`` passes iterate
            (training images with the deterministic evaluation transform); ``None`` if no term needs one.
        train_loader: Called with no argument, returns the (shuffled, augmented) training loader, for terms whose
            ``setup_transform`` is ``"train"`` (FMR's statistics pass).
        channels_last: Keep the model and image batches in channels-last memory format (about 1.7x faster
            training steps for EfficientNet on CPU, and the preferred layout for convolutions on GPUs).
        feature_stats: Log per-epoch feature statistics (``{train,val}/feature_norm``, ``/fmr_entropy``,
            ``/mean_margin``, and ``train/class_margin_deg``, the head's class margin averaged over the epoch's
            steps); the others are means of per-sample values, so the batch-size-weighted epoch mean (the module's
            own sums, reduced across processes) is the exact mean over the epoch's images.
        resuming: The fit continues from a checkpoint, which holds the terms' set-up state: no set-up pass runs.
        mixup: Mixes each training batch (timm's ``Mixup`` with ``label_smoothing=0``: ``(images, labels) ->
            (mixed images, soft targets)``); its draws are seeded per step (`mix_seed`).
            The step record then carries the soft ``targets``.
        seed: The run's seed (for the per-step mixing seed).
        ema_decay: Keep an exponential moving average of the weights (``self.ema``, saved in checkpoints), updated
            after every optimisation step, evaluated beside the raw weights at each validation.
        select_by: The run's selection (``trainer.select``): with an EMA, validation loss, accuracy or balanced
            accuracy (``val_bal_acc``) decides which of the two weights an epoch stands for.
        freeze_bn_stats: Keep the model's BatchNorm layers in evaluation mode during training (see
            ``ModelConfig.freeze_bn_stats``).
        prepare: Called once with the model before the terms' set-up (not on resume): the linear probe that gives
            LP-FT its head.
        class_names: The classes in the order of the head's outputs, written into every checkpoint
            (``regtune_class_names``).
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: Criterion,
            regularizers: Sequence[Regularizer],
            optim: OptimConfig,
            num_classes: int,
            setup_loader: Any = None,
            channels_last: bool = True,
            train_loader: Any = None,
            feature_stats: bool = False,
            resuming: bool = False,
            mixup: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
            seed: int = 0,
            ema_decay: float | None = None,
            select_by: str = "val_acc",
            freeze_bn_stats: bool = False,
            prepare: Callable[[nn.Module], None] | None = None,
            class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.class_names = [str(c) for c in class_names] if class_names is not None else None
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.mixup = mixup
        self.seed = seed
        self.finite_guard = FiniteGuard()
        self._labels_checked = False  # this training batch's labels were range-checked on the CPU
        self.step_values: dict[str, torch.Tensor | float] = {}  # the last training step's logged values
        self.freeze_bn_stats = freeze_bn_stats  # Lightning keeps the modes it finds; train() below sets them
        self.prepare = prepare
        # Before the optimizer sees the model: LM-Softmax installs its cosine head, L2-SP snapshots the starting
        # weights, DELTA copies the pretrained network, StochNorm swaps the BatchNorms.
        criterion.adapt_model(model)
        for term in regularizers:
            term.adapt_model(model)
        self.criterion = criterion
        self.regularizers = nn.ModuleDict(dict(zip(_unique_names(regularizers), regularizers)))
        # The average starts as a copy; its first update copies the weights again (n_averaged = 0), so it starts
        # from the weights of the first step whatever happened before (the probe's head).
        self.ema = None if ema_decay is None else torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay), use_buffers=True,
        ).requires_grad_(False)
        self.ema_selected = False  # whether the last validation preferred the EMA weights (saved with checkpoints)
        self.select_by = select_by
        self.optim = optim
        self.num_classes = num_classes
        self.setup_loader = setup_loader
        self.train_loader = train_loader
        self.criterion_name = getattr(criterion, "registry_name", "loss")
        self.regularizers_ready = False
        self.resuming = resuming  # the fit restores a checkpoint: the terms' state comes from there
        self._steps_total: int | None = None  # known once configure_optimizers ran
        self.channels_last = channels_last
        self.feature_stats = feature_stats
        self._test_confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)  # [true class, predicted]
        self._epoch_sums: dict[str, torch.Tensor] = {}  # name -> [sum of value x batch size, sum of batch sizes]
        # [loss sum, correct, count, correct per class (C), count per class (C)] of the running evaluation
        self._eval_sums: torch.Tensor | None = None
        self._ema_sums: torch.Tensor | None = None  # the same for the EMA weights
        self.train()

    # -- set-up -----------------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # Regularizers measure pretrained statistics once, before the first update; a resumed run has them in its
        # checkpoint already. This runs in Lightning's setup hook: the processes of a DDP run exist (the set-up
        # statistics are reduced across them), but DDP has not yet wrapped the model nor the optimizer taken its
        # parameters, so terms may still give their lazily shaped parameters and buffers their shapes.
        if stage != "fit" or self.regularizers_ready or self.resuming:
            return
        self.to(self.trainer.strategy.root_device)
        if self.prepare is not None:
            self.prepare(self.model)
        self.prepare_regularizers()
        self.train(self.training)  # the probe's and terms' passes switched modes: this module's modes again

    def prepare_regularizers(self) -> None:
        """Run every term's set-up (its statistics pass over the loader it asks for) once."""
        if self.regularizers_ready:
            return
        mode = self.model.training
        try:
            for name, term in self.regularizers.items():
                factory = self.train_loader if term.setup_transform == "train" else self.setup_loader
                loader = factory() if term.needs_setup_pass and factory is not None else None
                try:
                    term.setup(self.model, loader)
                except Exception as err:
                    raise RuntimeError(f"setup of regularizer {name!r} failed: {err}") from err
        finally:
            self.model.train(mode)
        self.regularizers_ready = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.finite_guard.resolve()  # a deferred check: the weights of a non-finite step are never saved
        checkpoint["regtune_regularizers_ready"] = self.regularizers_ready
        checkpoint["regtune_epoch_sums"] = {k: v.detach().cpu() for k, v in self._epoch_sums.items()}
        checkpoint["regtune_ema_selected"] = self.ema_selected
        if self.class_names is not None:
            checkpoint["regtune_class_names"] = list(self.class_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.regularizers_ready = bool(checkpoint.get("regtune_regularizers_ready", False))
        self._epoch_sums = dict(checkpoint.get("regtune_epoch_sums", {}))
        self.ema_selected = bool(checkpoint.get("regtune_ema_selected", False))

    def selected_weights(self, select: str) -> dict[str, torch.Tensor]:
        """A copy of the model weights the run's selection stands for: the EMA's when it was preferred (or, with
        ``select`` ``"last"``, whenever an EMA is kept), else the raw weights."""
        use_ema = self.ema is not None and (self.ema_selected or select == "last")
        return {k: v.detach().clone() for k, v in (self.ema.module if use_ema else self.model).state_dict().items()}

    # -- per-epoch means ---------------------------------------------------------------------------------------------
    # The module sums the values of an epoch itself (training terms and statistics, and the validation feature
    # statistics of --feature-stats; not Lightning's on_epoch logging) so that the sums travel in a checkpoint
    # written mid-epoch and a resumed epoch reports the means of all its batches, and so that the processes of a
    # distributed run reduce sums and counts, not means.

    def on_train_start(self) -> None:
        if not self.trainer.fit_loop.restarted_mid_epoch:
            self._epoch_sums = {}  # a restart at an epoch's end may carry the finished epoch's sums

    def on_train_epoch_end(self) -> None:
        self.finite_guard.resolve()
        self._epoch_sums = {}  # callbacks (EpochLog) have read epoch_means() by now

    def on_train_end(self) -> None:
        self.finite_guard.resolve()

    def train(self, mode: bool = True) -> FineTuner:
        """Training mode; with ``freeze_bn_stats`` the model's BatchNorm layers stay in evaluation mode (they normalise
        with, and keep, their running statistics). Lightning keeps the modes it finds at the start of training and
        restores them after each validation."""
        super().train(mode)
        if mode and self.freeze_bn_stats:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def _sum_dtype(self, device: torch.device) -> torch.dtype:
        return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64

    def _epoch_stat(self, name: str, value: torch.Tensor | float, batch_size: int) -> None:
        # A tensor is summed where it lives (no copy, no synchronisation per step); a Python number on the CPU.
        value = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        value = value.to(self._sum_dtype(value.device))
        entry = torch.stack([value * batch_size, torch.full_like(value, float(batch_size))])
        previous = self._epoch_sums.get(name)
        self._epoch_sums[name] = entry if previous is None else previous + entry

    def epoch_means(self) -> dict[str, float]:
        """This epoch's batch-size-weighted means of the summed values so far, over all processes.

        Every process must call it (it all-reduces when ``torch.distributed`` runs).
        """
        self.finite_guard.resolve()
        if not self._epoch_sums:
            return {}
        names = sorted(self._epoch_sums)
        dtype = self._sum_dtype(self.device)
        sums = all_reduce_sum(torch.stack([self._epoch_sums[n].to(device=self.device, dtype=dtype) for n in names]))
        return {n: float(total / count) for n, (total, count) in zip(names, sums.tolist())}

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    # -- steps ------------------------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return forward_parts(self.model, images)[2]

    @property
    def needs_indices(self) -> bool:
        """Whether some term reads the samples' positions in the training subset (the data module yields them)."""
        return any(term.needs_indices for term in self.regularizers.values())

    def forward_step(self, images: torch.Tensor, labels: torch.Tensor, step: int = 0, epoch: int = 0,
                     total_steps: int | None = None, indices: torch.Tensor | None = None,
                     targets: torch.Tensor | None = None) -> TrainStep:
        """One forward pass of the model on a batch, recorded as the criterion and the regularizers read it.

        The images take the module's memory layout; the outputs of the modules that some regularizer lists in
        ``needs_feature_maps`` are captured during the same pass.

        Args:
            images: The input batch.
            labels: Integer targets.
            step: Global optimisation step (0-based) this batch will produce.
            epoch: Current epoch (0-based).
            total_steps: Planned optimisation steps of the run, when known.
            indices: Positions of the samples in the training subset, for terms that set ``needs_indices``.
            targets: Soft targets of a mixed batch (mixup / cutmix), ``None`` otherwise.

        Shape:
            images: (B, 3, H, W). labels: (B,). indices: (B,). targets: (B, C).

        Returns:
            The step record: features, logits, feature maps (``"last"`` and the captured ones), labels, images.
        """
        images = self._layout(images)
        wanted = list(dict.fromkeys(n for term in self.regularizers.values() for n in term.needs_feature_maps))
        with capture_outputs(self.model, wanted) as maps:
            feature_map, features, logits = forward_parts(self.model, images)
        return TrainStep(features=features, logits=logits, labels=labels, model=self.model, global_step=step,
                         epoch=epoch, total_steps=total_steps, feature_maps={"last": feature_map, **maps},
                         images=images, indices=indices, targets=targets)

    def loss_terms(self, record: TrainStep) -> dict[str, torch.Tensor]:
        """The criterion and every regularizer evaluated on one step record, without logging.

        Args:
            record: What `forward_step` returned, or a copy of it with other tensors (the overhead benchmark
                times the terms alone on detached copies).

        Returns:
            ``{name: term}`` under the names the terms are logged as, the criterion's first; each a 0-dim tensor.
        """
        terms = {self.criterion_name: self.criterion(record)}
        for name, term in self.regularizers.items():
            terms[name] = term(record)
        return terms

    def compute_terms(self, images: torch.Tensor, labels: torch.Tensor, step: int = 0, epoch: int = 0,
                      total_steps: int | None = None, indices: torch.Tensor | None = None,
                      targets: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], TrainStep]:
        """One forward pass and every term of the loss, without logging (`forward_step`, `loss_terms`).

        What `training_step` runs and the overhead benchmark times; the arguments are `forward_step`'s.

        Returns:
            ``({name: term}, step record)``; the criterion's term first; the record holds features and logits.
        """
        record = self.forward_step(images, labels, step, epoch, total_steps, indices, targets)
        return self.loss_terms(record), record

    @staticmethod
    def total_loss(terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss: the sum of the terms, each in float32 (under mixed precision a term may be half)."""
        return torch.stack([t.float() for t in terms.values()]).sum()

    @torch.no_grad()
    def _log_feature_stats(self, features: torch.Tensor, labels: torch.Tensor, prefix: str) -> None:
        f = features.detach().float()
        weight = self.model.get_classifier().weight.detach().float()
        n = labels.shape[0]
        values = {f"{prefix}/feature_norm": f.norm(dim=1).mean(),
                  f"{prefix}/mean_margin": sample_margins(cosine_logits(f, weight), labels).mean()}
        if f.shape[1] > 1:  # normalised by H_max = log D, which is 0 for a single channel: no such statistic
            values[f"{prefix}/fmr_entropy"] = channel_entropy(f).mean() / math.log(f.shape[1])
        if prefix == "train":  # and the head's class margin, averaged over the epoch's steps
            values["train/class_margin_deg"] = torch.rad2deg(class_margin(weight))
        # Validation runs before the epoch's end: its sums join the training epoch's and reach epochs.csv with them.
        for name, value in values.items():
            self._epoch_stat(name, value, n)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels, *rest = batch
        targets = None
        if self.mixup is not None:
            with seeded_rng(mix_seed(self.seed, self.global_step)):  # timm's Mixup draws from NumPy and random
                images, targets = self.mixup(images, labels)
        # Labels checked on the CPU before the transfer (on_before_batch_transfer): the terms need not read them back.
        verified, self._labels_checked = self._labels_checked, False
        with labels_verified(self.num_classes) if verified else contextlib.nullcontext():
            terms, record = self.compute_terms(images, labels, self.global_step, self.current_epoch,
                                               self._total_steps(), indices=rest[0] if rest else None, targets=targets)
        logits = record.logits
        if self.feature_stats:
            self._log_feature_stats(record.features, labels, "train")
        loss = self.total_loss(terms)
        self.finite_guard.watch(loss, terms, f"step {self.global_step} (epoch {self.current_epoch + 1}, batch "
                                             f"{batch_idx})")
        batch_size = labels.shape[0]
        # Step values go to Lightning (progress bar, steps.csv); epoch means are the module's own sums.
        stepwise: dict[str, torch.Tensor | float] = {"train/loss": loss.detach()}
        criterion_stats = self.criterion.stats()
        if self.regularizers or criterion_stats:
            stepwise.update({f"train/{name}": value.detach() for name, value in terms.items()})
            # Tensors stay on the device (a float() would wait for it), cloned: a term may change its state in place.
            stepwise.update({f"train/{self.criterion_name}/{k}": _step_value(v) for k, v in criterion_stats.items()})
            for name, term in self.regularizers.items():
                stepwise.update({f"train/{name}/{key}": _step_value(v) for key, v in term.stats().items()})
        # The bar shows the criterion's loss: the total can be negative (FMR adds a negative entropy) and reads as a
        # bug.
        headline = f"train/{self.criterion_name}" if f"train/{self.criterion_name}" in stepwise else "train/loss"
        # A bar metric is read on the host at every step (a GPU wait): only while a bar shows it. The step log
        # (StepLog) reads step_values and converts a whole epoch's at once.
        bar = self._trainer is not None and self.trainer.progress_bar_callback is not None
        for name, value in stepwise.items():
            self.log(f"{name}_step", value, on_step=True, on_epoch=False, batch_size=batch_size,
                     prog_bar=bar and name == headline)
            self._epoch_stat(name, value, batch_size)
        self.step_values = stepwise
        self._epoch_stat("train/acc", (logits.argmax(-1) == labels).float().mean(), batch_size)
        return loss

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Check the batch's labels while they are on the CPU (free), before they go to the device."""
        labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        if isinstance(labels, torch.Tensor) and labels.device.type == "cpu" and labels.dim() == 1 and labels.numel():
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= self.num_classes:
                raise ValueError(
                    f"a batch has labels in [{low}, {high}], outside [0, {self.num_classes - 1}] for the "
                    f"{self.num_classes} classes of the model: the dataset's targets do not match its class list"
                )
            self._labels_checked = self._trainer is not None and self.trainer.training
        return batch

    def _total_steps(self) -> int | None:
        return self._steps_total

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def _batch_sums(self, model: nn.Module, images: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(features, predictions, sums)`` of one evaluation batch; ``sums`` is ``[loss sum, correct, count]``
        followed by the correct predictions and the items of each class."""
        _, features, logits = forward_parts(model, images)
        loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        loss = loss.to(self._sum_dtype(loss.device))
        predicted = logits.argmax(-1)
        # Per-class sums by one-hot rows, not bincount of the correct labels: no boolean indexing (a device
        # synchronisation per batch) and deterministic on every device.
        items = nn.functional.one_hot(labels, self.num_classes).to(loss.dtype)  # (B, C)
        class_hits = (items * (predicted == labels).unsqueeze(1)).sum(0)
        class_counts = items.sum(0)
        sums = torch.cat([torch.stack([loss, class_hits.sum(), torch.full_like(loss, labels.shape[0])]),
                          class_hits, class_counts])
        return features, predicted, sums

    @torch.no_grad()
    def score(self, loader: Iterable[Sequence[torch.Tensor]], device: torch.device,
              context: Callable[[], Any] = contextlib.nullcontext) -> Evaluation:
        """Mean cross-entropy, accuracy and balanced accuracy of the model, in evaluation mode, on every batch of
        ``loader`` in this process (no sharding, no logging): WiSE-FT's choice among its mixes.

        Args:
            loader: Yields ``(images, labels, ...)``.
            device: Where the forward passes run (the module is moved there).
            context: Entered around the passes, e.g. the trainer's precision (``precision_plugin.forward_context``).
        """
        self.to(device).eval()
        # read once, after the last batch
        sums = torch.zeros(3 + 2 * self.num_classes, dtype=self._sum_dtype(device), device=device)
        with context():
            for images, labels, *_ in loader:
                images, labels = self._layout(images.to(device)), labels.to(device)
                sums += self._batch_sums(self.model, images, labels)[2]
        return self._scores(sums.tolist())

    def _scores(self, sums: list[float]) -> Evaluation:
        loss, correct, count = sums[:3]
        hits, counts = sums[3:3 + self.num_classes], sums[3 + self.num_classes:]
        return Evaluation(loss / count, correct / count, balanced_accuracy(hits, counts))

    def _evaluate(self, batch: Sequence[torch.Tensor], prefix: str) -> torch.Tensor:
        images, labels = self._layout(batch[0]), batch[1]
        features, predicted, sums = self._batch_sums(self.model, images, labels)
        if self.feature_stats and prefix == "val":
            self._log_feature_stats(features, labels, prefix)
        self._eval_sums = sums if self._eval_sums is None else self._eval_sums + sums
        if self.ema is not None and prefix == "val":
            ema_sums = self._batch_sums(self.ema.module, images, labels)[2]
            self._ema_sums = ema_sums if self._ema_sums is None else self._ema_sums + ema_sums
        return predicted

    def _reduce_evaluation(self, sums: torch.Tensor | None) -> Evaluation | None:
        """Loss, accuracy and balanced accuracy over the whole split: sums and counts reduced across processes (each
        holds a share); ``None`` for a split without items."""
        if sums is None:  # a process without items joins with zeros
            sums = torch.zeros(3 + 2 * self.num_classes, dtype=self._sum_dtype(self.device), device=self.device)
        sums = all_reduce_sum(sums).tolist()
        return self._scores(sums) if sums[2] > 0 else None

    def _log_evaluation(self, prefix: str) -> Evaluation | None:
        result = self._reduce_evaluation(self._eval_sums)
        self._eval_sums = None
        if result is not None:
            self.log(f"{prefix}/loss", result.loss, sync_dist=False)
            self.log(f"{prefix}/acc", result.acc, sync_dist=False)
            self.log(f"{prefix}/bal_acc", result.bal_acc, sync_dist=False)
        return result

    def _log_ema_evaluation(self, raw: Evaluation | None) -> None:
        """The EMA weights' validation loss, accuracy and balanced accuracy, and which of the two weights selection
        prefers this epoch (by the run's ``select``: lower loss for ``val_loss``, higher balanced accuracy for
        ``val_bal_acc``, higher accuracy otherwise; ties: the raw weights): ``select/loss``, ``select/acc`` and
        ``select/bal_acc`` are the preferred one's, ``select/ema`` is 1 when it is the EMA."""
        ema = self._reduce_evaluation(self._ema_sums)
        self._ema_sums = None
        if ema is None or raw is None:
            return
        self.log("val_ema/loss", ema.loss, sync_dist=False)
        self.log("val_ema/acc", ema.acc, sync_dist=False)
        self.log("val_ema/bal_acc", ema.bal_acc, sync_dist=False)
        if self.select_by == "val_loss":
            self.ema_selected = ema.loss < raw.loss
        elif self.select_by == "val_bal_acc":
            self.ema_selected = ema.bal_acc > raw.bal_acc
        else:
            self.ema_selected = ema.acc > raw.acc
        chosen = ema if self.ema_selected else raw
        self.log("select/ema", float(self.ema_selected), sync_dist=False)
        self.log("select/loss", chosen.loss, sync_dist=False)
        self.log("select/acc", chosen.acc, sync_dist=False)
        self.log("select/bal_acc", chosen.bal_acc, sync_dist=False)

    def on_validation_epoch_start(self) -> None:
        self.finite_guard.resolve()
        self._eval_sums = None
        self._ema_sums = None

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        raw = self._log_evaluation("val")
        if self.ema is not None:
            self._log_ema_evaluation(raw)

    def on_test_epoch_start(self) -> None:
        self._eval_sums = None
        self._test_confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=self.device)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        predicted = self._evaluate(batch, "test")
        cells = batch[1] * self.num_classes + predicted  # row-major index of (true class, predicted class)
        self._test_confusion += torch.bincount(cells, minlength=self.num_classes ** 2).reshape(self.num_classes, -1)

    def on_test_epoch_end(self) -> None:
        result = self._log_evaluation("test")
        confusion = self.all_gather(self._test_confusion).reshape(-1, self.num_classes, self.num_classes).sum(0)
        self._test_confusion = confusion  # every process holds the whole split's confusion
        if result is not None:  # the balanced accuracy under its older name
            self.log("test/mean_class_acc", result.bal_acc, sync_dist=False)

    def test_confusion(self) -> list[list[int]]:
        """The confusion matrix of the last test run: ``[i][j]`` test images of class ``i`` predicted as ``j``."""
        return self._test_confusion.tolist()

    def test_class_accuracy(self) -> list[float | None]:
        """Per-class test accuracy of the last test run (``None`` for classes absent from the test set)."""
        confusion = self._test_confusion
        return class_recall(confusion.diagonal().tolist(), confusion.sum(1).tolist())

    # -- optimisation -----------------------------------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups, each with ``name`` and ``lr``; frozen parameters and empty groups left out.

        ``backbone``; ``head`` at ``lr * head_lr_mult``; ``reg/<name>`` for each regularizer with learnable
        parameters, with its ``param_group_options()`` (a term that returns ``None`` steps its own parameters).
        """
        head = list(self.model.get_classifier().parameters())
        head_ids = {id(p) for p in head}
        backbone = [p for p in self.model.parameters() if id(p) not in head_ids and p.requires_grad]
        groups = [
            *self._backbone_groups(backbone),
            {"name": "head", "params": [p for p in head if p.requires_grad],
             "lr": self.optim.lr * self.optim.head_lr_mult},
        ]
        for name, term in self.regularizers.items():
            options = term.param_group_options()
            params = [p for p in term.parameters() if p.requires_grad]
            if params and options is not None:  # None: the term steps its own parameters
                groups.append({"name": f"reg/{name}", "params": params, "lr": self.optim.lr, **options})
        return [g for g in groups if g["params"]]

    def _backbone_groups(self, backbone: list[nn.Parameter]) -> list[dict[str, Any]]:
        """``backbone`` at ``lr``; with layer-wise decay, one group per layer ``l`` of ``L`` (timm's grouping of the
        model's blocks, its ``group_matcher``, as `timm.optim.param_groups_layer_decay` uses it), named
        ``backbone/<l>``, at ``lr * layer_decay ** (L - 1 - l)``: the last layer (where timm puts the head) at
        ``lr``, the stem lowest. Weight decay is not changed (timm's helper would also drop it from biases and norms).
        """
        decay = self.optim.layer_decay
        if decay is None:
            return [{"name": "backbone", "params": backbone, "lr": self.optim.lr}]
        if not hasattr(self.model, "group_matcher"):
            raise ValueError(f"optim.layer_decay needs timm's layer grouping, but {type(self.model).__name__} has no "
                             "group_matcher(); use a timm model or drop layer_decay")
        from timm.models import group_parameters

        layer_of = group_parameters(self.model, self.model.group_matcher(coarse=False), reverse=True)
        top = max(layer_of.values())
        by_id = {id(p): name for name, p in self.model.named_parameters()}
        layers: dict[int, list[nn.Parameter]] = {}
        for param in backbone:  # in the model's parameter order: the groups' contents are deterministic
            layers.setdefault(layer_of.get(by_id[id(param)], top), []).append(param)
        return [{"name": f"backbone/{layer}", "params": layers[layer], "lr": self.optim.lr * decay ** (top - layer)}
                for layer in sorted(layers)]

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self.param_groups()
        if self.optim.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=self.optim.lr, momentum=self.optim.momentum,
                                        nesterov=self.optim.nesterov and self.optim.momentum > 0,
                                        weight_decay=self.optim.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        self._steps_total = total
        per_epoch = max(total // max(self.trainer.max_epochs, 1), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total, per_epoch, self.optim))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def named_terms(self) -> Iterable[str]:
        """Names under which the criterion and regularizers are logged."""
        return [self.criterion_name, *self.regularizers.keys()]
