"""A tqdm progress bar over iterations, showing the loss (ignite's ProgressBar, attached MONAI's way)."""

from __future__ import annotations

from ignite.contrib.handlers import ProgressBar as _IgniteProgressBar
from ignite.engine import Engine

from .epoch_loss import loss_value


class ProgressBar:
    """MONAI engines call ``handler.attach(engine)``; ignite's bar takes its options in ``attach``."""

    def __init__(self, show_loss: bool = True, persist: bool = False, desc: str | None = None) -> None:
        self.show_loss, self.bar = show_loss, _IgniteProgressBar(persist=persist, desc=desc)

    def attach(self, engine: Engine) -> None:
        transform = (lambda out: {"loss": loss_value(out["loss"])}) if self.show_loss else None
        self.bar.attach(engine, output_transform=transform)
