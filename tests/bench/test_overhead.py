"""The overhead benchmark runs every method side by side and reports ratios against the first row."""

from __future__ import annotations

from regtune.bench.overhead import Method, measure_overhead, overhead_table
from regtune.train.config import TermSpec
from tests.conftest import TINY_BACKBONE


def test_overhead_rows_and_ratios() -> None:
    methods = (Method("ft"), Method("fmr", (TermSpec("fmr"),)), Method("adarand", (TermSpec("adarand"),)),
               Method("lm", (), TermSpec("lm_softmax")))
    results = measure_overhead(methods, backbone=TINY_BACKBONE, pretrained="none", num_classes=3, img_size=32,
                               batch_size=4, steps=1, rounds=3, warmup=1)
    assert [r.label for r in results] == ["ft", "fmr", "adarand", "lm"]
    assert results[0].ratio == 1.0 and all(len(r.rounds_ms) == 3 for r in results)
    assert all(r.ms_per_step > 0 and r.ratio > 0 for r in results)
    assert all(r.peak_mib is None for r in results)  # CPU: no per-method peak
    table = overhead_table(results)
    assert table.count("\n") == len(results) + 1 and "| adarand |" in table


def test_framework_overhead_times_both_loops() -> None:
    from regtune.bench.overhead import framework_table, measure_framework_overhead

    result = measure_framework_overhead(backbone=TINY_BACKBONE, pretrained="none", img_size=32, batch_size=4,
                                        steps_per_epoch=3, epochs=2, rounds=1)
    # 3 steps per epoch, the first of each epoch excluded: 2 timed steps per epoch in each loop
    assert result.steps_per_epoch == 3 and result.bare_ms_per_step > 0 and result.regtune_ms_per_step > 0
    assert result.step_ratio == result.regtune_ms_per_step / result.bare_ms_per_step  # one round: the plain ratio
    assert result.bare_s_per_epoch >= 2 * result.bare_ms_per_step / 1000
    assert result.regtune_fit_s > result.regtune_s_per_epoch * 2
    assert "| regtune fit |" in framework_table(result)
