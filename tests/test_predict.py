"""`regtune predict` and `regtune.load`: a finished run classifies new images as it classified its test images."""

from __future__ import annotations

import csv
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import regtune
from regtune.cli import main
from regtune.predict import Prediction, expand_inputs, open_rgb
from regtune.train.config import DataConfig, FitConfig, ModelConfig, OptimConfig, TrainerConfig
from regtune.train.fit import fit
from tests.conftest import TINY_BACKBONE

MODES = (("RGB", (30, 20)), ("L", (20, 28)), ("RGBA", (26, 26)))  # non-square colour, grey, and with alpha


def write_photos(root: Path, classes: int = 3, train: int = 8, test: int = 4, seed: int = 0) -> Path:
    """``root/{train,test}/<class>/`` with photos of mixed size and mode, coloured by class (learnable)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"kind_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                mode, (w, h) = MODES[i % len(MODES)]
                pixels = rng.normal(60.0, 25.0, (h, w, 3))
                pixels[..., c % 3] += 150.0
                image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
                if mode == "RGBA":
                    image.putalpha(255)
                image.convert(mode).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = write_photos(tmp_path_factory.mktemp("photos"))
    config = FitConfig(
        data=DataConfig(dataset="imagefolder", root=str(root), fraction=None, val_fraction=0.25, img_size=32,
                        batch_size=8, num_workers=0),
        model=ModelConfig(backbone=TINY_BACKBONE, pretrained="none", head_init="normal", freeze_bn_stats=False),
        optim=OptimConfig(lr=0.05, head_lr_mult=1.0),  # learns these colours (75 % on the test photos)
        trainer=TrainerConfig(epochs=6, progress_bar=False, accelerator="cpu", wise_alphas=()),
    )
    return fit(config, run_dir=tmp_path_factory.mktemp("runs") / "run").run_dir, root


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_on_the_test_folder_reproduces_the_test_accuracy(run: tuple[Path, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    run_dir, root = run
    assert main(["predict", str(run_dir), str(root / "test"), "--out", str(tmp_path / "p.csv"), "--topk", "2"]) == 0
    rows = _rows(tmp_path / "p.csv")
    assert len(rows) == 12 and list(rows[0]) == ["path", "class1", "prob1", "class2", "prob2", "error"]
    correct = [Path(r["path"]).parent.name == r["class1"] for r in rows]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert sum(correct) == round(metrics["test_acc"] * len(rows))  # the same images right, counted exactly
    assert metrics["test_acc"] > 0.5  # a model that learnt something, so that agreeing means something
    assert all(float(r["prob1"]) >= float(r["prob2"]) for r in rows)
    assert "12 of 12 images classified" in capsys.readouterr().err
    # an existing --out is not overwritten
    assert main(["predict", str(run_dir), str(root / "test"), "--out", str(tmp_path / "p.csv")]) == 2
    assert "exists" in capsys.readouterr().err


def test_unreadable_files_are_reported_on_their_line_and_the_rest_classified(
        run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir, root = run
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    good = sorted((root / "test" / "kind_1").glob("*.png"))[:2]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([str(good[0]), "broken.jpg", "missing.png", str(good[1])]) + "\n")
    assert main(["predict", str(run_dir), str(listing), "--out", str(tmp_path / "p.csv")]) == 3
    rows = _rows(tmp_path / "p.csv")
    assert [Path(r["path"]).name for r in rows] == [good[0].name, "broken.jpg", "missing.png", good[1].name]
    assert [bool(r["error"]) for r in rows] == [False, True, True, False]
    assert rows[1]["class1"] == "" and "UnidentifiedImageError" in rows[1]["error"]
    assert "FileNotFoundError" in rows[2]["error"] and rows[0]["class1"].startswith("kind_")
    err = capsys.readouterr().err
    assert "2 of 4 images classified" in err and "not read: " in err and "broken.jpg" in err


def test_python_api_takes_paths_images_and_tensors(run: tuple[Path, Path]) -> None:
    run_dir, root = run
    predictor = regtune.load(run_dir)
    assert predictor.classes == ["kind_0", "kind_1", "kind_2"]
    paths = expand_inputs([root / "test"])
    assert len(paths) == 12 and paths == sorted(paths)
    by_path = predictor.predict(paths, topk=3, batch_size=5)  # batches that do not divide the inputs
    by_image = predictor.predict([Image.open(p) for p in paths], topk=3)  # grey and RGBA as they are on disk
    batch = torch.stack([predictor.transform(open_rgb(p)) for p in paths])
    by_tensor = predictor.predict([batch], topk=3)
    for a, b, c in zip(by_path, by_image, by_tensor):
        assert isinstance(a, Prediction) and a.error is None and len(a.topk) == 3
        assert [x for x, _ in a.topk] == [x for x, _ in b.topk] == [x for x, _ in c.topk]
        assert [p for _, p in a.topk] == pytest.approx([p for _, p in c.topk], abs=1e-6)
        assert sum(p for _, p in a.topk) == pytest.approx(1.0, abs=1e-5)  # every class: the whole softmax
    # flip TTA: the mean of the two softmaxes, computed here by hand
    with torch.no_grad():
        expected = (predictor.model(batch).softmax(1) + predictor.model(batch.flip(-1)).softmax(1)) / 2
    flipped = predictor.predict([batch], topk=1, tta="flip")
    assert [p.probability for p in flipped] == pytest.approx(expected.max(1).values.tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="tta must be one of"):
        predictor.predict(paths[:1], tta="rotate")
    with pytest.raises(ValueError, match="topk must be >= 1"):
        predictor.predict(paths[:1], topk=0)


def test_the_readme_example_runs(run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture) -> None:
    run_dir, root = run
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    (code,) = [b for b in blocks if "regtune.load(" in b]
    monkeypatch.chdir(tmp_path)
    open_rgb(min((root / "test" / "kind_0").glob("*.png"))).save("photo.jpg")
    (tmp_path / "other.png").write_bytes(b"broken")  # the example prints the error of a file it cannot read
    (tmp_path / "example.py").write_text(code.replace("runs/<run>", str(run_dir)))
    runpy.run_path(str(tmp_path / "example.py"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("photo.jpg kind_") and lines[1].startswith("other.png None None ()")


def test_export_loads_in_plain_timm_onnxruntime_and_torch_export(run: tuple[Path, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    import onnxruntime
    import timm

    run_dir, root = run
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert "checked on 6 of the run's images against PyTorch" in capsys.readouterr().out  # its validation images
    config = json.loads((out / "config.json").read_text())
    checked = config["regtune"]["checked"]
    assert checked["pt2_max_abs_diff"] == 0.0 and checked["onnx_max_abs_diff"] < 1e-4
    assert config["architecture"] == TINY_BACKBONE and config["label_names"] == ["kind_0", "kind_1", "kind_2"]
    assert config["pretrained_cfg"]["crop_mode"] == "center" and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    predictor = regtune.load(run_dir)
    photos = expand_inputs([root / "test"])
    batch = torch.stack([predictor.transform(open_rgb(p)) for p in photos])  # real images, the run's frame
    with torch.no_grad():
        expected = predictor.model(batch)
        # plain timm, strictly, from the safetensors alone
        plain = timm.create_model(config["architecture"], num_classes=config["num_classes"],
                                  checkpoint_path=str(out / "model.safetensors")).eval()
        assert torch.equal(plain(batch), expected)
        program = torch.export.load(out / "model.pt2").module()
        pt2_diff = float((program(batch) - expected).abs().max())
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    onnx_diff = float(abs(session.run(None, {"images": batch.numpy()})[0] - expected.numpy()).max())
    assert pt2_diff < 1e-5 and onnx_diff < 1e-4, (pt2_diff, onnx_diff)  # measured: pt2 0, ONNX ~1e-6
    # regtune.load of the export is the run's predictor
    exported = regtune.load(out)
    assert [p.topk for p in exported.predict(photos, topk=2)] == pytest.approx(
        [p.topk for p in predictor.predict(photos, topk=2)])
    assert main(["export", str(run_dir), "--out", str(out)]) == 2  # nothing is overwritten
    assert "already holds an export" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--out", str(tmp_path / "x"), "--format", "tflite"]) == 2
    assert "unknown export format(s) tflite" in capsys.readouterr().err


def test_export_refuses_a_model_that_is_not_timms_architecture() -> None:
    import timm

    from regtune.export import _check_plain_timm
    from regtune.regularizers import create_criterion

    model = timm.create_model(TINY_BACKBONE, num_classes=3)
    _check_plain_timm(model, TINY_BACKBONE, 3, "run")  # timm's own: accepted
    create_criterion("lm_softmax").adapt_model(model)  # its cosine head
    with pytest.raises(ValueError, match="not timm's .* layer for layer .*instead of timm's Linear"):
        _check_plain_timm(model, TINY_BACKBONE, 3, "run")


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON (other readers refuse it)")


def test_interpret_writes_its_tables_and_figures_and_they_agree_with_the_run(
        run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir, root = run
    assert main(["interpret", str(run_dir), "--out", str(tmp_path / "i"), "--top-losses", "5", "--bins", "10"]) == 0
    out = tmp_path / "i"
    summary = json.loads((out / "interpret.json").read_text(), parse_constant=_not_json)  # strict JSON: no NaN
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert summary["n"] == 12 and round(summary["accuracy"] * 12) == round(metrics["test_acc"] * 12)
    with open(out / "confusion_matrix.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["true \\ predicted", "kind_0", "kind_1", "kind_2"]
    counts = np.array([[int(v) for v in row[1:]] for row in table[1:]])
    assert counts.sum() == 12 and counts.trace() == round(metrics["test_acc"] * 12)
    assert counts.sum(1).tolist() == [4, 4, 4]  # rows are the true classes
    off = [(int(counts[t, p]), f"kind_{t}", f"kind_{p}") for t in range(3) for p in range(3) if t != p and counts[t, p]]
    assert [(m["count"], m["true"], m["predicted"]) for m in summary["most_confused"]] == sorted(off, reverse=True)
    # ECE in plain NumPy from the predictor's probabilities (another code path): 10 equal bins, (lo, hi]
    photos = [root / item for item in _test_ids(run_dir)]  # ids are paths under the dataset root
    predictions = regtune.load(run_dir).predict(photos, topk=1)
    confidence = np.array([p.probability for p in predictions])
    correct = np.array([p.label == Path(path).parent.name for p, path in zip(predictions, photos)])
    ece = 0.0
    for lo in np.arange(10) / 10:
        members = (confidence > lo) & (confidence <= lo + 0.1) | ((lo == 0) & (confidence == 0))
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    assert summary["ece"] == pytest.approx(ece, abs=1e-6)
    per_class = {row["class"]: row for row in summary["per_class"]}
    for c in range(3):  # recall = the diagonal over the row
        assert per_class[f"kind_{c}"]["recall"] == pytest.approx(counts[c, c] / 4)
    assert len(summary["top_losses"]) == 5
    worst = [t["loss"] for t in summary["top_losses"]]
    assert worst == sorted(worst, reverse=True)
    for name in ("confusion_matrix.png", "reliability.png", "top_losses.png"):
        assert (out / name).stat().st_size > 15_000, name
    assert "ECE" in capsys.readouterr().out


def _test_ids(run_dir: Path) -> list[str]:
    from regtune.train.rundir import RunDir

    run = RunDir(run_dir)
    return list(run.dataset("test", run.config()).ids)


def test_expected_calibration_error_by_hand() -> None:
    from regtune.posthoc.interpret import expected_calibration_error

    # bins (0, 0.5] and (0.5, 1]: {0.2: wrong} -> |0 - 0.2| x 1/3; {0.9: right, 0.95: wrong} -> |0.5 - 0.925| x 2/3
    ece, bins = expected_calibration_error(np.array([0.2, 0.9, 0.95]), np.array([False, True, False]), bins=2)
    assert ece == pytest.approx(0.2 / 3 + 0.425 * 2 / 3)
    assert [b["count"] for b in bins] == [1, 2] and bins[1]["accuracy"] == 0.5
    ece, bins = expected_calibration_error(np.array([0.0, 0.5, 1.0]), np.array([False, True, True]), bins=2)
    assert [b["count"] for b in bins] == [2, 1]  # 0 joins the first bin; 0.5 closes it
    assert ece == pytest.approx(2 / 3 * abs(0.5 - 0.25) + 1 / 3 * 0.0)
    _, bins = expected_calibration_error(np.array([0.2, 0.9]), np.array([False, True]), bins=4)
    assert [b["count"] for b in bins] == [1, 0, 0, 1] and bins[1]["confidence"] is None is bins[2]["accuracy"]


def test_an_export_that_differs_from_pytorch_is_an_error(run: tuple[Path, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from regtune.export import export_run

    load = torch.export.load

    class _Off:  # a program whose logits are off by 0.5: what a broken exporter would write
        def __init__(self, path: Path) -> None:
            self.program = load(path)

        def module(self) -> object:
            inner = self.program.module()
            return lambda x: inner(x) + 0.5

    monkeypatch.setattr(torch.export, "load", _Off)
    with pytest.raises(RuntimeError, match="pt2 model's logits differ from PyTorch's by up to 0.5"):
        export_run(run[0], tmp_path / "e", formats=["safetensors", "pt2"])
    assert not (tmp_path / "e" / "config.json").exists()  # not a complete export


def test_the_readme_library_example_runs_in_a_plain_loop(capsys: pytest.CaptureFixture) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## As a library"):]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    generator = torch.Generator().manual_seed(0)
    loader = [(torch.randn(10, 3, 32, 32, generator=generator), torch.arange(10)) for _ in range(2)]
    namespace = {"loader": loader}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the README's own example)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1"]
    for key in ("sp", "l_intra", "lambda"):  # L2-SP, AdaRand and FMR ran and logged
        assert f"'{key}'" in lines[-1], key
    assert namespace["terms"][1].mu.grad is None  # AdaRand's prior means stay out of the loop's optimizer
