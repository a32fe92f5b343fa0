"""Class-imbalance corrections of a trained model: classifier re-training (cRT) and post-hoc logit adjustment."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from regtune.train.config import ConfigError, TermSpec, apply_overrides, validate
from regtune.train.fit import fit, imbalance_advice
from regtune.train.probe import fit_linear_probe
from tests.conftest import write_imagefolder
from tests.train.test_fit import tiny_config


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training images 20, 8 and 3 per class; with val_fraction 0.2 the training split keeps 16, 7 and 3."""
    root = write_imagefolder(tmp_path_factory.mktemp("imbalanced"), classes=3, train_per_class=20, test_per_class=4)
    for c, keep in enumerate((20, 8, 3)):
        for path in sorted((root / "train" / f"class_{c}").glob("*.png"), key=lambda p: int(p.stem))[keep:]:
            path.unlink()
    return root


def _head(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    weight = next(k for k in state if k.endswith("classifier.weight"))
    return state[weight], state[weight.replace("weight", "bias")]


def _checkpoint_model(run_dir: Path, metrics: dict) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / metrics["selected_checkpoint"], weights_only=True)["state_dict"]
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def test_posthoc_logit_adjustment_moves_the_bias_by_tau_log_prior(imbalanced: Path, tmp_path: Path) -> None:
    result = fit(tiny_config(imbalanced, epochs=2, posthoc_tau=0.5), run_dir=tmp_path / "run")
    m = result.metrics
    assert m["posthoc_logit_adjustment"] == {"tau": 0.5, "train_class_counts": [16, 7, 3]}
    tested = load_file(result.run_dir / m["model_file"])  # the adjusted model is the run's model
    trained = _checkpoint_model(result.run_dir, m)
    (w_tested, b_tested), (w_trained, b_trained) = _head(tested), _head(trained)
    torch.testing.assert_close(w_tested, w_trained)  # only the bias moves
    prior = np.array([16, 7, 3]) / 26
    expected = b_trained.double().numpy() - 0.5 * np.log(prior)
    np.testing.assert_allclose(b_tested.double().numpy(), expected, rtol=0, atol=1e-6)
    backbone = [k for k in tested if "classifier" not in k]
    assert all(torch.equal(tested[k], trained[k]) for k in backbone)


def test_crt_refits_the_head_class_balanced_on_the_frozen_backbone(imbalanced: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="regtune.train.fit"):
        result = fit(tiny_config(imbalanced, epochs=2, crt=True), run_dir=tmp_path / "run")
    advice = [r.message for r in caplog.records if "imbalanced" in r.message]  # the split's 16 / 7 / 3 images
    assert advice == [("the training classes are imbalanced: 16 to 3 images per class (ratio 5.33); --select "
                       "val_bal_acc chooses the checkpoint by balanced accuracy (every class counts the same) "
                       "(docs/imbalance.md)")]  # it selects by accuracy, but already rebalances (cRT)
    m = result.metrics
    crt = m["crt"]
    assert crt["C"] in tiny_config(imbalanced).model.lp_cs
    assert len(crt["val_bal_acc"]) == len(tiny_config(imbalanced).model.lp_cs)
    assert crt["val_bal_acc"][str(crt["C"])] == max(crt["val_bal_acc"].values())  # chosen by balanced accuracy
    tested = load_file(result.run_dir / m["model_file"])
    trained = _checkpoint_model(result.run_dir, m)
    assert not torch.equal(_head(tested)[0], _head(trained)[0])  # a new head
    assert all(torch.equal(tested[k], trained[k]) for k in tested if "classifier" not in k)  # the same backbone
    assert json.loads((result.run_dir / "metrics.json").read_text())["crt"] == crt


