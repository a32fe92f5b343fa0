"""Training order and per-sample augmentation seeds: epoch keys, sharding across processes, mid-epoch resume."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from regtune.data.seeds import sample_seed
from regtune.data.transforms import TransformedSubset, seeded_rng
from regtune.train import datamodule
from regtune.train.datamodule import EpochShuffle, Shard


def test_sample_seeds_differ_across_epochs_and_items_and_are_fixed() -> None:
    seeds = {sample_seed(0, e, i) for e in range(5) for i in range(200)}
    assert len(seeds) == 1000  # no two (epoch, item) pairs share a seed
    assert sample_seed(3, 2, 7) == sample_seed(3, 2, 7) != sample_seed(4, 2, 7)


def test_seeded_rng_seeds_all_three_generators_and_restores_them() -> None:
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    before = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    with seeded_rng(123):
        inside = torch.rand(3), random.random(), np.random.rand()
    after = torch.rand(3), random.random(), np.random.rand()
    torch.testing.assert_close(after[0], before[0])  # the outer streams continue as if nothing ran
    assert after[1:] == before[1:]
    with seeded_rng(123):
        again = torch.rand(3), random.random(), np.random.rand()
    torch.testing.assert_close(inside[0], again[0])
    assert inside[1:] == again[1:]


def test_augmentation_depends_on_epoch_and_item_only() -> None:
    data = TransformedSubset(list(zip(range(10), range(10))), range(10), lambda x: x + torch.rand(()).item(), seed=5)
    a = data[(0, 3)][0]
    torch.rand(100)  # whatever ran before
    assert data[(0, 3)][0] == a and data[(1, 3)][0] != a and data[(0, 4)][0] - 4 != a - 3
    # plain integer keys (evaluation, set-up passes) draw from the global stream as it is
    torch.manual_seed(0)
    plain = data[3][0]
    torch.manual_seed(0)
    assert data[3][0] == plain


def test_epoch_shuffle_yields_epoch_keys_and_a_new_order_per_epoch() -> None:
    sampler = EpochShuffle(20, seed=0)
    first = list(sampler)
    assert {e for e, _ in first} == {0} and sorted(i for _, i in first) == list(range(20))
    sampler.set_epoch(1)
    second = list(sampler)
    assert {e for e, _ in second} == {1} and [i for _, i in second] != [i for _, i in first]
    assert list(EpochShuffle(20, seed=0)) == first  # a fixed function of (seed, epoch)


def test_resume_skips_the_items_already_trained_once() -> None:
    sampler = EpochShuffle(20, seed=0)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.resume(2, 8)
    assert list(sampler) == whole[8:]
    assert list(sampler) == whole  # only the next pass is shortened
    sampler.resume(1, 8)  # for another epoch: ignored when epoch 2 is iterated
    assert list(sampler) == whole


@pytest.mark.parametrize("world", [2, 3])
def test_processes_take_disjoint_shares_of_one_epoch(monkeypatch: pytest.MonkeyPatch, world: int) -> None:
    order = [i for _, i in EpochShuffle(20, seed=0)]
    shares, shards = [], []
    for rank in range(world):
        monkeypatch.setattr(datamodule, "_rank_and_world", lambda rank=rank: (rank, world))
        sampler = EpochShuffle(20, seed=0)
        share = [i for _, i in sampler]
        assert len(share) == len(sampler) == 20 // world
        shares.append(share)
        shards.append(list(Shard(20)))
        assert len(shards[-1]) == len(Shard(20))
    flat = [i for share in shares for i in share]
    assert len(set(flat)) == len(flat) == 20 // world * world  # disjoint, the tail of the permutation dropped
    assert sorted(flat) == sorted(order[:len(flat)])
    assert sorted(i for shard in shards for i in shard) == list(range(20))  # evaluation: every item exactly once
