"""The configuration of one fine-tuning run: frozen dataclasses, written to and read from YAML.

The resolved config that a run writes (``config.yaml``) is accepted by ``regtune fit --config`` and reproduces it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from regtune._io import atomic_write_text, load_yaml

__all__ = [
    "COSINE_HEAD_CRITERIA",
    "CROP_MODES",
    "HEAD_INITS",
    "PRIOR_ADJUSTED_CRITERIA",
    "SELECT_MODES",
    "WISE_ALPHAS",
    "ConfigError",
    "DataConfig",
    "FitConfig",
    "ModelConfig",
    "OptimConfig",
    "TermSpec",
    "TrainerConfig",
    "apply_overrides",
    "check_names",
    "load_config",
    "save_config",
]

SELECT_MODES = ("val_acc", "val_loss", "val_bal_acc", "test_acc", "last")
PRIOR_ADJUSTED_CRITERIA = ("logit_adjusted", "balanced_softmax")  # criteria that shift the logits by the class prior
COSINE_HEAD_CRITERIA = ("lm_softmax",)  # criteria whose head is cosine, without a bias: no cRT, no post-hoc shift
HEAD_INITS = ("normal", "timm", "lp")
CROP_MODES = ("center", "squash", "border")  # timm's evaluation frames (create_transform's crop_mode)
WISE_ALPHAS = tuple(round(0.1 * k, 1) for k in range(11))  # WiSE-FT's mixing coefficients: 0, 0.1, ..., 1


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and lists the valid ones."""


