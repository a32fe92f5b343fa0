r"""Linear probing (LP): a multinomial logistic regression on the frozen backbone's penultimate features.

The probe that LP-FT starts fine-tuning from (Kumar et al., "Fine-Tuning can Distort Pretrained Features and
Underperform Out-of-Distribution", ICLR 2022, arXiv 2202.10054), and a baseline of its own. The regression is
scikit-learn's ``LogisticRegression`` (L-BFGS, softmax over the classes, L2 penalty, unpenalized intercept), which
minimises

$$
\tfrac12 \lVert W \rVert_F^2 + C \sum_{i=1}^{n} -\log \operatorname{softmax}(W (f_i - \mu) + c)_{y_i}
$$

f_i: the penultimate features (D,) of training image i; mu: their mean over the training images; y_i its class;
W (C_classes, D), c (C_classes,): the head; C: the inverse regularization strength, chosen from a grid by
validation accuracy. The validation images are never trained on. The returned head applies to the features as the
backbone gives them: bias b = c - W mu, so ``W f + b = W (f - mu) + c`` exactly.

Centring changes nothing in the optimum's W (the intercept is not penalised) but decouples the intercept from the
weights: on 540 EfficientNet-Lite0 features (D = 1280) L-BFGS converges in about 160 iterations (2-3 s a fit)
instead of stopping at its 1000-iteration limit after 20 s. The features are deliberately not scaled per channel:
the penalty on W then keeps weights small on channels of small variance, whereas a probe fitted on standardised
features puts weights up to 1/sigma larger on them (sigma down to 0.01 here) and LP-FT's first steps, which move
those channels, blew its logits up (validation loss 11.8 after one epoch).
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from regtune._io import atomic_write_bytes
from regtune.models import forward_parts

__all__ = ["DEFAULT_CS", "PROBE_SELECTIONS", "ProbeResult", "adapt_batchnorm", "extract_features", "fit_linear_probe",
           "linear_probe", "set_head"]

_log = logging.getLogger(__name__)

DEFAULT_CS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
PROBE_SELECTIONS = ("best", "one_se")
"""Grid of the inverse regularization strength C."""

ABSENT_CLASS_GAP = 100.0
"""How far below the smallest fitted bias a class without training features is put (its weight row is zero). The
fitted rows sum to zero (the L2 optimum, and L-BFGS from zero, keep sum_k W_k = 0), so the mean fitted logit is the
mean fitted bias for every input: an absent class is never the largest logit, and its probability is below e^-100."""


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu") -> bool:
    """Re-estimate every BatchNorm layer's running statistics on ``loader``'s images (AdaBN, Li et al., 2016):
    the plain average over the batches of their means and variances (`torch.optim.swa_utils.update_bn`).

    A probe fitted on features normalised with the pretrained statistics fails once training normalises with the
    new data's batch statistics (measured: EfficientNet-Lite0 on Fashion-MNIST at 64 px, a probe right on 100 % of
    its training images in evaluation mode got 13.7 % of them in training mode). With the statistics re-estimated
    first, evaluation and training mode normalise alike, and LP-FT starts from a head that works in both.

    Args:
        model: Moved to ``device``; its train/eval mode is restored.
        loader: Yields ``(images, ...)``: the training images with the evaluation transform.
        device: Where the passes run.

    Returns:
        Whether the model has BatchNorm layers (without, nothing changes).
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    training = model.training
    model.to(device)
    torch.optim.swa_utils.update_bn(((batch[0],) for batch in loader), model, device=device)
    model.train(training)
    return True


@torch.no_grad()
def extract_features(model: nn.Module, loader: DataLoader, device: str | torch.device = "cpu"
                     ) -> tuple[Tensor, Tensor]:
    """Penultimate features (``forward_head(pre_logits=True)``) of every item of ``loader``, the model in eval mode.

    Args:
        model: A timm model; moved to ``device``; its train/eval mode is restored afterwards.
        loader: Yields ``(images, labels[, ...])``; its transform should be the evaluation one.
        device: Where the forward passes run.

    Returns:
        ``(features, labels)``: float32 (N, D) and int64 (N,), on the CPU.

    Raises:
        ValueError: the loader yields nothing.
    """
    training = model.training
    model.to(device).eval()
    features, labels = [], []
    try:
        for images, targets, *_ in loader:
            features.append(forward_parts(model, images.to(device))[1].float().cpu())
            labels.append(torch.as_tensor(targets).to(torch.int64).cpu())
    finally:
        model.train(training)
    if not features:
        raise ValueError("the loader yielded no batch: nothing to extract features from")
    return torch.cat(features), torch.cat(labels)


