"""Weight-space averages of state dicts: WiSE-FT's interpolation and a model soup's uniform mean.

Wortsman et al., "Robust fine-tuning of zero-shot models" (WiSE-FT), CVPR 2022, arXiv 2109.01903: the weights
(1 - alpha) * theta_start + alpha * theta_end. Wortsman et al., "Model soups: averaging weights of multiple
fine-tuned models improves accuracy without increasing inference time", ICML 2022, arXiv 2203.05482: the uniform
mean (1/n) sum_i theta_i.

Only floating-point entries are averaged. Integer and boolean entries (BatchNorm's ``num_batches_tracked``) are
counters, not weights: they are taken from one of the states as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["average_states", "check_same_layout", "interpolate_states"]


def _first(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def check_same_layout(first: Mapping[str, Tensor], other: Mapping[str, Tensor],
                      names: tuple[str, str] = ("the first state", "the other state")) -> None:
    """Raise unless two state dicts have the same keys, and each key the same shape and dtype.

    Args:
        first: A state dict.
        other: Another one.
        names: How the messages call them.

    Raises:
        ValueError: the first keys only one of them has, or the first key whose shape or dtype differs.
    """
    only_first = [k for k in first if k not in other]
    only_other = [k for k in other if k not in first]
    if only_first or only_other:
        parts = [f"only in {names[0]}: {_first(only_first)}" if only_first else "",
                 f"only in {names[1]}: {_first(only_other)}" if only_other else ""]
        raise ValueError("the state dicts have different keys; " + "; ".join(p for p in parts if p))
    for key, tensor in first.items():
        if tensor.shape != other[key].shape or tensor.dtype != other[key].dtype:
            raise ValueError(f"{key!r} is {tuple(tensor.shape)} {tensor.dtype} in {names[0]} but "
                             f"{tuple(other[key].shape)} {other[key].dtype} in {names[1]}")


def interpolate_states(start: Mapping[str, Tensor], end: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    r"""WiSE-FT's weight-space interpolation between two state dicts of one architecture.

    $$
    \theta(\alpha) = (1 - \alpha)\,\theta_{start} + \alpha\,\theta_{end}
    $$

    theta_start: the weights training started from (WiSE-FT: the zero-shot or pretrained model); theta_end: the
    fine-tuned weights; alpha in [0, 1]. Computed with `torch.lerp`; at alpha 0 and 1 the result is a copy of
    ``start`` or ``end``, bit for bit (a signed zero or a non-finite entry included).

    Args:
        start: State dict at alpha = 0.
        end: State dict at alpha = 1 (same keys, shapes and dtypes).
        alpha: Interpolation weight of ``end``.

    Returns:
        A new state dict (new tensors, on the inputs' devices): floating entries interpolated, integer and boolean
        entries (``num_batches_tracked``) copied from the nearer endpoint (``start`` for alpha < 0.5), so that both
        endpoints are reproduced exactly.

    Raises:
        ValueError: ``alpha`` outside [0, 1], or the state dicts differ in keys, shapes or dtypes.

    Example:
        >>> interpolate_states({"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([1.0, 4.0])}, 0.25)["w"]
        tensor([0.2500, 2.5000])
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:  # also refuses NaN
        raise ValueError(f"alpha must be in [0, 1] (0: the start weights, 1: the end weights), got {alpha}")
    check_same_layout(start, end, ("start", "end"))
    return {key: _mix(value, end[key], alpha) for key, value in start.items()}


def _mix(start: Tensor, end: Tensor, alpha: float) -> Tensor:
    if not start.is_floating_point():
        return (start if alpha < 0.5 else end).clone()
    if alpha in (0.0, 1.0):  # lerp's start + 0 * (end - start) turns -0.0 into 0.0 and inf into NaN
        return (end if alpha == 1.0 else start).clone()
    return torch.lerp(start, end, alpha)


def average_states(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    r"""The uniform mean of state dicts of one architecture (a uniform model soup).

    $$
    \bar\theta = \frac{1}{n} \sum_{i=1}^{n} \theta_i
    $$

    Each floating entry is summed in float64 and cast back to its dtype, so the mean of one state is that state
    bit for bit, and the order of the states changes at most the last bit.

    Args:
        states: n >= 1 state dicts with the same keys, shapes and dtypes.

    Returns:
        A new state dict (new tensors, on the first state's devices): floating entries averaged, integer and boolean
        entries (``num_batches_tracked``) copied from the first state.

    Raises:
        ValueError: no state, or states that differ in keys, shapes or dtypes.

    Example:
        >>> average_states([{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}])["w"]
        tensor([2., 4.])
    """
    if not states:
        raise ValueError("average_states needs at least one state dict")
    first = states[0]
    for i, state in enumerate(states[1:], start=1):
        check_same_layout(first, state, ("state 0", f"state {i}"))
    averaged = {}
    for key, value in first.items():
        if not value.is_floating_point():
            averaged[key] = value.clone()
            continue
        total = torch.zeros(value.shape, dtype=torch.float64, device=value.device)
        for state in states:
            total += state[key].to(device=value.device, dtype=torch.float64)
        averaged[key] = (total / len(states)).to(value.dtype)
    return averaged

