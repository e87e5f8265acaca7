"""The slice inferer for training and slice-level validation: box prompts in, mask logits out."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer

from .amp import autocast
from .precision import Precision


class BoxPromptInferer(Inferer):
    """``network(images, boxes, valid=valid, output_size=S)`` under autocast, returned in fp32.

    Receives the ``(boxes, valid)`` that :class:`~cobot_med.engine.prepare.PrepareSliceBatch`
    hands MONAI's engines as extra arguments.
    """

    def __init__(self, amp: Precision | bool | str = True) -> None:
        super().__init__()
        self.amp = amp

    def __call__(self, inputs: torch.Tensor, network: Any, boxes: torch.Tensor, valid: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        with autocast(inputs.device, self.amp):
            logits = network(inputs, boxes, valid=valid, output_size=tuple(inputs.shape[-2:]))
        return logits.float()
