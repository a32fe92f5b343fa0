"""Overhead of each method per training step against plain fine-tuning, measured side by side in one process.

Every method trains its own copy of the same pretrained backbone on the same fixed batches with the same optimizer.
Methods are timed in interleaved rounds (round r runs every method for ``steps`` steps), so that drifts of the
machine's speed fall on all methods alike; the reported time is the median over rounds of the mean step time, and
the ratio is the median over rounds of (method's time / plain fine-tuning's time in the same round). On
CUDA the peak memory of each method's steps is measured too (on CPU PyTorch exposes no per-allocation peak).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from regtune.models import create_backbone
from regtune.regularizers import create_criterion, create_regularizer
from regtune.train.config import OptimConfig, TermSpec
from regtune.train.module import FineTuner

__all__ = ["Method", "OverheadResult", "measure_overhead", "overhead_table", "SEED_METHODS"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """A row of the benchmark: a label, a criterion and regularizers."""

    label: str
    regularizers: tuple[TermSpec, ...] = ()
    criterion: TermSpec = TermSpec("ce")


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


def measure_overhead(
        methods: Sequence[Method] = SEED_METHODS,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: str = "auto",
        num_classes: int = 10,
        img_size: int = 128,
        batch_size: int = 32,
        steps: int = 5,
        rounds: int = 5,
        warmup: int = 3,
        device: str = "cpu",
        seed: int = 0,
) -> list[OverheadResult]:
    """Time one training step (forward, every term, backward, optimizer step) per method.

    Args:
        methods: Rows; the first is the baseline of the ratios (plain fine-tuning).
        backbone: timm model name.
        pretrained: Weight source (see :func:`regtune.models.create_backbone`).
        num_classes: Classes of the synthetic task.
        img_size: Input resolution.
        batch_size: Batch size.
        steps: Steps per method per round.
        rounds: Interleaved rounds (the median over rounds is reported).
        warmup: Untimed steps per method before the first round.
        device: ``"cpu"`` or ``"cuda"``.
        seed: Seed of the synthetic batches and initialisations.

    Returns:
        One :class:`OverheadResult` per method, in order.
    """
    torch.manual_seed(seed)
    dev = torch.device(device)
    base = create_backbone(backbone, num_classes, pretrained=pretrained).model
    images = torch.randn(batch_size, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(batch_size) % num_classes
    setup_images = torch.randn(2 * num_classes, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    batches = [(setup_images, torch.arange(2 * num_classes) % num_classes)]  # setup passes see every class
    runners = []
    for method in methods:
        module = FineTuner(copy.deepcopy(base), create_criterion(method.criterion.name, **method.criterion.args),
                           [create_regularizer(r.name, **r.args) for r in method.regularizers], OptimConfig(),
                           num_classes, setup_loader=lambda: batches, train_loader=lambda: batches).to(dev)
        module.train()
        module.on_fit_start()
        optimizer = torch.optim.SGD(module._param_groups(), lr=1e-3, momentum=0.9, nesterov=True)
        runners.append((method, module, optimizer))
    x, y = images.to(dev), labels.to(dev)

    def run(module: FineTuner, optimizer: torch.optim.Optimizer, count: int) -> None:
        for i in range(count):
            terms, _ = module.compute_terms(x, y, step=i, epoch=1, total_steps=10_000)
            loss = torch.stack([t.float() for t in terms.values()]).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    for _, module, optimizer in runners:
        run(module, optimizer, warmup)
    _sync(dev)
    times: dict[str, list[float]] = {m.label: [] for m in methods}
    peaks: dict[str, float] = {}
    for r in range(rounds):
        for method, module, optimizer in runners:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            _sync(dev)
            start = time.perf_counter()
            run(module, optimizer, steps)
            _sync(dev)
            times[method.label].append(1000 * (time.perf_counter() - start) / steps)
            if dev.type == "cuda":
                peaks[method.label] = max(peaks.get(method.label, 0.0), torch.cuda.max_memory_allocated(dev) / 2**20)
        _log.info("overhead round %d/%d done", r + 1, rounds)
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


def overhead_table(results: Sequence[OverheadResult]) -> str:
    """Markdown table of :func:`measure_overhead`'s results."""
    lines = ["| method | ms / step (median) | x plain FT (paired median) | rounds (ms) | peak MiB | x plain FT |",
             "|---|---:|---:|---|---:|---:|"]
    for r in results:
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "n/a (CPU)"
        mem = f"{r.mem_ratio:.3f}" if r.mem_ratio is not None else "n/a"
        rounds = " ".join(f"{t:.0f}" for t in r.rounds_ms)
        lines.append(f"| {r.label} | {r.ms_per_step:.1f} | {r.ratio:.3f} | {rounds} | {peak} | {mem} |")
    return "\n".join(lines)
