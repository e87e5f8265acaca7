"""``decoder``: train SAM's mask decoder only (the papers' "Lightweight" row)."""

from __future__ import annotations

import dataclasses

from torch import nn

from .config import PeftConfig


@dataclasses.dataclass
class DecoderConfig(PeftConfig):
    pass


def inject(sam: nn.Module, config: DecoderConfig) -> None:
    """Nothing to add: the tuner unfreezes the mask decoder, as for every trained method."""
