"""The run directory: status, claiming, discovery, the split, and the model rebuilt as it was trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from regtune.data.datasets import build_dataset
from regtune.data.subset import stratified_split, write_manifest
from regtune.data.transforms import TransformedSubset, build_transforms
from regtune.regularizers import UnknownNameError
from regtune.regularizers.stochnorm import StochNormMixin
from regtune.train.config import ConfigError, TermSpec, apply_overrides, load_config, save_config
from regtune.train.fit import fit
from regtune.train.rundir import RunDir, RunDirError, find_runs, make_split, run_preprocessing
from tests.conftest import write_imagefolder
from tests.train.test_fit import tiny_config


def _touch(path: Path, text: str = "{}\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_status_follows_what_the_run_wrote(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert run.status == "new"
    _touch(run.config_path)
    assert run.status == "started"
    _touch(run.last_checkpoint, "x")
    assert run.status == "interrupted"
    _touch(run.metrics_path)
    assert run.status == "finished" and run.finished


def test_claim_refuses_to_overwrite_and_to_resume_what_is_not_interrupted(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    with pytest.raises(RunDirError, match="no checkpoints/last.ckpt to resume from"):
        run.claim(resume=True)
    run.claim()
    assert run.path.is_dir()
    _touch(run.config_path)
    with pytest.raises(RunDirError, match="unfinished run.*--overwrite"):
        run.claim()
    _touch(run.last_checkpoint, "x")
    run.claim(resume=True)  # interrupted: resumable, nothing removed
    assert run.last_checkpoint.is_file()
    _touch(run.metrics_path)
    with pytest.raises(RunDirError, match="finished run.*nothing to resume"):
        run.claim(resume=True)
    with pytest.raises(RunDirError, match="already holds a finished run"):
        run.claim()
    run.claim(overwrite=True)
    assert run.status == "new" and run.path.is_dir() and not any(run.path.iterdir())


def test_require_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a regtune run directory"):
        RunDir(tmp_path).require()
    _touch(tmp_path / "config.yaml")
    with pytest.raises(FileNotFoundError, match="has not finished.*--resume"):
        RunDir(tmp_path).require("finished")
    assert RunDir(tmp_path).require("started").path == tmp_path


def test_find_runs_below_folders_and_by_status(tmp_path: Path) -> None:
    finished = [tmp_path / "grid" / "runs" / "cell" / m / "s0" for m in ("ft", "fmr")]
    for path in finished:
        _touch(path / "config.yaml")
        _touch(path / "metrics.json")
    unfinished = tmp_path / "grid" / "runs" / "cell" / "l2sp" / "s0"
    _touch(unfinished / "config.yaml")
    _touch(tmp_path / "grid" / "grid.yaml")  # not a run
    assert [r.path for r in find_runs([tmp_path / "grid"])] == sorted(finished)
    assert [r.path for r in find_runs([finished[1]])] == [finished[1]]  # a run directory itself
    assert [r.path for r in find_runs([tmp_path], status="started")] == [unfinished]
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        find_runs([tmp_path / "missing"])


def test_make_split_is_the_stratified_split_or_the_manifest(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "data", classes=3, train_per_class=10, test_per_class=2)
    train_set = build_dataset("imagefolder", root, "train")
    config = apply_overrides(tiny_config(root), {"data.fraction": 0.5, "trainer.seed": 3})
    split = make_split(config, train_set)
    expected = stratified_split(train_set.targets, 3, fraction=0.5, val_fraction=0.2, seed=3,
                                class_names=train_set.classes)
    assert (split.train, split.val) == (expected.train, expected.val)
    other = stratified_split(train_set.targets, 3, fraction=0.5, val_fraction=0.2, seed=4)
    write_manifest(tmp_path / "split.json", other, train_set.ids, "imagefolder")
    from_file = make_split(apply_overrides(config, {"data.split_manifest": str(tmp_path / "split.json")}), train_set)
    assert (from_file.train, from_file.val) == (sorted(other.train), sorted(other.val))
    assert from_file.train != split.train


def test_a_config_with_an_unknown_term_or_argument_fails_when_read(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    path = tmp_path / "config.yaml"
    save_config(apply_overrides(config, {"regularizers": [{"name": "fmrr"}]}), path)
    with pytest.raises(UnknownNameError, match="unknown regularizer 'fmrr'; known: .*fmr"):
        load_config(path)
    save_config(apply_overrides(config, {"regularizers": [{"name": "fmr", "args": {"bta": 1}}]}), path)
    with pytest.raises(UnknownNameError, match="'fmr' has no argument.*bta.*valid: .*beta"):
        load_config(path)
    save_config(apply_overrides(config, {"criterion": {"name": "ce", "args": {"smoothing": 0.1}}}), path)
    with pytest.raises(UnknownNameError, match="criterion 'ce' has no argument"):
        load_config(path)
    save_config(apply_overrides(config, {"regularizers": [{"name": "fmr", "args": {"mode": "metta"}}]}), path)
    with pytest.raises(ValueError, match="metta"):
        load_config(path)
    path.write_text("optim: {lr: 0.1, learning_rate: 0.2}\n")
    with pytest.raises(ConfigError, match="unknown key.*learning_rate"):
        load_config(path)


def test_a_bad_regularizer_in_fit_writes_no_folder(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    config = apply_overrides(config, {"regularizers": [{"name": "l2sp", "args": {"alpha": 1}}]})
    with pytest.raises(UnknownNameError, match="unknown regularizer 'l2sp'; known: .*l2_sp"):
        fit(config, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_load_model_rebuilds_the_run_as_trained(tmp_path: Path) -> None:
    """A run with a cosine head (LM-Softmax) and StochNorm: the rebuilt model gives the run's test accuracy."""
    root = write_imagefolder(tmp_path / "data", classes=3, train_per_class=10, test_per_class=4)
    config = apply_overrides(tiny_config(root, epochs=2), {"criterion": {"name": "lm_softmax", "args": {"s": 8.0}},
                                                          "regularizers": [{"name": "stochnorm"}]})
    result = fit(config, run_dir=tmp_path / "run")
    run = RunDir(result.run_dir)
    assert run.finished and run.config() == config
    model, loaded, checkpoint = run.load_model(3)
    assert loaded == config and checkpoint == run.path / result.metrics["selected_checkpoint"]
    assert type(model.get_classifier()).__name__ == "CosineClassifier" and not model.training
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, StochNormMixin) for m in norms)  # as trained: StochNorm's swap replayed
    test_set = run.dataset("test")
    _, eval_tf = build_transforms(run_preprocessing(model, config))
    images = torch.stack([TransformedSubset(test_set, range(len(test_set)), eval_tf)[i][0]
                          for i in range(len(test_set))])
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == torch.tensor(test_set.targets)).float().mean().item()
    assert accuracy == pytest.approx(result.metrics["test_acc"], abs=1e-6)
    assert json.loads(run.metrics_path.read_text()) == run.metrics()
    assert TermSpec("stochnorm") in run.config().regularizers
    import timm

    versions = run.metrics()["versions"]  # what decides the digits besides the code
    assert versions["timm"] == timm.__version__ and {"torch", "torchvision", "numpy", "pillow"} <= set(versions)
    assert run.metrics()["selected_epoch"] in (1, 2) and run.metrics()["epoch_base"] == 1


