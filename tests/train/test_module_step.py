"""The module's public step API: forward_step records a batch, loss_terms evaluates the terms, total_loss sums them."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from regtune.regularizers import DELTA, CrossEntropy, create_regularizer
from regtune.train.config import OptimConfig
from regtune.train.module import FineTuner
from tests.conftest import TINY_BACKBONE

CLASSES = 3


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return images, torch.tensor([0, 1, 2, 0])


def _cross_entropy_np(logits: np.ndarray, labels: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_softmax[np.arange(len(labels)), labels].mean())


def test_loss_terms_on_a_recorded_step_against_numpy() -> None:
    model = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=CLASSES)
    module = FineTuner(model, CrossEntropy(), [create_regularizer("head_l2", weight=0.1)], OptimConfig(), CLASSES)
    module.eval()  # batch statistics aside, the same batch gives the same logits twice
    images, labels = _batch()
    record = module.forward_step(images, labels, step=7, epoch=2, total_steps=100)
    assert (record.global_step, record.epoch, record.total_steps) == (7, 2, 100)
    assert record.logits.shape == (4, CLASSES) and set(record.feature_maps) == {"last"}
    terms = module.loss_terms(record)
    assert list(terms) == ["ce", "head_l2"]  # the criterion first, under the names they are logged as
    values = {k: float(v.detach()) for k, v in terms.items()}
    logits = record.logits.detach().double().numpy()
    weight = model.get_classifier().weight.detach().double().numpy()
    assert values["ce"] == pytest.approx(_cross_entropy_np(logits, labels.numpy()), rel=1e-5)
    assert values["head_l2"] == pytest.approx(0.1 * float((weight ** 2).sum()), rel=1e-5)  # lambda sum w^2
    total = module.total_loss(terms)
    assert total.dtype == torch.float32 and total.requires_grad
    assert float(total.detach()) == pytest.approx(values["ce"] + values["head_l2"], rel=1e-6)
    # compute_terms is exactly forward_step then loss_terms
    again, again_record = module.compute_terms(images, labels, step=7, epoch=2, total_steps=100)
    torch.testing.assert_close(again_record.logits, record.logits, rtol=0, atol=0)
    assert {k: float(v.detach()) for k, v in again.items()} == values


def test_total_loss_sums_half_precision_terms_in_float32() -> None:
    terms = {"ce": torch.tensor(1.0009765625, dtype=torch.float16), "reg": torch.tensor(0.5, dtype=torch.bfloat16)}
    total = FineTuner.total_loss(terms)
    assert total.dtype == torch.float32 and float(total) == 1.5009765625  # both exact in their formats


def test_forward_step_captures_the_maps_a_term_asks_for() -> None:
    model = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=CLASSES)
    term = DELTA(layers=None, attention="uniform")
    module = FineTuner(model, CrossEntropy(), [term], OptimConfig(), CLASSES)
    assert term.needs_feature_maps  # DELTA names its layers once it has seen the model
    images, labels = _batch()
    with torch.no_grad():
        record = module.forward_step(images, labels)
    assert set(record.feature_maps) == {"last", *term.needs_feature_maps}
    assert all(m.shape[0] == 4 for m in record.feature_maps.values())
    assert record.images.is_contiguous(memory_format=torch.channels_last)  # the module's layout


@pytest.mark.parametrize("dim", [1, 4])
def test_feature_stats_of_single_channel_features_skip_the_normalised_entropy(dim: int) -> None:
    model = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=CLASSES)
    model.reset_classifier(CLASSES)
    model.classifier = torch.nn.Linear(dim, CLASSES)  # only the head's weight is read by the statistics
    module = FineTuner(model, CrossEntropy(), [], OptimConfig(), CLASSES, feature_stats=True)
    features = torch.rand(6, dim, generator=torch.Generator().manual_seed(2)) + 0.1
    module._log_feature_stats(features, torch.tensor([0, 1, 2, 0, 1, 2]), "val")
    means = module.epoch_means()
    assert means["val/feature_norm"] == pytest.approx(float(features.norm(dim=1).mean()), rel=1e-6)
    if dim == 1:  # log D = 0: no normalised entropy instead of a division by zero
        assert "val/fmr_entropy" not in means
    else:
        p = torch.softmax(features.double(), dim=1)
        expected = float((-(p * p.log()).sum(1)).mean() / np.log(dim))
        assert means["val/fmr_entropy"] == pytest.approx(expected, rel=1e-6)


def test_feature_stats_never_share_a_column_with_a_term() -> None:
    from regtune.regularizers import list_criteria, list_regularizers

    model = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=CLASSES)
    module = FineTuner(model, CrossEntropy(), [], OptimConfig(), CLASSES, feature_stats=True)
    features = torch.rand(6, model.num_features, generator=torch.Generator().manual_seed(2))
    module._log_feature_stats(features, torch.tensor([0, 1, 2, 0, 1, 2]), "train")
    stats = set(module.epoch_means())
    assert {"train/feature_norm", "train/fmr_entropy", "train/mean_margin"} <= stats
    terms = {f"train/{name}" for name in list_regularizers() + list_criteria()}  # each term's weighted value
    assert not stats & terms  # the feature-stat mean of sample margins was once averaged with the term's value


def test_labels_are_range_checked_on_the_cpu_before_the_transfer() -> None:
    model = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=CLASSES)
    module = FineTuner(model, CrossEntropy(), [], OptimConfig(), CLASSES)
    images, labels = _batch()
    assert module.on_before_batch_transfer((images, labels), 0)[1] is labels  # in range: passed through
    assert not module._labels_checked  # no trainer is training: the terms check the labels themselves
    with pytest.raises(ValueError, match=r"labels in \[0, 3\], outside \[0, 2\] for the 3 classes"):
        module.on_before_batch_transfer((images, torch.tensor([0, 3, 1, 2])), 0)
    with pytest.raises(ValueError, match=r"labels in \[-1, 2\]"):
        module.on_before_batch_transfer((images, torch.tensor([0, -1, 1, 2]), torch.arange(4)), 0)
