"""The built wheel works outside a checkout: the README's entry points (``regtune --help``, ``regtune list``,
``regtune bench quick``) find everything they read (the shipped grids, the registries' sources) in the installed
package, not in the repository.

The wheel is built offline from a copy of the package's files (nothing is written into the checkout) and installed
with ``--no-deps`` into a fresh virtual environment that sees this interpreter's packages (torch, timm, ...); the
commands run from a folder outside the checkout, without ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # builds a wheel and a virtual environment: about 15-30 s on 2 CPU cores


def _run(argv: list[str | Path], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)  # the assertion shows stdout and stderr
    assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """``(venv, outside, env)``: a virtual environment with the wheel installed, a working folder outside the
    checkout, and the environment to run its commands with."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"  # what the wheel is built from: the project's metadata and the package, no build output
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "regtune", source / "regtune",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          source, "-w", tmp / "dist"], cwd=tmp, env=env)
    wheel, = (tmp / "dist").glob("regtune-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp, env=env)
    python = venv / "bin" / "python"
    if sys.prefix != sys.base_prefix:  # run from a virtual environment: --system-site-packages sees the base
        # interpreter's packages, not this environment's; a .pth file adds them (and pip) after the venv's own
        purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp, env).strip())
        paths = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
        (purelib / "outer_environment.pth").write_text("\n".join(paths) + "\n")
    # pip of this interpreter's packages, run by the venv's python, installs into the venv (scripts included)
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel],
         cwd=tmp, env=env)
    outside = tmp / "elsewhere"
    outside.mkdir()
    return venv, outside, env


def test_the_wheel_holds_the_shipped_grids(installed: tuple[Path, Path, dict[str, str]]) -> None:
    venv, _, _ = installed
    wheel, = venv.parent.glob("dist/regtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"regtune/{kind}/{path.name}" for kind in ("grids", "searches")
               for path in (REPO / "regtune" / kind).glob("*.yaml")}
    assert {"regtune/grids/quick.yaml", "regtune/searches/small.yaml"} <= shipped <= names


def test_regtune_imports_from_the_wheel_and_finds_its_grids_there(
        installed: tuple[Path, Path, dict[str, str]]) -> None:
    venv, outside, env = installed
    code = ("import regtune, regtune.cli\n"
            "from regtune.bench.shipped import resolve_grid\n"
            "print(regtune.__file__, regtune.cli._PACKAGE, resolve_grid('quick'), sep='\\n')\n")
    module, package, grid_file = map(Path, _run([venv / "bin" / "python", "-c", code], outside, env).split())
    site = venv / "lib"  # not the editable install of the checkout, which the venv also sees
    assert module.is_relative_to(site) and not module.is_relative_to(REPO), module
    assert package == module.parent  # where `regtune list` reads the registries' sources
    assert grid_file.is_relative_to(site) and grid_file.name == "quick.yaml", grid_file
    assert grid_file.read_bytes() == (REPO / "regtune" / "grids" / "quick.yaml").read_bytes()


def test_the_readme_entry_points_run_from_outside_the_checkout(installed: tuple[Path, Path, dict[str, str]]) -> None:
    venv, outside, env = installed
    regtune = venv / "bin" / "regtune"  # the console script the wheel installed
    assert "bench" in _run([regtune, "--help"], outside, env)
    assert "--data-root" in _run([regtune, "fit", "--help"], outside, env)
    grids = _run([regtune, "list", "grids"], outside, env)
    assert any(line.startswith("quick ") and line.endswith("(15 runs)") for line in grids.splitlines()), grids
    assert "fmr" in _run([regtune, "list", "regularizers"], outside, env).split()  # read from the wheel's sources
    assert "fashion_mnist" in _run([regtune, "list", "datasets"], outside, env).split()
    assert "small" in _run([regtune, "list", "searches"], outside, env).split()  # a shipped search, from the wheel
    dry = _run([regtune, "bench", "quick", "--dry-run"], outside, env)
    assert "15 runs: 0 finished before, 0 ran" in dry
    assert not (outside / "runs").exists()  # a dry run writes nothing


def test_the_practitioners_path_runs_from_the_wheel(installed: tuple[Path, Path, dict[str, str]]) -> None:
    """fit, predict, export, interpret and ``regtune.load`` as the README shows them, with the wheel alone."""
    from tests.conftest import TINY_BACKBONE, write_imagefolder

    venv, outside, env = installed
    regtune = venv / "bin" / "regtune"
    photos = write_imagefolder(outside / "photos", classes=3, train_per_class=6, test_per_class=2)
    _run([regtune, "fit", "--dataset", "imagefolder", "--data-root", photos, "--backbone", TINY_BACKBONE,
          "--pretrained", "none", "--head-init", "normal", "--img-size", "32", "--epochs", "1", "--batch-size", "6",
          "--num-workers", "0", "--no-progress", "--accelerator", "cpu", "--val-fraction", "0.2",
          "--set", "data.fraction=null", "--wise-alphas", "", "--run-dir", "run"], outside, env)
    _run([regtune, "predict", "run", photos / "test", "--out", "preds.csv"], outside, env)
    assert len((outside / "preds.csv").read_text().splitlines()) == 1 + 6
    _run([regtune, "export", "run", "--out", "export", "--format", "safetensors,onnx,pt2"], outside, env)
    assert {p.name for p in (outside / "export").iterdir()} >= {"model.safetensors", "config.json", "model.onnx",
                                                                  "model.pt2"}
    _run([regtune, "interpret", "run", "--out", "interpret", "--top-losses", "2"], outside, env)
    assert (outside / "interpret" / "confusion_matrix.png").is_file()
    code = ("import regtune\n"
            "for where in ('run', 'export'):\n"
            "    print(*regtune.load(where).predict(['photos/test/class_0/0.png'], topk=3)[0].topk)\n")
    from_run, from_export = _run([venv / "bin" / "python", "-c", code], outside, env).splitlines()
    assert from_run.count("class_") == 3  # the three classes by name, best first
    assert from_run.split()[0] == from_export.split()[0]  # the run and its export agree
