"""``prepare_batch`` callables for MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator``.

MONAI's engines call ``prepare_batch(batch, device, non_blocking)`` and, when it returns a
4-tuple ``(inputs, targets, args, kwargs)``, pass ``args``/``kwargs`` on to the inferer: that
is how the box prompts reach the network.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch


def _plain(x: Any, device: torch.device | str | None, non_blocking: bool) -> torch.Tensor:
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.to(device=device, non_blocking=non_blocking)


class PrepareSliceBatch:
    """Slice samples -> (images, masks of the present organs packed (N,1,S,S), (boxes, valid), {})."""

    def __call__(
        self, batch: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], dict]:
        images = _plain(batch["image"], device, non_blocking).float()
        masks = _plain(batch["masks"], device, non_blocking).float()
        boxes = _plain(batch["boxes"], device, non_blocking).float()
        valid = _plain(batch["valid"], device, non_blocking).bool()
        return images, masks[valid].unsqueeze(1), (boxes, valid), {}


class PrepareVolumeBatch:
    """Whole volumes -> (image, label, (label,), {"case_id": ...}): the label gives the inferer its box prompts,
    the case id (the datalist's, one volume per batch) names the volume as every record and progress bar does."""

    def __call__(
        self, batch: Mapping[str, Any], device: torch.device | str | None = None, non_blocking: bool = False, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor], dict]:
        image = batch["image"].to(device=device, non_blocking=non_blocking)
        label = batch["label"].to(device=device, non_blocking=non_blocking)
        case_id = batch.get("case_id")
        if isinstance(case_id, (list, tuple)):
            case_id = case_id[0] if len(case_id) == 1 else None
        return image, label, (label,), ({"case_id": str(case_id)} if case_id else {})
