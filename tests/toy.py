"""Shared toy model and batch for the PEFT tests (tiny SAM, two images with two boxes each)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cobot_med.model import ModelSpec, build_model

SIZE = 64


def tiny(peft, seed=0, checkpoint=None, size=SIZE, **options):
    torch.manual_seed(seed)  # same seed -> same base weights whatever the method adds afterwards
    return build_model(ModelSpec(arch="tiny", image_size=size, peft=peft, peft_options=options), checkpoint)


def toy_batch(seed=0, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, size, size, generator=g) * 255
    boxes = torch.tensor([[[8.0, 8, 40, 36], [20, 24, 60, 58]], [[4.0, 10, 30, 50], [30, 2, 62, 30]]])
    boxes = boxes * size / 64
    target = torch.zeros(2, 2, size, size)
    for b in range(2):
        for k in range(2):
            x0, y0, x1, y1 = boxes[b, k].int().tolist()
            target[b, k, y0 + 4 : y1 - 4, x0 + 4 : x1 - 4] = 1  # an object a little inside its box
    images = images * (1 - 0.5 * target.amax(1, keepdim=True))  # and visible in the image
    return images, boxes, target


def loss_fn(logits, target):
    """Sigmoid Dice + BCE, as the papers train."""
    probs = logits.sigmoid()
    dice = 1 - (2 * (probs * target).sum((-1, -2)) + 1) / (probs.sum((-1, -2)) + target.sum((-1, -2)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


def acting_adapter(folder):
    """A tiny lora+cobot adapter saved in ``folder`` whose branches are non-zero (so it changes the output and
    merging changes weights), the same every time."""
    from cobot_med.adapter import save_adapter

    torch.manual_seed(0)
    model = build_model(ModelSpec("tiny", 64, "lora+cobot"))
    with torch.no_grad():
        for parameter in model.sam.image_encoder.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return save_adapter(model, folder)
