"""``frozen``: zero-shot SAM with box prompts (the papers' "Freeze" row); nothing trains."""

from __future__ import annotations

import dataclasses

from torch import nn

from .config import PeftConfig


@dataclasses.dataclass
class FrozenConfig(PeftConfig):
    pass


def inject(sam: nn.Module, config: FrozenConfig) -> None:
    """Nothing to add: every parameter stays frozen."""
