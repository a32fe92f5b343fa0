"""curves.png: the criterion's loss as the training curve, the total with the regularizers on its own axis."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from regtune.analysis import plots
from regtune.analysis.plots import _total_loss_beside

ROWS = [{"epoch": e, "train/ce": ce, "train/loss": total, "val/loss": v, "train/acc": 0.5, "val/acc": 0.5}
        for e, ce, total, v in ((1, 2.0, -260.0, 3.0), (2, 1.5, -180.0, 2.0), (3, 1.0, -115.0, 1.0))]


def test_total_on_its_own_axis_only_when_it_differs_from_the_criterion() -> None:
    ax = Figure().subplots()
    right = _total_loss_beside(ax, [1, 2, 3], ROWS, "train/ce")
    assert right is not None and right is not ax
    (line,) = right.get_lines()
    assert list(line.get_ydata()) == [-260.0, -180.0, -115.0] and "regularizers" in line.get_label()
    plain = [{**r, "train/loss": r["train/ce"]} for r in ROWS]  # no regularizer: the total is the criterion
    assert _total_loss_beside(Figure().subplots(), [1, 2, 3], plain, "train/ce") is None


def test_loss_panel_draws_the_criterion_as_the_training_curve(tmp_path: Path, monkeypatch) -> None:
    drawn: list[Figure] = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path, title: (drawn.append(fig), save(fig, path, title))[1])
    plots.plot_learning_curves(ROWS, tmp_path / "curves.png", criterion="ce", selected_epoch=2)
    loss_axes = [a for a in drawn[0].axes if a.get_ylabel() == "loss"]
    curves = {line.get_label(): list(line.get_ydata()) for line in loss_axes[0].get_lines()}
    assert curves["train ce"] == [2.0, 1.5, 1.0] and curves["val"] == [3.0, 2.0, 1.0]
    assert "train" not in curves  # the total is not drawn on the criterion's axis
    assert (tmp_path / "curves.png").stat().st_size > 10_000
