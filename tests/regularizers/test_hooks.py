"""Layer choice from ``feature_info``, forward-hook capture (removed even on error) and the (B, C, S) view."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import timm
import torch
from torch import nn

from regtune.regularizers.hooks import as_channel_maps, capture_outputs, feature_layers


def _model(name: str) -> nn.Module:
    return timm.create_model(name, pretrained=False).eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return _model("resnet18")


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return _model("test_vit")


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


class _Twice(nn.Module):
    """Calls one submodule twice and returns a tuple from another (for the capture edge cases)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.pair = _Pair()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pair(self.linear(self.linear(x)))[0]


class _Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x * 3


# -- feature_layers ---------------------------------------------------------------------------------------------------


def test_default_layers_of_a_resnet_are_its_four_stages(resnet: nn.Module) -> None:
    # feature_info of resnet18 starts with the stem ("act1"), which the last four leave out
    assert feature_layers(resnet) == ["layer1", "layer2", "layer3", "layer4"]
    assert feature_layers(resnet, last=2) == ["layer3", "layer4"]


def test_default_layers_of_a_vit_are_its_last_four_blocks(vit: nn.Module) -> None:
    depth = len(vit.blocks)
    assert depth > 4
    assert feature_layers(vit) == [f"blocks.{i}" for i in range(depth - 4, depth)]


def test_default_layers_of_an_efficientnet_follow_its_feature_info() -> None:
    model = _model("test_efficientnet")
    modules = [entry["module"] for entry in model.feature_info]
    assert len(modules) > 4
    layers = feature_layers(model)
    assert layers == modules[-4:]
    assert all(isinstance(model.get_submodule(name), nn.Module) for name in layers)


@pytest.mark.parametrize("layers, expected", [
    ([-1, 0], ["layer4", "act1"]),  # the order given, not sorted
    ([1, -2], ["layer1", "layer3"]),
    (["layer4.1.conv2"], ["layer4.1.conv2"]),
    ([2, "layer4.1.conv2"], ["layer2", "layer4.1.conv2"]),
])
def test_indices_and_names(resnet: nn.Module, layers: list, expected: list[str]) -> None:
    assert feature_layers(resnet, layers) == expected


def test_names_work_without_feature_info() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert feature_layers(model, ["1"]) == ["1"]


@pytest.mark.parametrize("layers, words", [
    ([5], "out of range"),  # resnet18 lists 5 entries: 0..4 and -5..-1
    ([-6], "out of range"),
    (["layer9"], "no submodule 'layer9'"),
    (["layer1.0.conv1.weight"], "no submodule"),  # a parameter, not a module
    ([1, "layer1"], "repeat"),
])
def test_bad_layers_raise(resnet: nn.Module, layers: list, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        feature_layers(resnet, layers)


def test_unknown_name_lists_the_feature_info_names(resnet: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"\['act1', 'layer1', 'layer2', 'layer3', 'layer4'\]"):
        feature_layers(resnet, ["layr4"])


@pytest.mark.parametrize("layers", [None, [0]])
def test_model_without_feature_info_needs_names(layers: list | None) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="Sequential has no feature_info"):
        feature_layers(model, layers)


# -- capture_outputs --------------------------------------------------------------------------------------------------


def test_resnet_stage_outputs_equal_calling_the_stages(resnet: nn.Module) -> None:
    images = torch.randn(2, 3, 64, 64)
    names = ["layer1", "layer2", "layer3", "layer4"]
    with torch.no_grad(), capture_outputs(resnet, names) as maps:
        resnet(images)
    with torch.no_grad():  # outside the block: calling the stages inside it would overwrite the captured maps
        stem = resnet.maxpool(resnet.act1(resnet.bn1(resnet.conv1(images))))
        expected = {"layer1": resnet.layer1(stem)}
        for previous, name in itertools.pairwise(names):
            expected[name] = resnet.get_submodule(name)(expected[previous])
    assert list(maps) == names
    shapes = {name: tuple(maps[name].shape) for name in names}
    assert shapes == {"layer1": (2, 64, 16, 16), "layer2": (2, 128, 8, 8), "layer3": (2, 256, 4, 4),
                      "layer4": (2, 512, 2, 2)}
    for name in names:
        torch.testing.assert_close(maps[name], expected[name])
    assert _no_hooks(resnet)


def test_vit_block_outputs_are_tokens(vit: nn.Module) -> None:
    channels, size = vit.pretrained_cfg["input_size"][0], vit.pretrained_cfg["input_size"][1:]
    images = torch.randn(2, channels, *size)
    names = feature_layers(vit)
    with torch.no_grad(), capture_outputs(vit, names) as maps:
        vit(images)
    with torch.no_grad():
        after = vit.get_submodule(names[-1])(maps[names[-2]])
    tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
    assert {tuple(maps[n].shape) for n in names} == {(2, tokens, vit.embed_dim)}
    torch.testing.assert_close(maps[names[-1]], after)
    assert _no_hooks(vit)


def test_hooks_are_removed_when_the_block_raises(resnet: nn.Module) -> None:
    with pytest.raises(KeyError, match="inside"), capture_outputs(resnet, ["layer1", "layer4"]) as maps:
        with torch.no_grad():
            resnet(torch.randn(1, 3, 32, 32))
        assert set(maps) == {"layer1", "layer4"}
        assert len(resnet.layer1._forward_hooks) == 1
        raise KeyError("inside the block")
    assert _no_hooks(resnet)


