"""Adapter-only checkpoints during training: the best by a validation metric, and the latest."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from ignite.engine import Engine, Events
from torch import nn

from ..adapter import CONFIG_NAME, save_adapter
from ._distributed import is_rank0


class AdapterSaver:
    """Writes an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    With ``key_metric_name`` (attach to the validation evaluator) it saves when the metric
    beats the best so far, which survives a restart (read back from the folder's config);
    without it (attach to the trainer) it saves after every epoch.
    """

    def __init__(
        self,
        save_dir: str | Path,
        network: nn.Module,
        key_metric_name: str | None = None,
        epoch_fn: Callable[[], int] | None = None,
    ) -> None:
        self.save_dir, self.network = Path(save_dir), network
        self.key_metric_name, self.epoch_fn = key_metric_name, epoch_fn
        self.best = -math.inf
        config = self.save_dir / CONFIG_NAME
        if key_metric_name and config.is_file():
            self.best = json.loads(config.read_text()).get("metric", {}).get(key_metric_name, -math.inf)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_rank0():
            return
        epoch = self.epoch_fn() if self.epoch_fn else engine.state.epoch
        extra = {"epoch": int(epoch)}
        if self.key_metric_name:
            value = float(engine.state.metrics[self.key_metric_name])
            if not value > self.best:
                return
            self.best = value
            extra["metric"] = {self.key_metric_name: value}
        save_adapter(self.network, self.save_dir, extra=extra)