@dataclass(frozen=True)
class ProbeResult:
    """The chosen linear probe and how each C of the grid did.

    Attributes:
        weight: (num_classes, D) float32 head weights.
        bias: (num_classes,) float32 head bias.
        C: The chosen inverse regularization strength.
        val_acc: Validation accuracy per C of the grid (empty without validation features).
        val_loss: Mean validation cross-entropy per C (empty without validation features).
        train_acc: The chosen head's accuracy on the training features.
    """

    weight: Tensor
    bias: Tensor
    C: float
    val_acc: dict[float, float]
    val_loss: dict[float, float]
    train_acc: float


def _check_probe_inputs(train_x: Tensor, train_y: Tensor, val_x: Tensor | None, val_y: Tensor | None,
                        num_classes: int, Cs: Sequence[float]) -> bool:
    """Whether there are validation features; raises on inconsistent inputs."""
    if train_x.ndim != 2 or train_y.ndim != 1 or train_x.shape[0] != train_y.shape[0]:
        raise ValueError(f"expected training features (N, D) and labels (N,), got {tuple(train_x.shape)} and "
                         f"{tuple(train_y.shape)}")
    if (val_x is None) != (val_y is None):
        raise ValueError("give both validation features and labels, or neither")
    has_val = val_x is not None and val_x.shape[0] > 0
    if has_val and (val_x.ndim != 2 or val_x.shape[1] != train_x.shape[1] or val_y.shape != (val_x.shape[0],)):
        raise ValueError(f"validation features {tuple(val_x.shape)} and labels {tuple(val_y.shape)} do not match "
                         f"the training features (N, {train_x.shape[1]})")
    labels = torch.cat([train_y, val_y]) if has_val else train_y
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    if not Cs or any(not c > 0 for c in Cs):
        raise ValueError(f"Cs must be positive inverse regularization strengths, got {list(Cs)}")
    if not has_val and len(Cs) > 1:
        raise ValueError(f"choosing C among {list(Cs)} needs validation features: give one C, or a validation split "
                         "(data.val_fraction > 0)")
    return has_val


def _fit_one(features: np.ndarray, labels: np.ndarray, num_classes: int, C: float, max_iter: int,
             tol: float, balanced: bool = False) -> tuple[Tensor, Tensor]:
    """One L-BFGS fit at ``C`` on centred features; the (num_classes, D), (num_classes,) float64 head on the raw
    features, absent classes filled in."""
    mean = features.mean(0)
    coef, intercept = _fit_centred(features - mean, labels, C, max_iter, tol, balanced)
    intercept = intercept - coef @ torch.from_numpy(mean)  # b = c - W mu: the same logits on the raw features
    present = torch.from_numpy(np.unique(labels).astype(np.int64))
    weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    bias = torch.full((num_classes,), float(intercept.min()) - ABSENT_CLASS_GAP, dtype=torch.float64)
    weight[present], bias[present] = coef, intercept
    return weight, bias


def _fit_centred(features: np.ndarray, labels: np.ndarray, C: float, max_iter: int,
                      tol: float, balanced: bool = False) -> tuple[Tensor, Tensor]:
    """scikit-learn's fit at ``C``: the head ``(V, c)`` of the classes present, in float64 (``balanced``: each
    image weighted n / (K n_c), every class the same total weight)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    present = np.unique(labels)
    # Two classes: scikit-learn fits one logistic w (objective 1/2 |w|^2 + C' sum CE). The softmax head
    # (-w/2, w/2) has |W|^2 = |w|^2 / 2, so the softmax objective at C is the logistic one at C' = 2C, halved.
    binary = len(present) == 2
    regression = LogisticRegression(C=2 * C if binary else C, max_iter=max_iter, tol=tol,
                                    class_weight="balanced" if balanced else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        regression.fit(features, labels)
    for warning in caught:
        if issubclass(warning.category, ConvergenceWarning):
            _log.warning("linear probe at C=%g: L-BFGS did not converge in %d iterations; raise max_iter (the "
                         "head is the last iterate)", C, max_iter)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    coef = torch.from_numpy(np.asarray(regression.coef_, dtype=np.float64))
    intercept = torch.from_numpy(np.asarray(regression.intercept_, dtype=np.float64))
    if binary:
        coef, intercept = torch.cat([-coef / 2, coef / 2]), torch.cat([-intercept / 2, intercept / 2])
    return coef, intercept


def _scores(weight: Tensor, bias: Tensor, features: Tensor, labels: Tensor,
            balanced: bool = False) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of the head on the features, in float64; ``balanced``: the mean per-class
    recall instead of the accuracy."""
    logits = features.double() @ weight.T + bias
    loss = nn.functional.cross_entropy(logits, labels)
    right = (logits.argmax(1) == labels).double()
    if balanced:
        classes = torch.unique(labels)
        return float(torch.stack([right[labels == c].mean() for c in classes]).mean()), float(loss)
    return float(right.mean()), float(loss)


