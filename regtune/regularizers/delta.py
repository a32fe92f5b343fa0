"""DELTA: feature-map behavioural regularization against the frozen pretrained network.

Li, Xiong, Wang, Rao, Liu, Chen, Huan, "DELTA: Deep Learning Transfer using Feature Map with Attention for
Convolutional Networks", ICLR 2019, arXiv 1901.09229.

User documentation: docs/methods/delta.md.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from regtune.regularizers._utils import (
    LazyShapeMixin,
    all_reduce_sum,
    check_choice,
    check_float_tensor,
    check_positive,
    gather_shards,
    model_device,
    shard_positions,
)
from regtune.regularizers.base import Regularizer, TrainStep, register_regularizer
from regtune.regularizers.hooks import as_channel_maps, capture_outputs, feature_layers
from regtune.regularizers.l2sp import l2_penalty, split_backbone_head

__all__ = ["DELTA", "channel_attention", "delta_penalty", "layer_loss_increase"]

_log = logging.getLogger(__name__)
_ATTENTION = ("ablation", "uniform", "none")


_DELTA_BATCH_REDUCTIONS = ("sum", "mean")


def delta_penalty(maps: torch.Tensor, source_maps: torch.Tensor, attention: torch.Tensor | None = None,
                  normalize: bool = True, batch_reduction: str = "sum") -> torch.Tensor:
    r"""Behavioural distance of one layer's feature maps to the frozen source network's (DELTA).

    Li, Xiong, Wang, Rao, Liu, Chen, Huan, "DELTA: Deep Learning Transfer using Feature Map with Attention for
    Convolutional Networks", ICLR 2019, arXiv 1901.09229.

    $$
    \Omega_j = \tfrac12 \sum_b \sum_{c=1}^{C} C\,a_c\,\frac{\lVert FM(x_b)_c - FM^0(x_b)_c \rVert_2^2}{S}
    $$

    with S = H W spatial positions (or tokens) and a the channel attention (uniform a_c = 1/C when ``None``, which
    makes the term the per-position mean squared distance summed over channels). ``normalize=False`` is TLlib's
    unweighted ``feature_map`` variant, 1/2 sum_b ||FM(x_b) - FM0(x_b)||^2 (no attention, no division by S).

    Args:
        maps: Feature maps of the network being trained, as ``(B, C, S)`` (see
            `regtune.regularizers.hooks.as_channel_maps`).
        source_maps: The frozen source network's maps of the same images (detached here).
        attention: Channel attention a (non-negative, summing to 1), or ``None``.
        normalize: Weight by C a_c and divide by S (DELTA); ``False`` gives the plain squared distance.
        batch_reduction: ``"sum"`` over the batch (TLlib: the term grows with the batch size) or ``"mean"``.

    Shape:
        maps, source_maps: (B, C, S). attention: (C,). Output: scalar.

    Returns:
        The 0-dim penalty of this layer.

    Example:
        >>> fm, fm0 = torch.ones(1, 2, 4), torch.zeros(1, 2, 4)  # every position differs by 1 in both channels
        >>> delta_penalty(fm, fm0).item()  # 1/2 * (1 + 1)
        1.0
    """
    check_choice("batch_reduction", batch_reduction, _DELTA_BATCH_REDUCTIONS)
    check_float_tensor("maps", maps)
    if maps.dim() != 3 or maps.shape != source_maps.shape:
        raise ValueError(f"maps and source_maps must both be (B, C, S), got {tuple(maps.shape)} and "
                         f"{tuple(source_maps.shape)}")
    squared = (maps - source_maps.detach()).pow(2).sum(-1)  # (B, C)
    if normalize:
        channels, positions = maps.shape[1], maps.shape[2]
        if attention is None:
            weights = squared.new_full((channels,), 1.0 / channels)
        else:
            if attention.shape != (channels,):
                raise ValueError(f"attention must have shape ({channels},), got {tuple(attention.shape)}")
            weights = attention.to(squared.dtype)
        squared = squared * (channels * weights) / positions
    elif attention is not None:
        raise ValueError("attention needs normalize=True (TLlib's unweighted feature_map variant has none)")
    per_sample = 0.5 * squared.sum(-1)
    return per_sample.sum() if batch_reduction == "sum" else per_sample.mean()


def channel_attention(loss_increase: torch.Tensor, temperature: float = 5.0) -> torch.Tensor:
    r"""DELTA's channel attention from the loss increase when each channel is zeroed.

    $$
    a = \mathrm{softmax}\!\left(\frac{z}{T}\right), \qquad z_c = \frac{\Delta_c - \mathrm{mean}(\Delta)}
    {\mathrm{std}(\Delta)}
    $$

    with the population standard deviation (numpy's ``std``, as TLlib). A layer whose channels all give the same
    increase (std 0) gets uniform attention.

    Args:
        loss_increase: Delta_c, mean increase of the loss when channel c is zeroed.
        temperature: T (5 in TLlib).

    Shape:
        loss_increase: (C,). Output: (C,), summing to 1.
    """
    check_float_tensor("loss_increase", loss_increase)
    if loss_increase.dim() != 1 or loss_increase.numel() == 0:
        raise ValueError(f"loss_increase must be a non-empty vector, got shape {tuple(loss_increase.shape)}")
    std = loss_increase.std(unbiased=False)
    if not std > 0:
        return torch.full_like(loss_increase, 1.0 / loss_increase.numel())
    z = (loss_increase - loss_increase.mean()) / std
    return torch.softmax(z / temperature, dim=0)


def _layer_format(model: nn.Module) -> dict[str, Any]:
    return {"prefix_tokens": int(getattr(model, "num_prefix_tokens", 0) or 0),
            "channels_last": str(getattr(model, "output_fmt", "NCHW")).upper() == "NHWC"}


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    # Squared distances summed over positions and a batch lose too much in half precision.
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _zero_channels(output: torch.Tensor, channels: Sequence[int], fmt: dict[str, Any]) -> torch.Tensor:
    """``len(channels)`` copies of ``output`` stacked along the batch, copy i with channel ``channels[i]`` zeroed."""
    copies = output.repeat(len(channels), *([1] * (output.dim() - 1)))
    batch = output.shape[0]
    channel_dim = 1 if output.dim() == 4 and not fmt["channels_last"] else output.dim() - 1
    mask = torch.ones(len(channels), output.shape[channel_dim], dtype=output.dtype, device=output.device)
    mask[torch.arange(len(channels)), torch.as_tensor(list(channels))] = 0
    mask = mask.repeat_interleave(batch, dim=0)  # (k * B, C)
    shape = [mask.shape[0]] + [1] * (output.dim() - 1)
    shape[channel_dim] = mask.shape[1]
    if output.dim() == 3 and fmt["prefix_tokens"]:
        # zero the channel in the patch tokens only
        token_mask = torch.ones_like(copies)
        token_mask[:, fmt["prefix_tokens"]:, :] = mask.reshape(shape)
        return copies * token_mask
    return copies * mask.reshape(shape)


@torch.no_grad()
def layer_loss_increase(model: nn.Module, head: nn.Module, layer: str, images: torch.Tensor, labels: torch.Tensor,
                        chunk: int = 16) -> torch.Tensor:
    """Mean increase of the cross-entropy when each channel of ``layer``'s output is zeroed (DELTA's attention).

    The layer runs once; a forward hook replaces its output by ``chunk`` copies of the batch, each with one channel
    zeroed, so only the layers after it run ``chunk`` times (the stage outputs of timm CNNs and ViT blocks feed the
    next stage only). ``chunk=1`` is the plain one-channel-per-forward evaluation.

    Args:
        model: The network in eval mode (``forward_features`` / ``forward_head(pre_logits=True)``).
        head: Classifier on the pre-logits features.
        layer: Module name whose output channels are zeroed.
        images: A batch of images.
        labels: Their classes.
        chunk: Channels zeroed per forward pass.

    Returns:
        (C,) mean loss increase per channel over the batch.
    """
    fmt = _layer_format(model)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = head(model.forward_head(model.forward_features(x), pre_logits=True))
        return nn.functional.cross_entropy(logits.float(), y, reduction="none")

    base = loss(images, labels).mean()
    with capture_outputs(model, [layer]) as maps:
        model.forward_features(images)
    channels = as_channel_maps(maps[layer], **fmt).shape[1]
    increase = torch.zeros(channels, dtype=torch.float64)
    batch = images.shape[0]
    for start in range(0, channels, chunk):
        selected = list(range(start, min(start + chunk, channels)))

        # The hook is registered and removed within this iteration: binding this iteration's channels is exact.
        def ablate(module: nn.Module, args: Any, output: torch.Tensor, selected: list[int] = selected) -> torch.Tensor:
            return _zero_channels(output, selected, fmt)

        handle = model.get_submodule(layer).register_forward_hook(ablate)
        try:
            losses = loss(images, labels.repeat(len(selected)))
        finally:
            handle.remove()
        if losses.shape[0] != batch * len(selected):
            raise RuntimeError(f"zeroing channels of {layer!r} in a batch of {len(selected)} copies changed the "
                               "batch size further on; this architecture reuses earlier outputs, use "
                               "attention_chunk=1")
        increase[start:start + len(selected)] = (losses.reshape(len(selected), batch).mean(1) - base).double().cpu()
    return increase


@register_regularizer("delta")
class DELTA(LazyShapeMixin, Regularizer):
    """DELTA: attention-weighted distance of intermediate feature maps to the frozen pretrained network's.

    L = alpha * sum_j `delta_penalty` (FM_j, FM0_j, a_j) + beta * `l2_penalty`
    (head weights). FM_j are the outputs of the layers chosen from the model's own ``feature_info`` (default: its last
    four entries, e.g. ``layer1..4`` of a ResNet, ``blocks.1, 2, 4, 6`` of EfficientNet-Lite0, the last four blocks of a
    ViT with the class / register tokens dropped); FM0_j the same layers of a frozen eval-mode copy of the pretrained
    network, run on the same batch every step (no gradient, kept out of the optimizer and of DDP's gradient sync, its
    BatchNorm never updated). The copy is made by `adapt_model` and saved in checkpoints.

    Channel attention a_j (``attention="ablation"``, computed once by `setup`): a linear probe on the frozen
    pretrained features of the training subset (L-BFGS, ``probe_steps``); then for the first ``attention_samples``
    training images, each channel of each layer is zeroed in turn and the increase of the probe's cross-entropy is
    recorded; a = softmax(zscore(increase) / 5) per layer.

    Deviations from TLlib, all documented choices:

    - TLlib trains a whole classifier for 10 epochs before the ablation, with a line meant to freeze the backbone
      that freezes nothing; the authors' code trains the last layer alone on the frozen backbone. regtune trains the
      probe on frozen features, as the authors do, at a small fraction of the cost (docs/methods/delta.md,
      'Readings we chose').
    - TLlib zeroes the output of the last convolution of each ResNet stage (before its BatchNorm and residual);
      regtune zeroes the stage output named by ``feature_info``, which exists for any timm CNN or ViT. For TLlib's
      exact layers pass their names, e.g. ``layers=["layer1.2.conv3", "layer2.3.conv3", "layer3.5.conv3",
      "layer4.2.conv3"]`` on ResNet-50.
    - ``attention="uniform"`` sets a = 1/C (the per-position mean squared distance); ``"none"`` is TLlib's
      ``feature_map`` variant, 1/2 ||FM - FM0||^2 without the C a_c / S weighting (its scale is ~S times larger).

    Args:
        alpha: Weight of the feature-map term (TLlib 0.01).
        beta: Weight of the head's L2 term (TLlib 0.01; 0 disables it).
        layers: ``feature_info`` indices or module names (see `regtune.regularizers.hooks.feature_layers`);
            ``None`` takes the last ``num_layers`` entries.
        num_layers: How many of the deepest ``feature_info`` entries ``layers=None`` takes.
        attention: ``"ablation"`` (DELTA), ``"uniform"`` or ``"none"``.
        attention_file: Load the attention from this file (``torch.save`` of the ``attention`` artifact of an
            earlier run on the same backbone and data) instead of computing it.
        attention_samples: Training images used by the ablation (TLlib: 10 batches of 32).
        attention_chunk: Channels zeroed per forward pass in the ablation (1 = one forward per channel).
        probe_steps: L-BFGS iterations of the attention probe.
        batch_reduction: ``"sum"`` over the batch (TLlib; the term scales with the batch size) or ``"mean"``.

    Shape:
        ``step.images`` (B, ...), ``step.feature_maps[layer]`` -> scalar.
    """

    needs_setup_pass = True
    gradient_reaches = "model"
    # Per step it compares the maps of the batch the model saw (mixed or not) with the source network's on the same
    # images; the labels only serve the set-up pass, on the unmixed training subset.
    accepts_soft_targets = True
    contract_kwargs = (
        {"num_layers": 1, "attention_samples": 6, "attention_chunk": 3},
        {"num_layers": 2, "attention": "uniform", "batch_reduction": "mean"},
        {"layers": [-1], "attention": "none"},
    )

    def __init__(self, alpha: float = 0.01, beta: float = 0.01, layers: Sequence[int | str] | None = None,
                 num_layers: int = 4, attention: str = "ablation", attention_file: str | None = None,
                 attention_samples: int = 320, attention_chunk: int = 16, probe_steps: int = 100,
                 batch_reduction: str = "sum") -> None:
        super().__init__()
        check_positive("alpha", alpha)
        check_positive("beta", beta)
        check_choice("attention", attention, _ATTENTION)
        check_choice("batch_reduction", batch_reduction, _DELTA_BATCH_REDUCTIONS)
        check_positive("num_layers", num_layers, allow_zero=False)
        check_positive("attention_samples", attention_samples, allow_zero=False)
        check_positive("attention_chunk", attention_chunk, allow_zero=False)
        self.alpha = alpha
        self.beta = beta
        self.layers = None if layers is None else list(layers)
        self.num_layers = int(num_layers)
        self.attention = attention
        self.attention_file = attention_file
        self.attention_samples = int(attention_samples)
        self.attention_chunk = int(attention_chunk)
        self.probe_steps = int(probe_steps)
        self.batch_reduction = batch_reduction
        self.needs_setup_pass = attention == "ablation" and attention_file is None
        self.source: nn.Module | None = None
        self.register_buffer("attention_weights", torch.zeros(0))  # concatenated a_j; (sum_j C_j,) after setup
        self.register_buffer("attention_sizes", torch.zeros(0, dtype=torch.long))  # C_j
        self._head: list[nn.Parameter] = []
        self._sizes: list[int] | None = None  # attention_sizes as Python ints, read once (no per-step host sync)
        self._fmt: dict[str, Any] = {"prefix_tokens": 0, "channels_last": False}
        self._last: dict[str, torch.Tensor] = {}

    # -- set-up -----------------------------------------------------------------------------------------------------

    def adapt_model(self, model: nn.Module) -> None:
        self.needs_feature_maps = tuple(feature_layers(model, self.layers, last=self.num_layers))
        self._fmt = _layer_format(model)
        _, self._head = split_backbone_head(model)
        source = copy.deepcopy(model)
        source.requires_grad_(False)
        source.eval()
        self.source = source

    def train(self, mode: bool = True) -> DELTA:
        super().train(mode)
        if self.source is not None:
            self.source.eval()  # the frozen network never leaves eval mode (its BatchNorm statistics stay put)
        return self

    def setup(self, model: nn.Module, loader: Iterable[Any] | None) -> None:
        if self.source is None:
            raise RuntimeError("DELTA.adapt_model(model) must run before setup (the trainer does it)")
        if self.attention == "none" or self.attention == "uniform":
            return
        if self.attention_file is not None:
            weights = torch.load(self.attention_file, map_location="cpu", weights_only=True)
            self._set_attention(weights["attention_weights"], weights["attention_sizes"])
            return
        if loader is None:
            raise ValueError("DELTA's channel attention needs the training loader")
        self._set_attention(*self._ablation_attention(loader))

    def _set_attention(self, weights: torch.Tensor, sizes: torch.Tensor) -> None:
        if len(sizes) != len(self.needs_feature_maps) or int(sizes.sum()) != weights.numel():
            raise ValueError(f"attention for {len(sizes)} layers of {sizes.tolist()} channels does not match the "
                             f"{len(self.needs_feature_maps)} layers {list(self.needs_feature_maps)}")
        device = self.attention_weights.device
        self.attention_weights = weights.detach().to(device=device, dtype=self.attention_weights.dtype)
        self.attention_sizes = sizes.detach().to(device=device, dtype=torch.long)
        self._sizes = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._sizes = None  # a checkpoint may bring other layer sizes
        super()._load_from_state_dict(*args, **kwargs)

    def _ablation_attention(self, loader: Iterable[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        # Under DDP each process holds a share of the set-up pass (items rank, rank + world, ...): the probe is
        # trained on every process's features gathered back into the data's order (the same probe everywhere), and
        # the loss increases over the first ``attention_samples`` items of the data are summed across processes.
        assert self.source is not None
        device = model_device(self.source)
        features, labels, kept_images, kept_labels, seen = [], [], [], [], 0
        one_image = None  # for the channel counts
        with torch.no_grad():
            for images, targets, *_ in loader:
                images, targets = images.to(device), targets.to(device)
                one_image = images[:1]
                features.append(self.source.forward_head(self.source.forward_features(images), pre_logits=True))
                labels.append(targets)
                keep = shard_positions(seen + len(targets))[seen:] < self.attention_samples
                seen += len(targets)
                if keep.any():
                    kept_images.append(images[keep.to(device)])
                    kept_labels.append(targets[keep.to(device)])
        local_feats, local_targets = torch.cat(features), torch.cat(labels)
        total = len(loader.dataset) if hasattr(loader, "dataset") else local_feats.shape[0]
        probe = self._train_probe(gather_shards(local_feats, total), gather_shards(local_targets, total))
        samples = min(self.attention_samples, total)
        images = torch.cat(kept_images) if kept_images else local_feats.new_zeros(0)
        targets = torch.cat(kept_labels) if kept_labels else local_targets[:0]
        weights, sizes = [], []
        for name in self.needs_feature_maps:
            increase = torch.zeros(0, dtype=torch.float64)
            for start in range(0, images.shape[0], 32):
                part = layer_loss_increase(self.source, probe, name, images[start:start + 32],
                                           targets[start:start + 32], chunk=self.attention_chunk)
                n = min(32, images.shape[0] - start)
                increase = part * n if increase.numel() == 0 else increase + part * n
            # every process needs the channel count to join the sum, also one that kept no item
            increase = all_reduce_sum(self._channels_like(name, increase, one_image).to(device)).cpu()
            weights.append(channel_attention(increase / samples))
            sizes.append(len(increase))
            _log.info("DELTA attention of %s: %d channels, max weight %.4f (uniform %.4f)", name, sizes[-1],
                      float(weights[-1].max()), 1.0 / sizes[-1])
        return torch.cat(weights), torch.tensor(sizes)

    def _channels_like(self, name: str, increase: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        """``increase``, or zeros of ``name``'s channel count where this process kept no attention sample."""
        if increase.numel():
            return increase
        assert self.source is not None
        if image is None:
            raise ValueError("DELTA's attention: this process got no set-up image (fewer training images than "
                             "processes); train on more images or with fewer processes")
        with torch.no_grad(), capture_outputs(self.source, [name]) as maps:
            self.source.forward_features(image)
        return torch.zeros(as_channel_maps(maps[name], **_layer_format(self.source)).shape[1], dtype=torch.float64)

    def _train_probe(self, features: torch.Tensor, labels: torch.Tensor) -> nn.Module:
        classes = int(labels.max()) + 1
        probe = nn.Linear(features.shape[1], classes).to(device=features.device, dtype=features.dtype)
        nn.init.zeros_(probe.weight)
        nn.init.zeros_(probe.bias)
        optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=self.probe_steps,
                                      line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(probe(features), labels) + 1e-4 * probe.weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        return probe.requires_grad_(False).eval()

    def artifacts(self) -> dict[str, torch.Tensor]:
        if self.attention_weights.numel() == 0:
            return {}
        return {"attention_weights": self.attention_weights.cpu(), "attention_sizes": self.attention_sizes.cpu()}

    # -- per step ---------------------------------------------------------------------------------------------------

    def _layer_attention(self) -> list[torch.Tensor | None]:
        if self.attention != "ablation":
            return [None] * len(self.needs_feature_maps)
        if self.attention_weights.numel() == 0:
            raise RuntimeError("DELTA's attention is not computed: call setup(model, loader) before training")
        if self._sizes is None:
            self._sizes = self.attention_sizes.tolist()
        return list(torch.split(self.attention_weights, self._sizes))

    def forward(self, step: TrainStep) -> torch.Tensor:
        if self.source is None:
            raise RuntimeError("DELTA.adapt_model(model) must run before the first forward (the trainer does it)")
        if step.images is None:
            raise ValueError("DELTA needs step.images to run the frozen source network")
        missing = [n for n in self.needs_feature_maps if n not in step.feature_maps]
        if missing:
            raise ValueError(f"DELTA needs the outputs of {missing} in step.feature_maps (capture them with "
                             "regtune.regularizers.capture_outputs(model, term.needs_feature_maps))")
        with torch.no_grad(), capture_outputs(self.source, self.needs_feature_maps) as source_maps:
            self.source.forward_features(step.images)
        total = step.features.new_zeros(())
        for name, attention in zip(self.needs_feature_maps, self._layer_attention()):
            maps = as_channel_maps(step.feature_maps[name], **self._fmt)
            reference = as_channel_maps(source_maps[name], **self._fmt)
            total = total + delta_penalty(_at_least_float32(maps), _at_least_float32(reference), attention,
                                          normalize=self.attention != "none",
                                          batch_reduction=self.batch_reduction).to(total.dtype)
        head = l2_penalty(self._head).to(total.dtype) if self.beta > 0 and self._head else total.new_zeros(())
        self._last = {"feature_maps": total.detach(), "head": head.detach()}
        return self.alpha * total + self.beta * head

    def stats(self) -> dict[str, float | torch.Tensor]:
        return dict(self._last)  # detached results of this step's forward, on its device
