"""Batch inference over folders of CT volumes: prompts from labels, 3D boxes or key slices, the one slice
predictor, label maps written with each input's exact geometry. See docs/inference.md."""

from .cases import Case, InputError, find_cases
from .report import CaseOutcome, InferenceFailed, InferenceReport
from .runner import load_network, run_from_settings, run_inference

__all__ = [
    "Case",
    "CaseOutcome",
    "InferenceFailed",
    "InferenceReport",
    "InputError",
    "find_cases",
    "load_network",
    "run_from_settings",
    "run_inference",
]
