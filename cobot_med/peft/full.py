"""``full``: the whole image encoder trains (plus the mask decoder): the upper reference."""

from __future__ import annotations

import dataclasses

from torch import nn

from .config import PeftConfig


@dataclasses.dataclass
class FullConfig(PeftConfig):
    pass


def inject(sam: nn.Module, config: FullConfig) -> None:
    sam.image_encoder.requires_grad_(True)
