"""Rules of how the code reads that a test can check (docs/architecture.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _function_lengths():
    spec = importlib.util.spec_from_file_location("function_lengths", ROOT / "scripts" / "function_lengths.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_long_function_without_a_stated_reason() -> None:
    lengths = _function_lengths()
    too_long = [f"{where} ({length} lines)" for length, where, reason in lengths.function_lengths(ROOT / "regtune")
                if length > lengths.LIMIT and not reason]
    assert not too_long, (f"functions over {lengths.LIMIT} lines of body without a '# Long:' comment saying why: "
                          + ", ".join(too_long))


def test_the_length_count_excludes_the_docstring_and_sees_reasons(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(3))
    (tmp_path / "m.py").write_text(f'def f():\n    """Doc\n    string."""\n{body}\n\n\ndef g():\n    # Long: why\n'
                                   f'{body}\n')
    rows = {where.split()[-1]: (length, reason) for length, where, reason in
            _function_lengths().function_lengths(tmp_path)}
    assert rows == {"f": (3, False), "g": (3, True)}
