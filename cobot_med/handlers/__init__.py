"""Ignite/MONAI handlers, one class per module, each with ``attach(engine)``.

The classes are imported on first use (PEP 562): ``cobot-med infer`` draws its overlays with
``handlers.overlays.draw_overlay`` and must not import ignite for it (the exported-model path, cobot_med.export).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "AdapterSaver": ".adapter_saver", "EpochLoss": ".epoch_loss", "EpochSeeds": ".epoch_seeds",
    "StopOnNanLoss": ".nan_guard", "PerOrganMetrics": ".organ_metrics", "ValidationOverlays": ".overlays",
    "ProgressBar": ".progress", "ResumeCheckpoint": ".resume", "SegmentationWriter": ".segmentation_writer",
    "OneLineErrors": ".one_line_errors", "ProtocolScores": ".protocol_scores",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