def test_hooks_are_removed_when_the_forward_raises(resnet: nn.Module) -> None:
    with pytest.raises(RuntimeError), capture_outputs(resnet, ["layer1"]), torch.no_grad():
        resnet(torch.randn(1, 1, 32, 32))  # one channel: the stem convolution expects three
    assert _no_hooks(resnet)


def test_hooks_are_removed_when_a_later_name_is_unknown(resnet: nn.Module) -> None:
    with pytest.raises(AttributeError), capture_outputs(resnet, ["layer1", "layer9"]):
        pass
    assert _no_hooks(resnet)


def test_the_callers_own_hooks_stay(resnet: nn.Module) -> None:
    seen = []
    handle = resnet.layer2.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    try:
        with torch.no_grad(), capture_outputs(resnet, ["layer2"]):
            resnet(torch.randn(1, 3, 32, 32))
        with torch.no_grad():
            resnet(torch.randn(1, 3, 32, 32))
        assert len(resnet.layer2._forward_hooks) == 1
        assert len(seen) == 2
    finally:
        handle.remove()


def test_captured_maps_keep_the_autograd_graph() -> None:
    torch.manual_seed(0)
    model = _model("resnet18")
    with capture_outputs(model, ["layer2"]) as maps:
        model(torch.randn(2, 3, 32, 32))
    assert maps["layer2"].requires_grad
    maps["layer2"].square().sum().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    # timm zero-initialises each block's last BatchNorm scale, so inside a block only that scale gets a gradient
    assert model.layer1[0].bn2.weight.grad.abs().sum() > 0
    assert model.layer3[0].conv1.weight.grad is None  # after layer2: not on the path to the captured map


def test_module_called_twice_keeps_its_last_output_and_tuples_give_their_first() -> None:
    model = _Twice()
    x = torch.randn(4, 3)
    with torch.no_grad(), capture_outputs(model, ["linear", "pair"]) as maps:
        out = model(x)
    with torch.no_grad():
        once = model.linear(x)
        twice = model.linear(once)
    torch.testing.assert_close(maps["linear"], twice)
    assert not torch.allclose(maps["linear"], once)
    torch.testing.assert_close(maps["pair"], out)
    torch.testing.assert_close(maps["pair"], 2 * twice)


# -- as_channel_maps --------------------------------------------------------------------------------------------------


def test_nchw_maps_flatten_the_positions() -> None:
    output = torch.randn(2, 3, 4, 5)
    maps = as_channel_maps(output, num_channels=3)
    assert maps.shape == (2, 3, 20)
    np.testing.assert_array_equal(maps.numpy(), output.numpy().reshape(2, 3, 20))


def test_channels_last_maps_are_permuted() -> None:
    output = torch.randn(2, 4, 5, 3)  # (B, H, W, C)
    maps = as_channel_maps(output, num_channels=3, channels_last=True)
    expected = np.transpose(output.numpy(), (0, 3, 1, 2)).reshape(2, 3, 20)
    assert maps.shape == (2, 3, 20)
    np.testing.assert_array_equal(maps.numpy(), expected)
    assert not np.array_equal(maps.numpy(), output.numpy().reshape(2, 3, 20))


def test_tokens_drop_the_prefix_and_put_channels_first() -> None:
    output = torch.randn(2, 7, 3)  # (B, N, C): one class token, six patches
    maps = as_channel_maps(output, num_channels=3, prefix_tokens=1)
    assert maps.shape == (2, 3, 6)
    np.testing.assert_array_equal(maps.numpy(), np.transpose(output.numpy()[:, 1:, :], (0, 2, 1)))


def test_vectors_become_single_position_maps() -> None:
    output = torch.randn(2, 5)
    maps = as_channel_maps(output, num_channels=5)
    assert maps.shape == (2, 5, 1)
    np.testing.assert_array_equal(maps[..., 0].numpy(), output.numpy())


@pytest.mark.parametrize("shape, kwargs", [
    ((2, 3, 4, 5), {"num_channels": 4}),
    ((2, 4, 5, 3), {"num_channels": 4, "channels_last": True}),
    ((2, 7, 3), {"num_channels": 7, "prefix_tokens": 1}),
])
def test_wrong_channel_count_raises(shape: tuple[int, ...], kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"channels, expected 4|channels, expected 7"):
        as_channel_maps(torch.zeros(shape), **kwargs)


def test_five_dimensional_output_raises() -> None:
    with pytest.raises(ValueError, match=r"cannot read channels .* \(1, 2, 3, 4, 5\)"):
        as_channel_maps(torch.zeros(1, 2, 3, 4, 5))


def test_feature_layers_checks_last_and_single_names() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    for bad in (0, 6, -1, True):
        with pytest.raises(ValueError, match="last must be between 1 and the 5"):
            feature_layers(model, None, last=bad)
    assert feature_layers(model, "layer4") == ["layer4"]  # one name, not its letters
    for bad in ("", True, 1.5):
        with pytest.raises(ValueError, match="feature_info index or a non-empty module name"):
            feature_layers(model, [bad])
