"""Whole volumes: prompts -> per-organ probabilities -> one label map, the same way for every caller.

:func:`predict_volume` predicts an oriented volume from its :class:`~cobot_med.predict.prompts.CasePrompts`
(fixed boxes in batches, key slices propagated both ways) through the one
:class:`~cobot_med.predict.slices.SlicePredictor`; :func:`to_label_map` turns the K organ probabilities
into the label map that is written and scored (overlaps go to the most probable organ).

The predictor's ``propagator`` says how a key slice reaches the rest of the volume: ``boxes`` (every base: the
mask's bounding box on one slice prompts the next) or ``sam2_memory`` (SAM 2 bases: SAM 2's video predictor
carries the key slice's mask by memory attention, :mod:`cobot_med.sam2_base.propagation`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..data.boxes import mask_boxes
from .prompts import CasePrompts
from .slices import SlicePredictor

THRESHOLD = 0.5  # probability above which a pixel belongs to an organ (also where propagation stops)
BOXES, MEMORY = "boxes", "sam2_memory"
PROPAGATORS = (BOXES, MEMORY)  # the ``propagator`` setting: how a key slice reaches the rest of the volume


def to_label_map(probs: torch.Tensor, organ_ids: Sequence[int], threshold: float = THRESHOLD) -> torch.Tensor:
    """(K, X, Y, Z) probabilities -> (1, X, Y, Z) uint8 label map; overlaps go to the most probable organ."""
    best, index = probs.max(dim=0)
    ids = torch.as_tensor(list(organ_ids), dtype=torch.uint8, device=probs.device)
    return torch.where(best > threshold, ids[index], torch.zeros_like(index, dtype=torch.uint8))[None]


def organ_channels(label: torch.Tensor, organ_ids: Sequence[int]) -> torch.Tensor:
    """A label map (..., X, Y, Z) -> (K, X, Y, Z) float binary masks, one per organ id."""
    label = torch.as_tensor(label).reshape(label.shape[-3:])
    return torch.stack([label == i for i in organ_ids]).to(torch.float32)


def predict_volume(predictor: SlicePredictor, volume: torch.Tensor, prompts: CasePrompts,
                   threshold: float = THRESHOLD) -> tuple[torch.Tensor, list[dict[int, list[float]]]]:
    """Per-organ probabilities (K, X, Y, Z) of an oriented volume and the boxes used per organ {slice: box}.

    Fixed prompts (labels, 3D boxes) go through in batches. Key slices are predicted first (together
    with the fixed prompts on those slices); then every organ's two fronts (up and down) advance one
    slice per step, all fronts of a step in one batch, each prompted with the bounding box of the
    organ's mask on the slice before; a front stops where the mask (probability > ``threshold``)
    vanishes or the volume ends. Fixed prompts on a slice a step visits travel with it; the
    remaining fixed slices go last. With the predictor's ``propagator`` ``sam2_memory``, each key slice's
    box goes to SAM 2's video predictor instead, which segments the key slice and carries its mask up and down
    by memory (:meth:`SlicePredictor.propagate`; the same stopping rule); the fixed prompts then go in batches.
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
    if keys and predictor.propagator == MEMORY:
        for k, organ_probs in predictor.propagate(volume, keys, threshold).items():
            probs[k] = organ_probs
            z, box = keys[k]
            used[k][z] = [float(v) for v in box]
    elif keys:
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
                box, found = mask_boxes(probs[k, :, :, before] > threshold)
                if not found:  # the organ vanished
                    continue
                requests.setdefault(z, {})[k] = box.tolist()
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
