"""The documentation: every method page's example runs, every registered term has one, no link leaves the repository,
and the site builds strictly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from regtune.regularizers import list_criteria, list_regularizers

ROOT = Path(__file__).parents[1]
METHODS = ROOT / "docs" / "methods"
NOT_METHODS = {"analysis-metrics.md"}  # the analysis quantities: no term to train with
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _python_blocks(page: Path) -> str:
    """The page's ```python blocks, in order, as one script."""
    return "\n".join(block.split("\n```", 1)[0] for block in page.read_text().split("```python\n")[1:])


def _method_pages() -> list[Path]:
    return sorted(p for p in METHODS.glob("*.md") if p.name not in NOT_METHODS)


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *patterns],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


@pytest.mark.parametrize("page", _method_pages(), ids=lambda p: p.stem)
def test_the_method_page_example_runs_in_a_plain_loop(page: Path, capsys: pytest.CaptureFixture) -> None:
    code = _python_blocks(page)
    assert code.strip(), f"{page.name} has no ```python example"
    assert "assert " in code, f"{page.name}'s example checks nothing"
    exec(compile(code, str(page), "exec"), {"__name__": "__doc_example__"})  # noqa: S102 (the page's own example)
    assert capsys.readouterr().out.strip(), f"{page.name}'s example prints nothing (each step's stats)"


def test_every_registered_term_has_a_page_with_an_example() -> None:
    examples = {page.name: _python_blocks(page) for page in _method_pages()}
    names = [name for name in list_regularizers() + list_criteria() if name != "ce"]  # ce: the README's loop
    missing = [name for name in names if not any(f'"{name}"' in code for code in examples.values())]
    assert not missing, f"no method page's example creates {missing} (docs/methods/<page>.md)"


def test_no_link_points_outside_the_repository() -> None:
    pages = _tracked("*.md")
    assert ROOT / "README.md" in pages and len(pages) > 20
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor of the same page
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.is_file():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to no file of the repository:\n" + "\n".join(broken)


def test_nothing_refers_readers_to_the_internal_specification() -> None:
    words = ("methods" + ".md", "shared" + "/docs")
    hits = [f"{path.relative_to(ROOT)}: {word}" for path in _tracked("*.md", "*.py", "*.yaml", "*.toml", "*.txt")
            if path.name != "test_docs.py" for word in words if word in path.read_text()]
    assert not hits, "references to a document users do not have:\n" + "\n".join(hits)


@pytest.mark.slow
def test_the_documentation_site_builds_strictly(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "index.html").is_file() and (tmp_path / "docs" / "methods" / "fmr" / "index.html").is_file()
    assert "FeatureMagnitudeRegularization" in (tmp_path / "docs" / "methods" / "fmr" / "index.html").read_text()
