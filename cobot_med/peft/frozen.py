"""``frozen``: zero-shot SAM with box prompts (the papers' "Freeze" row); nothing is added and nothing trains."""

from __future__ import annotations

import dataclasses

from .config import PeftConfig


@dataclasses.dataclass
class FrozenConfig(PeftConfig):
    pass
