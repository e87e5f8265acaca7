"""``full``: the whole image encoder trains (plus the mask decoder): the upper reference."""

from __future__ import annotations

import dataclasses
from typing import Iterator

from torch import nn

from .config import PeftConfig


@dataclasses.dataclass
class FullConfig(PeftConfig):
    pass


def trainable(sam: nn.Module, config: FullConfig) -> Iterator[nn.Parameter]:
    """Every parameter of the image encoder (the base's own: nothing to unload or disable)."""
    return sam.image_encoder.parameters()
