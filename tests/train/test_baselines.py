"""The strong baselines inside ``fit``: linear probe, LP-FT, WiSE-FT, EMA, mixup / cutmix, layer-wise lr decay,
class-weighted CE, and the recipes that name them; each end to end on the tiny ImageFolder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from regtune.train.callbacks import read_epoch_log
from regtune.train.config import ConfigError, FitConfig, TermSpec, apply_overrides, check_names
from regtune.train.fit import fit
from regtune.train.recipes import RECIPES, UnknownRecipeError, recipe_label, recipe_overrides
from regtune.train.rundir import RunDir
from tests.train.test_fit import COMPARED, _StopAt, tiny_config


def _config(root: Path, epochs: int = 2, **overrides: object) -> FitConfig:
    return apply_overrides(tiny_config(root, epochs=epochs), overrides)


def _model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_linear_probe_alone_is_a_run(imagefolder: Path, tmp_path: Path) -> None:
    result = fit(_config(imagefolder, **{"model.head_init": "lp", "trainer.epochs": 0}), run_dir=tmp_path / "lp")
    m = result.metrics
    assert m["selected_epoch"] is None and m["selected_checkpoint"] is None and m["model_file"] == "model.safetensors"
    probe = json.loads((result.run_dir / "probe.json").read_text())
    assert m["probe"] == probe and probe["C"] in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    assert m["best_val"] == probe["val_acc"][str(probe["C"])]
    # the tested model is the pretrained backbone with the probe's head, and RunDir loads exactly it
    run = RunDir(result.run_dir)
    model, _, path = run.load_model(3)
    assert path == run.model_path
    assert _same({k: v for k, v in model.state_dict().items()}, load_file(run.model_path))
    assert (result.run_dir / "probe_features.npz").is_file()  # the features, computed once for the run
    assert not (result.run_dir / "epochs.csv").exists()


def test_lp_ft_starts_from_the_probe_head_and_resumes_bit_identical(imagefolder: Path, tmp_path: Path) -> None:
    config = _config(imagefolder, epochs=3, **{"model.head_init": "lp"})
    whole = fit(config, run_dir=tmp_path / "whole")
    probe_only = fit(apply_overrides(config, {"trainer.epochs": 0}), run_dir=tmp_path / "lp")
    assert whole.metrics["probe"]["C"] == probe_only.metrics["probe"]["C"]
    stopped = fit(config, run_dir=tmp_path / "cut", callbacks=[_StopAt(2)])
    assert stopped.interrupted
    resumed = fit(run_dir=tmp_path / "cut", resume=True)
    assert {k: whole.metrics[k] for k in COMPARED} == {k: resumed.metrics[k] for k in COMPARED}
    assert _same(_model_weights(whole.run_dir / "checkpoints/last.ckpt"),
                 _model_weights(resumed.run_dir / "checkpoints/last.ckpt"))


def test_wise_ft_endpoints_are_exact(imagefolder: Path, tmp_path: Path) -> None:
    config = _config(imagefolder, **{"model.head_init": "lp"})
    at0 = fit(apply_overrides(config, {"trainer.wise_alphas": [0.0]}), run_dir=tmp_path / "a0")
    start = load_file(at0.run_dir / "checkpoints/start.safetensors")
    assert _same(load_file(at0.run_dir / "model.safetensors"), start)  # alpha 0: the starting weights
    lp = fit(apply_overrides(config, {"trainer.epochs": 0}), run_dir=tmp_path / "lp")
    assert _same(load_file(lp.run_dir / "model.safetensors"), start)  # which are the probe's model
    assert at0.metrics["test_acc"] == lp.metrics["test_acc"]
    at1 = fit(apply_overrides(config, {"trainer.wise_alphas": [1.0]}), run_dir=tmp_path / "a1")
    selected = _model_weights(at1.run_dir / at1.metrics["selected_checkpoint"])
    assert _same(load_file(at1.run_dir / "model.safetensors"), selected)  # alpha 1: the fine-tuned weights
    # the same validation measured twice: by the checkpoint selection and by WiSE-FT's evaluation at alpha 1
    assert at1.metrics["wise"]["val_acc"] == [pytest.approx(at1.metrics["best_val"])]


def test_wise_ft_picks_the_best_alpha_on_validation(imagefolder: Path, tmp_path: Path) -> None:
    alphas = [0.0, 0.5, 1.0]
    m = fit(_config(imagefolder, **{"model.head_init": "lp", "trainer.wise_alphas": alphas}),
            run_dir=tmp_path / "run").metrics
    wise = m["wise"]
    best = max(range(3), key=lambda i: (wise["val_acc"][i], -wise["val_loss"][i], -i))
    assert wise["alphas"] == alphas and wise["alpha"] == alphas[best]


def test_ema_with_decay_zero_is_the_raw_weights(imagefolder: Path, tmp_path: Path) -> None:
    result = fit(_config(imagefolder, **{"trainer.ema_decay": 0.0}), run_dir=tmp_path / "run")
    state = torch.load(result.run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    model = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    ema = {k[len("ema.module."):]: v for k, v in state.items() if k.startswith("ema.module.")}
    assert _same(model, ema)  # buffers (BatchNorm statistics) included
    rows = read_epoch_log(result.run_dir / "epochs.csv")
    assert all(r["val_ema/acc"] == r["val/acc"] and r["select/ema"] == 0.0 for r in rows)  # ties: the raw ones
    assert result.metrics["ema"] == {"decay": 0.0, "selected": False} and result.metrics["model_file"] is None


def test_ema_is_selected_when_better_and_tested(imagefolder: Path, tmp_path: Path) -> None:
    result = fit(_config(imagefolder, epochs=3, **{"trainer.ema_decay": 0.7}), run_dir=tmp_path / "run")
    rows = read_epoch_log(result.run_dir / "epochs.csv")
    for r in rows:
        assert r["select/acc"] == max(r["val/acc"], r["val_ema/acc"])
        assert r["select/ema"] == float(r["val_ema/acc"] > r["val/acc"])
    chosen = rows[result.metrics["selected_epoch"] - 1]
    # the epoch whose preferred weights (EMA or raw) score best, not the raw weights' best epoch
    assert chosen["select/acc"] == max(r["select/acc"] for r in rows)
    assert result.metrics["best_val"] == pytest.approx(chosen["select/acc"])
    assert result.metrics["ema"]["selected"] == bool(chosen["select/ema"])
    run = RunDir(result.run_dir)
    if result.metrics["ema"]["selected"]:  # the EMA weights were tested, and are what the run's model is
        state = torch.load(run.path / result.metrics["selected_checkpoint"], weights_only=True)["state_dict"]
        ema = {k[len("ema.module."):]: v for k, v in state.items() if k.startswith("ema.module.")}
        assert _same(load_file(run.model_path), ema)


def test_ema_mixup_randaugment_layer_decay_resume_bit_identical(imagefolder: Path, tmp_path: Path) -> None:
    config = _config(imagefolder, epochs=3, **{"trainer.ema_decay": 0.6, "data.mixup": 0.8, "data.cutmix": 1.0,
                                               "data.auto_augment": "rand-m9-mstd0.5-inc1", "data.re_prob": 0.5,
                                               "optim.layer_decay": 0.7})
    whole = fit(config, run_dir=tmp_path / "whole")
    assert fit(config, run_dir=tmp_path / "cut", callbacks=[_StopAt(2)]).interrupted
    resumed = fit(run_dir=tmp_path / "cut", resume=True)
    assert {k: whole.metrics[k] for k in (*COMPARED, "ema")} == {k: resumed.metrics[k] for k in (*COMPARED, "ema")}
    a, b = (torch.load(r.run_dir / "checkpoints/last.ckpt", weights_only=True)["state_dict"] for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the EMA's state too
    rows_a, rows_b = (read_epoch_log(r.run_dir / "epochs.csv") for r in (whole, resumed))
    assert [r["train/loss"] for r in rows_a] == [r["train/loss"] for r in rows_b]


def test_mixup_gives_the_terms_soft_targets(imagefolder: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from regtune.train.module import FineTuner

    seen: list[torch.Tensor] = []
    original = FineTuner.loss_terms

    def recording(self: FineTuner, record: object) -> dict[str, torch.Tensor]:
        seen.append(record.targets)
        return original(self, record)

    monkeypatch.setattr(FineTuner, "loss_terms", recording)
    fit(_config(imagefolder, epochs=1, **{"data.mixup": 1.0}), run_dir=tmp_path / "run")
    assert len(seen) == 3 and all(t is not None and t.shape == (8, 3) for t in seen)
    assert all(torch.allclose(t.sum(1), torch.ones(8)) for t in seen)
    assert any(((t > 0) & (t < 1)).any() for t in seen)  # mixed, not one-hot


@pytest.mark.parametrize(("overrides", "message"), [
    ({"data.mixup": 0.8, "regularizers": [{"name": "adarand"}]}, "adarand does not accept mixed"),
    ({"data.cutmix": 1.0, "criterion": {"name": "lm_softmax"}}, "lm_softmax does not accept mixed"),
    ({"trainer.wise_alphas": [0.5]}, "set model.head_init: lp"),
    ({"model.head_init": "lp", "trainer.epochs": 0, "regularizers": [{"name": "fmr"}]}, "linear probe alone"),
    ({"trainer.epochs": 0}, "trainer.epochs must be >= 1"),
    ({"data.mixup": 0.8, "data.batch_size": 7}, "must be even"),
    ({"model.freeze_bn_stats": True, "regularizers": [{"name": "stochnorm"}]}, "StochNorm's layers are plain"),
    ({"data.auto_augment": "rand-x9"}, "not a timm policy"),
    ({"optim.layer_decay": 0.0}, "layer_decay"),
    ({"trainer.ema_decay": 1.0}, "ema_decay"),
])
def test_combinations_that_make_no_sense_are_refused(imagefolder: Path, tmp_path: Path, overrides: dict,
                                                     message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_names(apply_overrides(tiny_config(imagefolder), overrides))
    with pytest.raises(ConfigError, match=message):  # and fit refuses it before writing anything
        fit(apply_overrides(tiny_config(imagefolder), overrides), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_layer_decay_groups(imagefolder: Path, tmp_path: Path) -> None:
    from timm.models import group_parameters

    from regtune.models import create_backbone
    from regtune.regularizers import create_criterion
    from regtune.train.module import FineTuner
    from tests.conftest import TINY_BACKBONE

    config = apply_overrides(tiny_config(imagefolder), {"optim.layer_decay": 0.5})
    model = create_backbone(TINY_BACKBONE, 3, pretrained="none").model
    module = FineTuner(model, create_criterion("ce"), [], config.optim, 3)
    groups = {g["name"]: g for g in module.param_groups()}
    layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    top = max(layer_of.values())
    names = {id(p): n for n, p in model.named_parameters()}
    backbone = [g for name, g in groups.items() if name.startswith("backbone/")]
    assert len(backbone) >= 3
    for group in backbone:
        for param in group["params"]:
            assert group["lr"] == pytest.approx(0.05 * 0.5 ** (top - layer_of[names[id(param)]]))
    assert groups["head"]["lr"] == pytest.approx(0.05 * 10)
    covered = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())  # every parameter once
    stem = next(g for g in backbone if any(names[id(p)] == "conv_stem.weight" for p in g["params"]))
    assert stem["lr"] == pytest.approx(0.05 * 0.5 ** top)
    # and a run logs each group's learning rate
    result = fit(config, run_dir=tmp_path / "run")
    row = read_epoch_log(result.run_dir / "epochs.csv")[0]
    assert {f"lr/{name}" for name in groups} <= set(row)


def test_balanced_cross_entropy_weights_come_from_the_training_subset(tmp_path: Path) -> None:
    from tests.conftest import write_imagefolder

    root = write_imagefolder(tmp_path / "data", classes=3, train_per_class=10)
    for i in range(6):  # class 0 keeps 4 of its 10 training images
        (root / "train" / "class_0" / f"{i}.png").unlink()
    config = apply_overrides(tiny_config(root, epochs=1), {"criterion": {"name": "ce",
                                                                         "args": {"class_weights": "balanced"}}})
    result = fit(config, run_dir=tmp_path / "run")
    split = json.loads((result.run_dir / "split.json").read_text())
    counts = [sum(item.startswith(f"train/class_{c}/") for item in split["train"]) for c in range(3)]
    state = torch.load(result.run_dir / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    weights = next(v for k, v in state.items() if k.startswith("criterion."))
    n = sum(counts)
    assert weights.tolist() == pytest.approx([n / (3 * c) for c in counts])


def test_recipes_compose_and_are_recorded_as_values(tmp_path: Path) -> None:
    values = recipe_overrides(["lp_ft", "ema", "mix"])
    assert values == {"model.head_init": "lp", "model.lp_select": "one_se", "model.freeze_bn_stats": True,
                      "optim.lr": 0.002,
                      "optim.head_lr_mult": 1.0, "trainer.wise_alphas": [], "trainer.ema_decay": 0.99,
                      "data.mixup": 0.8, "data.cutmix": 1.0}
    assert apply_overrides(FitConfig(), recipe_overrides(["wise_ft"])) == FitConfig()  # the defaults are WiSE-FT's
    ft = apply_overrides(FitConfig(), recipe_overrides(["ft"]))  # every value the defaults had before
    assert (ft.model.head_init, ft.model.lp_select, ft.model.freeze_bn_stats, ft.optim.lr, ft.optim.head_lr_mult,
            ft.trainer.wise_alphas) == ("normal", "best", False, 0.02, 10.0, ())
    assert recipe_overrides(["lp"])["model.lp_select"] == "best"  # the probe alone keeps its best C
    lp_ft = apply_overrides(FitConfig(), recipe_overrides(["lp_ft"]))
    assert (lp_ft.model.head_init, lp_ft.model.freeze_bn_stats, lp_ft.optim.lr, lp_ft.optim.head_lr_mult) == \
        ("lp", True, 0.002, 1.0)
    config = apply_overrides(FitConfig(), recipe_overrides(["wise_ft"]))
    assert config.trainer.wise_alphas == tuple(round(0.1 * k, 1) for k in range(11))
    for name, recipe in RECIPES.items():  # every recipe gives a valid config
        check_names(apply_overrides(FitConfig(), recipe.values)), name
    with pytest.raises(UnknownRecipeError, match="unknown recipe 'lpft'; known: ft, lp, lp_ft"):
        recipe_overrides(["lpft"])


def test_cli_recipe_reaches_the_config(imagefolder: Path, tmp_path: Path) -> None:
    from regtune.cli import main
    from regtune.train.config import load_config

    code = main(["fit", "--dataset", "imagefolder", "--data-root", str(imagefolder), "--fraction", "1",
                 "--val-fraction", "0.2", "--img-size", "32", "--batch-size", "8", "--backbone", "tiny_placeholder",
                 "--pretrained", "none", "--recipe", "lp_ft", "--recipe", "ema", "--wise-alphas", "0,0.5,1",
                 "--epochs", "1", "--run-dir", str(tmp_path / "run")])
    assert code == 2  # the backbone name is refused before anything runs: the recipe parsing is what is checked here
    from tests.conftest import TINY_BACKBONE

    assert main(["fit", "--dataset", "imagefolder", "--data-root", str(imagefolder), "--fraction", "1",
                 "--val-fraction", "0.2", "--img-size", "32", "--batch-size", "8", "--backbone", TINY_BACKBONE,
                 "--pretrained", "none", "--recipe", "lp_ft", "--recipe", "ema", "--wise-alphas", "0,0.5,1",
                 "--epochs", "1", "--accelerator", "cpu", "--run-dir", str(tmp_path / "run")]) == 0
    config = load_config(tmp_path / "run/config.yaml")
    assert config.model.head_init == "lp" and config.trainer.ema_decay == 0.99
    assert config.trainer.wise_alphas == (0.0, 0.5, 1.0)
    assert config.regularizers == () and config.criterion == TermSpec("ce")


def test_frozen_batchnorm_statistics_stay_pretrained_while_the_rest_trains(imagefolder: Path, tmp_path: Path) -> None:
    config = _config(imagefolder, **{"model.freeze_bn_stats": True})
    result = fit(config, run_dir=tmp_path / "run")
    trained = _model_weights(result.run_dir / "checkpoints/last.ckpt")
    from regtune.models import create_backbone
    from tests.conftest import TINY_BACKBONE

    torch.manual_seed(0)
    initial = create_backbone(TINY_BACKBONE, 3, pretrained="none").model.state_dict()
    stats = [k for k in trained if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and all(torch.equal(trained[k], initial[k]) for k in stats)  # never updated
    affine = [k for k in trained if k.endswith("bn1.weight")]
    assert affine and not all(torch.equal(trained[k], initial[k]) for k in affine)  # scale and shift trained
    unfrozen = fit(_config(imagefolder), run_dir=tmp_path / "free")
    moved = _model_weights(unfrozen.run_dir / "checkpoints/last.ckpt")
    assert not all(torch.equal(moved[k], initial[k]) for k in stats)  # the comparison can fail


def test_adapt_batchnorm_re_estimates_the_running_statistics() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from regtune.train.probe import adapt_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, bias=False), torch.nn.BatchNorm2d(4)).eval()
    images = 3.0 + 2.0 * torch.randn(12, 3, 5, 5)
    assert adapt_batchnorm(model, DataLoader(TensorDataset(images, torch.zeros(12)), batch_size=4))
    assert not model.training  # mode restored
    with torch.no_grad():
        out = model[0](images)  # the batches' means and (unbiased) variances, averaged over the 3 equal batches
    batches = out.split(4)
    mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert not adapt_batchnorm(torch.nn.Linear(2, 2), [])  # nothing to adapt


def test_runs_are_named_by_their_recipe_and_older_runs_keep_their_names() -> None:
    from regtune.bench.aggregate import method_label
    from regtune.train.rundir import default_run_dir

    def label(*names: str, regularizers: tuple[TermSpec, ...] = ()) -> str:
        config = apply_overrides(FitConfig(), recipe_overrides(list(names)))
        return method_label({**config.to_dict(), "regularizers": [
            {"name": r.name, "args": r.args} for r in regularizers]})

    assert recipe_label(FitConfig().to_dict()) == "wise_ft"  # the defaults
    assert [label(n) for n in ("ft", "lp", "lp_ft", "wise_ft")] == ["ft", "lp", "lp_ft", "wise_ft"]
    assert label("ft", "ema") == "ema" and label("wise_ft", "mix", "layer_decay") == "wise_ft+mix+layer_decay"
    assert label("randaug") == "wise_ft+randaug" and label("ft", "randaug", "ema") == "ema+randaug"
    assert label("wise_ft", regularizers=(TermSpec("fmr", {"beta": 5}),)) == "wise_ft+fmr(beta=5)"
    assert label("ft", regularizers=(TermSpec("fmr"),)) == "fmr"
    # a config.yaml written before the recipes existed has no head_init: plain fine-tuning, named as it was
    old = {"data": {"dataset": "fashion_mnist", "fraction": 0.01}, "trainer": {"seed": 0}, "optim": {"lr": 0.02},
           "criterion": {"name": "ce"}, "regularizers": [{"name": "lwf"}]}
    assert recipe_label(old) == "ft" and method_label(old) == "lwf"
    assert default_run_dir(FitConfig(regularizers=(TermSpec("fmr"),))).name.startswith(
        "fashion_mnist-tf_efficientnet_lite0-wise_ft+fmr-s0-")
