"""Write each evaluated volume's label map as ``<case_id>_seg.nii.gz`` in its input's exact geometry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from ..predict.writing import segmentation_path, write_label_map


class SegmentationWriter:
    """After every evaluator iteration, writes the predicted label maps of the batch's cases into ``output_dir``
    (atomically, named by case id, so every process of a distributed run writes its own cases).

    ``chain`` is the volume chain the images went through (its inverse puts the label map back into the
    file's grid); the same writer as ``cobot-med infer`` (:func:`cobot_med.predict.writing.write_label_map`).
    """

    def __init__(self, output_dir: str | Path, chain: Any) -> None:
        self.output_dir, self.chain = Path(output_dir), chain

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        case_ids = [case for item in items for case in _case_ids(item)]
        for case_id, output in zip(case_ids, outputs):
            write_label_map(output["pred"], output["image"], self.chain, segmentation_path(self.output_dir, case_id))


def _case_ids(item: Any) -> list[str]:
    case = item.get("case_id") if isinstance(item, dict) else None
    if isinstance(case, (list, tuple)):
        return [str(c) for c in case]
    return [str(case)]
