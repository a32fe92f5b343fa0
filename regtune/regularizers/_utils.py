"""Private helpers shared by the regularizer modules (pure torch)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn

from regtune._dist import rank_and_world as _rank_and_world

# -- argument and input checks (the messages name what was received and what was expected) ---------------------------


def check_positive(name: str, value: float, allow_zero: bool = True) -> None:
    """Raise ValueError unless ``value`` is >= 0 (or > 0)."""
    if value < 0 or (not allow_zero and value == 0):
        raise ValueError(f"{name} must be {'>=' if allow_zero else '>'} 0, got {value}")


def check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``valid`` (an option string)."""
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}, got {value!r}")


def check_float_tensor(name: str, tensor: torch.Tensor) -> None:
    """Raise TypeError unless ``tensor`` is a floating-point tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}")


def check_float_matrix(name: str, tensor: torch.Tensor, expected: str) -> None:
    """Raise unless ``tensor`` is a 2-D floating-point tensor; ``expected`` names its shape, e.g. ``"(B, D)"``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape {expected}, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}; cast it with .float()")


def check_matching_matrices(names: tuple[str, str], first: torch.Tensor, second: torch.Tensor,
                            expected: str) -> None:
    """`check_float_matrix` of both, and raise ValueError unless their shapes are equal."""
    check_float_matrix(names[0], first, expected)
    check_float_matrix(names[1], second, expected)
    if first.shape != second.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape {expected}, got {tuple(first.shape)} "
                         f"and {tuple(second.shape)}")


_LABELS_VERIFIED: contextvars.ContextVar[int | None] = contextvars.ContextVar("regtune_labels_verified", default=None)


@contextlib.contextmanager
def labels_verified(classes: int) -> Iterator[None]:
    """Within the block, `check_labels` trusts that device labels lie in ``[0, classes)``.

    For a caller that has checked them where reading them is free: the trainer checks each batch's labels on the CPU
    before the batch goes to the GPU, so the terms do not read their minimum and maximum back from the GPU (a host
    wait at every step). Shapes and dtypes are still checked; labels on the CPU, or scores with another number of
    classes, are still range-checked.
    """
    token = _LABELS_VERIFIED.set(classes)
    try:
        yield
    finally:
        _LABELS_VERIFIED.reset(token)


def check_labels(labels: torch.Tensor, batch: int, classes: int, scores_name: str) -> None:
    """Raise unless ``labels`` are ``batch`` integer class indices in ``[0, classes)`` (the range is trusted inside
    `labels_verified` for device labels)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of shape (B,), got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"labels must have shape (B,) = ({batch},) to match {scores_name}, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
    # Checked here because an out-of-range index in gather/one_hot is a device-side assert on CUDA (unrecoverable).
    if batch > 0 and not (labels.device.type != "cpu" and _LABELS_VERIFIED.get() == classes):
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= classes:
            raise ValueError(
                f"labels must lie in [0, {classes - 1}] for {classes} classes, got values in [{low}, {high}]"
            )


def check_soft_targets(targets: torch.Tensor, batch: int, classes: int, scores_name: str) -> None:
    """Raise unless ``targets`` are ``batch`` floating rows over ``classes`` classes (soft targets of a mixed batch).

    Their rows are not checked to sum to 1: that would wait for the device at every step.
    """
    check_float_matrix("targets", targets, "(B, C)")
    if tuple(targets.shape) != (batch, classes):
        raise ValueError(f"targets must have shape (B, C) = ({batch}, {classes}) to match {scores_name}, got "
                         f"{tuple(targets.shape)}")


def check_at_least_two_classes(cos: torch.Tensor, what: str) -> None:
    """Raise ValueError unless the (B, C) scores have C >= 2 (a non-target class must exist)."""
    if cos.shape[1] < 2:
        raise ValueError(f"{what} needs at least 2 classes (a non-target class must exist), got C = {cos.shape[1]}")


# -- small tensor helpers ---------------------------------------------------------------------------------------------


def normalize_rows(matrix: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows divided by max(||row||_2, eps)."""
    # x / max(||x||, eps): a zero row stays zero (cosine 0 with everything) instead of producing NaN.
    return matrix / torch.linalg.vector_norm(matrix, dim=1, keepdim=True).clamp_min(eps)


