"""Whole-volume evaluation in MONAI's evaluator: the one predictor, the one label map, the one metric policy.

The evaluator's inferer predicts a volume from its reference label's boxes exactly as
``cobot-med infer --labels`` does (:mod:`cobot_med.predict`; the ``tight`` protocol) and returns the label
map; :class:`cobot_med.handlers.ProtocolScores` predicts and scores the same volume under the other prompt
protocols (:mod:`cobot_med.predict.protocols`) with the same inferer. The
post-processing splits predicted and reference label maps into one binary channel per organ for
:class:`cobot_med.metrics.OrganDiceMetric` (3D DSC, ``val_dsc`` / ``test_dsc``) and
:class:`cobot_med.metrics.SliceDiceMetric` (the authors' pooled slice DSC). The
:class:`~cobot_med.handlers.SegmentationWriter` writes the same label map in the input's geometry for
validation; the test split's are written per protocol by :class:`~cobot_med.handlers.ProtocolScores`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from tqdm.auto import tqdm

from ..distributed import rank
from ..metrics import spacing_of
from ..predict import SlicePredictor, organ_channels, to_label_map
from ..predict.protocols import TIGHT, Protocol, parse_protocol, predict_case
from .precision import Precision


class VolumeSliceInferer(Inferer):
    """``__call__(image (1,1,X,Y,Z) in [0,255], network, label (1,1,X,Y,Z))`` -> label map (1,1,X,Y,Z) uint8
    as a MetaTensor carrying the image's metadata; prompts are the label's under ``protocol`` (``tight`` by
    default: the label's tight boxes per slice, the papers' oracle, whose score is ``val_dsc`` / ``test_dsc``;
    :mod:`cobot_med.predict.protocols`), drawn with ``seed`` and the case id where the protocol is random;
    ``propagator``: how key slices (``key_slice``, ``clicks``) reach the rest of the volume, ``boxes`` or
    ``sam2_memory`` (:mod:`cobot_med.predict.volume`)."""

    def __init__(self, organs: Mapping[str, int], batch_size: int = 8, amp: Precision | bool | str = False,
                 protocol: Protocol | str = TIGHT, seed: int = 0, propagator: str = "boxes") -> None:
        super().__init__()
        self.organs, self.batch_size, self.amp = dict(organs), int(batch_size), amp
        self.protocol = parse_protocol(protocol) if isinstance(protocol, str) else protocol
        self.seed, self.propagator = int(seed), propagator

    def for_protocol(self, protocol: Protocol | str) -> "VolumeSliceInferer":
        """The same inferer (organs, batch size, precision, seed, propagator) under another protocol."""
        return VolumeSliceInferer(self.organs, self.batch_size, self.amp, protocol, self.seed, self.propagator)

    def __call__(self, inputs: torch.Tensor, network: Any, label: torch.Tensor, *args: Any, case_id: str = "",
                 **kwargs: Any):
        seg, _, _ = self.predict(inputs, network, label, case_id)
        seg = seg[None].to(inputs.device)
        return MetaTensor(seg, meta=inputs.meta if isinstance(inputs, MetaTensor) else {})

    def predict(self, inputs: torch.Tensor, network: Any, label: torch.Tensor, case_id: str = ""):
        """(label map (1, X, Y, Z) uint8 on the CPU, the prompts, the boxes sent per organ) of one volume."""
        affine = getattr(inputs, "affine", None)
        spacing = spacing_of(affine.reshape(-1, 4, 4)[0].cpu().numpy()) if affine is not None else [1.0, 1.0, 1.0]
        volume = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        label = label.as_tensor() if isinstance(label, MetaTensor) else label
        predictor = SlicePredictor(network, volume.device, self.batch_size, self.amp, propagator=self.propagator)
        # progress inside the volume (a CT volume takes minutes on a CPU): slice images sent, under this protocol
        with tqdm(desc=f"{case_id or _name_of(inputs)} ({self.protocol.name}) slices", unit="slice", leave=False,
                  disable=rank() > 0) as bar:
            predictor.on_slices = bar.update
            probs, prompts, used = predict_case(predictor, volume.reshape(volume.shape[-3:]).cpu(),
                                                label.reshape(label.shape[-3:]).cpu(), self.organs, self.protocol,
                                                spacing, self.seed, case_id)
        return to_label_map(probs, list(self.organs.values())), prompts, used


def _name_of(inputs: Any) -> str:
    """The case a volume is (its file's case id, as the test split names it), for its progress bar."""
    from pathlib import Path

    from ..inference.cases import case_id_of

    source = (getattr(inputs, "meta", None) or {}).get("filename_or_obj")
    if isinstance(source, (list, tuple)):
        source = source[0] if source else None
    return case_id_of(Path(str(source))) if source else "volume"


def postprocessing(organs: Mapping[str, int]):
    """Decollated evaluator items: ``pred_organs`` and ``label_organs``, (K, X, Y, Z) binary channels of the
    predicted and reference label maps, for the metrics."""
    from monai.transforms import Compose, Lambdad

    organ_ids = list(organs.values())
    return Compose([
        Lambdad(keys=["pred", "label"], func=lambda lab: organ_channels(lab, organ_ids),
                overwrite=["pred_organs", "label_organs"]),
    ])
