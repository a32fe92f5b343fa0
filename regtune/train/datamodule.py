"""The LightningDataModule: training subset, validation carve-out and test split, each with its transform."""

from __future__ import annotations

from typing import Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler

from regtune.data.base import ImageDataset
from regtune.data.subset import Split
from regtune.data.transforms import TransformedSubset
from regtune.train.callbacks import epoch_seed

__all__ = ["FineTuneData", "EpochShuffle"]


class EpochShuffle(Sampler[int]):
    """A random permutation per epoch that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before each training epoch. The sampler also owns the generator the
    DataLoader draws its worker base seed from, re-seeded with the permutation, so neither the order nor the
    workers' augmentation depends on how much of torch's global random stream ran before (a validation loop, a
    restart from a checkpoint): a resumed run sees exactly the batches of the uninterrupted one.

    Args:
        size: Number of items.
        seed: The run's seed.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(epoch_seed(self.seed, epoch))

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)
                                                                                  + 1))
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.size


class FineTuneData(pl.LightningDataModule):
    """Loaders over one :class:`~regtune.data.subset.Split` of a dataset.

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
        seed: Seed of the training order (see :class:`EpochShuffle`).
        with_index: Training batches also carry each sample's position in the training subset (the order of
            :meth:`setup_dataloader`), for regularizers with per-sample state.
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

    def _loader(self, dataset: TransformedSubset, train: bool) -> DataLoader:
        # drop_last keeps every training batch full (BatchNorm and batch-statistics terms such as BSS need B > 1),
        # unless the subset is smaller than one batch. Workers are not persistent: each epoch's workers are seeded
        # from that epoch's seed, which makes a resumed run identical to an uninterrupted one.
        sampler = EpochShuffle(len(dataset), self.seed) if train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            generator=sampler.generator if sampler is not None else None,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(TransformedSubset(self.train_set, self.split.train, self.train_transform,
                                              with_index=self.with_index), train=True)

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
