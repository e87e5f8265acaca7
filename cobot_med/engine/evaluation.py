"""Whole-volume evaluation in MONAI's evaluator: the one predictor, the one label map, the one metric policy.

The evaluator's inferer predicts a volume from its reference label's boxes exactly as
``cobot-med infer --labels`` does (:mod:`cobot_med.predict`) and returns the label map; the
post-processing splits predicted and reference label maps into one binary channel per organ for
:class:`cobot_med.metrics.OrganDiceMetric` (3D DSC, ``val_dsc`` / ``test_dsc``) and
:class:`cobot_med.metrics.SliceDiceMetric` (the authors' pooled slice DSC). The
:class:`~cobot_med.handlers.SegmentationWriter` writes the same label map in the input's geometry.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from ..predict import SlicePredictor, from_labels, organ_channels, predict_volume, to_label_map
from .precision import Precision


class VolumeSliceInferer(Inferer):
    """``__call__(image (1,1,X,Y,Z) in [0,255], network, label (1,1,X,Y,Z))`` -> label map (1,1,X,Y,Z) uint8
    as a MetaTensor carrying the image's metadata; prompts are the label's tight boxes per slice."""

    def __init__(self, organs: Mapping[str, int], batch_size: int = 8, amp: Precision | bool | str = False) -> None:
        super().__init__()
        self.organs, self.batch_size, self.amp = dict(organs), int(batch_size), amp

    def __call__(self, inputs: torch.Tensor, network: Any, label: torch.Tensor, *args: Any, **kwargs: Any):
        volume = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        label = label.as_tensor() if isinstance(label, MetaTensor) else label
        prompts = from_labels(label.reshape(1, *label.shape[-3:]).cpu(), self.organs)
        predictor = SlicePredictor(network, volume.device, self.batch_size, self.amp)
        probs, _ = predict_volume(predictor, volume.reshape(volume.shape[-3:]).cpu(), prompts)
        seg = to_label_map(probs, list(self.organs.values()))[None].to(volume.device)
        return MetaTensor(seg, meta=inputs.meta if isinstance(inputs, MetaTensor) else {})


def postprocessing(organs: Mapping[str, int]):
    """Decollated evaluator items: ``pred_organs`` and ``label_organs``, (K, X, Y, Z) binary channels of the
    predicted and reference label maps, for the metrics."""
    from monai.transforms import Compose, Lambdad

    organ_ids = list(organs.values())
    return Compose([
        Lambdad(keys=["pred", "label"], func=lambda lab: organ_channels(lab, organ_ids),
                overwrite=["pred_organs", "label_organs"]),
    ])
