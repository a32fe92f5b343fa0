"""MkDocs hook: the site is laid out as the repository is, so one set of relative links works in both.

MkDocs reads pages from ``docs/`` only and refuses the repository root as its ``docs_dir``. The pages link to what
lies beside them in the repository: the README links to ``docs/baselines.md``, the docs to
``../benchmarks/results/<name>/accuracy.png`` and to the shipped grids and searches. This hook therefore gives every
file of ``docs/`` its repository path (``docs/baselines.md``), and adds the README (the home page), the LICENSE and
the files under ``benchmarks/``, ``regtune/grids/`` and ``regtune/searches/`` that git does not ignore at theirs. A
link that resolves to none of them is a broken link, and ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

EXTRA_ROOTS = ("README.md", "LICENSE", "benchmarks", "regtune/grids", "regtune/searches")


def _tracked(root: Path) -> list[str]:
    """Repository paths of the files under ``EXTRA_ROOTS`` that git tracks or would track (not the ignored ones)."""
    try:
        command = ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *EXTRA_ROOTS]
        out = subprocess.run(command, cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise RuntimeError(f"the docs site is built from a git checkout (`git ls-files` failed in {root}: {error}); "
                           "build it from a clone of the repository") from error
    return [line for line in out.splitlines() if (root / line).is_file()]


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Move ``docs/`` pages to their repository paths and add the repository files they link to."""
    root = Path(config["config_file_path"]).resolve().parent
    docs_dir = Path(config["docs_dir"]).resolve()
    site_dir, directory_urls = config["site_dir"], config["use_directory_urls"]
    out = Files([])
    for file in files:
        if Path(file.src_dir).resolve() == docs_dir:
            path = (docs_dir / file.src_uri).relative_to(root).as_posix()
            out.append(File(path, str(root), site_dir, directory_urls))
        else:  # the theme's and plugins' own files
            out.append(file)
    for path in _tracked(root):
        out.append(File(path, str(root), site_dir, directory_urls))
    return out
