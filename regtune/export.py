"""Export a finished run's tested model for use without regtune: weights as safetensors with a timm-style
``config.json``, an ONNX graph, a ``torch.export`` program.

    regtune export runs/my-run --out exported/ [--format safetensors,onnx,pt2]

``config.json`` follows the layout timm writes next to its Hugging Face weights (``architecture``, ``num_classes``,
``label_names``, ``pretrained_cfg`` with the preprocessing, the run's evaluation frame included), so that

    model = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"],
                              checkpoint_path="exported/model.safetensors")   # strict

gives the tested model, and ``regtune.load("exported/")`` the same predictor as the run. Nothing in an export is a
pickle of code: safetensors and JSON, an ONNX protobuf, and ``torch.export``'s archive (graph as JSON, weights as raw
bytes).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regtune._io import atomic_write_bytes, atomic_write_text

__all__ = ["CONFIG_FILE", "EXPORT_FORMATS", "ONNX_FILE", "PT2_FILE", "WEIGHTS_FILE", "export_run", "load_export"]

_log = logging.getLogger(__name__)

EXPORT_FORMATS = ("safetensors", "onnx", "pt2")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
PT2_FILE = "model.pt2"


def _check_plain_timm(model: nn.Module, architecture: str, num_classes: int, run: Any) -> None:
    """The run's model must be timm's architecture layer for layer (LM-Softmax's cosine head or StochNorm's layers
    are not): otherwise plain timm would load the weights into a model that computes something else."""
    import timm

    plain = timm.create_model(architecture, pretrained=False, num_classes=num_classes)
    ours = [(name, type(m)) for name, m in model.named_modules()]
    theirs = [(name, type(m)) for name, m in plain.named_modules()]
    if ours != theirs:
        different = next(f"{a[0] or 'model'}: {a[1].__name__} instead of timm's {b[1].__name__}"
                         for a, b in zip(ours + [("", type(None))], theirs + [("", type(None))]) if a != b)
        raise ValueError(f"{run}: the model is not timm's {architecture} layer for layer ({different}; a criterion "
                         "or regularizer changed it), so a plain timm model would compute something else with these "
                         "weights; export supports runs whose model is the timm architecture")


def _config(architecture: str, classes: Sequence[str], preprocessing: dict[str, Any], run: Any) -> dict[str, Any]:
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {
        "architecture": architecture,
        "num_classes": len(classes),
        "label_names": list(classes),
        "pretrained_cfg": {k: (list(preprocessing[k]) if isinstance(preprocessing[k], tuple) else preprocessing[k])
                           for k in keys if k in preprocessing},
        "regtune": {"run": str(run.path), "weights": WEIGHTS_FILE},
    }


def export_run(run_dir: str | Path, out: str | Path, formats: Sequence[str] = EXPORT_FORMATS) -> dict[str, Path]:
    """Write the run's tested model to ``out`` in ``formats`` (``config.json`` always); returns the files.

    Raises:
        ValueError: an unknown format, or a model that is not timm's architecture.
        FileExistsError: ``out`` already holds an export (nothing is overwritten).
    """
    from regtune.models.weights import weights_file_bytes
    from regtune.predict import load

    unknown = sorted(set(formats) - set(EXPORT_FORMATS))
    if unknown or not formats:
        raise ValueError(f"unknown export format(s) {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    if (out / CONFIG_FILE).exists():
        raise FileExistsError(f"{out} already holds an export ({CONFIG_FILE}); give another --out or delete it")
    predictor = load(run_dir)
    run, model = predictor.run, predictor.model
    architecture = run.config().model.backbone
    _check_plain_timm(model, architecture, len(predictor.classes), run.path)
    config = _config(architecture, predictor.classes, predictor.preprocessing, run)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    # Weights first, config last: a folder with config.json is a complete export.
    written["safetensors"] = out / WEIGHTS_FILE
    atomic_write_bytes(written["safetensors"], weights_file_bytes(model.state_dict(), predictor.classes))
    example = torch.zeros(2, *config["pretrained_cfg"]["input_size"])
    batch = {0: torch.export.Dim("batch", min=1)}
    if "pt2" in formats:
        program = torch.export.export(model, (example,), dynamic_shapes=(batch,))
        written["pt2"] = out / PT2_FILE
        torch.export.save(program, written["pt2"])
    if "onnx" in formats:
        written["onnx"] = out / ONNX_FILE
        _export_onnx(model, example, batch, written["onnx"])
    config["regtune"]["checked"] = _verify(predictor, written)
    written["config"] = out / CONFIG_FILE
    config["regtune"]["files"] = sorted(p.name for p in written.values() if p.name != CONFIG_FILE)
    atomic_write_text(written["config"], json.dumps(config, indent=1) + "\n")
    return written


def _check_images(predictor: Any, limit: int = 16) -> torch.Tensor:
    """Up to ``limit`` of the run's validation images (training images without a validation split), transformed as
    the run evaluates them."""
    run = predictor.run
    train = run.dataset("train", run.config())
    split = run.split(train)
    items = list(split.val or split.train)[:limit]
    return torch.stack([predictor.transform(train[i][0]) for i in items])


@torch.no_grad()
def _verify(predictor: Any, written: dict[str, Path], tolerance: float = 1e-3) -> dict[str, Any]:
    """Each exported model's logits against PyTorch's on real images; an export that differs by more than
    ``tolerance`` (times the logits' scale) is an error, not a file left to be found out."""
    images = _check_images(predictor)
    expected = predictor.model(images.to(predictor.device)).float().cpu()
    scale = max(1.0, float(expected.abs().max()))
    outputs = {}
    if "pt2" in written:
        outputs["pt2"] = torch.export.load(written["pt2"]).module()(images)
    if "onnx" in written:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(written["onnx"]), providers=["CPUExecutionProvider"])
        outputs["onnx"] = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    checked: dict[str, Any] = {"images": int(images.shape[0]), "max_abs_logit": float(expected.abs().max())}
    for kind, logits in outputs.items():
        difference = float((logits.float() - expected).abs().max())
        checked[f"{kind}_max_abs_diff"] = difference
        if difference > tolerance * scale:
            raise RuntimeError(f"the exported {kind} model's logits differ from PyTorch's by up to {difference:.3g} "
                               f"on {images.shape[0]} of the run's images (logits up to {scale:.3g}); the file is "
                               f"written ({written[kind]}) but should not be used; please report it")
    return checked


