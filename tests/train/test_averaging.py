"""WiSE-FT's interpolation and the uniform soup of state dicts, against NumPy and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from regtune.train.averaging import average_states, interpolate_states

DTYPES = (torch.float32, torch.float64)
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-14}  # relative


def _state(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g).to(dtype),
            "bn.running_mean": torch.randn(4, generator=g).to(dtype),
            "bn.num_batches_tracked": torch.tensor(10 * seed + 1),
            "mask": torch.tensor([True, seed % 2 == 0])}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


@pytest.mark.parametrize("dtype", (*DTYPES, torch.bfloat16))
@pytest.mark.parametrize("alpha", (0.0, 1.0))
def test_interpolation_endpoints_are_bit_exact(dtype: torch.dtype, alpha: float) -> None:
    start, end = _state(1, dtype), _state(2, dtype)
    # a signed zero and an infinity: lerp's arithmetic would change them (start + 0 * (end - start))
    start["bn.running_mean"][:2] = torch.tensor([-0.0, float("inf")])
    end["bn.running_mean"][:2] = torch.tensor([-0.0, float("-inf")])
    mixed = interpolate_states(start, end, alpha)
    expected = end if alpha == 1.0 else start
    for key in ("conv.weight", "bn.running_mean"):
        assert _bits_equal(mixed[key].view(torch.int16) if dtype == torch.bfloat16 else mixed[key],
                           expected[key].view(torch.int16) if dtype == torch.bfloat16 else expected[key]), key
        assert mixed[key].data_ptr() != expected[key].data_ptr()  # a copy, not the caller's tensor
    assert mixed["bn.num_batches_tracked"] == expected["bn.num_batches_tracked"]  # counters: the nearer endpoint's


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", (0.25, 0.5, 0.7))
def test_interpolation_matches_numpy(dtype: torch.dtype, alpha: float) -> None:
    start, end = _state(3, dtype), _state(4, dtype)
    mixed = interpolate_states(start, end, alpha)
    for key in ("conv.weight", "bn.running_mean"):
        reference = (1 - alpha) * start[key].double().numpy() + alpha * end[key].double().numpy()
        np.testing.assert_allclose(mixed[key].double().numpy(), reference, rtol=TOLERANCE[dtype], atol=1e-7)
        assert mixed[key].dtype == dtype
    nearer = start if alpha < 0.5 else end
    assert mixed["bn.num_batches_tracked"] == nearer["bn.num_batches_tracked"]
    assert mixed["mask"].tolist() == nearer["mask"].tolist()


def test_interpolation_by_hand() -> None:
    # (1 - 0.3) * [0, 10] + 0.3 * [10, -10] = [0 + 3, 7 - 3] = [3, 4]
    mixed = interpolate_states({"w": torch.tensor([0.0, 10.0], dtype=torch.float64)},
                               {"w": torch.tensor([10.0, -10.0], dtype=torch.float64)}, 0.3)
    assert mixed["w"].tolist() == pytest.approx([3.0, 4.0], abs=1e-12)


@pytest.mark.parametrize("alpha", (-0.1, 1.5, float("nan")))
def test_interpolation_refuses_alpha_outside_the_unit_interval(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        interpolate_states(_state(0), _state(1), alpha)


def test_mismatched_states_name_the_keys() -> None:
    start, end = _state(0), _state(1)
    del end["mask"]
    end["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"only in start: 'mask'; only in end: 'extra.weight'"):
        interpolate_states(start, end, 0.5)
    end = _state(1)
    end["conv.weight"] = torch.zeros(4, 3, 1, 1)
    with pytest.raises(ValueError, match=r"'conv.weight' is \(4, 3, 3, 3\) .* in start but \(4, 3, 1, 1\)"):
        interpolate_states(start, end, 0.5)
    with pytest.raises(ValueError, match=r"'conv.weight' is .* in state 0 but .* in state 2"):
        average_states([start, _state(2), end])
    end = _state(1, torch.float64)
    with pytest.raises(ValueError, match=r"float32 in start but \(4, 3, 3, 3\) torch.float64 in end"):
        interpolate_states(start, end, 0.5)


@pytest.mark.parametrize("dtype", (*DTYPES, torch.bfloat16))
def test_the_average_of_one_state_is_that_state(dtype: torch.dtype) -> None:
    state = _state(5, dtype)
    averaged = average_states([state])
    for key, value in state.items():
        a, b = (averaged[key].view(torch.int16), value.view(torch.int16)) if dtype == torch.bfloat16 and \
            value.is_floating_point() else (averaged[key], value)
        assert _bits_equal(a, b), key
        assert averaged[key].data_ptr() != value.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES)
def test_average_of_states_matches_numpy(dtype: torch.dtype) -> None:
    states = [_state(6, dtype), _state(7, dtype), _state(8, dtype)]
    for n in (2, 3):
        averaged = average_states(states[:n])
        for key in ("conv.weight", "bn.running_mean"):
            reference = np.mean([s[key].double().numpy() for s in states[:n]], axis=0)
            np.testing.assert_allclose(averaged[key].double().numpy(), reference, rtol=TOLERANCE[dtype], atol=1e-7)
            assert averaged[key].dtype == dtype
        assert averaged["bn.num_batches_tracked"].item() == 61  # counters: the first state's
        assert averaged["mask"].tolist() == [True, True]


def test_average_by_hand_and_of_a_real_module() -> None:
    # (1 + 2 + 6) / 3 = 3, (0 - 3 + 0) / 3 = -1
    averaged = average_states([{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([2.0, -3.0])},
                               {"w": torch.tensor([6.0, 0.0])}])
    assert averaged["w"].tolist() == [3.0, -1.0]
    nets = [nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)) for _ in range(2)]
    nets[1][1].num_batches_tracked += 5
    soup = average_states([net.state_dict() for net in nets])
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model.load_state_dict(soup, strict=True)
    assert torch.equal(model[0].weight, (nets[0][0].weight + nets[1][0].weight).detach() / 2)
    assert model[1].num_batches_tracked.item() == 0


def test_average_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one state dict"):
        average_states([])
