"""``decoder``: train SAM's mask decoder only (the papers' "Lightweight" row); nothing is added: the tuner
unfreezes the mask decoder, as for every trained method."""

from __future__ import annotations

import dataclasses

from .config import PeftConfig


@dataclasses.dataclass
class DecoderConfig(PeftConfig):
    pass
