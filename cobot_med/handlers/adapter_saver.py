"""Adapter-only checkpoints during training: the best by a validation metric, and the latest."""

from __future__ import annotations

import json
import math
from pathlib import Path
from ignite.engine import Engine, Events
from torch import nn

from ..adapter import CONFIG_NAME, save_adapter
from ._distributed import is_rank0


class AdapterSaver:
    """Writes an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    With ``key_metric_name`` (attach to the validation evaluator) it saves when the metric
    beats the best so far; without it (attach to the trainer) it saves after every epoch. Each
    folder records the run's key, so a resumed run continues from its own best (read back from
    the folder) and never from another run's.
    """

    def __init__(
        self,
        save_dir: str | Path,
        network: nn.Module,
        key_metric_name: str | None = None,
        run_key: str | None = None,
    ) -> None:
        self.save_dir, self.network = Path(save_dir), network
        self.key_metric_name, self.run_key = key_metric_name, run_key
        self.best = -math.inf
        config = self.save_dir / CONFIG_NAME
        if key_metric_name and config.is_file():
            saved = json.loads(config.read_text())
            if saved.get("run_key") == run_key:
                self.best = saved.get("metric", {}).get(key_metric_name, -math.inf)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_rank0():
            return
        extra = {"epoch": int(engine.state.epoch), "run_key": self.run_key}
        if self.key_metric_name:
            value = float(engine.state.metrics[self.key_metric_name])
            if not value > self.best:
                return
            self.best = value
            extra["metric"] = {self.key_metric_name: value}
        save_adapter(self.network, self.save_dir, extra=extra)
