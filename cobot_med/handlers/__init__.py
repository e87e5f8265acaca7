"""Ignite/MONAI handlers, one class per module, each with ``attach(engine)``.

The classes are imported on first use (PEP 562): ``cobot-med infer`` draws its overlays with
``handlers.overlays.draw_overlay`` and must not import ignite for it (the exported-model path, cobot_med.export).
"""

from __future__ import annotations

from ..lazy import lazy_names

_WHERE = {
    "AdapterSaver": ".adapter_saver", "EpochLoss": ".epoch_loss", "EpochSeeds": ".epoch_seeds",
    "StopOnNanLoss": ".nan_guard", "PerOrganMetrics": ".organ_metrics", "ValidationOverlays": ".overlays",
    "ProgressBar": ".progress", "ResumeCheckpoint": ".resume", "SegmentationWriter": ".segmentation_writer",
    "OneLineErrors": ".one_line_errors", "ProtocolScores": ".protocol_scores",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
