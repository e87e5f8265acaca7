"""Evaluation prompt protocols: which prompts a test case's reference label gives the model, and what a score
under each one means.

The papers score SAM fine-tuning with a tight box on every slice, taken from the ground-truth label. That prompt
is an oracle: it tells the model which slices hold the organ and where it is, so a slice without the organ is
never prompted and can never be wrong. A user's prompts are rougher. Each protocol below turns a reference label
into prompts; the predictions go through the one predictor (:func:`cobot_med.predict.predict_volume`) and are
scored on the whole volume by the one metric policy (:mod:`cobot_med.metrics`), so a false positive on a slice
without the organ counts. docs/evaluation.md says which one to quote for which claim.

- ``tight``: the papers' protocol, an **oracle** (:func:`cobot_med.predict.prompts.from_labels`): each organ's
  tight box on every slice where its reference mask has a pixel. ``test_dsc`` is this number.
- ``jitter:<px>``: the same slices (still the oracle's), each box's sides moved out by a uniform random whole
  0..px pixels at the volume's own resolution and clipped to the slice, exactly as training jitters its boxes
  (:func:`cobot_med.data.boxes.widen_boxes`). ``jitter:0`` is ``tight``.
- ``box3d:<mm>``: one 3D box per organ, the reference's extent grown by ``mm`` millimetres along each axis of the
  volume (whole voxels within the margin, clipped to the volume); every slice in its z-range is prompted with the
  box's 2D section, including the slices at the organ's ends where it is small or absent -- a
  ``cobot-med infer --boxes`` ``box3d`` entry (:func:`cobot_med.predict.prompts.extent_prompt`).
- ``key_slice``: one tight box on the organ's largest axial slice (the first of equal ones, from inferior to
  superior), propagated both ways as ``cobot-med infer --boxes`` propagates a ``key_slice`` entry.
- ``clicks:<n>``: ``n`` foreground clicks on pixels of the organ on its largest slice (SAM point prompts, which
  every base of this project takes), predicted as the MONAI Label app predicts clicks without an ROI: the
  clicked slice's mask gives the box that propagates, then the clicked slice is predicted again from its clicks
  and that box.

Every random draw is seeded by (the run's seed, the protocol, the case id) (:func:`protocol_seed`): a protocol
gives the same prompts for a case in every run, process and order.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import zlib
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..data.boxes import mask_boxes, widen_boxes
from ..errors import SettingsError
from .prompts import CasePrompts, OrganPrompt, extent_prompt, from_labels

TIGHT = "tight"
# kind -> (what its number is, whether it takes one, the number's type)
KINDS = {
    "tight": (None, None),
    "jitter": ("px", int),
    "box3d": ("mm", float),
    "key_slice": (None, None),
    "clicks": ("n", int),
}
SYNTAX = "tight, jitter:<px>, box3d:<mm>, key_slice, clicks:<n>"
DEFAULT = ("tight", "jitter:10", "jitter:25", "jitter:50", "box3d:10", "key_slice")  # common.json's default
ROBUSTNESS_JITTERS = (0, 10, 25, 50)  # the robustness curve's points (px); 0 is tight
_MARGIN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One protocol: ``name`` exactly as given (``evaluation.json``'s key, the predictions' folder), its ``kind``
    and ``amount`` (px, mm or clicks; None for ``tight`` and ``key_slice``)."""

    name: str
    kind: str
    amount: float | int | None = None

    @property
    def canonical(self) -> str:
        """The name in one spelling (``box3d:10.0`` -> ``box3d:10``): MLflow's metric names use it."""
        if self.amount is None:
            return self.kind
        amount = int(self.amount) if float(self.amount).is_integer() else float(self.amount)
        return f"{self.kind}:{amount}"

    @property
    def oracle(self) -> bool:
        """Prompts that only the reference label can give on every slice (``tight``, ``jitter``): they say which
        slices hold the organ."""
        return self.kind in ("tight", "jitter")

    @property
    def propagates(self) -> bool:
        """Prompts on one slice that the ``propagator`` carries through the volume (``key_slice``, ``clicks``)."""
        return self.kind in ("key_slice", "clicks")

    @property
    def label(self) -> str:
        """The name as tables print it: ``tight (oracle)``."""
        return f"{self.name} (oracle)" if self.kind == TIGHT else self.name

    def describe(self) -> str:
        """One line on what the prompts are, for ``evaluation.json`` and the printed tables."""
        if self.kind == "tight":
            return ("the papers' protocol, an oracle: a tight box from the reference label on every slice that "
                    "holds the organ, none elsewhere")
        if self.kind == "jitter":
            return (f"the oracle's slices, each tight box's sides moved out by a uniform 0-{self.amount} px (as "
                    "training's jitter)")
        if self.kind == "box3d":
            return (f"one 3D box per organ, its extent grown by {self.canonical.split(':')[1]} mm; every slice in "
                    "its z-range prompted with the box's section")
        if self.kind == "key_slice":
            return "one tight box on the organ's largest slice, propagated both ways (cobot-med infer's key_slice)"
        return (f"{self.amount} foreground click(s) in the organ on its largest slice, propagated both ways (the "
                "MONAI Label app's clicks)")


