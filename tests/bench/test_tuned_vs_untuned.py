"""benchmarks/tuned_vs_untuned.py pairs each tuned method with its untuned runs by seed."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
FIELDS = ["method", "cell", "seed", "test_acc"]


def _results(path: Path, rows: list[tuple[str, str, int, float]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        writer.writerows(rows)
    return path


def test_pairs_by_seed_maps_names_and_takes_the_first_untuned_file(tmp_path: Path) -> None:
    cell = "fashion_mnist 1%"
    tuned = _results(tmp_path / "tuned.csv", [("ft", cell, s, a) for s, a in enumerate([0.80, 0.75, 0.78])]
                     + [("head_l1", cell, 0, 0.81), ("head_l1", cell, 1, 0.79), ("lp", cell, 0, 0.7)])
    first = _results(tmp_path / "a.csv", [("ft", cell, s, a) for s, a in enumerate([0.70, 0.72, 0.71])]
                     + [("ft", "fashion_mnist 5%", 0, 0.99)])  # another cell: ignored
    second = _results(tmp_path / "b.csv", [("ft", cell, 0, 0.1), ("head_l1-w0.01", cell, 1, 0.77),
                                           ("head_l1-w0.01", cell, 2, 0.5), ("head_l1-w0.01", cell, 0, 0.80)])
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tuned_vs_untuned.py"), "--tuned", str(tuned),
                    "--untuned", str(first), str(second), "--alias", "head_l1=head_l1-w0.01", "--out", str(out)],
                   check=True, capture_output=True, text=True)
    lines = (out / "vs_untuned.md").read_text().splitlines()
    assert len(lines) == 4 and not any(line.startswith("| lp") for line in lines)  # lp: no untuned runs
    diffs = np.array([80 - 70, 75 - 72, 78 - 71], dtype=float)  # ft from the first file, seeds 0-2
    half = 4.302652729911275 * diffs.std(ddof=1) / np.sqrt(3)  # t_{0.975, 2}
    low, high = (f"{v:+.2f}".replace("-", "\u2212") for v in (diffs.mean() - half, diffs.mean() + half))
    assert f"| ft (ft) | 0,1,2 | 71.00 ± 1.00 | 77.67 ± 2.52 | +{diffs.mean():.2f} [{low}, {high}]" in lines[2]
    # head_l1 against head_l1-w0.01 of the second file, on the seeds both have (0 and 1): +1 and +2
    assert lines[3].startswith("| head_l1 (head_l1-w0.01) | 0,1 | 78.50 ± 2.12 | 80.00 ± 1.41 | +1.50 ")
    assert (out / "vs_untuned.png").stat().st_size > 5_000
