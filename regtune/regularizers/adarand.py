"""Random-feature regularization: RandReg (Zhong & Maki, CVPR 2020, arXiv 1908.05997) and AdaRand (Yamaguchi et
al., CVPR 2024, arXiv 2403.10097); guide: docs/methods/adarand.md.

Both pull the penultimate feature towards a reference vector drawn afresh at every step from a prior:
L = lambda * d(f, z), d the mean-squared error. RandReg's prior is fixed; AdaRand's is class-conditional and its
means move (one Adam step per training step) to follow the running class means of the features while staying
mutually orthogonal.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from regtune.regularizers._utils import (
    LazyShapeMixin,
    all_reduce_sum,
    check_choice,
    check_matching_matrices,
    check_positive,
    model_device,
    normalize_rows,
    off_diagonal,
    penultimate,
)
from regtune.regularizers.base import Regularizer, TrainStep, register_regularizer

__all__ = [
    "RANDREG_PRIORS",
    "AdaRand",
    "RandomFeatureRegularizer",
    "adarand_prior_losses",
    "feature_statistics",
    "random_feature_loss",
]

RANDREG_PRIORS = ("uniform", "normal", "pretrained", "class")


_RANDOM_FEATURE_REDUCTIONS = ("mean", "sum_dim")
_INTRA_DISTANCES = ("cosine_sq", "l2")
_INTER_SIMILARITIES = ("cosine_sq", "cosine")


def random_feature_loss(features: torch.Tensor, reference: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    r"""Squared distance between features and random targets (AdaRand / RandReg).

    Yamaguchi, Kanai, Adachi, Chijiwa, "Adaptive Random Feature Regularization on Fine-tuning Deep Neural
    Networks", CVPR 2024, arXiv 2403.10097; Zhong & Maki, "Regularizing CNN Transfer Learning with Randomised
    Regression", CVPR 2020, arXiv 1908.05997.

    $$
    \text{mean:}\ \frac{1}{BD} \sum_{b,d} (f_{b,d} - z_{b,d})^2, \qquad
    \text{sum\_dim:}\ \frac{1}{B} \sum_b \lVert f_b - z_b \rVert_2^2
    $$

    with f the penultimate features and z the targets (a sample from the class prior for AdaRand, from U(0,1) or N(0,1)
    for RandReg). A reading (docs/methods/adarand.md, 'Readings we chose'): the official code uses ``F.mse_loss`` (mean
    over all B*D entries, the default here, for which lambda = 1 was tuned); a paper written with ||f - z||^2 sums over
    D ('sum_dim' = D times 'mean'). Gradients flow into ``features`` and, if it requires them, ``reference``.

    Args:
        features: Penultimate features f.
        reference: Targets z, same shape (detach them first if they must not receive gradients).
        reduction: ``'mean'`` (code) or ``'sum_dim'`` (paper's norm).

    Shape:
        features, reference: (B, D). Output: scalar.

    Reduction:
        'mean': averaged over batch and channels. 'sum_dim': summed over channels, averaged over the batch.

    Returns:
        The 0-dim loss.

    Raises:
        ValueError: Shapes differ or are not 2-D, or ``reduction`` is unknown.
        TypeError: A non-floating input.

    Example:
        >>> f, z = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)
        >>> random_feature_loss(f, z).item(), random_feature_loss(f, z, reduction="sum_dim").item()
        (2.5, 5.0)
    """
    check_matching_matrices(("features", "reference"), features, reference, "(B, D)")
    check_choice("reduction", reduction, _RANDOM_FEATURE_REDUCTIONS)
    squared = (features - reference).pow(2)
    if reduction == "mean":
        return squared.mean()
    return squared.sum(dim=1).mean()


def adarand_prior_losses(mu: torch.Tensor, running_mean: torch.Tensor, intra: str = "cosine_sq",
                         inter: str = "cosine_sq", eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The two terms of AdaRand's prior-update objective, minimised over the class means mu.

    Yamaguchi, Kanai, Adachi, Chijiwa, "Adaptive Random Feature Regularization on Fine-tuning Deep Neural
    Networks", CVPR 2024, arXiv 2403.10097.

    $$
    L_{intra} = \frac{1}{C} \sum_c \bigl(1 - \cos(\mu_c, \bar m_c)\bigr)^2 \ \text{('cosine\_sq')}
    \quad\text{or}\quad \frac{1}{C} \sum_c \lVert \mu_c - \bar m_c \rVert_2^2 \ \text{('l2')}

    L_{inter} = \frac{1}{C(C-1)} \sum_{c \ne c'} \cos(\mu_c, \mu_{c'})^2 \ \text{('cosine\_sq')}
    \quad\text{or}\quad \frac{1}{C(C-1)} \sum_{c \ne c'} \cos(\mu_c, \mu_{c'}) \ \text{('cosine')}
    $$

    with mu_c the prior mean of class c, mbar_c the running (EMA) mean of class c's features and C the number of
    classes; the inter sum runs over the C(C-1) ordered pairs. A reading (docs/methods/adarand.md, 'Readings we chose'):
    the paper speaks of a "distance" and a cosine; the defaults are the released code's squared forms. Cosines use safe
    normalisation: each row is divided by max(||row||_2, eps), so a zero row has cosine 0 with everything instead of NaN
    (its gradient is then of order 1/eps, as with ``F.normalize``). With C = 1 there is no pair and L_inter = 0 (still
    attached to the graph). The caller should pass ``running_mean`` detached (it is a statistic, not a parameter).

    Args:
        mu: Prior class means mu.
        running_mean: Running class means mbar.
        intra: ``'cosine_sq'`` (code) or ``'l2'``.
        inter: ``'cosine_sq'`` (code) or ``'cosine'``.
        eps: Lower bound on a row norm in the cosine.

    Shape:
        mu, running_mean: (C, D). Outputs: two scalars.

    Reduction:
        L_intra averaged over classes; L_inter averaged over the C(C-1) ordered off-diagonal pairs.

    Returns:
        ``(l_intra, l_inter)``, both 0-dim; the objective is their sum.

    Raises:
        ValueError: Shapes differ or are not 2-D, C = 0, or an option string is unknown.
        TypeError: A non-floating input.

    Example:
        >>> mu = torch.tensor([[1.0, 0.0], [1.0, 1.0]]) / torch.tensor([[1.0], [math.sqrt(2.0)]])
        >>> l_intra, l_inter = adarand_prior_losses(mu, torch.eye(2))
        >>> round(l_intra.item(), 6), round(l_inter.item(), 6)
        (0.042893, 0.5)
    """
    check_matching_matrices(("mu", "running_mean"), mu, running_mean, "(C, D)")
    if mu.shape[0] == 0:
        raise ValueError("mu must hold at least one class, got C = 0")
    check_choice("intra", intra, _INTRA_DISTANCES)
    check_choice("inter", inter, _INTER_SIMILARITIES)

    mu_unit = normalize_rows(mu, eps)
    if intra == "cosine_sq":
        cos_intra = (mu_unit * normalize_rows(running_mean, eps)).sum(dim=1)  # (C,)
        l_intra = (1.0 - cos_intra).pow(2).mean()
    else:
        l_intra = (mu - running_mean).pow(2).sum(dim=1).mean()

    pair_cos = off_diagonal(mu_unit @ mu_unit.T)  # (C(C-1),)
    pair_terms = pair_cos.pow(2) if inter == "cosine_sq" else pair_cos
    # Sum / count rather than .mean(): for C = 1 the empty sum gives 0 (mean of nothing would be NaN).
    l_inter = pair_terms.sum() / max(pair_terms.numel(), 1)
    return l_intra, l_inter