def _choose(val_acc: dict[float, float], val_loss: dict[float, float], select: str, count: int) -> float:
    """The C that ``select`` picks from the validation scores of the grid (see `fit_linear_probe`)."""
    best = min(val_acc, key=lambda c: (-val_acc[c], val_loss[c], c))
    if select == "best":
        return best
    accuracy = val_acc[best]
    margin = math.sqrt(accuracy * (1.0 - accuracy) / count)
    return min(c for c in val_acc if val_acc[c] >= accuracy - margin - 1e-12)  # rounding of equal accuracies


def fit_linear_probe(
        train_x: Tensor,
        train_y: Tensor,
        val_x: Tensor | None,
        val_y: Tensor | None,
        num_classes: int,
        Cs: Sequence[float] = DEFAULT_CS,
        max_iter: int = 1000,
        tol: float = 1e-6,
        select: str = "best",
        balanced: bool = False,
) -> ProbeResult:
    """Fit the linear probe once per C on the training features and keep the fit that validates best.

    ``select="best"``: the chosen fit has the highest validation accuracy; ties go to the lower validation
    cross-entropy, then to the smaller C. ``select="one_se"``: the one-standard-error rule (Breiman et al., 1984;
    Hastie et al., *Elements of Statistical Learning*, 7.10): the smallest C (the most regularised head) whose
    validation accuracy is within one binomial standard error sqrt(a (1 - a) / M) of the best accuracy a, over the
    M validation images. With 60 validation images a C that wins by one image is noise, and a weakly regularised
    head has large weights: LP-FT from such a head (C = 1, won by 1 of 60 images) diverged in its first epoch
    where C = 0.01 trained smoothly. The chosen head was trained on the training features only. The same inputs
    give the same result.

    Classes without training features get a zero weight row and a bias `ABSENT_CLASS_GAP` below the smallest
    fitted bias, so they are never predicted (a warning names them).

    Args:
        train_x: (N, D) training features.
        train_y: (N,) their classes in [0, num_classes).
        val_x: (M, D) validation features, or ``None`` (then ``Cs`` must hold one value).
        val_y: (M,) their classes, or ``None``.
        num_classes: Classes of the task (rows of the head).
        Cs: Grid of C, the inverse strength of the L2 penalty 1/2 ||W||^2 against the summed cross-entropy.
        max_iter: L-BFGS iterations per fit; a fit that stops there logs a warning saying to raise it.
        tol: L-BFGS gradient tolerance (scikit-learn's, on its objective divided by C N); scikit-learn's default
            1e-4 can stop well short of the optimum with many classes, 1e-6 is close to it (the test of the fit
            checks the gradient at 1e-4 of the data term).
        select: ``"best"`` or ``"one_se"`` (see above); without validation features the one C is taken.
        balanced: Class-balanced: each training image weighted n / (K n_c) (scikit-learn's ``class_weight=
            "balanced"``, every class the same total weight), and C chosen on the balanced validation accuracy (mean
            per-class recall; ``ProbeResult.val_acc`` then holds it).

    Returns:
        The `ProbeResult`.

    Raises:
        ValueError: inconsistent shapes, labels out of range, a non-positive C, several C without validation
            features, training features of fewer than two classes, or an unknown ``select``.
    """
    if select not in PROBE_SELECTIONS:
        raise ValueError(f"select must be one of {', '.join(PROBE_SELECTIONS)}, got {select!r}")
    has_val = _check_probe_inputs(train_x, train_y, val_x, val_y, num_classes, Cs)
    present = torch.unique(train_y)
    if present.numel() < 2:
        raise ValueError(f"the training features hold {present.numel()} class(es); a probe needs at least two")
    absent = sorted(set(range(num_classes)) - set(present.tolist()))
    if absent:
        _log.warning("linear probe: %d class(es) have no training features and are never predicted: %s",
                     len(absent), ", ".join(map(str, absent[:20])) + (" ..." if len(absent) > 20 else ""))
    features, labels = train_x.double().numpy(), train_y.numpy()
    fits, val_acc, val_loss = {}, {}, {}
    for C in map(float, Cs):
        fits[C] = _fit_one(features, labels, num_classes, C, max_iter, tol, balanced)
        if has_val:
            val_acc[C], val_loss[C] = _scores(*fits[C], val_x, val_y, balanced)
            _log.info("linear probe C=%g: validation accuracy %.4f, loss %.4f", C, val_acc[C], val_loss[C])
    chosen = _choose(val_acc, val_loss, select, val_x.shape[0]) if has_val else next(iter(fits))
    weight, bias = fits[chosen]
    train_acc = _scores(weight, bias, train_x, train_y)[0]
    return ProbeResult(weight=weight.float(), bias=bias.float(), C=chosen, val_acc=val_acc, val_loss=val_loss,
                       train_acc=train_acc)


