"""FMR: Feature Magnitude Regularization (Chapman, Xu, Liu; DICTA 2024; arXiv 2409.01672); see docs/methods/fmr.md."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regtune.regularizers._utils import (
    all_reduce_sum,
    check_choice,
    check_float_matrix,
    check_positive,
    model_device,
    penultimate,
)
from regtune.regularizers.base import Regularizer, TrainStep, register_regularizer

__all__ = ["FMR_MODES", "FeatureMagnitudeRegularization", "channel_entropy", "fmr_weight"]

FMR_MODES = ("meta", "provided", "dynamic", "static")

_log = logging.getLogger(__name__)


def channel_entropy(features: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    r"""Per-sample entropy of the softmax across feature channels (the FMR loss).

    Chapman, Xu, Liu, "Feature Magnitude Regularization", DICTA 2024, arXiv 2409.01672. The FMR loss is
    ``-lambda_t * channel_entropy(features, tau).mean()``; the weight comes from [`fmr_weight`][].

    $$
    p_{b,i} = \frac{\exp(f_{b,i} / \tau)}{\sum_{j=1}^{D} \exp(f_{b,j} / \tau)}, \qquad
    H_b = -\sum_{i=1}^{D} p_{b,i} \log p_{b,i}
    $$

    with f_b the raw (unnormalised, post-ReLU GAP) penultimate feature of sample b, D its number of channels, tau the
    softmax temperature and log the natural logarithm. Computed from ``log_softmax`` (no overflow for large f, no
    ``log 0``). The gradient is the exact gradient of H (nothing is detached), as in the official code.

    Args:
        features: Penultimate features f.
        tau: Softmax temperature, > 0.

    Shape:
        features: (B, D). Output: (B,).

    Reduction:
        Summed over the D channels; none over the batch (one value per sample).

    Returns:
        H_b in nats, between 0 and log D.

    Raises:
        ValueError: ``features`` is not 2-D, or ``tau`` is not positive.
        TypeError: ``features`` is not a floating tensor.

    Example:
        >>> f = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
        >>> [round(h, 6) for h in channel_entropy(f).tolist()]  # p = (1/4, 3/4); uniform -> log 2
        [0.562335, 0.693147]
    """
    check_float_matrix("features", features, "(B, D)")
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    log_p = F.log_softmax(features / tau, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def fmr_weight(h_t: torch.Tensor | float, h_init: torch.Tensor | float, h_max: torch.Tensor | float,
               beta: float) -> torch.Tensor | float:
    r"""The dynamic FMR weight lambda_t, "META_CALCULATED" mode.

    Chapman, Xu, Liu, "Feature Magnitude Regularization", DICTA 2024, arXiv 2409.01672.

    $$
    \lambda_t = \beta \, \frac{H_{max} - H_t}{H_{max} - H_{init}}
    $$

    with H_max = log D (entropy of the uniform channel distribution), H_t the running mean of recent batch-mean
    channel entropies, H_init that running mean at the end of the statistics pass, and beta the desired initial
    weight (50 in the published configs). The official code writes it as c_max (H_max - H_t) / H_max with
    c_max = beta H_max / (H_max - H_init); its DYNAMICALLY_CALCULATED mode is the same expression with a given c_max,
    i.e. this function with ``h_init = 0`` and ``beta = c_max``. No clamp is applied (the official code has none;
    see docs/methods/fmr.md, 'Readings we chose'): the weight exceeds beta once H_t < H_init. A clamp, if wanted,
    belongs to the caller (``lambda_max``).

    Args:
        h_t: Current running entropy H_t (nats).
        h_init: Initial running entropy H_init (nats).
        h_max: Maximum entropy H_max = log D (nats).
        beta: Desired initial weight beta.

    Shape:
        Scalars: Python numbers, or 0-dim tensors (then the result is a 0-dim tensor, computed without reading its
        value on the host).

    Reduction:
        None.

    Returns:
        lambda_t (no gradient flows through the weight in the FMR term: it is computed from detached entropies).

    Raises:
        ValueError: ``h_max == h_init`` for Python numbers (features already uniform at initialisation: the weight is
            undefined). With tensors the check is the caller's (:class:`~regtune.regularizers.fmr.
            FeatureMagnitudeRegularization` checks H_init once, after its statistics pass).

    Example:
        >>> round(fmr_weight(h_t=7.3, h_init=7.0, h_max=math.log(2048), beta=50.0), 3)
        25.985
    """
    if not any(isinstance(v, torch.Tensor) for v in (h_t, h_init, h_max)):
        h_t, h_init, h_max, beta = float(h_t), float(h_init), float(h_max), float(beta)
        if h_max == h_init:
            raise ValueError(
                f"fmr_weight is undefined when h_max == h_init (both {h_max}): the initial features are already "
                "uniform over the channels, so (H_max - H_init) = 0 divides by zero; use a fixed weight instead"
            )
    return beta * (h_max - h_t) / (h_max - h_init)


@register_regularizer("fmr")
class FeatureMagnitudeRegularization(Regularizer):
    """Maximise the entropy of the softmax over feature channels, with a weight that adapts to it.

    The term is L_FMR = -lambda_t * mean_b H_b, with H_b the channel-softmax entropy of sample b's penultimate feature
    at temperature tau ([`channel_entropy`][]). The weight lambda_t carries no
    gradient and depends on ``mode``:

    - ``"meta"`` (META_CALCULATED, every published config): [`fmr_weight`][]
      with H_t the running mean of the last ``window`` batch-mean entropies (at tau = 1, detached, the current batch
      included) and H_init that running mean at the end of the statistics pass (see `setup`). No clamp, as in
      the code (``lambda_max`` adds one).
    - ``"provided"``: a fixed lambda (the paper suggests a sweep over 10, 100, 1000).
    - ``"dynamic"`` (DYNAMICALLY_CALCULATED): lambda_t = max_coef (H_max - H_t) / H_max, i.e. ``fmr_weight`` with
      H_init = 0 and beta = ``max_coef``. Its running window starts filled by the statistics pass, as in the code.
    - ``"static"`` (STATICALLY_CALCULATED, which crashes in the official code; its intended formula):
      lambda = 10^(a N_train + b), N_train the size of the training subset.

    Schedule, as the official training loop runs it (its iteration counter is 0 at the first update): lambda_t is
    recomputed at every step of the first epoch, and afterwards at the global steps s with
    s % ``update_every`` == 1 (1, 6, 11, ... for the code's 5; every step for ``update_every=1``). The statistics
    pass before the first update reads every batch of one pass over the training loader but the last (the code's
    statistics epoch ends when its counter reaches 0, one batch before the loader is exhausted); H_init is the mean
    of the last min(``window``, batches read) of them, and the window carries on into training. Between updates
    lambda_t keeps its value while H_t moves.

    Where the paper is silent, the code's choices (docs/methods/fmr.md, 'Readings we chose'): the weight's entropy
    uses tau = 1 whatever the loss temperature (``weight_uses_tau=False``, the code); H_init is measured in train
    mode, so BatchNorm statistics move during the statistics pass (``init_mode="train"``, the code; ``"eval"`` freezes
    them), on augmented training images (``setup_transform="train"``).

    Args:
        mode: ``"meta"`` | ``"provided"`` | ``"dynamic"`` | ``"static"``.
        beta: Initial weight of ``meta`` (lambda at the first step ~= beta).
        lambda_: Fixed weight of ``provided``.
        max_coef: Maximal weight of ``dynamic`` (MaxFMRCoef).
        static_a: Slope ``a`` of ``static``.
        static_b: Intercept ``b`` of ``static``.
        tau: Softmax temperature of the loss.
        weight_uses_tau: Compute H_t / H_init / H_max at ``tau`` instead of 1.
        window: Batches in the running mean of H_t (50 in the code).
        update_every: Steps between weight updates after the first epoch (5 in the code).
        lambda_max: Optional upper clamp of lambda_t.
        target: ``"features"`` (penultimate, the paper) or ``"logits"`` (H_max = log C; with ``provided`` this is
            MaxEnt).
        init_mode: ``"train"`` or ``"eval"``: the model's mode during the statistics pass.
        init_batches: Batches the statistics pass reads; ``None`` for the code's: all batches of the loader but the
            last (a loader of one batch is read whole: the code's statistics epoch would read none).

    Shape:
        step.features (B, D) or step.logits (B, C) -> scalar.

    Reduction:
        Entropy summed over channels, averaged over the batch.

    Raises:
        ValueError: unknown mode / target, or H_init == H_max in ``meta`` mode (features already uniform: the weight
            is undefined).

    Example:
        >>> fmr = FeatureMagnitudeRegularization(mode="provided", lambda_=10.0)
        >>> step = TrainStep(features=torch.zeros(2, 4), logits=torch.zeros(2, 3), labels=torch.zeros(2).long(),
        ...                  model=nn.Identity())
        >>> round(float(fmr(step)), 4)  # -10 * log 4
        -13.8629
    """

    needs_setup_pass = True
    setup_transform = "train"
    accepts_soft_targets = True  # reads only the features (or logits)
    contract_kwargs = (
        {"window": 4},
        {"window": 4, "mode": "provided", "lambda_": 3.0},
        {"window": 4, "mode": "dynamic", "tau": 2.0},
        {"window": 4, "mode": "static"},
        {"window": 4, "target": "logits", "init_mode": "eval"},
    )

    def __init__(
            self,
            mode: str = "meta",
            beta: float = 50.0,
            lambda_: float = 100.0,
            max_coef: float = 200.0,
            static_a: float = -6.6515e-05,
            static_b: float = 0.67514,
            tau: float = 1.0,
            weight_uses_tau: bool = False,
            window: int = 50,
            update_every: int = 5,
            lambda_max: float | None = None,
            target: str = "features",
            init_mode: str = "train",
            init_batches: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("mode", mode, FMR_MODES)
        check_choice("target", target, ("features", "logits"))
        check_choice("init_mode", init_mode, ("train", "eval"))
        check_positive("tau", tau, allow_zero=False)
        if window < 1 or update_every < 1:
            raise ValueError(f"window and update_every must be >= 1, got {window}, {update_every}")
        if init_batches is not None and init_batches < 1:
            raise ValueError(f"init_batches must be >= 1 or None (the code's statistics epoch), got {init_batches}")
        self.mode, self.beta, self.lambda_, self.max_coef = mode, beta, lambda_, max_coef
        self.static_a, self.static_b = static_a, static_b
        self.tau, self.weight_uses_tau, self.window_size, self.update_every = tau, weight_uses_tau, window, update_every
        self.lambda_max, self.target, self.init_mode, self.init_batches = lambda_max, target, init_mode, init_batches
        self.needs_setup_pass = mode != "provided"
        self.register_buffer("window", torch.zeros(window, dtype=torch.float64))
        self.register_buffer("window_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("h_init", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("h_max", torch.tensor(float("nan"), dtype=torch.float64))
        # NaN until known: "static" sets it in setup(), "meta" and "dynamic" at their first update.
        self.register_buffer("lambda_t", torch.tensor(lambda_ if mode == "provided" else float("nan"),
                                                      dtype=torch.float64))
        self._entropy: torch.Tensor | None = None
        # What a step branches on, kept on the host so that no step reads a device value (a GPU wait): the filled
        # window slots, and whether H_init and lambda_t are known. These only ever go from NaN to a value: set where
        # they are set, else read from the buffer until known (a buffer filled from outside). A load of the state
        # resets all three from the loaded buffers.
        self._filled = 0
        self._h_init_known = False
        self._lambda_known = False
        self.register_load_state_dict_post_hook(_sync_host_state)

    # -- statistics ---------------------------------------------------------------------------------------------------

    def _target(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return features if self.target == "features" else logits

    def _weight_entropy(self, target: torch.Tensor, loss_entropy: torch.Tensor) -> torch.Tensor:
        """Batch-mean entropy that drives the weight (tau = 1 unless ``weight_uses_tau``), detached.

        Under DDP the mean is over the global batch (sum and count all-reduced), so H_t and lambda_t are the same on
        every process and equal to a single process's on the whole batch.
        """
        per_sample = loss_entropy if self.weight_uses_tau or self.tau == 1.0 else channel_entropy(target, 1.0)
        per_sample = per_sample.detach().double()
        total = all_reduce_sum(torch.stack([per_sample.sum(), per_sample.new_tensor(float(per_sample.numel()))]))
        return total[0] / total[1]

    def _push(self, value: torch.Tensor) -> torch.Tensor:
        """Add one batch entropy to the window; return the running mean H_t (current batch included)."""
        position = (self.window_count % self.window_size).reshape(1)
        # index_copy_, not window[position] = ...: indexing with a 0-dim tensor reads the index on the host
        self.window.index_copy_(0, position, value.reshape(1).to(self.window.dtype))
        self.window_count += 1
        self._filled = min(self._filled + 1, self.window_size)
        filled = torch.arange(self.window_size, device=self.window.device) < self.window_count
        return (self.window * filled).sum() / filled.sum()  # no host sync

    def _statistics_batches(self, loader: Iterable[Any]) -> int:
        """How many batches the statistics pass reads (see ``init_batches``)."""
        if self.init_batches is not None:
            return self.init_batches
        try:
            batches = len(loader)  # type: ignore[arg-type]
        except TypeError as err:
            raise ValueError("FMR's statistics pass reads all batches of the training loader but the last, so it needs "
                             f"the loader's length; {type(loader).__name__} has none: pass init_batches") from err
        if batches == 1:
            _log.warning("FMR: the training loader has a single batch; the statistics pass reads it (the official "
                         "statistics epoch, one batch shorter than the loader, would read none)")
        return max(batches - 1, 1)

    def setup(self, model: nn.Module, loader: Iterable[Any] | None) -> None:
        """The statistics pass before the first update: H_init and a filled window (``meta``, ``dynamic``), or
        N_train (``static``).

        The pass runs forward passes without gradient in ``init_mode`` (train mode by default, so BatchNorm running
        statistics move, as in the official code) over all batches of ``loader`` but the last (``init_batches``),
        and never steps an optimizer.
        """
        if self.mode == "provided":
            return
        if loader is None:
            raise ValueError(f"FMR mode {self.mode!r} needs the training loader in setup()")
        if self.mode == "static":
            n_train = len(loader.dataset)  # type: ignore[attr-defined]
            self.lambda_t.fill_(10.0 ** (self.static_a * n_train + self.static_b))
            self._lambda_known = True
            return
        limit = self._statistics_batches(loader)
        device, was_training = model_device(model), model.training
        model.train(self.init_mode == "train")
        batches = 0
        try:
            with torch.no_grad():
                for images, *_ in loader:
                    if batches == limit:
                        break
                    features, logits = penultimate(model, images.to(device))
                    target = self._target(features, logits)
                    self.h_max.fill_(math.log(target.shape[1]))
                    # float64: H_init is compared with H_max = log D, and their gap sets the weight's scale.
                    # The batch mean goes through _weight_entropy (sum and count, all-reduced under DDP): processes
                    # that each see a share of every batch obtain the single process's H_init (sum / n equals
                    # mean() bit for bit in one process).
                    entropy = channel_entropy(target.double(), self.tau if self.weight_uses_tau else 1.0)
                    h_t = self._push(self._weight_entropy(target.double(), entropy))
                    batches += 1
        finally:
            model.train(was_training)
        if batches == 0:
            raise ValueError("FMR statistics pass saw no batch: the training loader is empty")
        self.h_init.copy_(h_t)
        self._h_init_known = True
        # Uniform features give H_init = log D up to rounding; any gap below 1e-6 relative is "no gap".
        if self.mode == "meta" and float(self.h_max - self.h_init) <= 1e-6 * float(self.h_max):
            raise ValueError(
                f"FMR: H_init = {float(self.h_init):.6g} equals H_max = log D = {float(self.h_max):.6g}: the features "
                "are already uniform over channels, so the meta weight beta (H_max - H_t) / (H_max - H_init) is "
                "undefined. Use mode='provided' with a fixed lambda_."
            )

    # -- training -----------------------------------------------------------------------------------------------------

    def _updates_weight(self, step: TrainStep) -> bool:
        """Whether lambda_t is recomputed at this step: every step of epoch 0, then at global steps s with
        s % update_every == 1 (the official loop's ``iteration % 5 == 1``, its counter 0 at the first update)."""
        if step.epoch == 0 or step.global_step % self.update_every == 1 % self.update_every:
            return True
        return not self._lambda_set()  # a run started after epoch 0 has no weight yet

    def _h_init_set(self) -> bool:
        """Whether H_init is known (statistics pass run, or loaded); reads the buffer only until it is."""
        if not self._h_init_known:
            self._h_init_known = not bool(torch.isnan(self.h_init))
        return self._h_init_known

    def _lambda_set(self) -> bool:
        """Whether lambda_t is known; reads the buffer only until it is."""
        if not self._lambda_known:
            self._lambda_known = not bool(torch.isnan(self.lambda_t))
        return self._lambda_known

    def forward(self, step: TrainStep) -> torch.Tensor:
        target = self._target(step.features, step.logits)
        entropy = channel_entropy(target, self.tau)
        self._entropy = entropy.detach().mean()
        if self.training:
            self.h_max.fill_(math.log(target.shape[1]))  # log D from the shape: no host sync
            h_t = self._push(self._weight_entropy(target, entropy))
            if self.mode in ("meta", "dynamic") and self._updates_weight(step):
                if not self._h_init_set():
                    raise RuntimeError(f"FMR mode {self.mode!r} needs setup() (the statistics pass) before training")
                if self.mode == "meta":
                    weight = fmr_weight(h_t, self.h_init, self.h_max, self.beta)
                else:  # DYNAMICALLY_CALCULATED: the same expression with c_max given (see fmr_weight)
                    weight = fmr_weight(h_t, torch.zeros_like(self.h_max), self.h_max, self.max_coef)
                if self.lambda_max is not None:
                    weight = torch.clamp(weight, max=self.lambda_max)
                self.lambda_t.copy_(weight)
                self._lambda_known = True
        if self.mode == "static" and not self._lambda_set():
            raise RuntimeError("FMR mode 'static' needs setup() (the size of the training subset) before training")
        return -self.lambda_t.to(entropy.dtype) * entropy.mean()

    def stats(self) -> dict[str, float | torch.Tensor]:
        # New tensors (a clone, a mean), never views: the buffers change in place at the next step, and the trainer
        # reads these values only at the epoch's end. Only "meta" and "dynamic" set H_init.
        out = {"lambda": self.lambda_t.detach().clone()}
        if self._entropy is not None:
            out["entropy"] = self._entropy
        if self._filled:
            out["h_t"] = self.window[:self._filled].mean()
        if self.mode in ("meta", "dynamic") and self._h_init_set():
            out["h_init"] = self.h_init.detach().clone()
        return out


def _sync_host_state(module: nn.Module, incompatible_keys: Any) -> None:
    """After a load: FMR's host-side state from the loaded buffers (one read each, at load time)."""
    assert isinstance(module, FeatureMagnitudeRegularization)
    module._filled = min(int(module.window_count), module.window_size)
    module._h_init_known = not bool(torch.isnan(module.h_init))
    module._lambda_known = not bool(torch.isnan(module.lambda_t))