def feature_statistics(model: nn.Module, loader: Iterable[Any], num_classes: int) -> tuple[torch.Tensor, ...]:
    """Per-class and marginal mean and standard deviation of the model's penultimate features over ``loader``.

    Runs in eval mode without gradient, accumulating in float64; the caller's mode is restored. Standard deviations
    are population values (divided by N, as NumPy's default). Under ``torch.distributed`` the sums, sums of squares
    and counts are all-reduced, so processes that each see a share of the training set (every share non-empty)
    obtain the statistics of the whole set; processes that each see all of it obtain them unchanged.

    Returns:
        ``(class_mean (C, D), class_std (C, D), class_count (C,), mean (D,), std (D,))``.

    Raises:
        ValueError: a class has no image in ``loader``.
    """
    device, was_training = model_device(model), model.training
    model.eval()
    sums = squares = counts = None
    try:
        with torch.no_grad():
            for images, labels in loader:
                features, _ = penultimate(model, images.to(device))
                features, labels = features.double(), labels.to(device)
                if sums is None:
                    dim = features.shape[1]
                    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
                    squares = torch.zeros_like(sums)
                    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
                sums.index_add_(0, labels, features)
                squares.index_add_(0, labels, features * features)
                counts += torch.bincount(labels, minlength=num_classes).double()
    finally:
        model.train(was_training)
    if sums is None:
        raise ValueError("the set-up loader is empty")
    for total in (sums, squares, counts):
        all_reduce_sum(total)  # sums and counts, never means: shares of the data add up to the whole
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"no training image of class(es) {missing[:10]}: class statistics need every class")
    class_mean = sums / counts[:, None]
    class_std = (squares / counts[:, None] - class_mean**2).clamp_min(0).sqrt()
    total = counts.sum()
    mean = sums.sum(0) / total
    std = (squares.sum(0) / total - mean**2).clamp_min(0).sqrt()
    return class_mean, class_std, counts, mean, std