def test_a_run_reached_through_a_linked_folder_finishes(tmp_path: Path) -> None:
    """runs/ as a link to other storage: Lightning resolves the link in its checkpoint paths; the run keeps it."""
    root = write_imagefolder(tmp_path / "data", classes=2, train_per_class=5, test_per_class=2)
    (tmp_path / "scratch").mkdir()
    (tmp_path / "runs").symlink_to(tmp_path / "scratch", target_is_directory=True)
    result = fit(tiny_config(root, epochs=1), run_dir=tmp_path / "runs" / "run")
    assert result.metrics["selected_checkpoint"] == "checkpoints/best.ckpt"
    assert RunDir(tmp_path / "runs" / "run").finished and (tmp_path / "scratch" / "run" / "metrics.json").is_file()


def test_metrics_of_an_older_run_count_the_selected_epoch_from_1(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    _touch(run.config_path)
    _touch(run.metrics_path, json.dumps({"test_acc": 0.5, "selected_epoch": 6}))  # written before epoch_base: 0-based
    assert run.metrics()["selected_epoch"] == 7 and run.metrics()["epoch_base"] == 1
    _touch(run.metrics_path, json.dumps({"test_acc": 0.5, "selected_epoch": 7, "epoch_base": 1}))
    assert run.metrics()["selected_epoch"] == 7
