"""Where box prompts come from when a scan has no labels: reference labels, 3D boxes, key slices.

Every prompt ends up in the grid the model sees: the volume after the volume chain
(``Orientationd("RAS")``), where ``volume[..., z]`` is an axial (X, Y) slice and a 2D box is
XYXY with x along Y (columns) and y along X (rows), in pixel-edge coordinates with exclusive
right/bottom edges (``[x0, y0, x1, y1]`` covers columns x0..x1-1 and rows y0..y1-1).

Three sources:

- **labels**: each organ's tight box on every slice where the reference mask has a pixel
  (no jitter) -- for evaluation.
- **3D box** (``box3d`` in a boxes file): every axial slice inside the box gets the box's
  2D footprint as its prompt.
- **key slice** (``key_slice`` in a boxes file): one 2D box on one slice, or the middle slice of
  a 3D box; the predictor propagates it (the predicted mask's bounding box on one slice prompts the
  next, both ways, until the organ vanishes).

A boxes file (JSON)::

    {
      "space": "voxel",                      # or "ras" / "lps" (world millimetres); required
      "cases": {
        "Case_00001_0000": {                 # case id: the file name without .nii(.gz), or the DICOM folder
          "liver":  {"box3d": [i0, j0, k0, i1, j1, k1]},
          "spleen": {"key_slice": [i0, j0, k, i1, j1, k]},
          "kidney": {"key_slice": [x0, y0, z0, x1, y1, z1], "space": "ras"}
        }
      }
    }

Six numbers are two opposite corners. In ``voxel`` space they are 0-based voxel indices along
the file's own stored axes (``nibabel``'s ``dataobj[i, j, k]``, ITK's index), both corners
inside the box (inclusive). In ``ras`` (NIfTI / nibabel / 3D Slicer) or ``lps`` (DICOM / ITK)
space they are millimetres, the corners in any order (a flipped axis reverses them); the box holds the
voxels whose centres lie inside it. "space" may also be given per case or per entry.

Nothing ambiguous is guessed: a file with an unknown key, a key given twice, a case named both by its id
and its file name, a voxel box with a reversed corner (a negative size: a ``[i, j, k, w, h, d]`` box would
look like that), a negative voxel index or a coordinate no scan has (beyond 100,000 voxels or mm) is refused
before any case runs, naming the file and the entry. A box that misses its volume makes that organ
*unusable*: the case fails (the runner), unless told to go on with the usable organs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..data.boxes import mask_boxes
from ..errors import CobotMedError

SPACES = ("voxel", "ras", "lps")
KINDS = ("box3d", "key_slice")
_EPS = 1e-3  # voxel units: a centre on the boundary of a world box counts as inside
ABSURD = 1e5  # voxels or millimetres: no scan reaches this far (100 m)


class PromptError(CobotMedError, ValueError):
    """A boxes file or entry that cannot be used, naming the file and the entry."""


@dataclasses.dataclass
class OrganPrompt:
    """One organ's prompts in the oriented grid.

    ``boxes`` maps slice index -> XYXY box (fixed prompts); ``key`` is (slice, box) for propagation.
    """

    kind: str  # "labels", "box3d", "key_slice" or "none"
    boxes: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    key: tuple[int, list[float]] | None = None
    given: Any = None  # the entry as written in the boxes file
    extent: dict[str, list[int]] | None = None  # the box in the oriented grid, inclusive voxel indices
    note: str = ""

    @property
    def has_prompt(self) -> bool:
        return bool(self.boxes) or self.key is not None

    @property
    def unusable(self) -> bool:
        """An entry was given for the organ, but it prompts nothing (e.g. the box misses the volume)."""
        return self.given is not None and not self.has_prompt


@dataclasses.dataclass
class CasePrompts:
    """The prompts of one case, one :class:`OrganPrompt` per selected organ (label-map order)."""

    organs: dict[str, int]
    prompts: list[OrganPrompt]
    depth: int

    @property
    def has_prompt(self) -> bool:
        return any(p.has_prompt for p in self.prompts)

    def fixed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed prompts as boxes (Z, K, 4) and present (Z, K) (key slices excluded)."""
        K = len(self.prompts)
        boxes = torch.zeros(self.depth, K, 4)
        present = torch.zeros(self.depth, K, dtype=torch.bool)
        for k, prompt in enumerate(self.prompts):
            for z, box in prompt.boxes.items():
                boxes[z, k] = torch.tensor(box, dtype=torch.float32)
                present[z, k] = True
        return boxes, present

    def keys(self) -> dict[int, tuple[int, list[float]]]:
        return {k: p.key for k, p in enumerate(self.prompts) if p.key is not None}

    def unusable(self) -> dict[str, str]:
        """Organs whose entry prompts nothing, with the reason."""
        return {organ: p.note for organ, p in zip(self.organs, self.prompts) if p.unusable}


