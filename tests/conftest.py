"""Shared test set-up: no network, seeded tests, a tiny ImageFolder and a tiny timm backbone."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_OFFLINE", "1")

TINY_BACKBONE = "test_efficientnet"
"""timm's own tiny test model (0.1 M parameters), same family as the default backbone."""


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    connect = socket.socket.connect

    def refuse(self: socket.socket, *args: object, **kwargs: object) -> None:
        if self.family == socket.AF_UNIX:  # local: DataLoader workers hand tensors over Unix sockets
            return connect(self, *args, **kwargs)
        raise RuntimeError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(autouse=True)
def _regtune_logger_restored() -> Iterator[None]:
    """``regtune.cli.main`` points the ``regtune`` logger at its own handler (no propagation); later tests read the
    log through pytest's ``caplog``, so each test gets the logger back as it found it."""
    logger = logging.getLogger("regtune")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logger.setLevel(saved[2])


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


def write_imagefolder(root: Path, classes: int = 3, train_per_class: int = 10, test_per_class: int = 4,
                      size: int = 24, seed: int = 0) -> Path:
    """``root/{train,test}/<class>/<i>.png`` with class-dependent colours, so a tiny model can learn it."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3), dtype=np.float64)
                base[..., c % 3] = 180.0
                pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    return write_imagefolder(tmp_path / "images")
