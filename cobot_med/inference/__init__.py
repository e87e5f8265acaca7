"""Batch inference over folders of CT volumes (issue #5): prompts from labels, 3D boxes or key slices,
slice-by-slice SAM, stitched back into 3D with each input's exact geometry. See docs/inference.md."""

from .io import Case, InputError, find_cases
from .predict import SlicePredictor, model_images, predict_case
from .prompts import BoxFile, CasePrompts, OrganPrompt, PromptError, from_labels, oriented_extent
from .runner import (
    CaseOutcome,
    InferenceFailed,
    InferenceReport,
    load_network,
    run_from_bundle,
    run_inference,
    select_organs,
)

__all__ = [
    "BoxFile",
    "Case",
    "CaseOutcome",
    "CasePrompts",
    "InferenceFailed",
    "InferenceReport",
    "InputError",
    "OrganPrompt",
    "PromptError",
    "SlicePredictor",
    "find_cases",
    "from_labels",
    "load_network",
    "model_images",
    "oriented_extent",
    "predict_case",
    "run_from_bundle",
    "run_inference",
    "select_organs",
]
