"""Ignite/MONAI handlers, one class per module, each with ``attach(engine)``."""

from .adapter_saver import AdapterSaver
from .epoch_loss import EpochLoss
from .epoch_seeds import EpochSeeds
from .nan_guard import StopOnNanLoss
from .one_line_errors import OneLineErrors
from .organ_metrics import PerOrganMetrics
from .overlays import ValidationOverlays
from .protocol_scores import ProtocolScores
from .progress import ProgressBar
from .resume import ResumeCheckpoint
from .segmentation_writer import SegmentationWriter

__all__ = ["AdapterSaver", "EpochLoss", "EpochSeeds", "OneLineErrors", "PerOrganMetrics", "ProgressBar", "ProtocolScores", "ResumeCheckpoint",
           "SegmentationWriter", "StopOnNanLoss", "ValidationOverlays"]
