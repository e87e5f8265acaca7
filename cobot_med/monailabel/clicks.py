"""The prompts of an infer request, as 3D Slicer's and OHIF's MONAI Label modules send them.

Both send voxel indices of the image as stored in its file (Slicer: ``vtkMRMLVolumeNode``'s RAS -> IJK,
rounded; OHIF: the volume's ``worldToIndex``, rounded):

- ``foreground`` / ``background``: clicks ``[[i, j, k], ...]`` (Slicer's green and red control points);
- ``roi`` (Slicer's ROI / box button): ``[i_min, i_max, j_min, j_max, k_min, k_max]``, one pair per axis
  (a pair comes reversed along an axis the file stores flipped: both orders are taken);
- ``label``: the name of the segment being edited (Slicer); OHIF sends none.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from .errors import RequestError
from .project import Interaction

UNNAMED = "foreground"  # the result's name when the client names no segment (OHIF)


@dataclasses.dataclass
class Prompted:
    organ: str
    organ_id: int  # the value written in the result (the dataset's id; 1 for an unnamed segment)
    interaction: Interaction
    propagation: str


def _numbers(value: Any, count: int, what: str) -> list[float]:
    if (not isinstance(value, (list, tuple)) or len(value) < count
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise RequestError(f"{what} must be a list of {count} finite numbers, got {value!r}")
    return [float(v) for v in value[:count]]


def _clicks(value: Any, what: str) -> list[list[float]]:
    if value in (None, ""):
        return []
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"{what} must be a list of [i, j, k] voxel indices, got {value!r}")
    return [_numbers(point, 3, f"each {what} click") for point in value]


def parse(request: Mapping[str, Any], organs: Mapping[str, int], propagations: Sequence[str]) -> Prompted:
    """The organ, ROI and clicks of a request; :class:`RequestError` (422) naming what is wrong."""
    label = request.get("label")
    if label in (None, ""):
        organ, organ_id = UNNAMED, 1
    elif label in organs:
        organ, organ_id = str(label), int(organs[label])
    else:
        raise RequestError(f"unknown label {label!r}: this app segments {', '.join(organs)} "
                           "(name the segment after one of them)")
    roi = request.get("roi") or None
    corners = None
    if roi is not None:
        pairs = _numbers(roi, 6, "roi ([i_min, i_max, j_min, j_max, k_min, k_max])")
        if not all(v.is_integer() for v in pairs):
            raise RequestError(f"roi must be whole voxel indices (Slicer rounds them), got {roi!r}")
        corners = pairs[0::2] + pairs[1::2]  # [i0, j0, k0, i1, j1, k1]: two opposite corners
    interaction = Interaction(corners, _clicks(request.get("foreground"), "foreground"),
                              _clicks(request.get("background"), "background"))
    if corners is None and not interaction.foreground:
        raise RequestError("no prompt: place an ROI box or at least one foreground click")
    propagation = request.get("propagation", propagations[0])
    if isinstance(propagation, (list, tuple)):  # the config's list of choices, sent back unchanged
        propagation = propagation[0] if propagation else propagations[0]
    if propagation not in propagations:
        raise RequestError(f"propagation must be one of {list(propagations)}, got {propagation!r}")
    return Prompted(organ, organ_id, interaction, str(propagation))
