"""Named baselines and recipe knobs: each is a set of config values, so recipes compose with each other and with
every regularizer (``regtune fit --recipe lp_ft --recipe ema --reg fmr``), and a run's ``config.yaml`` records the
values themselves, not the name.

Imports nothing heavy: ``regtune list recipes`` reads this table without loading torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from regtune.train.config import WISE_ALPHAS

__all__ = ["RECIPES", "Recipe", "UnknownRecipeError", "recipe_label", "recipe_overrides"]


@dataclass(frozen=True)
class Recipe:
    """A named set of config values (dotted keys) and what it is."""

    summary: str
    values: dict[str, Any] = field(default_factory=dict)


# LP-FT's fine-tuning: a probe's head is a trained one, so the backbone gets the full gradient from the first step
# (a fresh head's N(0, 0.01) weights pass almost none); at FT's lr 0.02 with the head at x10 that wrecked the
# features in the first epoch (validation loss 13-15 at 64 px). A learning rate ten times smaller for all of it, as
# Kumar et al. tune LP-FT's lower than FT's, and BatchNorm in evaluation mode: the probe's head got 100 % of its
# training images in evaluation mode and 13.7 % in training mode (batch statistics of the new domain). Chosen on
# seed 0's validation split at 64 px (3 epochs: 0.88 against 0.55-0.72 for the other settings tried).
# The probe's C by the one-standard-error rule: on seed 1 a C of 1 won by one validation image of 60, and LP-FT
# from that weakly regularised head diverged in epoch 1 (train loss 3.1, validation accuracy 0.25) where C = 0.01
# trained smoothly.
_LP_FT = {"model.head_init": "lp", "model.lp_select": "one_se", "model.freeze_bn_stats": True, "optim.lr": 0.002,
          "optim.head_lr_mult": 1.0}
# Plain fine-tuning: every value the defaults had before WiSE-FT's recipe replaced them (lp_select only matters with
# --head-init lp on top).
_FT = {"model.head_init": "normal", "model.lp_select": "best", "model.freeze_bn_stats": False, "optim.lr": 0.02,
       "optim.head_lr_mult": 10.0, "trainer.wise_alphas": []}

RECIPES: dict[str, Recipe] = {
    "ft": Recipe("plain fine-tuning from a random head (the papers' recipe; regtune's default before the baselines "
                 "benchmark): N(0, 0.01) head, lr 0.02, head x10, BatchNorm statistics trained", _FT),
    "lp": Recipe("linear probe: logistic regression on the frozen backbone's features, no fine-tuning (seconds); "
                 "C with the best validation accuracy",
                 {"model.head_init": "lp", "model.lp_select": "best", "trainer.epochs": 0, "trainer.wise_alphas": []}),
    "lp_ft": Recipe("LP-FT (Kumar et al., ICLR 2022): fine-tune from the linear probe's head, at "
                    "lr 0.002 for backbone and head, BatchNorm statistics kept as pretrained (the probe's features)",
                    {**_LP_FT, "trainer.wise_alphas": []}),
    "wise_ft": Recipe("WiSE-FT (Wortsman et al., CVPR 2022), regtune's default: LP-FT, then the mix "
                      "(1 - a) * start + a * fine-tuned with a in 0, 0.1, ..., 1 chosen on validation",
                      {**_LP_FT, "trainer.wise_alphas": list(WISE_ALPHAS)}),
    "ema": Recipe("exponential moving average of the weights (decay 0.99: about the last 100 steps), selected "
                  "against the raw weights on validation", {"trainer.ema_decay": 0.99}),
    "mix": Recipe("timm's mixup 0.8 / cutmix 1.0 (one of the two per batch), soft-target cross-entropy",
                  {"data.mixup": 0.8, "data.cutmix": 1.0}),
    "randaug": Recipe("timm's RandAugment (rand-m9-mstd0.5-inc1) with random erasing 0.25",
                      {"data.auto_augment": "rand-m9-mstd0.5-inc1", "data.re_prob": 0.25}),
    "layer_decay": Recipe("layer-wise learning-rate decay 0.85 over timm's layers of the backbone",
                          {"optim.layer_decay": 0.85}),
    "balanced": Recipe("class-weighted cross-entropy, weights n / (C n_c) from the training images per class",
                       {"criterion": {"name": "ce", "args": {"class_weights": "balanced"}}}),
}


class UnknownRecipeError(KeyError):
    """A recipe name that is not in `RECIPES`; the message lists them."""

    def __str__(self) -> str:
        return str(self.args[0])


def recipe_overrides(names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The config values of ``names``, applied in order (a later recipe's value for the same key wins).

    Raises:
        UnknownRecipeError: an unknown name (the message lists the known ones).
    """
    values: dict[str, Any] = {}
    for name in names:
        if name not in RECIPES:
            raise UnknownRecipeError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
        values.update(RECIPES[name].values)
    return values


def recipe_label(config: Mapping[str, Any]) -> str:
    """The baseline a run's config stands for, from its values (the plain dict of ``config.yaml``, older runs too):
    ``ft``, ``lp``, ``lp_ft`` or ``wise_ft``, with the recipe knobs it turns on (``ema``, ``mix``, ``randaug`` /
    ``aug``, ``layer_decay``) after a ``+``; plain fine-tuning's ``ft`` is left out once a knob names the run."""
    model, optim = config.get("model") or {}, config.get("optim") or {}
    data, trainer = config.get("data") or {}, config.get("trainer") or {}
    base = "ft"
    if model.get("head_init", "normal") == "lp":
        base = "lp" if trainer.get("epochs") == 0 else ("wise_ft" if trainer.get("wise_alphas") else "lp_ft")
    knobs = []
    if trainer.get("ema_decay") is not None:
        knobs.append("ema")
    if (data.get("mixup") or 0) > 0 or (data.get("cutmix") or 0) > 0:
        knobs.append("mix")
    if data.get("auto_augment"):
        knobs.append("randaug" if str(data["auto_augment"]).startswith("rand") else "aug")
    if optim.get("layer_decay") is not None:
        knobs.append("layer_decay")
    return "+".join(([base] if base != "ft" or not knobs else []) + knobs)
