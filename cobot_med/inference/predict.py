"""Predict one oriented volume from its prompts: batched slices, one encoder pass per slice image,
key-slice propagation.

The network is anything with PromptableSam's call signature
``network(images (B,3,S,S) in [0,255], boxes (B,K,4) in the model grid, valid=(B,K) bool,
output_size=(X, Y)) -> logits (N,1,X,Y)`` for the N valid boxes in batch order, and an
``image_size`` attribute S. Each slice is resized to S x S exactly as the training pipeline
does (MONAI ``Resize``, bilinear, anti-aliased when shrinking) and sent once with all the
organs prompted on it; the logits come back at the slice's own (X, Y) grid (one bilinear
step from the decoder's grid). Slices with no prompt never reach the model.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..engine.amp import autocast
from .prompts import CasePrompts, mask_box


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
        self.image_size = int(network.image_size)
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
        return out


def predict_case(predictor: SlicePredictor, volume: torch.Tensor, prompts: CasePrompts,
                 threshold: float = 0.5) -> tuple[torch.Tensor, list[dict[int, list[float]]]]:
    """Per-organ probabilities (K, X, Y, Z) of an oriented volume and the boxes used per organ {slice: box}.

    Fixed prompts (labels, 3D boxes) go through in batches. Key slices are predicted first (together
    with the fixed prompts on those slices); then every organ's two fronts (up and down) advance one
    slice per step, all fronts of a step in one batch, each prompted with the bounding box of the
    organ's mask on the slice before; a front stops where the mask (probability > ``threshold``)
    vanishes or the volume ends. Fixed prompts on a slice a step visits travel with it; the
    remaining fixed slices go last.
    """
    volume = torch.as_tensor(volume).float()
    X, Y, Z = volume.shape
    K = len(prompts.prompts)
    probs = torch.zeros(K, X, Y, Z)
    fixed_boxes, fixed_present = prompts.fixed()
    pending = fixed_present.clone()  # fixed (slice, organ) prompts not yet predicted
    used: list[dict[int, list[float]]] = [dict() for _ in range(K)]

    def run(requests: dict[int, dict[int, list[float]]]) -> None:
        """requests {z: {k: box}} -> predictions stored; fixed prompts on these slices join them."""
        zs = sorted(requests)
        boxes = torch.zeros(len(zs), K, 4)
        present = torch.zeros(len(zs), K, dtype=torch.bool)
        for n, z in enumerate(zs):
            for k in pending[z].nonzero(as_tuple=True)[0].tolist():
                boxes[n, k], present[n, k] = fixed_boxes[z, k], True
            for k, box in requests[z].items():
                boxes[n, k], present[n, k] = torch.tensor(box), True
            pending[z] = False
        out = predictor(volume, zs, boxes, present)
        for n, z in enumerate(zs):
            for k in present[n].nonzero(as_tuple=True)[0].tolist():
                probs[k, :, :, z] = out[n, k]
                used[k][z] = boxes[n, k].tolist()

    keys = prompts.keys()
    if keys:
        requests: dict[int, dict[int, list[float]]] = {}
        for k, (z, box) in keys.items():
            requests.setdefault(z, {})[k] = box
        run(requests)
        fronts = []  # [organ, direction, next slice]
        for k, (z, _) in keys.items():
            fronts += [[k, +1, z + 1, z], [k, -1, z - 1, z]]  # organ, step, next slice, slice before
        while True:
            requests = {}
            live = []
            for front in fronts:
                k, step, z, before = front
                if not 0 <= z < Z:
                    continue
                box = mask_box(probs[k, :, :, before] > threshold)
                if box is None:  # the organ vanished
                    continue
                requests.setdefault(z, {})[k] = box
                live.append(front)
            if not requests:
                break
            run(requests)
            for front in live:
                front[3] = front[2]
                front[2] += front[1]
            fronts = live
    rest = pending.any(dim=1).nonzero(as_tuple=True)[0].tolist()
    for start in range(0, len(rest), predictor.batch_size):  # bounded memory: one batch of outputs at a time
        run({z: {} for z in rest[start : start + predictor.batch_size]})
    return probs, used
