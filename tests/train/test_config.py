"""Run configs: YAML round trip, overrides, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from regtune.train.config import (
    ConfigError,
    DataConfig,
    FitConfig,
    TermSpec,
    apply_overrides,
    config_from_dict,
    load_config,
    save_config,
)


def test_yaml_round_trip(tmp_path: Path) -> None:
    config = FitConfig(data=DataConfig(fraction=None, per_class=5, scale=(0.5, 1.0)),
                       regularizers=(TermSpec("fmr", {"beta": 50.0}),))
    save_config(config, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == config
    assert again.data.scale == (0.5, 1.0) and again.regularizers[0].args == {"beta": 50.0}


def test_partial_yaml_fills_defaults(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("trainer:\n  epochs: 3\nregularizers: [fnp]\ncriterion: ce\n")
    config = load_config(tmp_path / "c.yaml")
    assert config.trainer.epochs == 3 and config.data == DataConfig()
    assert config.regularizers == (TermSpec("fnp"),) and config.criterion == TermSpec("ce")


def test_exponent_numbers_are_numbers(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1e-3\nregularizers:\n  - {name: fnp, args: {weight: 5e-4}}\n")
    config = load_config(tmp_path / "c.yaml")  # PyYAML alone: "expected float, got '1e-3'"
    assert config.optim.lr == 0.001 and config.regularizers[0].args == {"weight": 0.0005}


def test_unknown_key_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="data: unknown key.*fractoin.*valid: dataset, root"):
        config_from_dict({"data": {"fractoin": 0.1}})


def test_wrong_type() -> None:
    with pytest.raises(ConfigError, match="trainer.epochs: expected int"):
        config_from_dict({"trainer": {"epochs": "many"}})


def test_overrides_by_dotted_key() -> None:
    config = apply_overrides(FitConfig(), {"optim.lr": 0.05, "data.img_size": 64})
    assert config.optim.lr == 0.05 and config.data.img_size == 64
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        apply_overrides(FitConfig(), {"optim.lrr": 1})


@pytest.mark.parametrize("data, message", [
    ({"data": {"fraction": 0.0}}, "fraction must be in"),
    ({"data": {"per_class": 3}}, "not both"),
    ({"trainer": {"select": "best"}}, "select must be one of"),
    ({"data": {"val_fraction": 0.0}}, "needs a validation split"),
    ({"optim": {"optimizer": "lion"}}, "optimizer must be"),
])
def test_validation_errors(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_paper_selection_without_validation_split_is_allowed() -> None:
    config = config_from_dict({"data": {"val_fraction": 0.0}, "trainer": {"select": "test_acc"}})
    assert config.trainer.select == "test_acc"
