"""The grids shipped with regtune: found by name, described by their first line, a file of the same name first."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import regtune
from regtune.bench.grid import load_grid, run_grid
from regtune.bench.shipped import UnknownGridError, grid_description, resolve_grid, shipped_grids
from regtune.cli import main
from tests.bench.test_grid import tiny_grid
from tests.conftest import write_imagefolder

GRIDS = Path(regtune.__file__).parent / "grids"


def test_shipped_grids_are_the_package_files() -> None:
    shipped = shipped_grids()
    assert list(shipped) == sorted(path.stem for path in GRIDS.glob("*.yaml"))
    assert {"quick", "fmnist", "baselines", "papers"} <= set(shipped)
    assert all(path.parent == GRIDS and path.is_file() for path in shipped.values())


@pytest.mark.parametrize("name", sorted(shipped_grids()))
def test_each_shipped_grid_says_in_one_line_what_it_runs_and_how_many_runs(name: str) -> None:
    description = grid_description(shipped_grids()[name])
    # `regtune list grids` pads names to the longest (24 characters) + 2 spaces: a description of <= 94 fits 120.
    # The count is checked against the grid's expansion by tests/bench/test_grid.py (which expands every grid).
    assert 0 < len(description) <= 94, description
    assert re.search(r"\(\d+ runs\)$", description), f"{name}: should end with '(N runs)': {description!r}"


def test_a_name_loads_the_shipped_grid_under_that_name() -> None:
    grid = load_grid("quick")
    assert grid.name == "quick" and grid.out == Path("runs") / "bench" / "quick"
    assert grid.source == yaml.safe_load((GRIDS / "quick.yaml").read_text())


def test_resolve_a_name_a_file_and_neither(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_grid("quick") == GRIDS / "quick.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("methods: {ft: {}}\n")
    assert resolve_grid(own) == own and resolve_grid("mine.yaml") == Path("mine.yaml")
    (tmp_path / "quick").write_text("methods: {ft: {}}\n")  # an existing file comes before the shipped name
    assert resolve_grid("quick") == Path("quick")
    with pytest.raises(UnknownGridError, match=r"'nope' is neither a file nor a shipped grid\. Shipped grids: "
                                               r"baselines, .*quick"):
        resolve_grid("nope")
    with pytest.raises(UnknownGridError, match=r"the shipped grid 'fmnist' is run with `regtune bench fmnist`"):
        resolve_grid("benchmarks/fmnist.yaml")  # where the grids were before they were package data


def test_cli_lists_the_grids_and_names_them_on_a_wrong_name(capsys: pytest.CaptureFixture) -> None:
    assert main(["list", "grids"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(shipped_grids())
    quick = next(line for line in lines if line.startswith("quick "))
    assert quick.endswith(grid_description(GRIDS / "quick.yaml")) and max(map(len, lines)) <= 120
    assert main(["bench", "quik", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "'quik' is neither a file nor a shipped grid" in err and "quick" in err and "list grids" in err


def test_a_moved_and_recommented_grid_resumes_its_folder(tmp_path: Path) -> None:
    """The output folder records the grid's content, not its path or comments (so moving the shipped grids into
    the package kept their finished results)."""
    root = write_imagefolder(tmp_path / "data", classes=2, train_per_class=5, test_per_class=2)
    spec = tiny_grid(root, tmp_path / "out", seeds=[0], fractions=[1.0])
    first = tmp_path / "benchmarks" / "tiny.yaml"
    first.parent.mkdir()
    first.write_text(yaml.safe_dump(spec))

    def fake_fit(config: object = None, run_dir: Path | None = None, **_: object) -> None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "metrics.json").write_text("{}")

    assert run_grid(load_grid(first), fit_fn=fake_fit)["ran"] == 2
    moved = tmp_path / "grids" / "tiny.yaml"
    moved.parent.mkdir()
    moved.write_text("# a one-line description (2 runs)\n#\n# regtune bench tiny\n" + yaml.safe_dump(spec))
    counts = run_grid(load_grid(moved), fit_fn=fake_fit)
    assert counts["done_before"] == 2 and counts["ran"] == 0