# --- labels ------------------------------------------------------------------------------------


def from_labels(label: torch.Tensor, organs: Mapping[str, int]) -> CasePrompts:
    """Tight boxes of each organ on every slice of an oriented (1, X, Y, Z) label (no jitter)."""
    from .volume import organ_channels

    label = torch.as_tensor(label)
    masks = organ_channels(label, list(organs.values())).bool()  # (K, X, Y, Z)
    boxes, present = mask_boxes(masks.permute(3, 0, 1, 2))  # (Z, K, 4), (Z, K)
    prompts = []
    for k in range(len(organs)):
        slices = present[:, k].nonzero(as_tuple=True)[0].tolist()
        prompt = OrganPrompt("labels", {int(z): boxes[z, k].tolist() for z in slices})
        if not slices:
            prompt.kind, prompt.note = "none", "not in the reference label"
        prompts.append(prompt)
    return CasePrompts(dict(organs), prompts, int(label.shape[-1]))


# --- boxes files -------------------------------------------------------------------------------


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once (``json`` would keep the last one silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(repr(key))
        out[key] = value
    return out


def _strip_nifti(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclasses.dataclass
class BoxEntry:
    kind: str  # "box3d" or "key_slice"
    box: list[float]  # two opposite corners (6 numbers)
    space: str


class BoxFile:
    """A parsed, checked boxes file: ``cases[case_id][organ] -> BoxEntry``."""

    def __init__(self, path: str | Path, organs: Mapping[str, int]) -> None:
        self.path = Path(path)
        self.organs = dict(organs)
        self.cases: dict[str, dict[str, BoxEntry]] = {}
        self._parse()

    def _error(self, where: str, message: str) -> PromptError:
        return PromptError(f"{self.path}: {where}: {message}")

    def _parse(self) -> None:
        if not self.path.is_file():
            raise PromptError(f"boxes file {self.path} does not exist")
        try:
            content = json.loads(self.path.read_text(), object_pairs_hook=_no_duplicates)
        except _Duplicate as err:
            raise PromptError(f"{self.path}: the key {err} is given twice in one object; keep one") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PromptError(f"{self.path}: not valid JSON ({err})") from None
        if not isinstance(content, dict) or not isinstance(content.get("cases"), dict):
            raise PromptError(f"{self.path}: expected {{\"space\": ..., \"cases\": {{case_id: {{organ: ...}}}}}}")
        unknown = sorted(k for k in content if k not in ("space", "cases") and not k.startswith("_"))
        if unknown:
            raise PromptError(f"{self.path}: unknown key(s) {unknown} at the top; a boxes file has \"space\" and "
                              "\"cases\" (and \"_comment\"-style keys starting with _)")
        top_space = content.get("space")
        for case_id, organs in content["cases"].items():
            if not isinstance(organs, dict):
                raise self._error(f"case {case_id}", "expected {organ: {\"box3d\" | \"key_slice\": [6 numbers]}}")
            stem = _strip_nifti(case_id)
            if stem != case_id and stem in content["cases"]:
                raise self._error(f"case {case_id}", f"also given as {stem!r}: name each case once")
            case_space = organs.get("space", top_space)
            entries: dict[str, BoxEntry] = {}
            for organ, entry in organs.items():
                if organ == "space":
                    continue
                where = f"case {case_id}, organ {organ}"
                if organ not in self.organs:
                    raise self._error(where, f"unknown organ; the label map has {list(self.organs)}")
                entries[organ] = self._entry(where, entry, case_space)
            self.cases[str(case_id)] = entries

    def _entry(self, where: str, entry: Any, case_space: Any) -> "BoxEntry":
        """One organ's entry, checked: nothing in it may need a guess."""
        if not isinstance(entry, dict):
            raise self._error(where, 'expected {"box3d": [...]} or {"key_slice": [...]}')
        kinds = [k for k in KINDS if k in entry]
        if len(kinds) != 1:
            raise self._error(where, f"give exactly one of {list(KINDS)}, got {sorted(entry)}")
        unknown = sorted(set(entry) - {*KINDS, "space"})
        if unknown:
            raise self._error(where, f"unknown key(s) {unknown}; an entry has {kinds[0]!r} and optionally \"space\"")
        box = entry[kinds[0]]
        if (not isinstance(box, list) or len(box) != 6
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise self._error(where, f"{kinds[0]} must be 6 finite numbers (two opposite corners), got {box!r}")
        space = entry.get("space", case_space)
        if space not in SPACES:
            raise self._error(where, f"space must be one of {list(SPACES)} (say it at the top of the file, "
                                     f"per case or per entry), got {space!r}")
        if space == "voxel" and not all(float(v).is_integer() for v in box):
            raise self._error(where, f"voxel boxes are integer indices, got {box}")
        far = [v for v in box if abs(v) > ABSURD]
        if far:
            raise self._error(where, f"{kinds[0]} {box}: {far[0]} is no place in a scan (beyond {ABSURD:,.0f} "
                                     f"{'voxels' if space == 'voxel' else 'mm'}); check the units and the space")
        if space == "voxel" and min(box) < 0:
            raise self._error(where, f"{kinds[0]} {box}: voxel indices start at 0, got {min(box):g}")
        reversed_axes = [axis for axis in range(3) if box[axis] > box[axis + 3]] if space == "voxel" else []
        if reversed_axes:  # world corners may come in any order (a flipped axis reverses them); indices may not
            axis = reversed_axes[0]
            raise self._error(where, f"{kinds[0]} {box}: a negative size along axis {axis} ({box[axis]:g} > "
                                     f"{box[axis + 3]:g}); give voxel boxes lowest index first, [i0, j0, k0, i1, j1, "
                                     "k1] with i0 <= i1 (a corner and a size would be another box)")
        return BoxEntry(kinds[0], [float(v) for v in box], space)

    def entries_for(self, case_id: str, file_name: str | None = None) -> dict[str, BoxEntry] | None:
        if case_id in self.cases:
            return self.cases[case_id]
        if file_name and file_name in self.cases:
            return self.cases[file_name]
        return None

    def for_case(self, case_id: str, image: Any, organs: Mapping[str, int],
                 file_name: str | None = None) -> CasePrompts:
        """The prompts of one case on its oriented image (a MetaTensor from the volume chain)."""
        shape = tuple(int(n) for n in image.shape[-3:])
        entries = self.entries_for(case_id, file_name)
        prompts = []
        for organ in organs:
            entry = None if entries is None else entries.get(organ)
            if entry is None:
                note = (f"no entry in {self.path.name}" if entries is not None
                        else f"case {case_id} is not in {self.path.name}")
                prompts.append(OrganPrompt("none", note=note))
                continue
            prompts.append(box_prompt(entry.kind, entry.box, entry.space, image))
        return CasePrompts(dict(organs), prompts, shape[2])


def box_prompt(kind: str, box: Sequence[float], space: str, image: Any) -> OrganPrompt:
    """One organ's prompt from a box (two opposite corners in ``space``) on an oriented image: ``box3d`` gives
    every axial slice inside the box its footprint, ``key_slice`` the middle slice's footprint to propagate.
    A box outside the volume gives a ``none`` prompt. (A boxes-file entry, or an ROI the MONAI Label app gets.)"""
    if kind not in KINDS:
        raise PromptError(f"a box prompt is one of {list(KINDS)}, got {kind!r}")
    shape = tuple(int(n) for n in image.shape[-3:])
    lo_hi = oriented_extent(box, space, original_affine(image), oriented_affine(image), shape)
    given = {kind: list(box), "space": space}
    if lo_hi is None:
        meta = getattr(image, "meta", None) or {}
        grid = [int(n) for n in meta.get("spatial_shape", shape)]
        return OrganPrompt("none", given=given, note=f"the {space} box {list(box)} lies outside the volume "
                                                     f"(the file's voxel grid is {grid})")
    return extent_prompt(kind, *lo_hi, given=given)


def extent_prompt(kind: str, lo: Sequence[int], hi: Sequence[int], given: Any = None) -> OrganPrompt:
    """One organ's prompt from an inclusive voxel range (lo, hi) of the oriented grid: ``box3d`` gives every axial
    slice from lo[2] to hi[2] the box's footprint, ``key_slice`` the middle slice's footprint to propagate. What
    :func:`box_prompt` does once a box is in the grid; the evaluation protocols build theirs here too."""
    if kind not in KINDS:
        raise PromptError(f"a box prompt is one of {list(KINDS)}, got {kind!r}")
    footprint = [float(lo[1]), float(lo[0]), float(hi[1] + 1), float(hi[0] + 1)]  # x along Y, y along X
    extent = {"lo": [int(v) for v in lo], "hi": [int(v) for v in hi]}
    if kind == "box3d":
        boxes = {z: list(footprint) for z in range(int(lo[2]), int(hi[2]) + 1)}
        return OrganPrompt("box3d", boxes=boxes, given=given, extent=extent)
    middle = (int(lo[2]) + int(hi[2])) // 2
    return OrganPrompt("key_slice", key=(middle, footprint), given=given, extent=extent)


# --- coordinates -------------------------------------------------------------------------------


def original_affine(image: Any) -> np.ndarray:
    """The file's own voxel -> RAS mm affine, as MONAI's reader recorded it when loading (``original_affine``)."""
    meta = getattr(image, "meta", {}) or {}
    affine = meta.get("original_affine")
    if affine is None:
        raise PromptError("the oriented image carries no 'original_affine' (load it with the volume chain)")
    return np.asarray(affine, dtype=np.float64)


def oriented_affine(image: Any) -> np.ndarray:
    return np.asarray(image.affine, dtype=np.float64)


def oriented_extent(box: Sequence[float], space: str, file_affine: np.ndarray, affine: np.ndarray,
                    shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive voxel index range (lo, hi) in the oriented grid of a box given in ``space``, clipped to ``shape``;
    None when nothing of it is inside the volume.

    The eight corners go to RAS millimetres (voxel space through the file's affine; LPS by negating x and y)
    and then into the oriented grid through the inverse of its affine; the result is the range of voxels
    whose centres lie within the corners' bounding box. For a voxel box this is exact (the orientation
    only permutes and flips axes); for a world box on an oblique volume it is the box's bounding box in
    the voxel grid.
    """
    a, b = np.asarray(box[:3], dtype=np.float64), np.asarray(box[3:], dtype=np.float64)
    corners = np.array([[(a, b)[i][0], (a, b)[j][1], (a, b)[k][2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    homogeneous = np.c_[corners, np.ones(len(corners))]
    if space == "voxel":
        world = homogeneous @ file_affine.T
    elif space == "ras":
        world = homogeneous
    elif space == "lps":
        world = homogeneous * np.array([-1.0, -1.0, 1.0, 1.0])
    else:
        raise PromptError(f"space must be one of {list(SPACES)}, got {space!r}")
    voxels = (world @ np.linalg.inv(affine).T)[:, :3]
    lo = np.ceil(voxels.min(axis=0) - _EPS).astype(int)
    hi = np.floor(voxels.max(axis=0) + _EPS).astype(int)
    top = np.asarray(shape[:3]) - 1
    lo, hi = np.maximum(lo, 0), np.minimum(hi, top)
    if np.any(lo > hi):
        return None
    return lo, hi