@dataclass(frozen=True)
class DataConfig:
    """Which images, how many, and how they are transformed.

    The defaults are the embedded default task (Fashion-MNIST, 1 % per class, 128 px). ``crop_pct=1.0`` and crop
    scale 0.5-1 were chosen on that task's validation split: its garments fill the frame, so cutting the border
    (timm's 0.875) or cropping 20 % of the area loses sleeves and hems that tell shirt, coat and pullover apart.
    For natural-image datasets the papers' recipes are ``crop_pct=None`` (the model's) and scale 0.2-1 (TLlib) or
    0.08-1 (AdaRand).

    Attributes:
        dataset: Registry name (``regtune.data.list_datasets()``).
        root: Folder holding the dataset (in its native layout).
        download: Let torchvision download the dataset where it can (needs internet).
        fraction: Share of each class of the training split to use, in (0, 1]; ``None`` with ``per_class`` unset
            uses everything.
        per_class: Images per class instead of a fraction.
        val_fraction: Share of the chosen images held out (per class) for model selection.
        imbalance_ratio: Draw a long-tailed (class-imbalanced) subset with imbalance ratio rho = n_max / n_min >= 1
            (`regtune.data.subset.longtail_split`; docs/imbalance.md): the head class keeps the balanced budget
            n_max (``per_class``, or ``fraction`` of the largest class), the others fewer as ``imbalance_profile``
            says, and at least one validation image each. ``None`` (default): class-balanced. The test split is the
            dataset's own either way.
        imbalance_profile: ``exp``: n_i = floor(n_max * rho^(-i / (C - 1))) for the class at rank i of C (long-tailed
            CIFAR); ``step``: n_max for the head classes, floor(n_max / rho) for the minority classes.
        imbalance_minority: Share of the classes that are minority classes in the step profile, in (0, 1).
        imbalance_order: Which classes are head and tail: ``index`` (class 0 is the head, as long-tailed CIFAR) or
            ``random`` (a permutation seeded by ``trainer.seed``).
        split_manifest: Reuse the exact split of an earlier run (its ``split.json``).
        img_size: Input resolution; ``None`` uses the backbone's pretrained resolution.
        crop_pct: Evaluation crop ratio (resize to ``img_size / crop_pct``, crop ``img_size``); ``None`` uses the
            backbone's pretrained value (0.875 for most ImageNet models), 1.0 keeps the frame ``crop_mode`` gives.
        crop_mode: The evaluation frame, decided once per run and used wherever the run's model sees an image
            (validation, test, the probe's features, predictions, exports, the labels ``regtune cam`` prints):
            ``center`` (default, timm's): resize the short side, keep the centre, so a non-square photo loses the
            ends of its long side; ``squash``: the whole frame, stretched to a square; ``border``: the whole frame,
            aspect kept, padded to a square. The same for square images (Fashion-MNIST) at ``crop_pct`` 1.
        scale: RandomResizedCrop area range.
        hflip: Horizontal flip probability.
        color_jitter: Colour jitter strength, ``None`` for none.
        auto_augment: timm auto-augment policy, ``None`` for none: RandAugment ``"rand-m9-mstd0.5-inc1"`` (timm's
            recipe), TrivialAugment-style ``"rand-m10-n1-mstd101"`` (one operation, magnitude uniform), AutoAugment
            ``"original"``, AugMix ``"augmix-m5-w4-d2"``.
        re_prob: Random erasing probability (timm's, after normalisation, per-pixel random values), 0 for none.
        mixup: Mixup's Beta(alpha, alpha) parameter, 0 for no mixup.
        cutmix: CutMix's Beta(alpha, alpha) parameter, 0 for no cutmix. With both, each batch takes one of the two
            (``mix_switch_prob``); a mixed batch has soft targets, and every term of the loss must accept them.
        mix_prob: Probability that a batch is mixed at all.
        mix_switch_prob: Probability of cutmix rather than mixup when both are on.
        batch_size: Training batch size.
        eval_batch_size: Batch size for validation and test.
        num_workers: DataLoader worker processes; ``None`` picks 0 on machines with 2 cores or fewer (workers
            would compete with the training threads) and ``min(8, cores - 1)`` otherwise.
    """

    dataset: str = "fashion_mnist"
    root: str = "data"
    download: bool = False
    fraction: float | None = 0.01
    per_class: int | None = None
    val_fraction: float = 0.1
    imbalance_ratio: float | None = None
    imbalance_profile: str = "exp"
    imbalance_minority: float = 0.5
    imbalance_order: str = "index"
    split_manifest: str | None = None
    img_size: int | None = 128
    crop_pct: float | None = 1.0
    crop_mode: str = "center"
    scale: tuple[float, float] = (0.5, 1.0)
    hflip: float = 0.5
    color_jitter: float | None = None
    auto_augment: str | None = None
    re_prob: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    batch_size: int = 32
    eval_batch_size: int = 128
    num_workers: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The backbone, its weights and its head.

    The defaults are WiSE-FT's recipe (``--recipe wise_ft``; plain fine-tuning from a random head is ``--recipe ft``):
    on the offline task it was the most accurate of the baselines measured (docs/benchmarks.md).

    Attributes:
        backbone: timm model name.
        pretrained: ``auto`` | ``offline`` | ``hub`` | ``none`` | path to a weights file.
        head_init: ``lp`` (default): the head of a linear probe
            (multinomial logistic regression on the frozen backbone's features of the training images, evaluation
            transform, features computed once; its strength chosen on the validation split among ``lp_cs``).
            Fine-tuning from it is LP-FT (Kumar et al., 2022); with ``trainer.epochs: 0`` the probe is the run.
            ``normal``: N(0, 0.01) weights and zero bias, as the papers' plain fine-tuning; ``timm``: the model's
            own initialisation.
        lp_cs: Inverse L2 strengths C of the probe tried (scikit-learn's ``LogisticRegression(C=...)``).
        lp_select: How the probe's C is chosen on the validation split: ``one_se`` (default: the most regularised
            C within one standard error of the best accuracy, `regtune.train.probe.fit_linear_probe`) or
            ``best`` (highest accuracy, then lowest loss).
        lp_adapt_bn: Before the probe, re-estimate the backbone's BatchNorm running statistics on the training
            images (AdaBN; evaluation transform, no gradient step), so that the probe's features are normalised as
            training mode normalises them (`regtune.train.probe.adapt_batchnorm`). Off by default: on the
            default task at 64 px it cost the probe 15 points (63.8 % against 79.4 %, seed 0); LP-FT keeps the
            pretrained statistics instead (``freeze_bn_stats``).
        lp_max_iter: L-BFGS iterations of each probe fit.
        drop_rate: Dropout before the classifier.
        freeze_bn_stats: Keep every BatchNorm layer in evaluation mode while training (default): it normalises
            with its running (pretrained) statistics and does not update them; its scale and shift still train. The
            features a linear probe was fitted on (evaluation mode) are then the ones LP-FT starts training with; in
            training mode, batch statistics of a new domain give other features, and the probe's head its worst
            loss.
    """

    backbone: str = "tf_efficientnet_lite0"
    pretrained: str = "auto"
    head_init: str = "lp"
    lp_cs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    lp_select: str = "one_se"
    lp_adapt_bn: bool = False
    lp_max_iter: int = 1000
    drop_rate: float = 0.0
    freeze_bn_stats: bool = True


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule.

    Attributes:
        optimizer: ``sgd`` (momentum, Nesterov) or ``adamw``.
        lr: Backbone learning rate (default 0.002, LP-FT's recipe; plain fine-tuning's recipe ``ft``: 0.02).
        head_lr_mult: Head learning rate = ``lr * head_lr_mult`` (default 1 for the probe's trained head; the
            papers use 10 for a random one, recipe ``ft``).
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        weight_decay: Decoupled (AdamW) or L2 (SGD) weight decay on every trained parameter.
        scheduler: ``cosine`` (per step, to zero), ``step`` (x ``gamma`` at each epoch in ``milestones``) or
            ``constant``.
        warmup_epochs: Linear warm-up length, in epochs (fractions allowed).
        milestones: Epochs where ``step`` multiplies the learning rate by ``gamma``.
        gamma: Factor of the ``step`` schedule.
        layer_decay: Layer-wise learning-rate decay (timm's layer grouping of the backbone): the backbone's layer
            ``l`` of ``0..L-1`` trains at ``lr * layer_decay ** (L - 1 - l)``, so the stem moves least; ``None`` for
            none. The head keeps ``lr * head_lr_mult``.
    """

    optimizer: str = "sgd"
    lr: float = 0.002
    head_lr_mult: float = 1.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    layer_decay: float | None = None


