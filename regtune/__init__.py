"""regtune: regularized fine-tuning of pretrained image backbones on small, fine-grained datasets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from regtune.predict import Predictor

__version__ = "0.1.0"


def load(path: str | Path, device: str = "cpu") -> Predictor:
    """The predictor of a finished run directory: ``regtune.load(RUN).predict(paths, topk=3)``
    ([`regtune.predict.load`][regtune.predict.load]; imported on first use, so ``import regtune`` stays light)."""
    from regtune.predict import load as _load

    return _load(path, device)
