"""Seed every random stream of a training epoch from (seed, epoch, rank), so a resumed run repeats exactly
the epochs an uninterrupted one would have run."""

from __future__ import annotations

import random
from typing import Any, Iterable

import numpy as np
import torch
from ignite.engine import Engine, Events

from ._distributed import rank


def epoch_seed(seed: int, epoch: int, process: int = 0) -> int:
    """One 31-bit seed per (run seed, epoch, process)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(process) * 104_729) % (2**31 - 1)


def randomizables(transform: Any) -> Iterable[Any]:
    """Every MONAI ``Randomizable`` in a transform chain (Compose nests), the chain included."""
    if hasattr(transform, "set_random_state"):
        yield transform
    for inner in getattr(transform, "transforms", ()) or ():
        yield from randomizables(inner)


class EpochSeeds:
    """At the start of every epoch: torch (CPU and CUDA: dropout, gate noise, shuffling), numpy, Python and
    the slice chain's own random state (box jitter) are seeded from (seed, epoch, rank).

    A run killed after epoch e and resumed then draws for epoch e+1 exactly what the uninterrupted run
    drew, with nothing but the epoch number carried over (``DistributedSampler`` is re-seeded by
    MONAI's trainer per epoch as well). The data loader workers, if any, take their seeds from torch's.
    """

    def __init__(self, seed: int, transform: Any = None) -> None:
        self.seed, self.transform = int(seed), transform

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        value = epoch_seed(self.seed, engine.state.epoch, rank())
        torch.manual_seed(value)
        np.random.seed(value)
        random.seed(value)
        for offset, item in enumerate(randomizables(self.transform)):
            item.set_random_state(seed=(value + offset) % (2**31 - 1))