@dataclass(frozen=True)
class TrainerConfig:
    """The loop (Lightning ``Trainer``) and model selection.

    Attributes:
        epochs: Training epochs.
        seed: Seed of everything (split, initialisation, order, augmentation).
        select: ``val_acc`` / ``val_loss``: best checkpoint on the held-out validation split (honest);
            ``val_bal_acc``: the same by balanced validation accuracy (mean per-class recall, for imbalanced
            classes; WiSE-FT then chooses its mix by it too); ``test_acc``: the papers' protocol (TLlib, FMR) of
            picking the best epoch on the TEST set (optimistic, labelled so in the results); ``last``: the final
            epoch.
        deterministic: ``torch.use_deterministic_algorithms`` (via Lightning).
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        devices: Lightning devices (``auto``, a count, or a list).
        precision: Lightning precision (``32-true``, ``bf16-mixed``, ``16-mixed``).
        progress_bar: Show the progress bar.
        channels_last: Channels-last memory format for model and batches (faster convolutions).
        log_every_n_steps: Period of the per-step log (``steps.csv``).
        feature_stats: Also log, per epoch on the training and validation images, the mean feature norm, FMR's
            normalised channel entropy and the mean cosine sample margin, and the head's class margin
            (docs/methods/analysis-metrics.md): the curves ``regtune analyze`` compares across runs. Costs a few
            vector operations per batch.
        train_fraction: Share of each epoch's (shuffled) training batches to run, in (0, 1]: a step budget on large
            data (e.g. 0.25 of the 1,687 batches of full Fashion-MNIST); the schedule spans the shortened epochs.
        ema_decay: Also keep an exponential moving average of the weights (``torch.optim.swa_utils``, buffers
            included), updated after every step: ``ema = decay * ema + (1 - decay) * weights``. Each validation
            evaluates both, and selection picks the better of the two per epoch (ties: the raw weights); with
            ``select: last`` the EMA weights are tested. ``None`` for none.
        crt: Classifier re-training (cRT; Kang et al., "Decoupling Representation and Classifier for Long-Tailed
            Recognition", ICLR 2020), for class-imbalanced data: after selection, the backbone is frozen and the
            linear head is re-fitted on its features of the training images with class-balanced weights (each
            image n / (K n_c): the class-balanced sampling of the paper, in expectation), as a logistic regression
            over ``model.lp_cs`` with C chosen on the balanced validation accuracy. Our reading: the paper re-trains
            the head by SGD for a few epochs on class-balanced batches; the convex fit reaches the optimum of the
            same balanced objective (with an L2 penalty) in seconds.
        posthoc_tau: Post-hoc logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021):
            after selection (and ``crt``), ``tau`` times the log of the training subset's class priors is subtracted
            from the head's bias, so the model predicts argmax ``z - tau log pi`` everywhere (test, predict,
            export). 1.0 is the paper's; ``None`` for none. Not with the ``logit_adjusted`` / ``balanced_softmax``
            criteria, which adjust in training.
        wise_alphas: WiSE-FT (Wortsman et al., 2022): after training, the weights ``(1 - a) * start + a * selected``
            for each ``a`` given, ``start`` being the weights training began from (pretrained backbone, probe
            head: needs ``model.head_init: lp``), are evaluated on the validation split and the best is tested
            once. Default 0, 0.1, ..., 1 (alpha 0 is the probe, 1 the fine-tuned weights); empty for none.
    """

    epochs: int = 15
    seed: int = 0
    select: str = "val_acc"
    deterministic: bool = True
    accelerator: str = "auto"
    devices: Any = "auto"
    precision: str = "32-true"
    progress_bar: bool = True
    channels_last: bool = True
    log_every_n_steps: int = 1
    feature_stats: bool = False
    train_fraction: float = 1.0
    ema_decay: float | None = None
    crt: bool = False
    posthoc_tau: float | None = None
    wise_alphas: tuple[float, ...] = WISE_ALPHAS


