"""The overhead benchmark runs every method side by side and reports ratios against the first row."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from regtune.bench.overhead import (
    Method,
    OverheadSettings,
    framework_table,
    measure_framework_overhead,
    measure_overhead,
    measure_peak_rss,
    measure_term_cost,
    overhead_table,
)
from regtune.train.config import TermSpec
from regtune.train.module import FineTuner
from tests.conftest import TINY_BACKBONE

TINY = OverheadSettings(backbone=TINY_BACKBONE, pretrained="none", num_classes=3, img_size=32, batch_size=4, steps=1,
                        rounds=3, warmup=1, term_repeats=2)


def test_overhead_rows_and_ratios() -> None:
    methods = (Method("ft"), Method("fmr", (TermSpec("fmr"),)), Method("adarand", (TermSpec("adarand"),)),
               Method("lm", (), TermSpec("lm_softmax")))
    results = measure_overhead(methods, TINY)
    assert [r.label for r in results] == ["ft", "fmr", "adarand", "lm"]
    assert results[0].ratio == 1.0 and all(len(r.rounds_ms) == 3 for r in results)
    assert all(r.ms_per_step > 0 and r.ratio > 0 for r in results)
    assert all(r.peak_mib is None for r in results)  # CPU: no per-method peak
    table = overhead_table(results)
    assert table.count("\n") == len(results) + 1 and "| adarand |" in table


def test_steps_run_through_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    # The benchmark trains with the module's own code path: compute_terms (forward_step, loss_terms), total_loss.
    calls: list[int] = []
    compute_terms = FineTuner.compute_terms

    def counted(self: FineTuner, *args: object, **kwargs: object) -> object:
        calls.append(1)
        return compute_terms(self, *args, **kwargs)

    monkeypatch.setattr(FineTuner, "compute_terms", counted)
    measure_overhead((Method("ft"), Method("fmr", (TermSpec("fmr"),))), TINY)
    assert len(calls) == 2 * (TINY.warmup + TINY.rounds * TINY.steps)  # per method: warm-up, then rounds x steps


def test_term_cost_times_the_modules_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    records = []
    loss_terms = FineTuner.loss_terms

    def recorded(self: FineTuner, record: object) -> object:
        records.append(record)
        return loss_terms(self, record)

    monkeypatch.setattr(FineTuner, "loss_terms", recorded)
    costs = measure_term_cost((Method("ft"), Method("head_l2", (TermSpec("head_l2"),))), TINY)
    assert list(costs) == ["ft", "head_l2"] and all(isinstance(v, float) for v in costs.values())
    # term_repeats timed evaluations after three untimed ones, per method, each on its own leaves
    assert len(records) == 2 * (TINY.term_repeats + 3)
    assert all(r.features.is_leaf and r.features.requires_grad for r in records)
    assert len({id(r.features) for r in records}) == len(records)


@pytest.mark.parametrize(("changes", "error", "match"), [
    ({"steps": 0}, ValueError, "steps must be >= 1; got 0"),
    ({"warmup": -1}, ValueError, "warmup must be >= 0"),
    ({"img_size": 32.0}, TypeError, "img_size must be an int"),
    ({"device": "meta"}, ValueError, "'cpu' or a CUDA device; got 'meta'"),
])
def test_settings_refuse_bad_values(changes: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        OverheadSettings(**changes)


def test_cpu_only_measurements_refuse_cuda_settings() -> None:
    cuda = OverheadSettings(device="cuda")  # refused before anything is built or spawned
    with pytest.raises(ValueError, match="measure_peak_rss measures the CPU; got device='cuda'"):
        measure_peak_rss((Method("ft"),), cuda)
    with pytest.raises(ValueError, match="precision must be 32-true or bf16-mixed"):
        measure_framework_overhead(cuda, precision="16-mixed")


def test_framework_overhead_times_both_loops() -> None:
    result = measure_framework_overhead(OverheadSettings(backbone=TINY_BACKBONE, pretrained="none", img_size=32,
                                                         batch_size=4, rounds=1), steps_per_epoch=3, epochs=2)
    # 3 steps per epoch, the first of each epoch excluded: 2 timed steps per epoch in each loop
    assert result.steps_per_epoch == 3 and result.bare_ms_per_step > 0 and result.regtune_ms_per_step > 0
    assert result.step_ratio == result.regtune_ms_per_step / result.bare_ms_per_step  # one round: the plain ratio
    assert result.bare_s_per_epoch >= 2 * result.bare_ms_per_step / 1000
    assert result.regtune_fit_s > result.regtune_s_per_epoch * 2
    assert "| regtune fit |" in framework_table(result)


def test_framework_overhead_in_bfloat16_with_loader_workers() -> None:
    """The GPU settings (bf16 autocast in both loops, loader processes), here on the CPU: both loops run them."""
    result = measure_framework_overhead(OverheadSettings(backbone=TINY_BACKBONE, pretrained="none", img_size=32,
                                                         batch_size=4, rounds=1), steps_per_epoch=2, epochs=1,
                                        precision="bf16-mixed", num_workers=1)
    assert result.steps_per_epoch == 2 and result.bare_ms_per_step > 0 and result.regtune_ms_per_step > 0


def test_script_help_and_flag_errors() -> None:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "overhead.py"
    shown = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                           check=False)
    assert shown.returncode == 0, shown.stderr
    assert "--terms-only" in shown.stdout and "(default: tf_efficientnet_lite0)" in shown.stdout
    refused = subprocess.run([sys.executable, str(script), "--rounds", "0"], capture_output=True, text=True,
                             timeout=120, check=False)
    assert refused.returncode == 2 and "OverheadSettings.rounds must be >= 1; got 0" in refused.stderr