_CACHE_KEYS = ("train_x", "train_y", "val_x", "val_y")


def _read_cache(cache: Path, loaders: dict[str, DataLoader | None]) -> dict[str, Tensor | None]:
    """The features of an earlier extraction, checked against the loaders' sizes."""
    with np.load(cache, allow_pickle=False) as saved:
        arrays = {key: torch.from_numpy(saved[key]) for key in _CACHE_KEYS if key in saved.files}
    for split, loader in loaders.items():
        key = f"{split}_x"
        if (key in arrays) != (loader is not None):
            raise ValueError(f"{cache} holds {'no ' if key not in arrays else ''}{split} features but a {split} "
                             f"loader was {'given' if loader is not None else 'not given'}: delete the cache to "
                             "extract again")
        size = len(loader.dataset) if loader is not None and hasattr(loader.dataset, "__len__") else None
        if size is not None and arrays[key].shape[0] != size:
            raise ValueError(f"{cache} holds {arrays[key].shape[0]} {split} features but the {split} loader has "
                             f"{size} items: delete the cache to extract again")
    return {key: arrays.get(key) for key in _CACHE_KEYS}


def _write_cache(cache: Path, arrays: dict[str, Tensor | None]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **{key: value.numpy() for key, value in arrays.items() if value is not None})
    atomic_write_bytes(cache, buffer.getvalue())


def linear_probe(
        model: nn.Module,
        train_loader: DataLoader,
        val_loader: DataLoader | None,
        num_classes: int,
        Cs: Sequence[float] = DEFAULT_CS,
        max_iter: int = 1000,
        cache: Path | None = None,
        device: str | torch.device = "cpu",
        tol: float = 1e-6,
        select: str = "best",
        balanced: bool = False,
) -> ProbeResult:
    """Extract the frozen model's features once and fit the linear probe on them (`fit_linear_probe`).

    Args:
        model: The backbone (timm contract); its weights are not changed (see `set_head`).
        train_loader: Training images with the evaluation transform (features of a frozen backbone).
        val_loader: Validation images, or ``None`` (then ``Cs`` must hold one value).
        num_classes: Classes of the task.
        Cs: Grid of C.
        max_iter: L-BFGS iterations per fit.
        cache: An ``.npz`` file for the features: read when it exists (no extraction), else written (atomically).
            It is keyed by nothing but its path: delete it when the model, the data or the transform change.
        device: Where the features are extracted.
        tol: L-BFGS gradient tolerance (see `fit_linear_probe`).
        select: How C is chosen on validation (see `fit_linear_probe`).
        balanced: Class-balanced weights and selection (see `fit_linear_probe`).

    Returns:
        The `ProbeResult`.
    """
    loaders = {"train": train_loader, "val": val_loader}
    if cache is not None and Path(cache).is_file():
        arrays = _read_cache(Path(cache), loaders)
        _log.info("linear probe: features read from %s", cache)
    else:
        arrays = dict.fromkeys(_CACHE_KEYS)
        for split, loader in loaders.items():
            if loader is not None:
                arrays[f"{split}_x"], arrays[f"{split}_y"] = extract_features(model, loader, device)
        if cache is not None:
            _write_cache(Path(cache), arrays)
    return fit_linear_probe(arrays["train_x"], arrays["train_y"], arrays["val_x"], arrays["val_y"], num_classes,
                            Cs=Cs, max_iter=max_iter, tol=tol, select=select, balanced=balanced)


@torch.no_grad()
def set_head(model: nn.Module, result: ProbeResult) -> None:
    """Copy the probe's weight and bias into ``model.get_classifier()`` (a linear layer with a bias).

    Raises:
        ValueError: the classifier is not a linear layer with a bias (e.g. LM-Softmax's cosine head), or its shape
            differs from the probe's.
    """
    head = model.get_classifier()
    if not isinstance(head, nn.Linear) or head.bias is None:
        raise ValueError(f"a linear probe sets a linear classifier with a bias, but the model's is {head!r}; probe "
                         "before any criterion replaces the head (e.g. LM-Softmax's cosine head)")
    if head.weight.shape != result.weight.shape or head.bias.shape != result.bias.shape:
        raise ValueError(f"the probe's head is {tuple(result.weight.shape)} but the model's classifier is "
                         f"{tuple(head.weight.shape)} (classes x features): was the probe fitted for this model?")
    head.weight.copy_(result.weight.to(head.weight))
    head.bias.copy_(result.bias.to(head.bias))
