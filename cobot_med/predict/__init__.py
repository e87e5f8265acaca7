"""From prompts to a label volume, one way for validation, test, ``cobot-med infer`` and the MONAI Label app:
prompts (:mod:`.prompts`), the slice predictor (:mod:`.slices`), whole volumes and the label map (:mod:`.volume`)."""

from .prompts import BoxFile, CasePrompts, OrganPrompt, PromptError, from_labels, oriented_extent
from .slices import SlicePredictor, model_images
from .volume import THRESHOLD, organ_channels, predict_volume, to_label_map

__all__ = [
    "BoxFile",
    "CasePrompts",
    "OrganPrompt",
    "PromptError",
    "SlicePredictor",
    "THRESHOLD",
    "from_labels",
    "model_images",
    "organ_channels",
    "oriented_extent",
    "predict_volume",
    "to_label_map",
]
