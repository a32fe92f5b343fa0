"""Cell names and the plot's split of a cell; the aggregation and plotting modules import each other in one
direction."""

from __future__ import annotations

import doctest
import subprocess
import sys

import pytest

from regtune.bench import cells
from regtune.bench.cells import cell_label, split_cell


@pytest.mark.parametrize(("cell", "label"), [
    ((("data.dataset", "cub200"), ("data.fraction", 0.15)), "cub200 15%"),
    ((("data.fraction", 0.05), ("data.dataset", "fmnist")), "fmnist 5%"),  # the dataset goes first whatever the order
    ((("data.dataset", "pets"), ("data.per_class", 10)), "pets 10/class"),
    ((("data.dataset", "dtd"), ("optim.lr", 0.01)), "dtd lr=0.01"),
    ((), "all"),
])
def test_cell_label(cell: tuple, label: str) -> None:
    assert cell_label(cell) == label


def test_split_cell_takes_the_amount_of_data_out_of_the_panel() -> None:
    assert split_cell((("data.dataset", "cub200"), ("data.fraction", 0.25), ("optim.lr", 0.1))) == (
        (("data.dataset", "cub200"), ("optim.lr", 0.1)), 25.0, "training data per class (%)")
    assert split_cell((("data.per_class", 5), ("data.dataset", "pets"))) == (
        (("data.dataset", "pets"),), 5.0, "training images per class")
    assert split_cell((("data.dataset", "dtd"),)) == ((("data.dataset", "dtd"),), None, "")
    # long-tailed: the fraction is the head class's budget (the tail has rho times fewer), and the axis says so
    assert split_cell((("data.fraction", 0.05), ("data.imbalance_ratio", 100))) == (
        (("data.imbalance_ratio", 100),), 5.0, "training data of the head class (%)")


def test_cells_doctests() -> None:
    failures, tried = doctest.testmod(cells)
    assert tried >= 3 and failures == 0


def test_plots_import_without_aggregate_nor_backend_switch() -> None:
    # A fresh interpreter: the modules are imported top-level, so a circle or a backend switch would show on import.
    code = ("import sys, matplotlib; matplotlib.use('pdf'); import regtune.bench.plots; "
            "assert 'regtune.bench.aggregate' not in sys.modules, 'plots imported aggregate'; "
            "import regtune.bench.aggregate; "
            "assert matplotlib.get_backend() == 'pdf', matplotlib.get_backend(); "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
