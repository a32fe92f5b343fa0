"""Overhead of each method per training step against plain fine-tuning, measured side by side in one process.

Every method trains its own copy of the same pretrained backbone on the same fixed batches with the same optimizer.
Methods are timed in interleaved rounds (round r runs every method for ``steps`` steps), so that drifts of the
machine's speed fall on all methods alike; the reported time is the median over rounds of the mean step time, and
the ratio is the median over rounds of (method's time / plain fine-tuning's time in the same round). On
CUDA the peak memory of each method's steps is measured too (on CPU PyTorch exposes no per-allocation peak).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import lightning.pytorch as pl
import torch

from regtune.models import create_backbone
from regtune.regularizers import CrossEntropy, TrainStep, create_criterion, create_regularizer
from regtune.train.config import OptimConfig, TermSpec
from regtune.train.module import FineTuner

__all__ = ["METHOD_SETS", "SEED_METHODS", "TRANSFER_METHODS", "FrameworkResult", "Method", "OverheadResult",
           "OverheadSettings", "framework_table", "measure_framework_overhead", "measure_overhead", "measure_peak_rss",
           "measure_term_cost", "overhead_table"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """A row of the benchmark: a label, a criterion and regularizers."""

    label: str
    regularizers: tuple[TermSpec, ...] = ()
    criterion: TermSpec = field(default_factory=lambda: TermSpec("ce"))


SEED_METHODS: tuple[Method, ...] = (
    Method("ft"),
    Method("fmr", (TermSpec("fmr"),)),
    Method("adarand", (TermSpec("adarand"),)),
    Method("randreg-uniform", (TermSpec("randreg", {"prior": "uniform"}),)),
    Method("randreg-pretrained", (TermSpec("randreg", {"prior": "pretrained"}),)),
    Method("fnp", (TermSpec("fnp"),)),
    Method("maxent", (TermSpec("maxent"),)),
    Method("head_l1", (TermSpec("head_l1"),)),
    Method("head_l2", (TermSpec("head_l2"),)),
    Method("lm_softmax", (), TermSpec("lm_softmax")),
    Method("sample_margin", (TermSpec("sample_margin"),)),
)

TRANSFER_METHODS: tuple[Method, ...] = (
    Method("ft"),
    Method("l2_sp", (TermSpec("l2_sp"),)),
    Method("delta", (TermSpec("delta"),)),
    Method("delta-uniform", (TermSpec("delta", {"attention": "uniform"}),)),
    Method("bss", (TermSpec("bss"),)),
    Method("co_tuning", (TermSpec("co_tuning"),)),
    Method("lwf", (TermSpec("lwf"),)),
    Method("lwf-online", (TermSpec("lwf", {"teacher": "online"}),)),
    Method("stochnorm", (TermSpec("stochnorm"),)),
)

METHOD_SETS = {"seed": SEED_METHODS, "transfer": TRANSFER_METHODS}


@dataclass(frozen=True)
class OverheadSettings:
    """What the overhead measurements build and how long they run; one object shared by every measurement.

    Each measurement reads the fields it needs: all of them the model and batch fields (``backbone`` to ``seed``);
    `measure_overhead` also ``steps``, ``rounds`` and ``warmup``; `measure_term_cost` ``term_repeats``;
    `measure_peak_rss` ``memory_steps``; `measure_framework_overhead` ``rounds``.

    Args:
        backbone: timm model name.
        pretrained: Weight source (see `regtune.models.create_backbone`); ``"none"`` for random weights.
        num_classes: Classes of the synthetic task (the framework benchmark's image folder has as many).
        img_size: Input resolution (square images, pixels).
        batch_size: Images per training step.
        device: ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:1"``). The peak-memory measurement is CPU-only and
            refuses any other device.
        seed: Seed of the synthetic batches and of the initialisations.
        steps: Timed steps per method per round of `measure_overhead`.
        rounds: Interleaved rounds (the median over rounds is reported).
        warmup: Untimed steps per method before the first round.
        term_repeats: Timed evaluations of the terms per method in `measure_term_cost` (the median is
            reported; three more run untimed first).
        memory_steps: Training steps per method in `measure_peak_rss`.

    Raises:
        TypeError: A count or size that is not an ``int``.
        ValueError: A count or size below 1 (``seed`` and ``warmup`` below 0), or a device that is neither CPU nor
            CUDA.
    """

    backbone: str = "tf_efficientnet_lite0"
    pretrained: str = "auto"
    num_classes: int = 10
    img_size: int = 128
    batch_size: int = 32
    device: str = "cpu"
    seed: int = 0
    steps: int = 5
    rounds: int = 5
    warmup: int = 3
    term_repeats: int = 30
    memory_steps: int = 3

    def __post_init__(self) -> None:
        for name in ("num_classes", "img_size", "batch_size", "seed", "steps", "rounds", "warmup", "term_repeats",
                     "memory_steps"):
            value, lowest = getattr(self, name), 0 if name in ("seed", "warmup") else 1
            if not isinstance(value, int):
                raise TypeError(f"OverheadSettings.{name} must be an int; got {value!r}")
            if value < lowest:
                raise ValueError(f"OverheadSettings.{name} must be >= {lowest}; got {value}")
        if torch.device(self.device).type not in ("cpu", "cuda"):
            raise ValueError(f"OverheadSettings.device must be 'cpu' or a CUDA device; got {self.device!r}")

    def _require_cpu(self, measurement: str) -> None:
        if torch.device(self.device).type != "cpu":
            raise ValueError(f"{measurement} measures the CPU; got device={self.device!r}. Pass settings with "
                             f"device='cpu' (measure_overhead reports the CUDA peak memory on GPUs).")


@dataclass
class OverheadResult:
    """Timing of one method."""

    label: str
    ms_per_step: float
    ratio: float
    rounds_ms: list[float]
    peak_mib: float | None = None
    mem_ratio: float | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_overhead(methods: Sequence[Method] = SEED_METHODS,
                     settings: OverheadSettings = OverheadSettings()) -> list[OverheadResult]:
    """Time one training step (forward, every term, backward, optimizer step) per method.

    Args:
        methods: Rows; the first is the baseline of the ratios (plain fine-tuning).
        settings: Model, batch and device; ``steps``, ``rounds`` and ``warmup`` set the timing.

    Returns:
        One `OverheadResult` per method, in order.
    """
    torch.manual_seed(settings.seed)
    dev = torch.device(settings.device)
    runners = [_build_runner(method, settings) for method in methods]
    for _, module, optimizer, data in runners:
        _steps(module, optimizer, *data, settings.warmup)
    _sync(dev)
    times: dict[str, list[float]] = {m.label: [] for m in methods}
    peaks: dict[str, float] = {}
    for r in range(settings.rounds):
        for method, module, optimizer, data in runners:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            _sync(dev)
            start = time.perf_counter()
            _steps(module, optimizer, *data, settings.steps)
            _sync(dev)
            times[method.label].append(1000 * (time.perf_counter() - start) / settings.steps)
            if dev.type == "cuda":
                peaks[method.label] = max(peaks.get(method.label, 0.0), torch.cuda.max_memory_allocated(dev) / 2**20)
        _log.info("overhead round %d/%d done", r + 1, settings.rounds)
    base_times = times[methods[0].label]
    base_mem = peaks.get(methods[0].label)
    results = []
    for method in methods:
        ms = statistics.median(times[method.label])
        # Paired by round: each round's time over the baseline's time in the same round, then the median, so that
        # slow phases of the machine cancel out.
        ratio = statistics.median(t / b for t, b in zip(times[method.label], base_times))
        peak = peaks.get(method.label)
        results.append(OverheadResult(method.label, ms, ratio, times[method.label], peak,
                                      peak / base_mem if peak is not None and base_mem else None))
    return results


def _build_runner(method: Method, settings: OverheadSettings) -> tuple:
    """A FineTuner for ``method`` on a fresh copy of the backbone, set up, with its optimizer and the fixed batch."""
    seed, num_classes = settings.seed, settings.num_classes
    batch_size, img_size = settings.batch_size, settings.img_size
    device = torch.device(settings.device)
    torch.manual_seed(seed)
    built = create_backbone(settings.backbone, num_classes, pretrained=settings.pretrained)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(batch_size) % num_classes
    count = max(2 * num_classes, batch_size)  # set-up passes see every class; LwF caches one output per image
    setup_images = torch.randn(count, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed + 1))
    batches = [(setup_images, torch.arange(count) % num_classes)]
    terms = [create_regularizer(r.name, **r.args) for r in method.regularizers]
    for term in terms:
        if term.needs_source_head:
            term.attach_source_head(built.source_head)
    module = FineTuner(built.model, create_criterion(method.criterion.name, **method.criterion.args), terms,
                       OptimConfig(), num_classes, setup_loader=lambda: batches,
                       train_loader=lambda: batches).to(device)
    module.train()
    module.prepare_regularizers()
    optimizer = torch.optim.SGD(module.param_groups(), lr=1e-3, momentum=0.9, nesterov=True)
    indices = torch.arange(batch_size).to(device) if module.needs_indices else None
    return method, module, optimizer, (images.to(device), labels.to(device), indices)


def _steps(module: FineTuner, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
           indices: torch.Tensor | None, count: int) -> None:
    """``count`` training steps on one batch: the module's own forward pass, terms and loss, then the update."""
    for i in range(count):
        terms, _ = module.compute_terms(x, y, step=i, epoch=1, total_steps=10_000, indices=indices)
        loss = module.total_loss(terms)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def measure_term_cost(methods: Sequence[Method] = SEED_METHODS,
                      settings: OverheadSettings = OverheadSettings()) -> dict[str, float]:
    """Milliseconds that each method's own terms add to a step, timed alone (the profile behind a ratio).

    One forward pass of the method's module (`forward_step`) records a
    `TrainStep`; its features, logits and feature maps are copied as detached leaves, and
    the module's terms (`loss_terms`: the criterion and every regularizer) are
    evaluated on the copy and back-propagated ``settings.term_repeats`` times (median reported), minus the same for
    plain cross-entropy. What remains is the work of the terms themselves, including what they run besides (DELTA's
    frozen source forward, LwF's online teacher), without the noise of timing whole steps. Model-changing methods
    (StochNorm) cost inside the forward pass and show here as about 0.

    Args:
        methods: Rows to time.
        settings: Model, batch and device; ``term_repeats`` sets the timing.

    Returns:
        ``{label: milliseconds}``.
    """
    costs: dict[str, float] = {}
    for method in methods:
        costs[method.label] = _term_cost(method, settings)
        _log.info("%s: terms add %.2f ms per step", method.label, costs[method.label])
    return costs


def _term_cost(method: Method, settings: OverheadSettings) -> float:
    """Milliseconds of ``method``'s terms on a recorded step, minus plain cross-entropy's on the same step."""
    device = torch.device(settings.device)
    _, module, _, (x, y, indices) = _build_runner(method, settings)
    with torch.no_grad():
        recorded = module.forward_step(x, y, step=1, epoch=1, total_steps=10_000, indices=indices)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(True)

    def fresh() -> TrainStep:  # each repeat back-propagates into its own leaves
        return replace(recorded, features=leaf(recorded.features), logits=leaf(recorded.logits),
                       feature_maps={k: leaf(v) for k, v in recorded.feature_maps.items()})

    plain = CrossEntropy()
    own_ms = _time_terms(module.loss_terms, fresh, settings.term_repeats, device)
    plain_ms = _time_terms(lambda record: {"ce": plain(record)}, fresh, settings.term_repeats, device)
    module.model.zero_grad(set_to_none=True)
    return own_ms - plain_ms


def _time_terms(evaluate: Callable[[TrainStep], dict[str, torch.Tensor]], make_record: Callable[[], TrainStep],
                repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``evaluate`` on a fresh record and the backward pass of its terms' sum."""
    samples = []
    for i in range(repeats + 3):  # the first three warm up
        record = make_record()
        _sync(device)
        start = time.perf_counter()
        total = FineTuner.total_loss(evaluate(record))
        if total.requires_grad:
            total.backward()
        _sync(device)
        if i >= 3:
            samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_rss_child(queue: Any, method: Method, settings: OverheadSettings) -> None:
    try:
        _, module, optimizer, (x, y, indices) = _build_runner(method, settings)
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand memory freed by the set-up back, so training must re-grow it
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak-RSS high-water mark (Linux >= 4.0)
        before = _status_kib("VmRSS")
        _steps(module, optimizer, x, y, indices, settings.memory_steps)
        queue.put(("ok", (before / 1024, _status_kib("VmHWM") / 1024)))
    except Exception as err:  # noqa: BLE001 - reported to the parent
        queue.put(("error", err))


def measure_peak_rss(methods: Sequence[Method] = SEED_METHODS,
                     settings: OverheadSettings = OverheadSettings()) -> dict[str, tuple[float, float]]:
    """Memory that each method's training steps add on top of its built, set-up model (MiB), on the CPU.

    The CPU counterpart of CUDA's peak-allocation counter (PyTorch keeps none on the CPU): each method runs alone in
    a spawned child process, which builds the model and runs the regularizers' set-up, then resets the kernel's
    peak-RSS mark (``/proc/self/clear_refs``) after returning freed heap to the system (``malloc_trim``), trains,
    and reports ``VmHWM - VmRSS_before``: the peak of gradients, optimizer state, activations and whatever the terms
    add (DELTA's source forward, LwF's teacher), without the interpreter, torch and the model itself. Linux with
    glibc only.

    Args:
        methods: Rows to measure.
        settings: Model and batch; ``memory_steps`` training steps per method. The device must be the CPU.

    Returns:
        ``{label: (rss_before_mib, peak_increase_mib)}``.

    Raises:
        ValueError: ``settings.device`` is not the CPU.
        RuntimeError: A child process failed (its error is chained).
    """
    settings._require_cpu("measure_peak_rss")
    context = multiprocessing.get_context("spawn")
    peaks = {}
    for method in methods:
        queue = context.Queue()
        child = context.Process(target=_peak_rss_child, args=(queue, method, settings))
        child.start()
        outcome, result = queue.get()
        child.join()
        if outcome == "error":
            raise RuntimeError(f"peak-memory run of {method.label} failed: {result}") from result
        before, peak = result
        peaks[method.label] = (before, peak - before)
        _log.info("%s: %.0f MiB resident before training, peak +%.0f MiB while training", method.label, before,
                  peak - before)
    return peaks


def overhead_table(results: Sequence[OverheadResult], peak_rss: dict[str, tuple[float, float]] | None = None,
                   term_ms: dict[str, float] | None = None) -> str:
    """Markdown table of `measure_overhead`'s results (with `measure_peak_rss`'s and
    `measure_term_cost`'s when given)."""
    rss_head = " RSS before (MiB) | training peak + MiB | x plain FT |" if peak_rss else ""
    term_head = " terms alone (ms) | FT step + terms, x FT |" if term_ms else ""
    lines = ["| method | ms / step (median) | x plain FT (paired median) | rounds (ms) | CUDA peak MiB | x plain FT |"
             + rss_head + term_head,
             "|---|---:|---:|---|---:|---:|" + ("---:|---:|---:|" if peak_rss else "")
             + ("---:|---:|" if term_ms else "")]
    base_rss = peak_rss.get(results[0].label) if peak_rss else None
    base_ms = results[0].ms_per_step
    for r in results:
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "n/a"
        mem = f"{r.mem_ratio:.3f}" if r.mem_ratio is not None else "n/a"
        rounds = " ".join(f"{t:.0f}" for t in r.rounds_ms)
        line = f"| {r.label} | {r.ms_per_step:.1f} | {r.ratio:.3f} | {rounds} | {peak} | {mem} |"
        if peak_rss and r.label in peak_rss and base_rss:
            before, increase = peak_rss[r.label]
            line += f" {before:.0f} | {increase:.0f} | {increase / base_rss[1]:.3f} |"
        if term_ms and r.label in term_ms:
            line += f" {term_ms[r.label]:.2f} | {(base_ms + term_ms[r.label]) / base_ms:.3f} |"
        lines.append(line)
    return "\n".join(lines)


# -- regtune's own framework overhead ---------------------------------------------------------------------------------


@dataclass
class FrameworkResult:
    """Per-step and per-epoch time of ``regtune fit`` against a bare PyTorch loop on the same model and data."""

    bare_ms_per_step: float
    regtune_ms_per_step: float
    step_ratio: float
    bare_s_per_epoch: float
    regtune_s_per_epoch: float
    epoch_ratio: float
    steps_per_epoch: int
    rounds: int
    regtune_fit_s: float


class _StepClock:
    """Iteration-to-iteration times (data loading + step + every hook) and epoch times, from inside a loop."""

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync
        self.steps: list[float] = []
        self.epochs: list[float] = []
        self._last: float | None = None
        self._epoch_start = 0.0

    def epoch_start(self) -> None:
        self._epoch_start = self._last = time.perf_counter()

    def step_end(self, first_of_epoch: bool) -> None:
        if self.sync:
            torch.cuda.synchronize()  # the step's kernels have run, not just been queued
        now = time.perf_counter()
        if not first_of_epoch:  # the first step of an epoch also pays for the loader's start: counted per epoch
            self.steps.append(now - self._last)
        self._last = now

    def epoch_end(self) -> None:
        self.epochs.append(time.perf_counter() - self._epoch_start)


def _write_synthetic_imagefolder(root: Any, classes: int, total: int, size: int, seed: int) -> None:
    """``total`` random training images, image k in class k mod ``classes``, and one test image per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in range(classes):
            (root / split / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    for k in range(total):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            root / "train" / f"class_{k % classes:02d}" / f"{k}.png")
    for c in range(classes):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            root / "test" / f"class_{c:02d}" / "0.png")


def _bare_epochs(root: Any, settings: OverheadSettings, epochs: int, clock: _StepClock, precision: str = "32-true",
                 num_workers: int = 0) -> None:
    """The loop a user writes by hand: timm model and transform, torchvision ImageFolder, SGD, cosine schedule (on
    a GPU: pinned memory, non-blocking copies and, for ``bf16-mixed``, bfloat16 autocast)."""
    import math

    import timm.data
    import torchvision

    torch.use_deterministic_algorithms(False)
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    built = create_backbone(settings.backbone, settings.num_classes, pretrained=settings.pretrained)
    model = built.model.to(device, memory_format=torch.channels_last).train()
    config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(input_size=(3, settings.img_size, settings.img_size), is_training=True,
                                           scale=(0.5, 1.0),
                                           hflip=0.5, color_jitter=None, interpolation=config["interpolation"],
                                           mean=config["mean"], std=config["std"])
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, drop_last=True,
                                         num_workers=num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=num_workers > 0)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())
    head = list(model.get_classifier().parameters())
    head_ids = {id(p) for p in head}
    optim = OptimConfig()
    optimizer = torch.optim.SGD([{"params": [p for p in model.parameters() if id(p) not in head_ids]},
                                 {"params": head, "lr": optim.lr * optim.head_lr_mult}], lr=optim.lr,
                                momentum=optim.momentum, nesterov=optim.nesterov, weight_decay=optim.weight_decay)
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    for _ in range(epochs):
        clock.epoch_start()
        for i, (images, labels) in enumerate(loader):
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            with autocast:
                logits = model(images)
                loss = torch.nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            clock.step_end(first_of_epoch=i == 0)
        clock.epoch_end()


class _Clocked(pl.Callback):
    """Feeds ``regtune fit``'s step and epoch ends to a `_StepClock`."""

    def __init__(self, clock: _StepClock) -> None:
        self.clock = clock

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.epoch_start()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.clock.step_end(first_of_epoch=batch_idx == 0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.epoch_end()


def measure_framework_overhead(settings: OverheadSettings = OverheadSettings(), steps_per_epoch: int = 12,
                               epochs: int = 2, precision: str = "32-true", num_workers: int = 0) -> FrameworkResult:
    """``regtune fit`` (Lightning, regtune's callbacks, per-step CSV log, checkpoints each epoch) against a bare loop.

    Both train the same backbone (channels-last in both) on the same synthetic image folder (``settings.num_classes``
    classes) with the same augmentation, batch size, optimizer and schedule, single process, no validation. They
    alternate, ``settings.rounds`` times each. Per step: the median iteration-to-iteration time (data loading,
    forward, backward, optimizer and every hook), first step of each epoch excluded; per epoch: the median epoch wall
    time (the first step, the epoch's hooks and regtune's checkpoints included). Ratios are medians over rounds of
    regtune / bare.

    On a GPU (``settings.device`` ``"cuda"``), both loops load with ``num_workers`` processes and pinned memory, and
    each step's time is taken after `torch.cuda.synchronize`, so it is the time the step's kernels took.

    Args:
        settings: Model, batch, device and ``rounds``.
        steps_per_epoch: Training steps per epoch (the image folder holds that many batches).
        epochs: Epochs of each loop per round.
        precision: ``"32-true"`` or ``"bf16-mixed"`` (bfloat16 autocast in the bare loop, Lightning's in fit).
        num_workers: Data-loading processes of both loops.

    Returns:
        Both loops' median times and their ratios.

    Raises:
        ValueError: Fewer than one step per epoch or epoch, or another precision.
    """
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(f"steps_per_epoch and epochs must be >= 1; got {steps_per_epoch} and {epochs}")
    if precision not in ("32-true", "bf16-mixed"):
        raise ValueError(f"precision must be 32-true or bf16-mixed, got {precision!r}")
    cuda = torch.device(settings.device).type == "cuda"
    import tempfile
    from pathlib import Path

    from regtune.train.config import DataConfig, FitConfig, ModelConfig, TrainerConfig
    from regtune.train.fit import fit

    with tempfile.TemporaryDirectory(prefix="regtune-framework-") as tmp:
        root = Path(tmp) / "data"
        classes = settings.num_classes
        _write_synthetic_imagefolder(root, classes, max(steps_per_epoch * settings.batch_size, classes),
                                     settings.img_size, settings.seed)
        config = FitConfig(
            data=DataConfig(dataset="imagefolder", root=str(root), fraction=None, per_class=None, val_fraction=0.0,
                            img_size=settings.img_size, batch_size=settings.batch_size, num_workers=num_workers),
            # the bare loop's training: a fresh head, BatchNorm in training mode (no probe, which is set-up time)
            model=ModelConfig(backbone=settings.backbone, pretrained=settings.pretrained, head_init="normal",
                              freeze_bn_stats=False),
            trainer=TrainerConfig(epochs=epochs, seed=settings.seed, select="last", progress_bar=False,
                                  accelerator="gpu" if cuda else "cpu", precision=precision, wise_alphas=(),
                                  devices=[torch.device(settings.device).index or 0] if cuda else "auto"),
        )
        bare_steps, bare_epochs, ours_steps, ours_epochs, fit_seconds = [], [], [], [], []
        for r in range(settings.rounds):
            bare_clock = _StepClock(sync=cuda)
            _bare_epochs(root, settings, epochs, bare_clock, precision, num_workers)
            bare_steps.append(statistics.median(bare_clock.steps))
            bare_epochs.append(statistics.median(bare_clock.epochs))
            clock = _StepClock(sync=cuda)
            started = time.perf_counter()
            fit(config, run_dir=Path(tmp) / f"run{r}", callbacks=[_Clocked(clock)])
            fit_seconds.append(time.perf_counter() - started)
            if len(clock.steps) != len(bare_clock.steps):
                raise RuntimeError(f"the loops ran different step counts ({len(clock.steps)} vs "
                                   f"{len(bare_clock.steps)}); the comparison would be unfair")
            ours_steps.append(statistics.median(clock.steps))
            ours_epochs.append(statistics.median(clock.epochs))
            _log.info("framework round %d/%d: bare %.0f ms/step, regtune %.0f ms/step", r + 1, settings.rounds,
                      1000 * bare_steps[-1], 1000 * ours_steps[-1])
    return FrameworkResult(
        bare_ms_per_step=1000 * statistics.median(bare_steps), regtune_ms_per_step=1000 * statistics.median(ours_steps),
        step_ratio=statistics.median(o / b for o, b in zip(ours_steps, bare_steps)),
        bare_s_per_epoch=statistics.median(bare_epochs), regtune_s_per_epoch=statistics.median(ours_epochs),
        epoch_ratio=statistics.median(o / b for o, b in zip(ours_epochs, bare_epochs)),
        steps_per_epoch=len(bare_clock.steps) // epochs + 1, rounds=settings.rounds,
        regtune_fit_s=statistics.median(fit_seconds))


def framework_table(result: FrameworkResult) -> str:
    """Markdown table of `measure_framework_overhead`."""
    r = result
    return ("| loop | ms / step (median) | s / epoch (median) |\n|---|---:|---:|\n"
            f"| bare PyTorch loop | {r.bare_ms_per_step:.1f} | {r.bare_s_per_epoch:.2f} |\n"
            f"| regtune fit | {r.regtune_ms_per_step:.1f} | {r.regtune_s_per_epoch:.2f} |\n"
            f"| **ratio** | **{r.step_ratio:.3f}x** | **{r.epoch_ratio:.3f}x** |\n\n"
            f"{r.steps_per_epoch} steps per epoch, {r.rounds} alternating rounds; ratios are medians over rounds. "
            f"One whole `fit` (set-up, {r.steps_per_epoch}-step epochs, checkpoints, test, plots) took "
            f"{r.regtune_fit_s:.1f} s.")
