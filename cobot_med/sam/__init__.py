"""The base models (SAM, MedSAM ViT-B, LiteMedSAM): building, checkpoint loading, input recipes,
the fast attention path and the promptable forward.

The names below are imported on first use (PEP 562), so that ``cobot_med.sam.recipes`` (the input recipes,
plain torch) can be imported by the exported-model runtime without segment-anything (:mod:`cobot_med.export`).
"""

from __future__ import annotations

from ..lazy import lazy_names

_WHERE = {
    "ARCHITECTURES": ".build", "SamArchitecture": ".build", "build_sam": ".build", "default_checkpoint": ".build",
    "CheckpointError": ".checkpoint", "file_sha256": ".checkpoint", "load_sam_checkpoint": ".checkpoint",
    "PromptableSam": ".promptable",
    "RECIPES": ".recipes", "InputRecipe": ".recipes", "SliceGeometry": ".recipes", "make_recipe": ".recipes",
}

__all__ = list(_WHERE)


__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
