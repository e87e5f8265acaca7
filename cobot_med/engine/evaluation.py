"""Whole-volume evaluation: predict every axial slice with its label boxes, stitch, score.

The volume arrives reoriented so that its last axis is the patient's superior-inferior
axis (see ``cobot_med.data``); a slice ``volume[..., z]`` is an (X, Y) image whose rows are
X and columns Y, and boxes are XYXY with x along columns. Slices without any prompt never
reach the model.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.metrics import CumulativeIterationMetric

from .amp import autocast


def organ_channels(label: torch.Tensor, organ_ids: Sequence[int]) -> torch.Tensor:
    """(1, X, Y, Z) label map -> (K, X, Y, Z) binary masks, one per organ id."""
    label = label.reshape(label.shape[-3:])
    return torch.stack([(label == i) for i in organ_ids]).to(torch.float32)


def merge_organs(probs: torch.Tensor, organ_ids: Sequence[int], threshold: float = 0.5) -> torch.Tensor:
    """(K, X, Y, Z) probabilities -> (1, X, Y, Z) uint8 label map; overlaps go to the most probable organ."""
    best, index = probs.max(dim=0)
    ids = torch.as_tensor(list(organ_ids), dtype=torch.uint8, device=probs.device)
    merged = torch.where(best > threshold, ids[index], torch.zeros_like(index, dtype=torch.uint8))
    return merged[None]


def tight_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K, H, W) binary masks -> boxes (N, K, 4) XYXY (inclusive pixel extents) and present (N, K)."""
    rows, cols = masks.any(dim=-1), masks.any(dim=-2)  # (N, K, H), (N, K, W)
    present = rows.any(dim=-1)

    def extent(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = flags.shape[-1]
        idx = torch.arange(n, device=flags.device).expand_as(flags)
        first = torch.where(flags, idx, n).amin(dim=-1)
        last = torch.where(flags, idx, -1).amax(dim=-1)
        return first, last

    y0, y1 = extent(rows)
    x0, x1 = extent(cols)
    boxes = torch.where(present[..., None], torch.stack([x0, y0, x1, y1], dim=-1).float(), 0.0)
    return boxes, present


def label_prompts(label: torch.Tensor, organ_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight per-slice boxes from a (1,X,Y,Z) label: boxes (Z,K,4) with exclusive right/bottom edges, present (Z,K)."""
    masks = organ_channels(label, organ_ids)
    boxes, present = tight_boxes(masks.permute(3, 0, 1, 2).bool())
    edges = torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device)  # one past the last pixel
    return torch.where(present[..., None], boxes + edges, 0.0), present


@torch.no_grad()
def predict_volume(
    network: Any,
    volume: torch.Tensor,
    boxes: torch.Tensor,
    present: torch.Tensor,
    image_size: int,
    batch_size: int = 8,
    amp: bool | str = True,
) -> torch.Tensor:
    """Per-organ probabilities (K, X, Y, Z) of an oriented volume (X, Y, Z) in [0, 255].

    ``boxes`` (Z, K, 4) are XYXY in each slice's own pixel grid (x along Y, y along X), ``present``
    (Z, K) says which prompts exist. The encoder runs once per slice for all its organs, slices
    go through in batches, and slices without any prompt never reach the model.
    """
    volume = volume.float()
    H, W, _ = volume.shape
    S = int(image_size)
    probs = torch.zeros((present.shape[1], *volume.shape), device=volume.device)
    slices = present.any(dim=1).nonzero(as_tuple=True)[0]
    scale = torch.tensor([S / W, S / H, S / W, S / H], device=volume.device)
    was_training = network.training
    network.eval()
    try:
        for start in range(0, len(slices), batch_size):
            z = slices[start : start + batch_size]
            images = volume[..., z].permute(2, 0, 1)[:, None].expand(-1, 3, -1, -1)
            images = F.interpolate(images, size=(S, S), mode="bilinear", align_corners=False)
            with autocast(volume.device, amp):
                logits = network(images, boxes[z].to(volume.device) * scale, valid=present[z], output_size=(S, S))
            logits = F.interpolate(logits.float(), size=(H, W), mode="bilinear", align_corners=False)
            slot = present[z].nonzero(as_tuple=False)  # (N, 2): (slice in batch, organ), the order of ``logits``
            probs[slot[:, 1], :, :, z[slot[:, 0]]] = logits[:, 0].sigmoid()
    finally:
        network.train(was_training)
    return probs


class VolumeSliceInferer(Inferer):
    """Predict a whole oriented volume slice by slice with box prompts from its label.

    ``__call__(image (1,1,X,Y,Z) in [0,255], network, label (1,1,X,Y,Z))`` returns per-organ
    probabilities (1, K, X, Y, Z) as a MetaTensor carrying the image's metadata.
    """

    def __init__(self, organ_ids: Sequence[int], image_size: int, batch_size: int = 8, amp: bool | str = True):
        super().__init__()
        self.organ_ids, self.image_size = list(organ_ids), int(image_size)
        self.batch_size, self.amp = int(batch_size), amp

    def __call__(self, inputs: torch.Tensor, network: Any, label: torch.Tensor, *args: Any, **kwargs: Any):
        volume = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        label = label.as_tensor() if isinstance(label, MetaTensor) else label
        boxes, present = label_prompts(label, self.organ_ids)
        probs = predict_volume(network, volume.reshape(volume.shape[-3:]), boxes, present, self.image_size,
                               self.batch_size, self.amp)
        return MetaTensor(probs[None], meta=inputs.meta if isinstance(inputs, MetaTensor) else {})


class SliceDiceMetric(CumulativeIterationMetric):
    """The authors' pooled slice DSC: the mean 2D DSC over every (slice, organ) with reference foreground.

    Inputs are (B, K, X, Y, Z) binary volumes; aggregate returns (mean, per-organ DSC (K,)) —
    the mean first, as MONAI's metric handlers record the first value.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y_pred, y = y_pred.float(), y.float()
        inter = (y_pred * y).sum(dim=(2, 3))
        total = y_pred.sum(dim=(2, 3)) + y.sum(dim=(2, 3))
        has_ref = y.sum(dim=(2, 3)) > 0  # (B, K, Z)
        dice = torch.where(has_ref, 2 * inter / total.clamp_min(1e-8), torch.zeros_like(inter))
        return torch.stack([dice.sum(-1), has_ref.sum(-1).float()], dim=-1)  # (B, K, 2)

    def aggregate(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        data = self.get_buffer()
        totals = data.sum(dim=0)  # (K, 2)
        per_organ = totals[:, 0] / totals[:, 1].clamp_min(1)
        per_organ = torch.where(totals[:, 1] > 0, per_organ, torch.full_like(per_organ, float("nan")))
        valid = per_organ[~torch.isnan(per_organ)]
        return (valid.mean() if valid.numel() else torch.tensor(float("nan"))), per_organ


def postprocessing(organs: Mapping[str, int], volume_transforms: Any, output_dir: str | None, save: bool = True):
    """Post-processing of a predicted volume (MONAI dictionary transforms, decollated items).

    ``pred`` (K organ probabilities, oriented) becomes binary for the metrics; ``label_organs``
    holds the reference as K binary channels; ``seg`` is the multi-label map (overlaps to the
    most probable organ) inverted back to the input's geometry by ``Invertd`` and written with
    ``SaveImaged`` as ``<image name>_seg.nii.gz``.
    """
    from monai.transforms import AsDiscreted, Compose, CopyItemsd, Invertd, Lambdad, SaveImaged

    organ_ids = list(organs.values())
    steps = [
        CopyItemsd(keys=["pred", "label"], names=["seg", "label_organs"]),
        Lambdad(keys="seg", func=lambda p: merge_organs(p, organ_ids)),
        Lambdad(keys="label_organs", func=lambda lab: organ_channels(lab, organ_ids)),
        AsDiscreted(keys="pred", threshold=0.5),
    ]
    if save and output_dir:
        steps += [
            Invertd(keys="seg", transform=volume_transforms, orig_keys="image", nearest_interp=True, to_tensor=True),
            SaveImaged(keys="seg", output_dir=output_dir, output_postfix="seg", output_ext=".nii.gz",
                       output_dtype=np.uint8, resample=False, separate_folder=False, print_log=False),
        ]
    return Compose(steps)
