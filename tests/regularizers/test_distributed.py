"""Per-step statistics under DDP: 2 CPU processes (gloo), each with half of a batch, end in the state that 1 process
reaches on the whole batch (AdaRand's running class means and prior means, FMR's window, H_t and lambda_t)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from regtune.regularizers import TrainStep, create_regularizer
from tests.regularizers.nets import FeatureNet

DIM, CLASSES, BATCH, STEPS = 6, 3, 8, 3


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    # class 2 appears only in the second half of the first batch: one process sees none of it (skipped there, but
    # present in the global batch)
    labels = [torch.tensor([0, 1, 0, 1, 0, 2, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1]),
              torch.tensor([1, 0, 2, 1, 0, 2, 2, 0])]
    return [(torch.rand(BATCH, DIM, generator=g, dtype=torch.float64), y) for y in labels]


def _terms() -> dict[str, torch.nn.Module]:
    model = FeatureNet(DIM, CLASSES)
    setup = [(torch.rand(9, DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
              torch.arange(9) % CLASSES)]
    terms = {"adarand": create_regularizer("adarand"), "fmr": create_regularizer("fmr", window=4, update_every=1)}
    for term in terms.values():
        term.to(torch.float64)
        term.adapt_model(model)
        term.setup(model, setup)  # the set-up passes see the same data in every process (no reduction there)
        term.train()
    return {"model": model, **terms}


def _run(rank: int, world: int, shard: bool) -> dict[str, torch.Tensor]:
    parts = _terms()
    model = parts.pop("model")
    for features, labels in _batches():
        if shard:
            features, labels = features.chunk(world)[rank], labels.chunk(world)[rank]
        step = TrainStep(features=features, logits=model.get_classifier()(features), labels=labels, model=model)
        for term in parts.values():
            term(step)
    return {f"{name}.{key}": value.detach().clone() for name, term in parts.items()
            for key, value in term.state_dict().items() if isinstance(value, torch.Tensor)}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_run(rank, world, shard=True), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_reach_the_single_process_state(tmp_path: Path) -> None:
    single = _run(0, 1, shard=False)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert set(ranks[0]) == set(single)
    for key, expected in single.items():
        for rank in ranks:
            torch.testing.assert_close(rank[key], expected, rtol=1e-10, atol=1e-12, equal_nan=True, msg=key)
    # the statistics really moved (a test of an unchanged state would prove nothing)
    fresh = _terms()
    assert not torch.equal(single["adarand.running_mean"], fresh["adarand"].running_mean)
    assert int(single["fmr.window_count"]) > int(fresh["fmr"].window_count)


def test_without_a_process_group_nothing_is_reduced() -> None:
    from regtune.regularizers._utils import all_reduce_sum

    value = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(value) is value and value.tolist() == [1.0, 2.0]


def _setup_state(rank: int, world: int) -> dict[str, torch.Tensor]:
    """RandReg's class prior, AdaRand's prior, Co-Tuning's relationship and FMR's H_init after set-up on this
    process's share of 12 images (rows rank::world; one batch, so FMR's window holds the whole-batch entropy)."""
    g = torch.Generator().manual_seed(3)
    images, labels = torch.rand(12, DIM, generator=g, dtype=torch.float64), torch.arange(12) % CLASSES
    share = [(images[rank::world], labels[rank::world])]
    model = FeatureNet(DIM, CLASSES)
    state = {}
    for name, kwargs in (("randreg", {"prior": "class"}), ("adarand", {}), ("co_tuning", {}),
                         ("fmr", {"window": 4})):
        term = create_regularizer(name, **kwargs)
        if term.needs_source_head:
            torch.manual_seed(4)
            term.attach_source_head(torch.nn.Linear(DIM, 5).double())
        term.to(torch.float64)
        term.adapt_model(model)
        term.setup(model, share)
        state.update({f"{name}.{k}": v.detach().clone() for k, v in term.state_dict().items()
                      if isinstance(v, torch.Tensor) and k in ("mu", "sigma", "prior_mean", "running_mean",
                                                               "relationship", "h_init", "window")})
    return state


def _state_worker(rank: int, world: int, init_file: str, out_dir: str, which: str) -> None:
    """Process ``rank`` of a gloo group: saves ``_setup_state`` (``which="setup"``) or ``_per_item_setup_state``
    (``"items"``) of its share to ``<out_dir>/<which><rank>.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = {"setup": _setup_state, "items": _per_item_setup_state}[which](rank, world)
        torch.save(state, os.path.join(out_dir, f"{which}{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_setup_statistics_from_shares_of_the_data_equal_the_whole(tmp_path: Path) -> None:
    whole = _setup_state(0, 1)
    assert {"randreg.mu", "randreg.sigma", "co_tuning.relationship", "fmr.h_init"} <= set(whole)
    mp.spawn(_state_worker, args=(2, str(tmp_path / "init"), str(tmp_path), "setup"), nprocs=2, join=True)
    for rank in range(2):
        shared = torch.load(tmp_path / f"setup{rank}.pt", weights_only=True)
        assert set(shared) == set(whole)
        for key, expected in whole.items():
            torch.testing.assert_close(shared[key], expected, rtol=1e-10, atol=1e-12, msg=key)
    # each share alone gives other statistics (the reduction is what makes them equal)
    alone = _setup_state(0, 2)
    assert not torch.allclose(alone["randreg.mu"], whole["randreg.mu"])
    assert not torch.allclose(alone["co_tuning.relationship"], whole["co_tuning.relationship"])
    assert not torch.allclose(alone["fmr.h_init"], whole["fmr.h_init"])


class _ShareLoader:
    """The set-up loader of one process: rows rank, rank + world, ... of the data (regtune's Shard), in batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, rank: int, world: int, batch: int = 3) -> None:
        self.dataset = range(len(labels))
        self.images, self.labels = images[rank::world], labels[rank::world]
        self.batch = batch

    def __iter__(self):
        for start in range(0, len(self.labels), self.batch):
            yield self.images[start:start + self.batch], self.labels[start:start + self.batch]


def _per_item_setup_state(rank: int, world: int) -> dict[str, torch.Tensor]:
    """LwF's cached teacher outputs and DELTA's channel attention after set-up on this process's share of 11 images
    (an odd count: the shares differ in size; DELTA's attention uses the first 7)."""
    import timm

    g = torch.Generator().manual_seed(5)
    images, labels = torch.randn(11, 3, 32, 32, generator=g), torch.arange(11) % 3
    torch.manual_seed(6)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    source = torch.nn.Linear(model.num_features, 5)
    lwf = create_regularizer("lwf", teacher="cached")
    lwf.attach_source_head(source)
    lwf.adapt_model(model)
    lwf.setup(model, _ShareLoader(images, labels, rank, world))
    delta = create_regularizer("delta", attention="ablation", attention_samples=7, attention_chunk=64,
                               probe_steps=20)
    delta.adapt_model(model)
    delta.setup(model, _ShareLoader(images, labels, rank, world))
    return {"lwf.teacher_logits": lwf.teacher_logits, "delta.attention_weights": delta.attention_weights}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_per_item_setup_from_shares_equals_the_whole(tmp_path: Path) -> None:
    """LwF's teacher outputs are gathered back into the data's order (every process can look up any training
    index) and DELTA's probe and attention are those of one process on all the data."""
    whole = _per_item_setup_state(0, 1)
    assert whole["lwf.teacher_logits"].shape == (11, 5)
    mp.spawn(_state_worker, args=(2, str(tmp_path / "init"), str(tmp_path), "items"), nprocs=2, join=True)
    for rank in range(2):
        shared = torch.load(tmp_path / f"items{rank}.pt", weights_only=True)
        torch.testing.assert_close(shared["lwf.teacher_logits"], whole["lwf.teacher_logits"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(shared["delta.attention_weights"], whole["delta.attention_weights"], rtol=1e-4,
                                   atol=1e-6)
    from regtune.regularizers._utils import gather_shards

    with pytest.raises(ValueError, match="rows for 11 items"):  # in one process, a share is not the whole data
        gather_shards(torch.zeros(6, 5), 11)


def test_shard_positions_follow_the_trainer_sharding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The regularizers' idea of which items a process holds is the trainer's Shard sampler."""
    from regtune.regularizers import _utils
    from regtune.train import datamodule

    for rank in range(3):
        monkeypatch.setattr(_utils, "_rank_and_world", lambda rank=rank: (rank, 3))
        monkeypatch.setattr(datamodule, "_rank_and_world", lambda rank=rank: (rank, 3))
        items = list(datamodule.Shard(11))
        assert _utils.shard_positions(len(items)).tolist() == items
