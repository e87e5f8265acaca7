"""Rank helpers: logging, tracking and checkpoints happen on rank 0 only."""

import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def is_rank0() -> bool:
    return rank() == 0
