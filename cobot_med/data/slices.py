"""Slice-level MONAI transforms: an axial slice of a cached volume -> a training sample with box prompts.

The chain (``transforms/slices.json``, per draw): per-organ binary masks and the area threshold in
the original slice grid, box prompts (the tight box of :mod:`cobot_med.data.boxes`, each side
widened by an independent random 0-``jitter`` px, clipped), then the base model's input recipe
(:mod:`cobot_med.sam.recipes`) makes the model input, the targets and the boxes in the model grid --
the same recipe the slice predictor uses for validation, test and inference.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from .boxes import mask_boxes, widen_boxes


def plain(x: Any) -> torch.Tensor:
    """A plain tensor of a MetaTensor, array or tensor (no metadata, no copy when possible)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def organ_area_threshold(min_area: float, height: int, width: int) -> float:
    """The authors keep an organ on a slice when it covers > 100 px at 256 x 256: the same fraction here.

    An organ counts on an H x W slice when its area exceeds ``min_area * H * W / 256**2`` pixels.
    """
    return float(min_area) * height * width / (256.0 * 256.0)


def axial_slice(volume: Mapping[str, Any], z: int) -> dict:
    """{"image": (1,H,W), "label": (1,H,W)} of slice ``z`` of an oriented volume (plain tensors)."""
    out = {"image": plain(volume["image"])[..., z]}
    if volume.get("label") is not None:
        out["label"] = plain(volume["label"])[..., z]
    return out


class SliceOrganMasksd(MapTransform):
    """label (1, H, W) -> ``masks`` (K, H, W) float, ``valid`` (K,) bool (area above the threshold), ``organ_ids``.

    Without a label the masks are empty and nothing is valid.
    """

    def __init__(self, organ_ids: Sequence[int], min_area: float = 100, label_key: str = "label",
                 image_key: str = "image") -> None:
        super().__init__(label_key, allow_missing_keys=True)
        self.organ_ids, self.min_area = [int(i) for i in organ_ids], float(min_area)
        self.label_key, self.image_key = label_key, image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if self.label_key in d:
            label = plain(d.pop(self.label_key))[0]
        else:
            label = torch.zeros(plain(d[self.image_key]).shape[-2:])
        masks = torch.stack([label == i for i in self.organ_ids]).float()
        threshold = organ_area_threshold(self.min_area, *label.shape)
        d["masks"] = masks
        d["valid"] = masks.sum(dim=(1, 2)) > threshold
        d["organ_ids"] = torch.tensor(self.organ_ids, dtype=torch.int64)
        return d


class BoxPromptsd(Randomizable, MapTransform):
    """Box prompts from ``masks`` (K, H, W), in the original slice grid.

    The tight box (:func:`cobot_med.data.boxes.mask_boxes`) of each valid organ, each side widened
    by an independent integer drawn from [0, ``jitter``] px with ``self.R``, clipped to the slice.
    ``jitter=0`` gives the tight box. Adds ``boxes`` (K, 4) XYXY in slice pixels; invalid organs get
    zeros. :class:`ModelInputd` maps them to the model grid.
    """

    backend = [torch.Tensor]

    def __init__(self, jitter: int = 50, masks_key: str = "masks") -> None:
        MapTransform.__init__(self, masks_key)
        if int(jitter) < 0:
            raise ValueError(f"jitter must be >= 0 px, got {jitter}")
        self.jitter, self.masks_key = int(jitter), masks_key
        self._offsets = np.zeros((0, 4), dtype=np.int64)

    def randomize(self, count: int) -> None:
        if self.jitter > 0:
            self._offsets = self.R.randint(0, self.jitter + 1, size=(count, 4))
        else:
            self._offsets = np.zeros((count, 4), dtype=np.int64)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        masks, valid = d[self.masks_key], d["valid"]
        K, H, W = masks.shape
        self.randomize(K)
        tight, _ = mask_boxes(masks > 0)
        boxes = widen_boxes(tight, self._offsets, H, W)
        d["boxes"] = torch.where(torch.as_tensor(valid)[:, None], boxes, torch.zeros_like(boxes))
        return d


BoxPromptsD = BoxPromptsDict = BoxPromptsd


class ModelInputd(MapTransform):
    """The base model's input recipe on a slice sample: ``image`` (1, H, W) in [0, 255] -> (3, S, S) model
    input, ``masks`` (K, H, W) -> (K, S, S) targets, ``boxes`` (K, 4) slice pixels -> the model grid."""

    def __init__(self, recipe: Any, image_key: str = "image", masks_key: str = "masks", boxes_key: str = "boxes"):
        super().__init__([image_key, masks_key, boxes_key], allow_missing_keys=True)
        self.recipe, self.image_key, self.masks_key, self.boxes_key = recipe, image_key, masks_key, boxes_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        images, geometry = self.recipe.prepare(plain(d[self.image_key]).float())
        d[self.image_key] = images[0]
        if self.masks_key in d:
            d[self.masks_key] = self.recipe.masks_to_model(plain(d[self.masks_key]).float(), geometry)
        if self.boxes_key in d:
            d[self.boxes_key] = self.recipe.boxes_to_model(plain(d[self.boxes_key]).float(), geometry)
        return d


ModelInputD = ModelInputDict = ModelInputd
