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