def parse_protocol(text: Any, setting: str = "prompts") -> Protocol:
    """``tight``, ``jitter:25``, ``box3d:10``, ``key_slice``, ``clicks:3`` -> a :class:`Protocol`; a
    :class:`~cobot_med.errors.SettingsError` naming ``setting`` and the nearest protocol otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise SettingsError(f"{setting}: a protocol is a name ({SYNTAX}), got {text!r}")
    name = text.strip()
    kind, _, amount = name.partition(":")
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, list(KINDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SettingsError(f"{setting}: unknown protocol {name!r}{hint}; the protocols are {SYNTAX} "
                            "(docs/evaluation.md)")
    unit, kind_type = KINDS[kind]
    if unit is None:
        if amount or name != kind:
            raise SettingsError(f"{setting}: {kind} takes no number, got {name!r}")
        return Protocol(name, kind)
    try:
        number = float(amount)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0 or (kind_type is int and not number.is_integer()):
        what = "a whole number" if kind_type is int else "a number"
        raise SettingsError(f"{setting}: {kind}:<{unit}> takes {what} >= 0, got {name!r}")
    if kind == "clicks" and number < 1:
        raise SettingsError(f"{setting}: clicks:<n> takes at least one click, got {name!r}")
    return Protocol(name, kind, int(number) if kind_type is int else number)


def parse_protocols(value: Any, setting: str = "prompts") -> list[Protocol]:
    """The ``prompts`` setting -> its protocols, ``tight`` first (the papers' number is always scored: it is
    ``test_dsc``). ``value``: ``"tight,jitter:25,box3d:10,key_slice"``, a JSON list of names, or a list; a name
    twice (in any spelling) or an unknown one is a :class:`~cobot_med.errors.SettingsError`."""
    if value is None:
        value = ""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise SettingsError(f"{setting}: not a JSON list of protocol names ({err}): {text!r}") from None
        else:
            value = [part for part in text.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise SettingsError(f"{setting}: give protocols as 'tight,jitter:25,box3d:10,key_slice' or a JSON list, "
                            f"got {value!r}")
    protocols = [parse_protocol(item, setting) for item in value]
    seen: dict[str, str] = {}
    for protocol in protocols:
        if protocol.canonical in seen:
            raise SettingsError(f"{setting}: {protocol.name!r} is given twice (as {seen[protocol.canonical]!r})")
        seen[protocol.canonical] = protocol.name
    tight = [p for p in protocols if p.kind == TIGHT] or [Protocol(TIGHT, TIGHT)]
    return tight + [p for p in protocols if p.kind != TIGHT]


def protocol_seed(seed: int, protocol: Protocol, case_id: str) -> int:
    """The seed of a protocol's draws for one case: the same in every run, process and case order."""
    return zlib.crc32(f"{int(seed)}/{protocol.canonical}/{case_id}".encode())


# --- prompts -------------------------------------------------------------------------------------


def _organ_masks(label: torch.Tensor, organs: Mapping[str, int]) -> torch.Tensor:
    from .volume import organ_channels

    return organ_channels(torch.as_tensor(label), list(organs.values())).bool()  # (K, X, Y, Z)


def largest_slice(mask: torch.Tensor) -> int:
    """The axial slice with the most pixels of a (X, Y, Z) mask; the first (most inferior) of equal ones."""
    return int(torch.argmax(mask.sum(dim=(0, 1))))


