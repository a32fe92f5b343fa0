"""Grid cells: how a cell is named in tables and titles, and how plots split it into a panel and an x value.

A *cell* is one point of a grid without the seed: a tuple of ``(dotted config key, value)`` pairs such as
``(("data.dataset", "cub200"), ("data.fraction", 0.15))``. The aggregation tables and the plots both name cells, so
the names live here, below both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["Cell", "cell_label", "split_cell"]

Cell = tuple[tuple[str, Any], ...]


def cell_label(cell: Sequence[tuple[str, Any]]) -> str:
    """A cell's short name: the dataset first, then the amount of data, then any other axis as ``name=value``.

    Args:
        cell: ``(dotted config key, value)`` pairs.

    Returns:
        The label; ``"all"`` for the empty cell.

    Example:
        >>> cell_label((("data.fraction", 0.15), ("data.dataset", "cub200")))
        'cub200 15%'
        >>> cell_label((("data.dataset", "pets"), ("data.per_class", 10), ("optim.lr", 0.01)))
        'pets 10/class lr=0.01'
    """
    parts = []
    for key, value in cell:
        if key == "data.dataset":
            parts.insert(0, str(value))
        elif key == "data.fraction":
            parts.append(f"{100 * float(value):g}%")
        elif key == "data.per_class":
            parts.append(f"{value}/class")
        else:
            parts.append(f"{key.split('.')[-1]}={value}")
    return " ".join(parts) or "all"


def split_cell(cell: Sequence[tuple[str, Any]]) -> tuple[Cell, float | None, str]:
    """A cell as a plot reads it: the panel (every axis but the amount of data), the x value and the x axis's name.

    Args:
        cell: ``(dotted config key, value)`` pairs.

    Returns:
        ``(panel, x, axis)``: ``x`` is the fraction in percent (axis ``"training data per class (%)"``) or the
        per-class count (axis ``"training images per class"``); ``(panel, None, "")`` for a cell with neither. In a
        long-tailed cell (``data.imbalance_ratio``) the amount is the head class's, and the axis says so.

    Example:
        >>> split_cell((("data.dataset", "cub200"), ("data.fraction", 0.15)))
        ((('data.dataset', 'cub200'),), 15.0, 'training data per class (%)')
    """
    rest, x, axis = [], None, ""
    # long-tailed subsets: the amount is the head class's; the others have fewer (data.imbalance_ratio)
    whose = "of the head class" if any(key == "data.imbalance_ratio" for key, _ in cell) else "per class"
    for key, value in cell:
        if key == "data.fraction":
            x, axis = 100 * float(value), f"training data {whose} (%)"
        elif key == "data.per_class":
            x, axis = float(value), f"training images {whose}"
        else:
            rest.append((key, value))
    return tuple(rest), x, axis
