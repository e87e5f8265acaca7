"""Per-organ values of a metric that MONAI computed with ``save_details=True``."""

from __future__ import annotations

from typing import Sequence

import torch
from ignite.engine import Engine, Events


class PerOrganMetrics:
    """Adds ``<metric>_<organ>`` scalars from ``engine.state.metric_details[metric]`` (cases x organs).

    Attach after the metric and before the tracking handlers, so MLflow logs them with the rest.
    """

    def __init__(self, metric_name: str, organs: Sequence[str]) -> None:
        self.metric_name, self.organs = metric_name, list(organs)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        details = getattr(engine.state, "metric_details", {}).get(self.metric_name)
        if details is None:
            return
        details = torch.as_tensor(details, dtype=torch.float32).reshape(-1, len(self.organs))
        for k, organ in enumerate(self.organs):
            column = details[:, k]
            column = column[~torch.isnan(column)]
            engine.state.metrics[f"{self.metric_name}_{organ}"] = float(column.mean()) if column.numel() else float("nan")
