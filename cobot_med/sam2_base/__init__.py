"""SAM 2.1 and MedSAM2 as bases: sam2's own ``SAM2VideoPredictor`` built from sam2's config yaml
(:mod:`.build`), wrapped as the project's promptable ``(images, boxes) -> logits`` module
(:mod:`.promptable`), so the same bundles, PEFT methods and predictors run on it (docs/sam2.md); key slices
carried through a volume by SAM 2's memory (:mod:`.propagation`, ``propagator: sam2_memory``).

The names below are imported on first use (PEP 562): importing ``sam2`` starts hydra's config module.
"""

from __future__ import annotations

from ..lazy import lazy_names

_WHERE = {
    "build_sam2": ".build", "sam2_config": ".build",
    "PromptableSam2": ".promptable", "Sam2Features": ".promptable",
    "MemoryPropagator": ".propagation",
}

__all__ = list(_WHERE)


__getattr__, __dir__ = lazy_names(__name__, _WHERE, globals())