def test_the_balanced_probe_is_scikit_learns_balanced_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    counts = (40, 12, 4)
    x = np.concatenate([rng.normal(c, 1.0, (n, 5)) for c, n in enumerate(counts)])
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    result = fit_linear_probe(torch.from_numpy(x).float(), torch.from_numpy(y), torch.from_numpy(x).float(),
                              torch.from_numpy(y), 3, Cs=[0.1], balanced=True)
    reference = LogisticRegression(C=0.1, class_weight="balanced", max_iter=1000, tol=1e-6).fit(x - x.mean(0), y)
    logits = torch.from_numpy(x).float() @ result.weight.T + result.bias
    expected = (x - x.mean(0)) @ reference.coef_.T + reference.intercept_
    np.testing.assert_allclose(torch.softmax(logits.double(), 1).numpy(),
                               torch.softmax(torch.from_numpy(expected), 1).numpy(), atol=2e-4)
    predicted = logits.argmax(1).numpy()
    recall = [float((predicted[y == c] == c).mean()) for c in range(3)]
    assert result.val_acc[0.1] == pytest.approx(sum(recall) / 3)  # balanced accuracy, not accuracy
    assert not math.isclose(result.val_acc[0.1], float((predicted == y).mean()))  # they differ on this data


@pytest.mark.parametrize(("overrides", "message"), [
    ({"trainer.epochs": 0, "trainer.crt": True, "trainer.wise_alphas": [], "model.head_init": "lp"},
     "no fine-tuned backbone"),
    ({"trainer.posthoc_tau": 1.0, "criterion": {"name": "logit_adjusted", "args": {}}}, "already adjusted"),
    ({"trainer.crt": True, "criterion": {"name": "lm_softmax", "args": {}}}, "no bias"),
    ({"trainer.posthoc_tau": -1.0}, "posthoc_tau must be >= 0"),
])
def test_corrections_that_make_no_sense_are_refused(imbalanced: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(apply_overrides(tiny_config(imbalanced), overrides))


def test_the_cli_sets_both() -> None:
    from regtune.cli import _fit_config, build_parser

    config = _fit_config(build_parser().parse_args(["fit", "--crt", "--posthoc-tau", "1"]))
    assert config.trainer.crt and config.trainer.posthoc_tau == 1.0


def _ce(**args: object) -> dict:
    return {"name": "ce", "args": args}


@pytest.mark.parametrize(("counts", "overrides", "tips"), [
    ([16, 7, 3], {}, ["--select val_bal_acc", "--crt"]),
    ([16, 7, 3], {"trainer.select": "val_bal_acc"}, ["--crt"]),
    ([16, 7, 3], {"trainer.select": "val_bal_acc", "trainer.posthoc_tau": 1.0}, []),
    ([16, 7, 3], {"trainer.select": "val_bal_acc", "criterion": {"name": "balanced_softmax", "args": {}}}, []),
    ([16, 7, 3], {"trainer.select": "val_bal_acc", "criterion": _ce(class_weights="balanced")}, []),
    ([16, 7, 3], {"trainer.select": "val_bal_acc", "criterion": {"name": "lm_softmax", "args": {}}}, []),  # no cRT
    ([16, 7, 3], {"trainer.select": "val_loss", "trainer.epochs": 0, "model.head_init": "lp"}, []),  # a probe
    ([9, 7, 3], {}, ["--select val_bal_acc", "--crt"]),  # ratio 3: the threshold itself
    ([8, 7, 3], {}, []),  # ratio 2.67
    ([16, 16, 0], {}, []),  # an empty class is not a ratio
])
def test_fit_advises_on_an_imbalanced_split_only_when_the_run_ignores_it(imbalanced: Path, counts: list[int],
                                                                        overrides: dict, tips: list[str]) -> None:
    config = apply_overrides(tiny_config(imbalanced, epochs=2), overrides)
    assert config.criterion == TermSpec(**overrides.get("criterion", {"name": "ce", "args": {}}))
    advice = imbalance_advice(config, counts)
    if not tips:
        assert advice is None
        return
    assert advice.startswith(f"the training classes are imbalanced: {max(counts)} to {min(counts)} images")
    assert [tip for tip in ("--select val_bal_acc", "--crt") if tip in advice] == tips
