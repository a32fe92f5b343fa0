"""benchmarks/pruning_replay.py replays Optuna's median rule on an unpruned study's learning curves."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

ROOT = Path(__file__).resolve().parents[2]


def _journal(path: Path) -> Path:
    """Five trials run one after another, 10 min each, six steps each (flat curves but the last):
    A 0.8, B 0.6, C 0.5, D 0.9, E 0.1 for steps 0-2 then 1.0 (the best objective, a late starter)."""
    storage = JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(study_name="toy/ft", storage=storage, direction="maximize")
    t0 = dt.datetime(2026, 1, 1)
    curves = {0: [0.8] * 6, 1: [0.6] * 6, 2: [0.5] * 6, 3: [0.9] * 6, 4: [0.1] * 3 + [1.0] * 3}
    values = {0: 0.8, 1: 0.6, 2: 0.5, 3: 0.9, 4: 0.95}
    for n, curve in curves.items():
        study.add_trial(FrozenTrial(
            number=n, trial_id=n, state=TrialState.COMPLETE, value=values[n], values=None,
            datetime_start=t0 + dt.timedelta(minutes=10 * n), datetime_complete=t0 + dt.timedelta(minutes=10 * n + 10),
            params={"optim.lr": 0.001 * (n + 1)}, distributions={"optim.lr": FloatDistribution(1e-4, 1.0, log=True)},
            user_attrs={"seconds": 600.0}, system_attrs={}, intermediate_values=dict(enumerate(curve))))
    return path


def test_median_rule_replayed_in_finishing_order(tmp_path: Path) -> None:
    journal = _journal(tmp_path / "study.journal")
    out = tmp_path / "replay"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pruning_replay.py"), str(journal), "--warmup", "2",
                    "--startup", "2", "--epochs", "3", "--out", str(out)], check=True, capture_output=True, text=True)
    text = (out / "replay.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    # A, B: fewer than 2 trials had completed, so nothing can be stopped; D at 0.9 is above the median 0.7 of A, B
    for n in ("0", "1", "3"):
        assert "| completes |" in rows[n]
    # C: 0.5 below the median of A and B (0.7) at the first step past the warm-up; half its 10 min saved
    assert "stopped at step 2 (split 1, epoch 3) | 10.0 | 5.0 |" in rows["2"]
    # E: 0.1 below the median of the survivors A, B, D (0.8) at step 2; C, stopped itself, does not count
    assert "stopped at step 2 (split 1, epoch 3)" in rows["4"]
    assert "would stop 2 of 5 complete trials, saving 0.17 h of 0.83 h run time (20 %)" in text
    assert "The best trial (#4, lr 0.005, 95.00 %) would be stopped at step 2" in text
    assert "the replayed choice is #3 (lr 0.004, 90.00 %, rank 2)" in text
    assert (out / "replay.png").stat().st_size > 10_000


def test_missing_journal_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pruning_replay.py"),
                             str(tmp_path / "nope.journal"), "--out", str(tmp_path / "o")],
                            check=False, capture_output=True, text=True)
    assert result.returncode != 0 and "no such journal file" in result.stderr
