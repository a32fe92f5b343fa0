"""Mixed precision: every regularizer and criterion on a bf16 autocast step gives the float32 value of the same
inputs within a stated tolerance, because entropies, SVDs, distances and softmaxes run in float32 inside.

Stated tolerance: relative 1e-2 (atol 1e-3) between the term on a step whose features, logits and maps are bfloat16
(as ``precision="bf16-mixed"`` produces them) under CPU autocast, and the term on the very same values upcast to
float32 without autocast. A term that computed in bfloat16 inside (8 bits of mantissa) would miss it by more on the
entropies and spectra; the term's own inputs, not its arithmetic, set the remaining gap.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from regtune.regularizers import TrainStep, list_criteria
from tests.regularizers.test_contract import build, build_criterion, cases, make_model, make_step, step_for
from tests.regularizers.tolerance import TOL


def _as(step: TrainStep, dtype: torch.dtype) -> TrainStep:
    features = step.features.detach().to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = step.model.get_classifier()(features)
    maps = {k: v.detach().to(dtype) for k, v in step.feature_maps.items()}
    return TrainStep(features=features, logits=logits, labels=step.labels, model=step.model,
                     global_step=step.global_step, epoch=step.epoch, total_steps=step.total_steps, feature_maps=maps,
                     images=step.images.to(dtype), indices=step.indices)


def _quantised(step: TrainStep) -> TrainStep:
    """The bf16 step's values in float32 (the reference sees exactly the mixed-precision inputs)."""
    low = _as(step, torch.bfloat16)
    return TrainStep(features=low.features.detach().float().requires_grad_(True), logits=low.logits.detach().float(),
                     labels=step.labels, model=step.model, global_step=step.global_step, epoch=step.epoch,
                     total_steps=step.total_steps, feature_maps={k: v.float() for k, v in low.feature_maps.items()},
                     images=low.images.float(), indices=step.indices)


@cases("test_regularizer_under_bf16_autocast_matches_float32")
def test_regularizer_under_bf16_autocast_matches_float32(name: str, kwargs: dict[str, Any]) -> None:
    model = make_model()
    term = build(name, kwargs, model, torch.float32)
    step = step_for(term, model, torch.float32, step=3, seed=11)
    torch.manual_seed(5)  # the random-feature terms draw their references: the same draws for both
    reference = copy.deepcopy(term)(_quantised(step))
    low = _as(step, torch.bfloat16)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = copy.deepcopy(term)(low)
    assert torch.isfinite(mixed)
    torch.testing.assert_close(mixed.float(), reference.float(), **TOL[torch.bfloat16])


@pytest.mark.parametrize("name", list_criteria())
def test_criterion_under_bf16_autocast_matches_float32(name: str) -> None:
    model = make_model()
    criterion = build_criterion(name, model)
    step = make_step(model, torch.float32, step=3, seed=11)
    reference = criterion(_quantised(step))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = criterion(_as(step, torch.bfloat16))
    torch.testing.assert_close(mixed.float(), reference.float(), **TOL[torch.bfloat16])


def test_a_bf16_mixed_run_trains_with_every_kind_of_term(imagefolder, tmp_path) -> None:
    from regtune.train.config import TermSpec, apply_overrides
    from regtune.train.fit import fit
    from tests.train.test_fit import tiny_config

    config = apply_overrides(tiny_config(imagefolder, epochs=2, precision="bf16-mixed"), {"regularizers": [
        {"name": "fmr", "args": {"window": 2}}, {"name": "adarand"}, {"name": "bss"}, {"name": "l2_sp"},
        {"name": "delta", "args": {"attention": "uniform"}}, {"name": "maxent"}]})
    assert [t.name for t in config.regularizers] == ["fmr", "adarand", "bss", "l2_sp", "delta", "maxent"]
    assert isinstance(config.regularizers[0], TermSpec)
    result = fit(config, run_dir=tmp_path / "run")
    assert 0.0 <= result.metrics["test_acc"] <= 1.0 and torch.isfinite(torch.tensor(result.metrics["test_loss"]))
