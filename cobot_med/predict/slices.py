"""The one slice predictor: slices of an oriented volume and their box prompts -> organ probabilities.

Validation, test, ``cobot-med infer`` and the MONAI Label app all predict through
:class:`SlicePredictor`, so the same adapter on the same volume gives the same numbers everywhere.

The network is anything with PromptableSam's call signature
``network(images (B,3,S,S) in [0,255], boxes (B,K,4) in the model grid, valid=(B,K) bool,
output_size=(X, Y)) -> logits (N,1,X,Y)`` for the N valid boxes in batch order, and an
``image_size`` attribute S. Each slice is resized to S x S as the training chain does (MONAI
``Resize``, bilinear, anti-aliased when shrinking) and sent once with all the organs prompted on it;
the logits come back at the slice's own (X, Y) grid (one bilinear step from the decoder's grid).
Slices with no prompt never reach the model.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..engine.amp import autocast


def model_images(volume: torch.Tensor, zs: list[int], image_size: int) -> torch.Tensor:
    """Slices ``zs`` of an oriented (X, Y, Z) volume in [0, 255] as model inputs (B, 3, S, S)."""
    from monai.transforms import Resize

    slices = volume[..., zs].permute(2, 0, 1).float()  # (B, X, Y): B as channels, one resize for all
    S = int(image_size)
    if tuple(slices.shape[-2:]) != (S, S):
        resized = Resize((S, S), mode="bilinear", anti_aliasing=True)(slices)
        slices = resized.as_tensor() if hasattr(resized, "as_tensor") else torch.as_tensor(resized)
    return slices[:, None].expand(-1, 3, -1, -1).contiguous()


class SlicePredictor:
    """Runs the network on lists of (slice, prompts) in batches; returns probabilities at the slice grid."""

    def __init__(self, network: Any, device: torch.device | str = "cpu", batch_size: int = 8,
                 amp: bool | str = False, on_slices: Callable[[int], None] | None = None) -> None:
        self.network, self.device = network, torch.device(device)
        self.batch_size, self.amp = max(int(batch_size), 1), amp
        self.image_size = int(getattr(network, "module", network).image_size)  # DDP wraps the model as ``module``
        self.on_slices = on_slices  # called with the number of slice images sent (progress)
        self.images_sent = 0

    @torch.no_grad()
    def __call__(self, volume: torch.Tensor, zs: list[int], boxes: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """volume (X, Y, Z); zs (N,); boxes (N, K, 4) XYXY in the slice grid; present (N, K) -> probs (N, K, X, Y)."""
        X, Y, _ = volume.shape
        K = present.shape[1]
        out = torch.zeros(len(zs), K, X, Y)
        S = self.image_size
        scale = torch.tensor([S / Y, S / X, S / Y, S / X])  # x along Y (columns), y along X (rows)
        was_training = getattr(self.network, "training", False)
        if hasattr(self.network, "eval"):
            self.network.eval()
        try:
            for start in range(0, len(zs), self.batch_size):
                chunk = list(range(start, min(start + self.batch_size, len(zs))))
                valid = present[chunk]
                if not valid.any():
                    continue
                images = model_images(volume, [zs[i] for i in chunk], S).to(self.device)
                model_boxes = (boxes[chunk] * scale).to(self.device)
                with autocast(self.device, self.amp):
                    logits = self.network(images, model_boxes, valid=valid.to(self.device), output_size=(X, Y))
                probs = logits.float().sigmoid()[:, 0].cpu()
                slot = valid.nonzero(as_tuple=False)  # (N, 2): (slice in chunk, organ), the order of ``logits``
                out[torch.tensor(chunk)[slot[:, 0]], slot[:, 1]] = probs
                self.images_sent += len(chunk)
                if self.on_slices:
                    self.on_slices(len(chunk))
        finally:
            if was_training:
                self.network.train()
        return out
