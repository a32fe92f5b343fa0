"""Benchmark statistics against SciPy and hand values; the aggregation tables on synthetic runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from regtune.bench.aggregate import RunRecord, markdown_report, summarize, write_report
from regtune.bench.stats import holm, mean_std, paired_difference, t_cdf, t_quantile


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 30, 200])
@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_and_cdf_match_scipy(df: int, p: float) -> None:
    assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)
    assert t_quantile(1 - p, df) == pytest.approx(stats.t.ppf(1 - p, df), rel=1e-9)
    for t in (-3.0, -0.4, 0.0, 1.7):
        assert t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-12)


def test_t_quantile_hand_value() -> None:
    assert t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-6)  # the textbook table entry


def test_paired_t_interval_by_hand() -> None:
    d = paired_difference([81.0, 80.0, 82.5], [80.0, 79.5, 81.0])  # differences 1.0, 0.5, 1.5
    half = 4.302653 * 0.5 / math.sqrt(3)  # t_{0.975,2} * sd / sqrt(n), sd of (1, .5, 1.5) = 0.5
    assert (d.mean, d.n, d.method) == (pytest.approx(1.0), 3, "t")
    assert d.low == pytest.approx(1.0 - half, abs=1e-6) and d.high == pytest.approx(1.0 + half, abs=1e-6)
    assert not d.above_zero and not d.below_zero  # [-0.24, 2.24]: three seeds leave zero inside
    res = stats.ttest_rel([81.0, 80.0, 82.5], [80.0, 79.5, 81.0]).confidence_interval(0.95)
    assert (d.low, d.high) == (pytest.approx(res.low), pytest.approx(res.high))


def test_paired_t_p_value_matches_scipy() -> None:
    a, b = [81.0, 80.0, 82.5, 79.0], [80.0, 79.5, 81.0, 79.5]
    assert paired_difference(a, b).p == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)
    # hand value: t = 2.776445 with 4 degrees of freedom is the two-sided 5 % point
    d = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, sd sqrt(2.5), se sqrt(0.5); shift so that t = 2.776445
    shift = 3.0 - 2.776445 * math.sqrt(0.5)
    assert paired_difference([x - shift for x in d], [0.0] * 5).p == pytest.approx(0.05, abs=1e-6)


def test_holm_adjustment_by_hand() -> None:
    # sorted 0.01, 0.02, 0.03, 0.5 (m = 4): 4 x 0.01 = 0.04, 3 x 0.02 = 0.06, max(0.06, 2 x 0.03) = 0.06, 0.5
    assert holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])
    assert holm([0.4, 0.6]) == pytest.approx([0.8, 0.8])  # monotone: the larger p never gets a smaller value
    adjusted = holm([0.01, math.nan, 0.02])  # NaN: not a member of the family
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)


def test_paired_bootstrap_is_seeded_and_brackets_the_mean() -> None:
    a, b = [1.0, 2.0, 3.5, 2.5, 3.0], [0.5, 1.0, 2.0, 2.0, 2.5]
    one = paired_difference(a, b, ci="bootstrap", seed=3)
    assert one == paired_difference(a, b, ci="bootstrap", seed=3)
    assert one.low <= one.mean <= one.high and one.method == "bootstrap"
    diffs = np.array(a) - np.array(b)
    assert diffs.min() <= one.low and one.high <= diffs.max()


def test_paired_difference_edge_cases() -> None:
    single = paired_difference([1.0], [0.0])
    assert single.mean == 1.0 and single.low == -math.inf and not single.above_zero
    with pytest.raises(ValueError, match="length"):
        paired_difference([1.0, 2.0], [1.0])
    assert mean_std([2.0, 4.0]) == (3.0, pytest.approx(math.sqrt(2.0)))


def _records(values: dict[str, list[float]], cell=(("data.dataset", "toy"), ("data.fraction", 0.01))):
    return [RunRecord(method, cell, seed, {"test_acc": v, "test_mean_class_acc": v}, Path(f"/runs/{method}/s{seed}"))
            for method, vs in values.items() for seed, v in enumerate(vs)]


def test_summarize_pairs_by_seed_and_marks_best() -> None:
    records = _records({"ft": [0.80, 0.79, 0.81], "fmr": [0.82, 0.80, 0.83], "bad": [0.70, 0.71, 0.69]})
    summaries = {s.method: s for s in summarize(records, baseline="ft")}
    assert summaries["ft"].difference is None
    assert summaries["fmr"].mean == pytest.approx(81.6667, abs=1e-4)
    assert summaries["fmr"].difference.mean == pytest.approx(5 / 3, abs=1e-9)  # (2 + 1 + 2) / 3 points
    assert summaries["bad"].difference.below_zero
    text = markdown_report(list(summaries.values()), baseline="ft")
    assert "**81.67 ± 1.53 (3)**" in text  # best mean in bold
    assert "| ft | 80.00 ± 1.00 (3) |" in text
    assert "▼" in text.split("Paired difference")[1]
    # Holm over the two comparisons of the cell (bad's p is the smaller: doubled; fmr's keeps its own or more)
    p_fmr, p_bad = summaries["fmr"].difference.p, summaries["bad"].difference.p
    assert p_bad < p_fmr
    assert summaries["bad"].p_holm == pytest.approx(2 * p_bad)
    assert summaries["fmr"].p_holm == pytest.approx(max(2 * p_bad, p_fmr))
    assert summaries["bad"].p_holm < 0.05 and "▼†" in text  # (-10, -8, -12): significant even after Holm


def test_a_column_with_one_method_marks_no_best() -> None:
    records = _records({"ft": [0.80, 0.79], "fmr": [0.82, 0.80]})
    records += _records({"ft": [0.70]}, cell=(("data.dataset", "toy"), ("data.fraction", 1.0)))
    text = markdown_report(summarize(records, baseline="ft"), baseline="ft")
    assert "| ft | 79.50 ± 0.71 (2) | 70.00 ± 0.00 (1) |" in text  # alone in the 100 % column: not bold
    assert "| fmr | **81.00 ± 1.41 (2)** | — |" in text


def test_summarize_refuses_duplicate_seeds() -> None:
    records = _records({"ft": [0.8]}) * 2
    with pytest.raises(ValueError, match="seed 0"):
        summarize(records)


def test_write_report_files_and_plots(tmp_path: Path) -> None:
    records = _records({"ft": [0.80, 0.79], "fmr": [0.82, 0.80]})
    records += _records({"ft": [0.90, 0.91], "fmr": [0.92, 0.90]}, cell=(("data.dataset", "toy"),
                                                                         ("data.fraction", 0.05)))
    paths = write_report(records, tmp_path, baseline="ft", title="toy")
    assert paths["summary_md"].read_text().startswith("# toy")
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 8
    for key in ("accuracy_png", "forest_png"):
        assert paths[key].stat().st_size > 10_000  # a real figure, not an empty canvas


def test_accuracy_plot_draws_means_and_paired_differences_per_fraction(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from regtune.bench import plots

    records = _records({"ft": [0.80, 0.79, 0.81], "fmr": [0.82, 0.80, 0.84]})
    records += _records({"ft": [0.90, 0.91, 0.89], "fmr": [0.93, 0.90, 0.92]},
                        cell=(("data.dataset", "toy"), ("data.fraction", 0.05)))
    figures = []
    monkeypatch.setattr(plots.Figure, "savefig", lambda fig, *args, **kwargs: figures.append(fig))  # look inside
    plots.plot_accuracy_vs_fraction(summarize(records), tmp_path / "a.png", baseline="ft")
    (fig,) = figures
    top, bottom = fig.axes
    # top: mean accuracy in % per method at 1 % and 5 %
    lines = {bars.get_label(): bars.lines[0] for bars in top.containers}
    np.testing.assert_allclose(np.asarray(lines["ft"].get_ydata(), dtype=float), [80.0, 90.0])
    np.testing.assert_allclose(np.asarray(lines["fmr"].get_ydata(), dtype=float), [82.0, 91.6667], atol=1e-3)
    # bottom: fmr's paired differences (2.0 and 1.6667 points), at the fractions (shifted sideways a little)
    (fmr_bars,) = bottom.containers  # the baseline has no difference to itself
    diff_line = fmr_bars.lines[0]
    np.testing.assert_allclose(np.asarray(diff_line.get_ydata(), dtype=float), [2.0, 1.6667], atol=1e-3)
    np.testing.assert_allclose(np.asarray(diff_line.get_xdata(), dtype=float), [1.0, 5.0], rtol=0.05)
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["1", "5"]  # only the grid's fractions as ticks