@register_regularizer("randreg")
class RandomFeatureRegularizer(LazyShapeMixin, Regularizer):
    """RandReg: lambda * [`random_feature_loss`][] (f, z) with z drawn afresh each step from a fixed prior.

    Priors as the AdaRand repository re-implements RandReg (the original paper released no code; see
    docs/methods/adarand.md, 'Readings we chose'): ``"uniform"`` z ~ U(low, high)^D (0, 1), ``"normal"`` z ~ N(0, 1)^D,
    ``"pretrained"`` z ~ N(mu, diag sigma^2) with the marginal statistics of the pretrained features of the training
    subset, ``"class"`` (RandReg-CP) z ~ N(mu_y, diag sigma_y^2) with per-class statistics, never updated.

    Pretrained statistics are measured in `setup` on the training subset with the deterministic evaluation
    transform, the pretrained model in eval mode (AdaRand's configs read precomputed statistics whose files and script
    are not in its repository, so this is our reading; see docs/methods/adarand.md); sigma is clamped to >=
    ``sigma_min`` (torch's Normal rejects 0, and dead channels give 0).

    Args:
        weight: lambda (1.0 in every AdaRand config).
        prior: ``"uniform"`` | ``"normal"`` | ``"pretrained"`` | ``"class"``.
        reduction: ``"mean"`` over B*D (the code; lambda = 1 was tuned for it) or ``"sum_dim"`` (||f - z||^2 per
            sample, averaged over the batch; see docs/methods/adarand.md, 'Readings we chose').
        low: Lower end of the uniform prior.
        high: Upper end of the uniform prior.
        sigma_min: Smallest standard deviation of the pretrained priors.
        stop_epoch: From this epoch on the term is 0 (``updater/rand_reg.py``'s ``stop_epoch``); ``None`` never.

    Shape:
        step.features (B, D), step.labels (B,) -> scalar.

    Reduction:
        See ``reduction``.

    Mixed batches (mixup / CutMix): the ``"uniform"``, ``"normal"`` and ``"pretrained"`` priors never read the
    labels and accept them; the ``"class"`` prior does not (``accepts_soft_targets`` is set per instance).
    """

    accepts_soft_targets = True  # the default prior; __init__ withdraws it for prior="class"
    contract_kwargs = (
        {},
        {"prior": "pretrained"},
        {"prior": "class"},
        {"prior": "normal", "reduction": "sum_dim"},
    )

    def __init__(
            self,
            weight: float = 1.0,
            prior: str = "uniform",
            reduction: str = "mean",
            low: float = 0.0,
            high: float = 1.0,
            sigma_min: float = 1e-6,
            stop_epoch: int | None = None,
    ) -> None:
        super().__init__()
        check_positive("weight", weight)
        check_choice("prior", prior, RANDREG_PRIORS)
        check_choice("reduction", reduction, _RANDOM_FEATURE_REDUCTIONS)
        if high <= low:
            raise ValueError(f"uniform prior needs low < high, got {low}, {high}")
        self.weight, self.prior, self.reduction = weight, prior, reduction
        self.low, self.high, self.sigma_min, self.stop_epoch = low, high, sigma_min, stop_epoch
        self.needs_setup_pass = prior in ("pretrained", "class")
        if prior == "class" and self.accepts_soft_targets:  # a subclass that refuses (AdaRand) keeps its own reason
            self.accepts_soft_targets = False
            self.soft_targets_note = (
                "prior='class' (RandReg-CP) draws each sample's reference feature around the pretrained mean of its "
                "one class, and a mixed image belongs to two classes in proportion (the 'uniform', 'normal' and "
                "'pretrained' priors accept mixed batches)")
        # (C, D) for the class prior, (1, D) for the marginal one; empty until setup() or a checkpoint fills them.
        self.mu = nn.Parameter(torch.empty(0, 0), requires_grad=False)
        self.register_buffer("sigma", torch.empty(0, 0))
        self._distance: torch.Tensor | None = None

    def setup(self, model: nn.Module, loader: Iterable[Any] | None) -> None:
        """Measure the pretrained feature statistics of the prior (``"pretrained"`` and ``"class"`` priors)."""
        if self.prior not in ("pretrained", "class"):
            return
        if loader is None:
            raise ValueError(f"prior {self.prior!r} needs the training subset in setup()")
        num_classes = model.get_classifier().weight.shape[0]
        class_mean, class_std, _, mean, std = feature_statistics(model, loader, num_classes)
        if self.prior == "class":
            mu, sigma = class_mean, class_std
        else:
            mu, sigma = mean[None], std[None]
        dtype = next(model.parameters()).dtype
        self.mu.data = mu.to(dtype)
        self.sigma = sigma.clamp_min(self.sigma_min).to(dtype)

    def sample(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Draw the reference vectors z (B, D) for one batch (no gradient)."""
        with torch.no_grad():
            if self.prior == "uniform":
                return torch.empty_like(features).uniform_(self.low, self.high)
            if self.prior == "normal":
                return torch.randn_like(features)
            if self.mu.numel() == 0:
                raise RuntimeError(f"prior {self.prior!r} needs setup() (pretrained statistics) before training")
            rows = labels if self.prior == "class" else torch.zeros_like(labels)
            mu, sigma = self.mu[rows].to(features.dtype), self.sigma[rows].to(features.dtype)
            return mu + sigma * torch.randn_like(features)

    def forward(self, step: TrainStep) -> torch.Tensor:
        if self.stop_epoch is not None and step.epoch >= self.stop_epoch:
            return step.features.sum() * 0.0
        reference = self.sample(step.features, step.labels)
        distance = random_feature_loss(step.features, reference, reduction=self.reduction)
        self._distance = distance.detach()
        return self.weight * distance

    def stats(self) -> dict[str, float | torch.Tensor]:
        return {} if self._distance is None else {"distance": self._distance}


@register_regularizer("adarand")
class AdaRand(RandomFeatureRegularizer):
    """AdaRand: class-conditional random-feature regularization with adaptive prior means.

    z_b ~ N(mu_{y_b}, diag sigma_{y_b}^2) (no gradient into mu); L_theta = lambda * [`random_feature_loss`][] (f, z).
    After the term is computed, within the same `forward` (training mode only), the running class means move,
    mbar_c <- alpha mbar_c + (1 - alpha) mean_{b: y_b = c} f_b for the classes present in the batch (absent classes keep
    theirs), and one Adam step on mu minimises L_prior = L_intra + L_inter of [`adarand_prior_losses`][]. Since
    L_prior does not depend on the network, this equals the code's order (network step, then prior step) exactly. sigma
    stays at its initial per-class value, as in the code.

    The Adam optimizer of mu lives inside the module (torch optimizers cannot mix SGD for the network with Adam for
    mu in one optimizer); its state is saved with the module's ``state_dict`` (extra state), so a resumed run
    continues it, and the trainer keeps mu out of its own optimizer (`param_group_options` returns ``None``).
    The prior learning rate follows the code's schedule lr_t = prior_lr cos(7 pi t / (16 T)) when the total number of
    steps T is known (``TrainStep.total_steps``), else stays constant.

    Args:
        weight: lambda (1.0).
        alpha: EMA factor of the running class means (0.5).
        prior_lr: Adam learning rate of mu (1e-2).
        prior_schedule: ``"cosine"`` (the code) or ``"constant"``.
        intra: ``"cosine_sq"`` (the code) or ``"l2"`` (the paper's word is "distance"; see docs/methods/adarand.md).
        inter: ``"cosine_sq"`` (the code) or ``"cosine"`` (the paper's word).
        reduction: As [`RandomFeatureRegularizer`][].
        sigma_min: As [`RandomFeatureRegularizer`][].
        update_prior: ``False`` gives RandReg-CP (the class prior without updates).

    Shape:
        step.features (B, D), step.labels (B,) -> scalar.
    """

    accepts_soft_targets = False
    soft_targets_note = (
        "its class-conditional prior pulls each sample's feature towards a draw around the prior mean of its one "
        "class and moves that class's running mean with the feature, and a mixed image belongs to two classes in "
        "proportion")
    contract_kwargs = (
        {},
        {"update_prior": False},
        {"intra": "l2", "inter": "cosine", "prior_schedule": "constant"},
    )

    def __init__(
            self,
            weight: float = 1.0,
            alpha: float = 0.5,
            prior_lr: float = 1e-2,
            prior_schedule: str = "cosine",
            intra: str = "cosine_sq",
            inter: str = "cosine_sq",
            reduction: str = "mean",
            sigma_min: float = 1e-6,
            update_prior: bool = True,
    ) -> None:
        super().__init__(weight=weight, prior="class", reduction=reduction, sigma_min=sigma_min)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        check_positive("prior_lr", prior_lr)
        check_choice("prior_schedule", prior_schedule, ("cosine", "constant"))
        check_choice("intra", intra, _INTRA_DISTANCES)
        check_choice("inter", inter, _INTER_SIMILARITIES)
        self.alpha, self.prior_lr, self.prior_schedule = alpha, prior_lr, prior_schedule
        self.intra, self.inter, self.update_prior = intra, inter, update_prior
        # mu is a parameter (Adam, checkpoints, .to() keep it) that only its own update step differentiates: it asks
        # for gradients inside that step alone, so the training loss's backward and DDP's gradient synchronisation
        # (which registers the parameters that require gradients) never see it. Every process computes the same
        # update from the all-reduced running means.
        self.mu.requires_grad_(False)
        self.register_buffer("running_mean", torch.empty(0, 0))
        self._optimizer: torch.optim.Adam | None = None
        self._pending_optimizer_state: dict[str, Any] | None = None
        self._prior_losses: tuple[torch.Tensor, torch.Tensor] | None = None

    def param_group_options(self) -> dict[str, Any] | None:
        return None  # mu is updated by the module's own Adam step

    def setup(self, model: nn.Module, loader: Iterable[Any] | None) -> None:
        super().setup(model, loader)
        self.running_mean = self.mu.detach().clone()

    def _prior_optimizer(self) -> torch.optim.Adam:
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam([self.mu], lr=self.prior_lr)
            if self._pending_optimizer_state is not None:
                self._optimizer.load_state_dict(self._pending_optimizer_state)
                self._pending_optimizer_state = None
        return self._optimizer

    def _apply(self, fn, recurse: bool = True):
        # .to() / .double() / .cuda() convert mu; Adam's moments follow when the optimizer is rebuilt from its state
        # (Optimizer.load_state_dict casts the state to each parameter's dtype and device).
        if self._optimizer is not None:
            self._pending_optimizer_state = self._optimizer.state_dict()
            self._optimizer = None
        return super()._apply(fn, recurse)

    def get_extra_state(self) -> dict[str, Any]:
        if self._optimizer is not None:
            return {"prior_optimizer": self._optimizer.state_dict()}
        return {"prior_optimizer": self._pending_optimizer_state}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._optimizer = None
        self._pending_optimizer_state = state.get("prior_optimizer")

    def _update_running_means(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        num_classes = self.running_mean.shape[0]
        sums = torch.zeros_like(self.running_mean).index_add_(0, labels, features.to(self.running_mean.dtype))
        counts = torch.bincount(labels, minlength=num_classes).to(self.running_mean.dtype)
        # Under DDP: class sums and counts of the global batch (one all-reduce), so every process holds the running
        # means a single process would compute on the whole batch.
        reduced = all_reduce_sum(torch.cat([sums, counts[:, None]], dim=1))
        sums, counts = reduced[:, :-1], reduced[:, -1]
        present = counts > 0
        batch_mean = sums / counts.clamp_min(1)[:, None]
        updated = self.alpha * self.running_mean + (1 - self.alpha) * batch_mean
        self.running_mean.copy_(torch.where(present[:, None], updated, self.running_mean))

    def _prior_step(self, step: TrainStep) -> None:
        optimizer = self._prior_optimizer()
        if self.prior_schedule == "cosine" and step.total_steps:
            for group in optimizer.param_groups:
                group["lr"] = self.prior_lr * math.cos(7 * math.pi * step.global_step / (16 * step.total_steps))
        # Full precision and autograd on, whatever the trainer's autocast or no_grad context.
        self.mu.requires_grad_(True)
        try:
            with torch.enable_grad(), torch.autocast(self.mu.device.type, enabled=False):
                l_intra, l_inter = adarand_prior_losses(self.mu, self.running_mean, intra=self.intra,
                                                        inter=self.inter)
                optimizer.zero_grad(set_to_none=True)
                (l_intra + l_inter).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            self.mu.requires_grad_(False)
        self._prior_losses = (l_intra.detach(), l_inter.detach())

    def forward(self, step: TrainStep) -> torch.Tensor:
        loss = super().forward(step)
        if self.training and self.update_prior:
            with torch.no_grad():
                self._update_running_means(step.features.detach(), step.labels)
            self._prior_step(step)
        return loss

    def stats(self) -> dict[str, float | torch.Tensor]:
        out = super().stats()
        if self._prior_losses is not None:
            out["l_intra"], out["l_inter"] = self._prior_losses
        if self.mu.numel():
            out["mu_norm"] = self.mu.detach().norm(dim=1).mean()  # a new tensor: mu moves in place
        return out
