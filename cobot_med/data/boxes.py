"""The one tight-box function: binary masks -> SAM box prompts, as a MONAI array transform and its
dictionary wrapper.

Conventions of the whole project: a slice is (X, Y) -- rows X, columns Y -- and a box is XYXY with x
along Y (columns) and y along X (rows), in pixel-edge coordinates: ``[x0, y0, x1, y1]`` covers
columns x0..x1-1 and rows y0..y1-1 (the right and bottom edges are exclusive, as MONAI's
``generate_spatial_bounding_box`` ends). An empty mask has no box (``present`` False, zeros).

Training jitters these boxes (:class:`cobot_med.data.slices.BoxPromptsd`), evaluation and inference
take them per slice of a reference label (:func:`cobot_med.predict.prompts.from_labels`), and
key-slice propagation takes them from the previous slice's prediction -- all through
:func:`mask_boxes`. :func:`widen_boxes` is the one jitter: training's random widening and the
``jitter:<px>`` evaluation protocol (:mod:`cobot_med.predict.protocols`) both call it.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform


def mask_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight boxes of binary masks (..., H, W) -> boxes (..., 4) float XYXY (exclusive ends) and present (...)."""
    masks = torch.as_tensor(masks).bool()
    rows, cols = masks.any(dim=-1), masks.any(dim=-2)  # (..., H), (..., W)
    present = rows.any(dim=-1)

    def extent(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = flags.shape[-1]
        index = torch.arange(n, device=flags.device).expand_as(flags)
        first = torch.where(flags, index, n).amin(dim=-1)
        last = torch.where(flags, index, -1).amax(dim=-1) + 1
        return first, last

    y0, y1 = extent(rows)
    x0, x1 = extent(cols)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1).float()
    return torch.where(present[..., None], boxes, torch.zeros_like(boxes)), present


def widen_boxes(boxes: torch.Tensor, offsets: Any, height: int, width: int) -> torch.Tensor:
    """Boxes (..., 4) XYXY widened side by side by ``offsets`` (..., 4) px (x0 and y0 move out by their offset,
    x1 and y1 too) and clipped to an H x W slice: training's box jitter when the offsets are drawn from
    [0, jitter]. Zero offsets give the boxes back unchanged."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    widen = torch.as_tensor(offsets, dtype=torch.float32) * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    limit = torch.tensor([width, height, width, height], dtype=torch.float32)
    return torch.minimum(torch.clamp(boxes + widen, min=0), limit)


class MaskToBoxes(Transform):
    """Array transform: masks (..., H, W) -> (boxes (..., 4), present (...)), see :func:`mask_boxes`."""

    backend = [torch.Tensor]

    def __call__(self, masks: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return mask_boxes(torch.as_tensor(masks))


class MaskToBoxesd(MapTransform):
    """Dictionary wrapper of :class:`MaskToBoxes`: for each key ``k``, adds ``k + box_postfix`` and
    ``k + present_postfix`` (``masks`` -> ``masks_boxes``, ``masks_present`` by default), or the
    names given in ``box_keys`` / ``present_keys``."""

    backend = MaskToBoxes.backend

    def __init__(self, keys: KeysCollection, box_keys: KeysCollection | None = None,
                 present_keys: KeysCollection | None = None, box_postfix: str = "_boxes",
                 present_postfix: str = "_present", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.box_keys = list(box_keys) if box_keys is not None else [f"{k}{box_postfix}" for k in self.keys]
        self.present_keys = (list(present_keys) if present_keys is not None
                             else [f"{k}{present_postfix}" for k in self.keys])
        if isinstance(box_keys, str):
            self.box_keys = [box_keys]
        if isinstance(present_keys, str):
            self.present_keys = [present_keys]
        if not len(self.box_keys) == len(self.present_keys) == len(self.keys):
            raise ValueError("MaskToBoxesd: give one box key and one present key per mask key")
        self.converter = MaskToBoxes()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key, box_key, present_key in self.key_iterator(d, self.box_keys, self.present_keys):
            d[box_key], d[present_key] = self.converter(d[key])
        return d


MaskToBoxesD = MaskToBoxesDict = MaskToBoxesd
