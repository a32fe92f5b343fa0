"""Print the longest functions of a source tree, by lines of body (docstring excluded), longest first.

    python3 scripts/function_lengths.py [ROOT=regtune] [N=15]

The project's rule (tests/test_style.py): no function in ``regtune/`` has a body longer than 60 lines unless a
comment in it starting with ``# Long:`` says why.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LIMIT = 60


def function_lengths(root: Path) -> list[tuple[int, str, bool]]:
    """``(body lines, "path:line name", has a '# Long:' reason)`` of every function under ``root``."""
    rows = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            has_docstring = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str)
            start = body[1].lineno if has_docstring and len(body) > 1 else body[0].lineno
            length = node.end_lineno - start + 1
            reason = any(line.strip().startswith("# Long:") for line in lines[node.lineno - 1:node.end_lineno])
            rows.append((length, f"{path}:{node.lineno} {node.name}", reason))
    return sorted(rows, reverse=True)


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path("regtune")
    count = int(argv[1]) if len(argv) > 1 else 15
    for length, where, reason in function_lengths(root)[:count]:
        print(f"{length:4d}  {where}{'  (# Long: reason given)' if reason else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
