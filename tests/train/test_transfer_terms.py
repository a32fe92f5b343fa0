"""End-to-end runs of the transfer-learning terms (L2-SP, DELTA, BSS, Co-Tuning, LwF, StochNorm) on a tiny ImageFolder.

The "pretrained" weights are a randomly initialised timm model saved with its 1000-class head, so the backbone gets a
source head as a real ImageNet checkpoint would give it. Runs are cached per module: the tests that inspect a run's
artifacts reuse the run of the parametrized test instead of training again.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

from regtune.models import create_backbone
from regtune.regularizers import DELTA, CoTuning, CrossEntropy
from regtune.train.callbacks import read_epoch_log
from regtune.train.config import FitConfig, ModelConfig, OptimConfig, TermSpec
from regtune.train.fit import FitResult, fit
from regtune.train.module import FineTuner
from tests.conftest import TINY_BACKBONE, write_imagefolder
from tests.train.test_fit import COMPARED, _StopAt, tiny_config

SOURCE_CLASSES = 1000
TARGET_CLASSES = 3  # write_imagefolder's default

TERMS = [  # (name, args, stats keys logged as train/<name>/<key>)
    ("l2_sp", {}, ("sp", "head")),
    ("delta", {"attention_samples": 2}, ("feature_maps", "head")),  # ablation attention, on 2 images to stay fast
    ("delta", {"attention": "uniform"}, ("feature_maps", "head")),
    ("bss", {}, ("sigma_min_sq",)),
    ("co_tuning", {}, ("soft_ce",)),
    ("lwf", {}, ("kl",)),
    ("lwf", {"teacher": "online"}, ("kl",)),
    ("stochnorm", {}, ("layers", "p")),
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``imagefolder`` fixture's data, once per module (the cached runs share it)."""
    return write_imagefolder(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A "pretrained" weights file of the tiny backbone with its 1000-class source head."""
    torch.manual_seed(0)  # module fixtures are built before the per-test seeding
    path = tmp_path_factory.mktemp("weights") / f"{TINY_BACKBONE}.pth"
    torch.save(timm.create_model(TINY_BACKBONE, pretrained=False).state_dict(), path)
    return path


def term_config(images: Path, weights: Path | str, name: str, args: dict[str, Any],
                epochs: int = 2) -> FitConfig:
    """``tiny_config`` with the weights file as the pretrained source and one regularizer."""
    return dataclasses.replace(tiny_config(images, epochs=epochs),
                               model=ModelConfig(backbone=TINY_BACKBONE, pretrained=str(weights), head_init="normal",
                                                 freeze_bn_stats=False),
                               regularizers=(TermSpec(name, args),))


@pytest.fixture(scope="module")
def run(images: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., FitResult]:
    """``run(name, args)``: a finished 2-epoch run with that one term, trained once per module."""
    done: dict[str, FitResult] = {}

    def get(name: str, args: dict[str, Any]) -> FitResult:
        key = f"{name}-{json.dumps(args, sort_keys=True)}"
        if key not in done:
            run_dir = tmp_path_factory.mktemp("runs") / name
            done[key] = fit(term_config(images, weights, name, args), run_dir=run_dir)
        return done[key]

    return get


def _checkpoint_state(result: FitResult, which: str = "last") -> dict[str, torch.Tensor]:
    return torch.load(result.run_dir / "checkpoints" / f"{which}.ckpt", map_location="cpu",
                      weights_only=False)["state_dict"]


def _term_id(name: str, args: dict[str, Any]) -> str:
    return "-".join([name, *(f"{k}={v}" for k, v in args.items())])


@pytest.mark.parametrize("name, args, keys", TERMS, ids=[_term_id(n, a) for n, a, _ in TERMS])
def test_term_trains_and_logs(run: Callable[..., FitResult], name: str, args: dict[str, Any],
                              keys: tuple[str, ...]) -> None:
    result = run(name, args)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["test_acc"] <= 1.0
    assert metrics["regularizers"] == [name] and metrics["weights"].startswith("file:")
    rows = read_epoch_log(result.run_dir / "epochs.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    columns = [f"train/{name}"] + [f"train/{name}/{key}" for key in keys]
    for row in rows:
        missing = [c for c in columns if c not in row]
        assert not missing, f"epochs.csv lacks {missing}; has {sorted(row)}"
        assert all(math.isfinite(row[c]) for c in columns), {c: row[c] for c in columns}
        assert math.isfinite(row["train/loss"])


def test_penalties_are_positive_where_they_must_be(run: Callable[..., FitResult]) -> None:
    # Training moved the weights away from w0, the features away from the frozen copy's, the source head away from
    # the teacher: each of these distances is positive after an epoch (0 would mean the term saw no change).
    last = {(n, json.dumps(a)): read_epoch_log(run(n, a).run_dir / "epochs.csv")[-1] for n, a, _ in TERMS}
    assert last[("l2_sp", "{}")]["train/l2_sp/sp"] > 0
    assert last[("delta", '{"attention": "uniform"}')]["train/delta/feature_maps"] > 0
    assert last[("lwf", "{}")]["train/lwf/kl"] > 0
    assert last[("co_tuning", "{}")]["train/co_tuning/soft_ce"] > 0
    # StochNorm adds no loss; it reports the converted BatchNorms and p.
    stochnorm = last[("stochnorm", "{}")]
    model = timm.create_model(TINY_BACKBONE, pretrained=False)
    batchnorms = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert stochnorm["train/stochnorm"] == 0.0
    assert stochnorm["train/stochnorm/layers"] == batchnorms > 0
    assert stochnorm["train/stochnorm/p"] == 0.5


def test_co_tuning_writes_a_reusable_relationship(run: Callable[..., FitResult], images: Path, weights: Path,
                                                  tmp_path: Path) -> None:
    first = run("co_tuning", {})
    artifact = first.run_dir / "setup" / "co_tuning.pt"
    relationship = torch.load(artifact, weights_only=True)["relationship"]
    assert relationship.shape == (TARGET_CLASSES, SOURCE_CLASSES)
    assert (relationship >= 0).all()
    torch.testing.assert_close(relationship.sum(1), torch.ones(TARGET_CLASSES, dtype=relationship.dtype),
                               atol=1e-5, rtol=0)
    assert not torch.equal(relationship[0], relationship[1])  # one row per target class, from its own images
    torch.testing.assert_close(_checkpoint_state(first)["regularizers.co_tuning.relationship"], relationship,
                               atol=0, rtol=0)

    second = fit(term_config(images, weights, "co_tuning", {"relationship_file": str(artifact)}),
                 run_dir=tmp_path / "reuse")
    torch.testing.assert_close(_checkpoint_state(second)["regularizers.co_tuning.relationship"], relationship,
                               atol=0, rtol=0)
    reused = torch.load(second.run_dir / "setup" / "co_tuning.pt", weights_only=True)["relationship"]
    torch.testing.assert_close(reused, relationship, atol=0, rtol=0)


def test_co_tuning_relationship_file_is_what_is_used(weights: Path, tmp_path: Path) -> None:
    # Data and weights of a re-use give the same relationship when recomputed, so the run above cannot tell a loaded
    # file from a recomputation; a file with other rows can. A plain (C_t, C_s) tensor is accepted too.
    rows = torch.softmax(torch.randn(TARGET_CLASSES, SOURCE_CLASSES), dim=1)
    path = tmp_path / "relationship.pt"
    torch.save(rows, path)
    backbone = create_backbone(TINY_BACKBONE, TARGET_CLASSES, pretrained=str(weights))
    term = CoTuning(relationship_file=str(path))
    term.attach_source_head(backbone.source_head)
    term.adapt_model(backbone.model)
    term.setup(backbone.model, None)
    torch.testing.assert_close(term.relationship, rows, atol=0, rtol=0)
    torch.save(rows[:, :10], path)
    with pytest.raises(ValueError, match=r"expected \(target classes, source classes\) = \(3, 1000\)"):
        term.setup(backbone.model, None)


def test_delta_ablation_writes_normalised_attention(run: Callable[..., FitResult]) -> None:
    result = run("delta", {"attention_samples": 2})
    artifact = torch.load(result.run_dir / "setup" / "delta.pt", weights_only=True)
    weights, sizes = artifact["attention_weights"], artifact["attention_sizes"]
    model = timm.create_model(TINY_BACKBONE, pretrained=False)
    expected_sizes = [entry["num_chs"] for entry in model.feature_info][-4:]
    assert sizes.tolist() == expected_sizes
    assert weights.shape == (sum(expected_sizes),) and (weights > 0).all()
    for layer in torch.split(weights, sizes.tolist()):
        torch.testing.assert_close(layer.sum(), torch.ones((), dtype=layer.dtype), atol=1e-5, rtol=0)
    state = _checkpoint_state(result)
    torch.testing.assert_close(state["regularizers.delta.attention_weights"], weights, atol=0, rtol=0)


@pytest.mark.parametrize("name, args, prefix", [
    ("delta", {"attention_samples": 2}, "regularizers.delta.source."),
    ("lwf", {"teacher": "online"}, "regularizers.lwf.frozen.model."),
    ("l2_sp", {}, None),
], ids=["delta-source", "lwf-frozen", "l2_sp-anchors"])
def test_frozen_references_stay_at_the_pretrained_weights(run: Callable[..., FitResult], weights: Path, name: str,
                                                          args: dict[str, Any], prefix: str | None) -> None:
    pretrained = torch.load(weights, weights_only=True)
    state = _checkpoint_state(run(name, args))
    if prefix is None:  # L2-SP's anchors are buffers named after the parameters
        reference = {key.removeprefix("regularizers.l2_sp.anchor__").replace("__", "."): value
                     for key, value in state.items() if key.startswith("regularizers.l2_sp.anchor__")}
    else:  # the frozen copies' heads were replaced by the 3-class head before copying; the rest must be untouched
        reference = {key.removeprefix(prefix): value for key, value in state.items()
                     if key.startswith(prefix) and not key.startswith(prefix + "classifier.")}
    assert len(reference) > 10
    moved = [key for key, value in reference.items() if not torch.equal(value, pretrained[key])]
    assert not moved, f"{name}'s pretrained reference changed during training: {moved[:5]}"
    trained = state["model.conv_stem.weight"]
    assert not torch.equal(trained, pretrained["conv_stem.weight"])  # the model itself did train


def test_source_term_without_source_head_fails_before_the_run_directory(images: Path, tmp_path: Path) -> None:
    config = term_config(images, "none", "co_tuning", {})
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="source classifier"):
        fit(config, run_dir=run_dir)
    assert not run_dir.exists()


def test_lwf_cached_teacher_resume_equals_uninterrupted(images: Path, weights: Path, tmp_path: Path) -> None:
    config = term_config(images, weights, "lwf", {}, epochs=4)
    whole = fit(config, run_dir=tmp_path / "whole")
    stopped = fit(config, run_dir=tmp_path / "cut", callbacks=[_StopAt(2)])
    assert stopped.interrupted and not (stopped.run_dir / "metrics.json").exists()
    resumed = fit(run_dir=tmp_path / "cut", resume=True)
    assert resumed.metrics["resumed"] is True
    assert {k: whole.metrics[k] for k in COMPARED} == {k: resumed.metrics[k] for k in COMPARED}
    rows_whole = read_epoch_log(whole.run_dir / "epochs.csv")
    rows_resumed = read_epoch_log(resumed.run_dir / "epochs.csv")
    assert [r["epoch"] for r in rows_resumed] == [1, 2, 3, 4]
    assert [r["train/loss"] for r in rows_resumed] == [r["train/loss"] for r in rows_whole]
    assert [r["train/lwf/kl"] for r in rows_resumed] == [r["train/lwf/kl"] for r in rows_whole]
    # the cached teacher outputs (one row of source logits per training image) came back from the checkpoint
    teacher_whole = _checkpoint_state(whole)["regularizers.lwf.teacher_logits"]
    assert teacher_whole.shape == (whole.metrics["num_train"], SOURCE_CLASSES)
    torch.testing.assert_close(_checkpoint_state(resumed)["regularizers.lwf.teacher_logits"], teacher_whole,
                               atol=0, rtol=0)


def test_delta_source_copy_is_frozen_and_not_optimised() -> None:
    model = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=TARGET_CLASSES)
    term = DELTA(layers=None, attention="uniform")
    module = FineTuner(model, CrossEntropy(), [term], OptimConfig(), TARGET_CLASSES)
    assert term.source is not None and term.source is not model
    source_ids = {id(p) for p in term.source.parameters()}
    grouped = [p for group in module.param_groups() for p in group["params"]]
    grouped_ids = {id(p) for p in grouped}
    assert not source_ids & grouped_ids
    assert {id(p) for p in model.parameters()} <= grouped_ids  # the model being trained is all there
    assert not any(p.requires_grad for p in term.source.parameters())
    module.train()
    assert module.model.training and term.training
    assert not term.source.training
    assert not any(m.training for m in term.source.modules())
