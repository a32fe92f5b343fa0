"""The one place that asks ``torch.distributed`` who this process is."""

from __future__ import annotations

import torch

__all__ = ["rank_and_world"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of a running ``torch.distributed`` group; ``(0, 1)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