@dataclass(frozen=True)
class TermSpec:
    """A criterion or regularizer by registry name, with its keyword arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FitConfig:
    """Everything that defines a run (the run directory is not part of it)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    criterion: TermSpec = field(default_factory=lambda: TermSpec("ce"))
    regularizers: tuple[TermSpec, ...] = ()

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (tuples as lists), as written to YAML."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def validate(config: FitConfig) -> None:
    """Check values that would otherwise fail late (after minutes of set-up)."""
    d, o, t = config.data, config.optim, config.trainer
    for ok, message in [*_data_checks(d), *_recipe_checks(config)]:
        if not ok:
            raise ConfigError(message)
    checks = [
        (o.optimizer in ("sgd", "adamw"), f"optim.optimizer must be 'sgd' or 'adamw', got {o.optimizer!r}"),
        (o.scheduler in ("cosine", "step", "constant"),
         f"optim.scheduler must be 'cosine', 'step' or 'constant', got {o.scheduler!r}"),
        (o.lr > 0 and o.head_lr_mult > 0, "optim.lr and optim.head_lr_mult must be > 0"),
        (t.epochs >= 1 or (t.epochs == 0 and config.model.head_init == "lp"),
         f"trainer.epochs must be >= 1 (or 0 with model.head_init: lp, a linear probe alone), got {t.epochs}"),
        (0.0 < t.train_fraction <= 1.0, f"trainer.train_fraction must be in (0, 1], got {t.train_fraction}"),
        (t.log_every_n_steps >= 1, f"trainer.log_every_n_steps must be >= 1, got {t.log_every_n_steps}"),
        (t.select in SELECT_MODES, f"trainer.select must be one of {', '.join(SELECT_MODES)}, got {t.select!r}"),
        (not (t.select in ("val_acc", "val_loss", "val_bal_acc") and d.val_fraction == 0.0),
         f"trainer.select={t.select!r} needs a validation split: set data.val_fraction > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _data_checks(d: DataConfig) -> list[tuple[bool, str]]:
    return [
        (d.fraction is None or 0.0 < d.fraction <= 1.0, f"data.fraction must be in (0, 1], got {d.fraction}"),
        (d.per_class is None or d.per_class >= 1, f"data.per_class must be >= 1, got {d.per_class}"),
        (d.fraction is None or d.per_class is None, "give data.fraction or data.per_class, not both"),
        (0.0 <= d.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {d.val_fraction}"),
        (d.imbalance_ratio is None or (math.isfinite(d.imbalance_ratio) and d.imbalance_ratio >= 1.0),
         f"data.imbalance_ratio (rho = n_max / n_min) must be >= 1, or null for balanced, got {d.imbalance_ratio}"),
        (d.imbalance_profile in ("exp", "step"),
         f"data.imbalance_profile must be 'exp' or 'step', got {d.imbalance_profile!r}"),
        (0.0 < d.imbalance_minority < 1.0, f"data.imbalance_minority must be in (0, 1), got {d.imbalance_minority}"),
        (d.imbalance_order in ("index", "random"),
         f"data.imbalance_order must be 'index' or 'random', got {d.imbalance_order!r}"),
        (d.crop_pct is None or 0.0 < d.crop_pct <= 1.0, f"data.crop_pct must be in (0, 1], got {d.crop_pct}"),
        (d.crop_mode in CROP_MODES, f"data.crop_mode must be one of {', '.join(CROP_MODES)}, got {d.crop_mode!r}"),
        (d.img_size is None or d.img_size >= 8, f"data.img_size must be >= 8, got {d.img_size}"),
        (d.batch_size >= 1 and d.eval_batch_size >= 1, "batch sizes must be >= 1"),
        (d.num_workers is None or d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}"),
        (0.0 <= d.re_prob <= 1.0, f"data.re_prob must be in [0, 1], got {d.re_prob}"),
        (d.mixup >= 0.0 and d.cutmix >= 0.0, f"data.mixup and data.cutmix must be >= 0, got {d.mixup}, {d.cutmix}"),
        (0.0 <= d.mix_prob <= 1.0 and 0.0 <= d.mix_switch_prob <= 1.0,
         "data.mix_prob and data.mix_switch_prob must be in [0, 1]"),
        (not (d.mixup > 0 or d.cutmix > 0) or d.batch_size % 2 == 0,
         "mixup / cutmix mix each batch with its mirror image (timm's Mixup): data.batch_size must be even, got "
         + str(d.batch_size)),
    ]


def _recipe_checks(config: FitConfig) -> list[tuple[bool, str]]:
    """The baselines' settings (probe, EMA, WiSE-FT, layer decay) and the combinations that make no sense."""
    m, o, t = config.model, config.optim, config.trainer
    probe_only = t.epochs == 0
    return [
        (m.head_init in HEAD_INITS, f"model.head_init must be one of {', '.join(HEAD_INITS)}, got {m.head_init!r}"),
        (len(m.lp_cs) >= 1 and all(c > 0 for c in m.lp_cs), f"model.lp_cs must be positive numbers, got {m.lp_cs}"),
        (m.lp_max_iter >= 1, f"model.lp_max_iter must be >= 1, got {m.lp_max_iter}"),
        (m.lp_select in ("best", "one_se"), f"model.lp_select must be 'best' or 'one_se', got {m.lp_select!r}"),
        (o.layer_decay is None or 0.0 < o.layer_decay <= 1.0,
         f"optim.layer_decay must be in (0, 1], got {o.layer_decay}"),
        (t.ema_decay is None or 0.0 <= t.ema_decay < 1.0, f"trainer.ema_decay must be in [0, 1), got {t.ema_decay}"),
        (all(0.0 <= a <= 1.0 for a in t.wise_alphas), f"trainer.wise_alphas must lie in [0, 1], got {t.wise_alphas}"),
        (not t.wise_alphas or m.head_init == "lp",
         ("trainer.wise_alphas (WiSE-FT) interpolates from the starting weights to the fine-tuned ones; its "
          "starting head must be a trained one: set model.head_init: lp (a random head is no endpoint worth mixing "
          "in), or drop WiSE-FT with trainer.wise_alphas: [] (--wise-alphas '', or --recipe ft: plain fine-tuning with "
          "all of its values)")),
        (not (probe_only and (t.ema_decay is not None or t.wise_alphas or config.regularizers)),
         ("trainer.epochs: 0 runs the linear probe alone: there is no training for trainer.ema_decay, "
          "trainer.wise_alphas or regularizers to act on; drop them (--recipe lp: the probe alone, WiSE-FT's "
          "alphas emptied) or train for some epochs")),
        (not (m.freeze_bn_stats and any(r.name == "stochnorm" for r in config.regularizers)),
         ("model.freeze_bn_stats (the default, and the lp_ft and wise_ft recipes) keeps every BatchNorm in "
          "evaluation mode, where StochNorm's layers are plain BatchNorm: the regularizer would do nothing. Set "
          "model.freeze_bn_stats: false (--set model.freeze_bn_stats=false, or --recipe ft for plain fine-tuning)")),
        (not (probe_only and t.crt),
         ("trainer.crt re-trains the head of a fine-tuned backbone on class-balanced weights; with trainer.epochs: 0 "
          "there is no fine-tuned backbone: train for some epochs, or drop --crt")),
        (t.posthoc_tau is None or t.posthoc_tau >= 0, f"trainer.posthoc_tau must be >= 0, got {t.posthoc_tau}"),
        (not (t.posthoc_tau is not None and config.criterion.name in PRIOR_ADJUSTED_CRITERIA),
         (f"trainer.posthoc_tau adjusts the logits of a model trained on the plain prior; the criterion "
          f"{config.criterion.name} has already adjusted them in training: use one of the two")),
        (not ((t.crt or t.posthoc_tau is not None) and config.criterion.name in COSINE_HEAD_CRITERIA),
         (f"trainer.crt and trainer.posthoc_tau change a linear head's weights and bias; {config.criterion.name}'s "
          "cosine head has no bias: use them with criterion ce")),
        (not (probe_only and (config.data.mixup > 0 or config.data.cutmix > 0)),
         "trainer.epochs: 0 runs the linear probe alone, on unaugmented images: data.mixup / data.cutmix do nothing"),
    ]


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Build a value of annotated type ``tp`` from YAML data, strictly for dataclasses."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(names)}")
        return tp(**{k: _convert(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in value.items()})
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where) if len(inner) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_convert(item, v, where) for v in value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def config_from_dict(data: dict[str, Any]) -> FitConfig:
    """Build a [`FitConfig`][] from nested dicts (unknown keys are errors)."""
    data = dict(data or {})
    if "criterion" in data and isinstance(data["criterion"], str):
        data["criterion"] = {"name": data["criterion"]}
    if "regularizers" in data:
        data["regularizers"] = [{"name": r} if isinstance(r, str) else r for r in data["regularizers"] or []]
    return _convert(FitConfig, data, "")


def check_names(config: FitConfig) -> None:
    """Check what the dataclasses cannot: the dataset and backbone names, and the criterion's and every
    regularizer's name, arguments and argument values.

    The criterion and each regularizer are built once, without a model (cheap), so their own checks run. Call it
    where a config is read, so that a typo fails before any run starts or any folder is written.

    Raises:
        UnknownDatasetError, UnknownBackboneError, UnknownNameError: an unknown name or argument (the message lists
            the valid ones).
        ValueError: an argument value a term refuses.
        ConfigError: mixing (mixup / cutmix) with a term that cannot take mixed targets; an unknown augmentation
            policy.
    """
    from regtune.data.datasets import check_dataset_name
    from regtune.models import check_backbone_name
    from regtune.regularizers import create_criterion, create_regularizer, soft_target_refusals

    check_dataset_name(config.data.dataset)
    check_backbone_name(config.model.backbone)
    terms = [create_criterion(config.criterion.name, **config.criterion.args)]
    terms += [create_regularizer(term.name, **term.args) for term in config.regularizers]
    d = config.data
    if d.mixup > 0 or d.cutmix > 0:
        refused = soft_target_refusals(terms)
        if refused:
            raise ConfigError("data.mixup / data.cutmix train on mixed images with soft targets, and "
                              + "; ".join(refused) + ". Drop mixing, or these terms.")
    if d.auto_augment:
        _check_auto_augment(d.auto_augment)


def _check_auto_augment(policy: str) -> None:
    """Build timm's policy once on a tiny image size, so that a typo fails before the run starts."""
    from timm.data import create_transform

    try:
        create_transform(32, is_training=True, auto_augment=policy)
    except (AssertionError, KeyError, ValueError) as err:
        raise ConfigError(
            f"data.auto_augment {policy!r} is not a timm policy ({type(err).__name__}: {err}); e.g. "
            "'rand-m9-mstd0.5-inc1' (RandAugment), 'rand-m10-n1-mstd101' (TrivialAugment-style), 'original' "
            "(AutoAugment), 'augmix-m5-w4-d2' (AugMix)"
        ) from err


def load_config(path: str | Path, check: bool = True) -> FitConfig:
    """Read a YAML config (a partial one fills the rest with defaults).

    Args:
        path: The YAML file.
        check: Also `check_names` (names of dataset, backbone, criterion, regularizers and their arguments).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    config = config_from_dict(load_yaml(path.read_text()) or {})
    if check:
        check_names(config)
    return config


def save_config(config: FitConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (every field, defaults included)."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))  # whole or not at all


def apply_overrides(config: FitConfig, overrides: dict[str, Any]) -> FitConfig:
    """Return ``config`` with dotted keys replaced, e.g. ``{"optim.lr": 0.02, "data.fraction": 0.05}``."""
    data = config.to_dict()
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown config key {key!r}")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            valid = ", ".join(sorted(node)) if isinstance(node, dict) else ""
            raise ConfigError(f"unknown config key {key!r}; valid at that level: {valid}")
        node[parts[-1]] = value
    return config_from_dict(data)
