"""The benchmark grids and searches shipped inside the package (``regtune/grids/<name>.yaml``,
``regtune/searches/<name>.yaml``), found by name.

``regtune bench quick`` runs the shipped grid ``quick``; ``regtune bench my_grid.yaml`` a file of the user's. A
shipped grid's first line is a comment, its one-line description (``regtune list grids`` prints it). The files are
package data, so the names work from an installed wheel as from a checkout.

Light on purpose: ``regtune list grids`` imports this module and nothing heavy.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["UnknownGridError", "grid_description", "resolve_grid", "shipped_grids"]


class UnknownGridError(FileNotFoundError):
    """Neither a grid file nor the name of a shipped grid."""


_COMMAND = {"grids": "bench", "searches": "tune"}


def _folder(kind: str) -> Path:
    # an installed wheel and a checkout both hold the files on disk: a plain path, which load_grid and the error
    # messages can name
    return Path(str(resources.files("regtune") / kind))


def shipped_grids(kind: str = "grids") -> dict[str, Path]:
    """``{name: path}`` of the shipped grids (or, with ``kind="searches"``, searches), sorted by name."""
    return {path.stem: path for path in sorted(_folder(kind).glob("*.yaml"))}


def grid_description(path: Path) -> str:
    """A grid file's one-line description: its first line, a comment (empty when the first line is not one)."""
    with open(path, encoding="utf-8") as handle:
        first = handle.readline().strip()
    return first.removeprefix("#").strip() if first.startswith("#") else ""


def resolve_grid(grid: str | Path, kind: str = "grids") -> Path:
    """The grid file that ``grid`` names: an existing file (it comes first), else the shipped grid of that name
    (``kind="searches"``: the shipped search).

    Raises:
        UnknownGridError: ``grid`` is neither an existing file nor a shipped grid's name; the message lists the
            shipped names.
    """
    path = Path(grid)
    if path.is_file():
        return path
    shipped = shipped_grids(kind)
    if str(grid) in shipped:
        return shipped[str(grid)]
    what, command = kind[:-1] if kind == "grids" else "search", _COMMAND[kind]
    hint = (f"; the shipped {what} {path.stem!r} is run with `regtune {command} {path.stem}`" if path.stem in shipped
            else "")
    raise UnknownGridError(f"{what} {str(grid)!r} is neither a file nor a shipped {what}{hint}. Shipped {kind}: "
                           f"{', '.join(shipped) or '(none)'} (`regtune list {kind}` describes them)")
