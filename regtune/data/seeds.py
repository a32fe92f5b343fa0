"""Every seed a run derives from its own seed, in one place.

A run has one seed ``s`` (``trainer.seed``). Everything random in training is drawn from generators seeded by fixed
functions of ``s``, the epoch ``e`` (0-based: Lightning's ``current_epoch``) and, for augmentation, the sample's
position ``i`` in the training subset, so that an epoch's data and draws depend on nothing that ran before it (an
interrupted run resumes exactly, and the number of DataLoader workers does not change the numbers):

=================== ================================================== ==========================================
seed                formula                                            seeds
=================== ================================================== ==========================================
`epoch_seed`  ``(s * 1_000_003 + e * 7_919 + 17) mod 2**32``    Python's ``random``, NumPy's and torch's
                                                                       global generators at the start of epoch
                                                                       ``e``; the DataLoader generator the worker
                                                                       base seeds are drawn from
`order_seed`  ``epoch_seed(s, e) + 1`` (not reduced: at most     the permutation of the training items in
                    ``2**32``, which torch accepts)                    epoch ``e``
`sample_seed` first 32-bit word of NumPy's                       the augmentation of item ``i`` in epoch
                    ``SeedSequence([s, e, i])``                        ``e`` (all three CPU generators)
`mix_seed`    first 32-bit word of NumPy's                       the mixup / cutmix draws of global
                    ``SeedSequence([s, 2**31 - 1, g])``                optimisation step ``g`` (all three CPU
                                                                       generators)
=================== ================================================== ==========================================

The two primes of `epoch_seed` keep the seeds of nearby runs and epochs apart; ``SeedSequence`` hashes its
entropy words, so neighbouring ``(s, e, i)`` give unrelated seeds. These numbers are part of a run's
reproducibility: changing a formula changes every run's numbers.
"""

from __future__ import annotations

import numpy as np

__all__ = ["epoch_seed", "mix_seed", "order_seed", "sample_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the global generators in one epoch: ``(seed * 1_000_003 + epoch * 7_919 + 17) mod 2**32``.

    Args:
        seed: The run's seed.
        epoch: 0-based epoch index (Lightning's ``current_epoch``).

    Example:
        >>> epoch_seed(0, 0), epoch_seed(1, 2)
        (17, 1015858)
    """
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**32)


def order_seed(seed: int, epoch: int) -> int:
    """The seed of the training order (the permutation of the items) in one epoch: ``epoch_seed(seed, epoch) + 1``.

    Example:
        >>> order_seed(0, 0)
        18
    """
    return epoch_seed(seed, epoch) + 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one item in one epoch: the first ``uint32`` word of ``SeedSequence([seed, epoch,
    index])``.

    Args:
        seed: The run's seed.
        epoch: 0-based epoch index.
        index: The item's position in the training subset.

    Example:
        >>> sample_seed(0, 0, 0)
        2968811710
    """
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint32)[0])


def mix_seed(seed: int, global_step: int) -> int:
    """The seed of one training step's batch mixing (mixup / cutmix: which of the two, the mixing weight, the box):
    the first ``uint32`` word of ``SeedSequence([seed, 2**31 - 1, global_step])``.

    The middle word keeps these seeds apart from `sample_seed`'s ``(seed, epoch, index)`` triples (no epoch
    reaches it). The draws of a step depend only on the run's seed and the step, so a resumed run mixes its batches
    as the uninterrupted one did.

    Example:
        >>> mix_seed(0, 0) == mix_seed(0, 0) != mix_seed(0, 1)
        True
    """
    return int(np.random.SeedSequence([seed, 2**31 - 1, global_step]).generate_state(1, dtype=np.uint32)[0])
