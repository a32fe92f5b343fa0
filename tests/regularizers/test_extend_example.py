"""The worked example of docs/extend/regularizers.md, run as written: its module, dropped into the package, registers
by itself, passes every contract check and trains; its test file passes.

The example's code blocks start with a comment naming their file (``# regtune/regularizers/decov.py``,
``# tests/regularizers/test_decov.py``). The module goes into a temporary folder that is added to the package's
``__path__`` for the duration of this file's tests, so nothing is written into the repository and the registry is
restored afterwards.
"""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import regtune.regularizers as package
from regtune.regularizers import base as base_module
from regtune.regularizers import list_regularizers, regularizer_class
from tests.regularizers.test_contract import (
    CHECKS,
    NUM_CLASSES,
    build,
    check_declarations,
    contract_cases,
    make_model,
    step_for,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "extend" / "regularizers.md"
MODULE = "regtune/regularizers/decov.py"
TEST = "tests/regularizers/test_decov.py"
NAME = "decov"


def example_files() -> dict[str, str]:
    """``{path: code}`` of the doc's python blocks whose first line is ``# <path>``."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    files = {}
    for block in blocks:
        first, _, _ = block.partition("\n")
        if first.startswith("# ") and first[2:].endswith(".py"):
            files[first[2:].strip()] = block
    return files


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The example module placed on the package's path and imported; the registry and path restored after."""
    folder = tmp_path_factory.mktemp("example_package")
    (folder / Path(MODULE).name).write_text(example_files()[MODULE], encoding="utf-8")
    registry = dict(base_module._REGULARIZERS)
    package.__path__.append(str(folder))
    try:
        yield folder
    finally:
        package.__path__.remove(str(folder))
        sys.modules.pop(f"regtune.regularizers.{NAME}", None)
        base_module._REGULARIZERS.clear()
        base_module._REGULARIZERS.update(registry)


@pytest.fixture(scope="module")
def registered(example: Path) -> str:
    assert NAME not in list_regularizers()  # not one of regtune's own
    imported = package.import_modules()  # what importing the package does: every public module, no list
    assert NAME in imported
    return NAME


def test_the_doc_names_exactly_one_module_one_test_and_one_page() -> None:
    assert set(example_files()) == {MODULE, TEST}  # the code it shows; the page is described, not shown
    text = DOC.read_text(encoding="utf-8")
    assert "Those three files" in text and "`docs/methods/<name>.md`" in text


def test_the_example_registers_from_the_package_folder(registered: str) -> None:
    assert registered in list_regularizers()
    cls = regularizer_class(registered)
    assert cls.__module__ == f"regtune.regularizers.{NAME}" and cls.registry_name == NAME
    check_declarations(registered)
    examples = doctest.testmod(sys.modules[cls.__module__], extraglobs={"torch": torch})
    assert examples.attempted >= 1 and examples.failed == 0


def _contract_params() -> list[Any]:
    params = []
    for check, takes_dtype in CHECKS:
        name = check.__name__.removeprefix("check_")
        if takes_dtype:
            params += [pytest.param(check, dtype, id=f"{name}-{str(dtype)[6:]}")
                       for dtype in (torch.float32, torch.float64)]
        else:
            params.append(pytest.param(check, None, id=name))
    return params


@pytest.mark.parametrize(("check", "dtype"), _contract_params())
def test_the_example_passes_the_contract(registered: str, check: Callable[..., None],
                                          dtype: torch.dtype | None) -> None:
    for kwargs in contract_cases(registered):  # the cases the class declares (collected before it existed)
        check(registered, kwargs, *(() if dtype is None else (dtype,)))


def test_the_example_trains_a_tiny_step(registered: str) -> None:
    model = make_model()
    term = build(registered, {"weight": 10.0}, model, torch.float32)
    optimizer = torch.optim.SGD([*model.parameters(), *term.parameters()], lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    values = []
    for i in range(3):  # the same batch: the term's own value goes down under its gradient
        step = step_for(term, model, torch.float32, step=i, seed=7)
        features = model.forward_head(model.forward_features(step.images), pre_logits=True)
        logits = model.get_classifier()(features)
        live = type(step)(features=features, logits=logits, labels=step.labels, model=model, global_step=i)
        loss = nn.functional.cross_entropy(logits, step.labels) + term(live)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(term.stats()[NAME])
        assert torch.isfinite(loss)
    assert values[-1] < values[0]
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    assert logits.shape == (step.labels.shape[0], NUM_CLASSES)


def test_the_example_test_file_passes(example: Path, tmp_path: Path) -> None:
    (tmp_path / Path(TEST).name).write_text(example_files()[TEST], encoding="utf-8")
    # In its own interpreter: the package's path gets the example's folder before the test file imports it.
    (tmp_path / "conftest.py").write_text(
        "import regtune.regularizers as package\n"
        f"package.__path__.append({str(example)!r})\n"
        "package.import_modules()\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "5 passed" in result.stdout, result.stdout[-3000:]