def off_diagonal(square: torch.Tensor) -> torch.Tensor:
    """The C(C-1) off-diagonal entries of a (C, C) matrix, row-major, as a 1-D tensor (empty for C = 1)."""
    mask = ~torch.eye(square.shape[0], dtype=torch.bool, device=square.device)
    return square[mask]


def without_target(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``scores`` with each row's target entry set to -inf (out of place), so max/logsumexp skip it."""
    target = torch.nn.functional.one_hot(labels, num_classes=scores.shape[1]).bool()
    return scores.masked_fill(target, float("-inf"))


# -- models and processes ---------------------------------------------------------------------------------------------


def classifier_of(model: nn.Module) -> nn.Module:
    """The model's final classifier (timm's ``get_classifier()``), which must have a ``weight`` (C, D)."""
    getter = getattr(model, "get_classifier", None)
    if getter is None:
        raise TypeError(f"{type(model).__name__} has no get_classifier(); head penalties and margins need a timm-style "
                        "model whose classifier is a Linear layer")
    head = getter()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"the classifier {type(head).__name__} has no (C, D) weight matrix")
    return head


def replace_classifier(model: nn.Module, new_head: nn.Module) -> None:
    """Install ``new_head`` where the model's classifier is (timm's ``pretrained_cfg["classifier"]`` path)."""
    path = getattr(model, "pretrained_cfg", {}).get("classifier")
    if not path:
        raise TypeError(f"{type(model).__name__} does not name its classifier (pretrained_cfg['classifier'])")
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if not isinstance(getattr(parent, name, None), nn.Module):
        raise TypeError(f"{type(model).__name__}.{path} is not a module")
    setattr(parent, name, new_head)
    if classifier_of(model) is not new_head:
        raise TypeError(f"replacing {path} did not change what get_classifier() returns for {type(model).__name__}")


def penultimate(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, logits)`` of a timm-style model: ``forward_head(forward_features(x), pre_logits=True)``."""
    feature_map = model.forward_features(images)
    features = model.forward_head(feature_map, pre_logits=True)
    return features, classifier_of(model)(features)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the processes of a running ``torch.distributed`` group, in place; as is otherwise.

    Statistics that the papers define over the data (AdaRand's class means of a batch, FMR's batch entropy) are
    reduced as sums and counts, never as means, so that a run on several processes computes what one process would
    on the whole batch.
    """
    if _rank_and_world()[1] > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def shard_positions(count: int) -> torch.Tensor:
    """Positions in the whole data of this process's ``count`` set-up items.

    The trainer's set-up loaders (`regtune.train.datamodule.Shard`) give process ``r`` of ``w`` the items
    ``r, r + w, r + 2w, ...``; in one process, ``0 .. count - 1``.
    """
    rank, world = _rank_and_world()
    return rank + world * torch.arange(count)


def gather_shards(local: torch.Tensor, total: int) -> torch.Tensor:
    """Every process's rows of a set-up pass, put back in the order of the whole data (``total`` rows).

    The inverse of the set-up sharding (see `shard_positions`): for per-item results that every process
    needs whole (LwF's cached teacher outputs, DELTA's probe features). As is in one process.
    """
    rank, world = _rank_and_world()
    if world == 1:
        if local.shape[0] != total:
            raise ValueError(f"the set-up pass gave {local.shape[0]} rows for {total} items")
        return local
    sizes = [len(range(r, total, world)) for r in range(world)]
    if local.shape[0] != sizes[rank]:
        raise ValueError(f"process {rank} has {local.shape[0]} rows, its share of {total} items is {sizes[rank]}")
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded.contiguous())
    out = local.new_empty((total, *local.shape[1:]))
    for r, part in enumerate(gathered):
        out[r::world] = part[: sizes[r]]
    return out


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


class LazyShapeMixin:
    """Lets a module load tensors whose shape is only known after ``setup`` (e.g. (C, D) class statistics).

    A regularizer built fresh for a resumed run holds empty placeholders; loading the checkpoint resizes each own
    buffer / parameter to the saved shape first, then loads the values as usual (strictly).
    """

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for table in (self._parameters, self._buffers):
            for name, tensor in list(table.items()):
                saved = state_dict.get(prefix + name)
                if tensor is not None and saved is not None and saved.shape != tensor.shape:
                    resized = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = resized
                    else:
                        table[name] = resized
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