def _export_onnx(model: nn.Module, example: torch.Tensor, batch: dict[int, Any], path: Path) -> None:
    import contextlib
    import io
    import tempfile

    try:
        import onnx  # noqa: F401  (torch.onnx's exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"ONNX export needs the onnx and onnxscript packages ({err}): pip install onnx "
                           "onnxscript, or export without it (--format safetensors,pt2)") from err
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        onnx_path = Path(tmp) / ONNX_FILE
        torch.onnx.export(model, (example,), str(onnx_path), dynamic_shapes=(batch,), input_names=["images"],
                          output_names=["logits"], dynamo=True, external_data=False)
        atomic_write_bytes(path, onnx_path.read_bytes())


def load_export(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """The `regtune.predict.Predictor` of an export folder: plain timm with its safetensors, strictly."""
    import timm
    from safetensors.torch import load_file

    from regtune.data.transforms import build_transforms
    from regtune.predict import Predictor

    path = Path(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    model = timm.create_model(config["architecture"], pretrained=False, num_classes=config["num_classes"])
    model.load_state_dict(load_file(path / WEIGHTS_FILE), strict=True)
    _, transform = build_transforms(config["pretrained_cfg"])
    return Predictor(model, config["label_names"], transform, device, config["pretrained_cfg"])