def case_prompts(protocol: Protocol, label: torch.Tensor, organs: Mapping[str, int], spacing: Sequence[float],
                 seed: int = 0, case_id: str = "") -> CasePrompts:
    """The box prompts ``protocol`` gives a case whose oriented reference label is ``label`` ((1,) X, Y, Z), with
    voxel ``spacing`` (mm) for ``box3d``'s margin. ``clicks`` gets its key slices and clicks from
    :func:`click_prompts`; its boxes come from a prediction (:func:`predict_case`)."""
    label = torch.as_tensor(label)
    label = label.reshape(label.shape[-3:])
    if protocol.kind in ("tight", "jitter"):
        prompts = from_labels(label[None], organs)
        if protocol.kind == "jitter":
            X, Y, Z = label.shape
            offsets = np.random.RandomState(protocol_seed(seed, protocol, case_id)).randint(
                0, int(protocol.amount) + 1, size=(Z, len(organs), 4))
            for k, prompt in enumerate(prompts.prompts):
                if prompt.has_prompt:
                    prompt.kind = "jitter"
                    prompt.boxes = {z: widen_boxes(torch.tensor(box), offsets[z, k], X, Y).tolist()
                                    for z, box in prompt.boxes.items()}
        return prompts
    masks = _organ_masks(label, organs)
    shape = np.asarray(label.shape)
    prompts = []
    for k in range(len(organs)):
        mask = masks[k]
        if not mask.any():
            prompts.append(OrganPrompt("none", note="not in the reference label"))
            continue
        given = {"protocol": protocol.name}
        if protocol.kind == "box3d":
            where = mask.nonzero()
            lo, hi = where.amin(dim=0).numpy(), where.amax(dim=0).numpy()
            grow = np.floor(float(protocol.amount) / np.asarray(spacing, dtype=np.float64) + _MARGIN_EPS).astype(int)
            lo, hi = np.maximum(lo - grow, 0), np.minimum(hi + grow, shape - 1)
            prompts.append(extent_prompt("box3d", lo, hi, given=given))
        elif protocol.kind == "key_slice":
            z = largest_slice(mask)
            box, _ = mask_boxes(mask[..., z])  # the tight box, as an inclusive voxel range of the slice
            x0, y0, x1, y1 = (int(v) for v in box.tolist())
            prompts.append(extent_prompt("key_slice", (y0, x0, z), (y1 - 1, x1 - 1, z), given=given))
        else:  # clicks: the key slice's box comes from the clicked prediction (predict_case)
            prompts.append(OrganPrompt("clicks", given=given))
    return CasePrompts(dict(organs), prompts, int(label.shape[-1]))


def click_prompts(protocol: Protocol, label: torch.Tensor, organs: Mapping[str, int], seed: int = 0,
                  case_id: str = "") -> dict[int, tuple[int, list[list[float]]]]:
    """``clicks:<n>``: per organ index present in ``label``, (its largest slice, ``n`` clicks XY in the slice grid
    (x along Y, as boxes)) on distinct pixels of the organ there, drawn with the protocol's seed (all of them
    when the organ has fewer pixels)."""
    label = torch.as_tensor(label)
    masks = _organ_masks(label.reshape(label.shape[-3:]), organs)
    rng = np.random.RandomState(protocol_seed(seed, protocol, case_id))
    out = {}
    for k in range(len(organs)):
        if not masks[k].any():
            continue
        z = largest_slice(masks[k])
        pixels = masks[k][..., z].nonzero().numpy()  # (P, 2) rows x, columns y
        pick = rng.choice(len(pixels), size=min(int(protocol.amount), len(pixels)), replace=False)
        out[k] = (z, [[float(pixels[i][1]), float(pixels[i][0])] for i in sorted(pick)])
    return out


def predict_case(predictor: Any, volume: torch.Tensor, label: torch.Tensor, organs: Mapping[str, int],
                 protocol: Protocol, spacing: Sequence[float], seed: int = 0,
                 case_id: str = "") -> tuple[torch.Tensor, CasePrompts, list[dict[int, list[float]]]]:
    """Per-organ probabilities (K, X, Y, Z) of an oriented volume under ``protocol``, its prompts and the boxes
    sent per organ ({slice: box}), through the one predictor and propagation
    (:func:`cobot_med.predict.predict_volume`)."""
    from .volume import THRESHOLD, predict_volume

    volume = torch.as_tensor(volume).float()
    prompts = case_prompts(protocol, label, organs, spacing, seed, case_id)
    clicks = click_prompts(protocol, label, organs, seed, case_id) if protocol.kind == "clicks" else {}
    for k, (z, points) in clicks.items():
        seed_probs = predictor.clicked(volume, z, points, [1] * len(points), None)
        box, found = mask_boxes(seed_probs > THRESHOLD)
        prompt = prompts.prompts[k]
        prompt.given = {**(prompt.given or {}), "slice": z, "clicks": points}
        if found:
            prompt.key = (z, box.tolist())
        else:
            prompt.kind, prompt.note = "none", "the clicks gave an empty mask"
    probs, used = predict_volume(predictor, volume, prompts)
    for k, (z, points) in clicks.items():  # the clicked slice again, from its clicks and the box it got
        if prompts.prompts[k].has_prompt:
            probs[k, :, :, z] = predictor.clicked(volume, z, points, [1] * len(points), used[k].get(z))
    return probs, prompts, used
