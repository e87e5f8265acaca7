"""Rank helpers: logging, tracking and checkpoints happen on rank 0 only."""

import torch.distributed as dist


def is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
