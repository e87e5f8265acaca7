"""The base models (SAM, MedSAM ViT-B, LiteMedSAM): building, checkpoint loading, input recipes,
the fast attention path and the promptable forward.

The names below are imported on first use (PEP 562), so that ``cobot_med.sam.recipes`` (the input recipes,
plain torch) can be imported by the exported-model runtime without segment-anything (:mod:`cobot_med.export`).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ARCHITECTURES": ".build", "SamArchitecture": ".build", "build_sam": ".build", "default_checkpoint": ".build",
    "CheckpointError": ".checkpoint", "file_sha256": ".checkpoint", "load_sam_checkpoint": ".checkpoint",
    "PromptableSam": ".promptable",
    "RECIPES": ".recipes", "InputRecipe": ".recipes", "SliceGeometry": ".recipes", "make_recipe": ".recipes",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
