"""Rank helpers for the handlers: logging, tracking and checkpoints happen on rank 0 only."""

from ..distributed import is_rank0, rank

__all__ = ["is_rank0", "rank"]
