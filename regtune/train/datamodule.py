"""The LightningDataModule: training subset, validation carve-out and test split, each with its transform."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler

from regtune._dist import rank_and_world as _rank_and_world
from regtune.data.base import ImageDataset
from regtune.data.seeds import epoch_seed, order_seed
from regtune.data.subset import Split
from regtune.data.transforms import TransformedSubset

__all__ = ["EpochShuffle", "FineTuneData", "Shard"]


class EpochShuffle(Sampler[tuple[int, int]]):
    """A random permutation per epoch that depends only on ``(seed, epoch)``; yields ``(epoch, index)`` keys.

    Lightning calls `set_epoch` before each training epoch. The epoch travels with every index, so
    `TransformedSubset` seeds each sample's augmentation from ``(seed, epoch,
    index)`` in whichever process loads it. The sampler also owns the generator the DataLoader draws its worker base
    seed from, re-seeded with the permutation, so nothing here depends on how much of torch's global random stream
    ran before (a validation loop, a restart from a checkpoint).

    Under ``torch.distributed`` each process takes every ``world``-th item of the permutation (the tail that does not
    fill one item per process is dropped), so the processes see disjoint shares of one epoch; the trainer runs with
    Lightning's sampler replacement off.

    `resume` makes the next pass over ``epoch`` start after the items already trained on: an exact
    mid-epoch restart.

    Args:
        size: Number of items.
        seed: The run's seed.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.generator = torch.Generator()
        self._resume: tuple[int, int] | None = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(epoch_seed(self.seed, epoch))

    def resume(self, epoch: int, done: int) -> None:
        """Skip the first ``done`` items (of this process's share) the next time ``epoch`` is iterated."""
        self._resume = (epoch, done)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(order_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        rank, world = _rank_and_world()
        if world > 1:
            order = order[:len(self) * world][rank::world]
        if self._resume is not None and self._resume[0] == self.epoch:
            order = order[self._resume[1]:]
            self._resume = None
        return iter([(self.epoch, i) for i in order])

    def __len__(self) -> int:
        return self.size // _rank_and_world()[1]


class Shard(Sampler[int]):
    """Every item once across processes, in order: process ``r`` of ``w`` takes items ``r, r + w, ...``.

    For passes whose results are sums reduced across processes (evaluation counts, regularizers' set-up
    statistics): without ``torch.distributed`` it is the plain sequential order.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __iter__(self) -> Iterator[int]:
        rank, world = _rank_and_world()
        return iter(range(rank, self.size, world))

    def __len__(self) -> int:
        rank, world = _rank_and_world()
        return len(range(rank, self.size, world))


class FineTuneData(pl.LightningDataModule):
    """Loaders over one `Split` of a dataset.

    Args:
        train_set: The dataset's full training split (the subset is ``split.train``).
        test_set: The dataset's test split.
        split: Indices of the training subset and the validation carve-out.
        train_transform: Random augmentation for training.
        eval_transform: Deterministic transform for validation, test and set-up passes.
        batch_size: Training batch size.
        eval_batch_size: Evaluation batch size.
        num_workers: Worker processes per loader.
        validate_on_test: Use the test split as the validation loader (the papers' test-set selection; only with
            ``select="test_acc"``).
        seed: Seed of the training order (see `EpochShuffle`).
        with_index: Training batches also carry each sample's position in the training subset (the order of
            `setup_dataloader`), for regularizers with per-sample state.
        pin_memory: Batches in page-locked memory, for asynchronous copies to a GPU (when training on one).
    """

    def __init__(
            self,
            train_set: ImageDataset,
            test_set: ImageDataset,
            split: Split,
            train_transform: Callable,
            eval_transform: Callable,
            batch_size: int = 32,
            eval_batch_size: int = 128,
            num_workers: int = 0,
            validate_on_test: bool = False,
            seed: int = 0,
            with_index: bool = False,
            pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.train_set = train_set
        self.test_set = test_set
        self.split = split
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.validate_on_test = validate_on_test
        self.seed = seed
        self.with_index = with_index
        self.pin_memory = pin_memory

    def _loader(self, dataset: TransformedSubset, train: bool) -> DataLoader:
        # drop_last keeps every training batch full (BatchNorm and batch-statistics terms such as BSS need B > 1),
        # unless the subset is smaller than one batch. Workers are not persistent: each epoch's workers are seeded
        # from that epoch's seed. Evaluation and set-up passes are sharded across processes (each item once).
        sampler = EpochShuffle(len(dataset), self.seed) if train else Shard(len(dataset))
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            generator=sampler.generator if train else None,
            drop_last=train and len(sampler) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(TransformedSubset(self.train_set, self.split.train, self.train_transform,
                                              with_index=self.with_index, seed=self.seed), train=True)

    def val_dataloader(self) -> DataLoader:
        if self.validate_on_test:
            return self.test_dataloader()
        return self._loader(TransformedSubset(self.train_set, self.split.val, self.eval_transform), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(TransformedSubset(self.test_set, range(len(self.test_set)), self.eval_transform),
                            train=False)

    def setup_dataloader(self) -> DataLoader:
        """Training subset with the evaluation transform, in order: for regularizers' statistics passes."""
        return self._loader(TransformedSubset(self.train_set, self.split.train, self.eval_transform), train=False)
