"""Input checks with errors that name the file and the problem.

Every check raises :class:`DataError` (a ``ValueError``) whose message starts with the file it
is about. In a dataset, a case that fails is reported and skipped (see ``GuardedVolume``).
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform

from ..errors import CobotMedError


class DataError(CobotMedError, ValueError):
    """A case that cannot be used: the message names the file and what is wrong."""


def file_name(d: Mapping[Hashable, Any], key: str) -> str:
    """The file(s) behind ``d[key]``: the path as given before loading, else the loaded tensor's metadata."""
    source = d.get(f"{key}_source")
    if source is not None:
        return ", ".join(map(str, source)) if isinstance(source, (list, tuple)) else str(source)
    value = d.get(key)
    meta = getattr(value, "meta", None)
    if meta and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    return str(value) if isinstance(value, (str, list, tuple)) else f"<{key}>"


def loaded_from_list(x: Any) -> bool:
    """True when a loaded volume was stacked from a list of files (MONAI marks the new axis 0 as channel)."""
    meta = getattr(x, "meta", None) or {}
    return meta.get("original_channel_dim") == 0


class CheckDimsd(MapTransform):
    """Right after loading: each key must be one 3D volume (not 2D, not 4D).

    A 4D file with a single volume along its 4th axis (shape X, Y, Z, 1) counts as 3D; a list
    of files (one per organ) loads as a stack along a new first axis and passes.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            shape = tuple(d[key].shape)
            stacked = loaded_from_list(d[key]) and len(shape) == 4
            singleton = len(shape) == 4 and shape[-1] == 1
            if len(shape) != 3 and not stacked and not singleton:
                raise DataError(f"{file_name(d, key)}: expected a 3D volume, got {len(shape)}D with shape {shape}")
        return d


class CheckCased(MapTransform):
    """Image/label agreement and content, after ``EnsureChannelFirstd`` (and per-organ files merged).

    Raises :class:`DataError` for NaN or infinite intensities, image/label shape or affine
    mismatch, label values outside ``label_values`` (the dataset's label map; the organ ids and
    0 by default), and a label with none of the expected organs.
    """

    def __init__(self, organ_ids: Sequence[int], image_key: str = "image", label_key: str = "label",
                 affine_tolerance: float = 1e-3, label_values: Sequence[int] | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__([image_key, label_key], allow_missing_keys)
        self.organ_ids = [int(i) for i in organ_ids]
        allowed = self.organ_ids if label_values is None else label_values
        self.label_values = sorted({0, *(int(v) for v in allowed)})
        self.image_key, self.label_key, self.affine_tolerance = image_key, label_key, affine_tolerance

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        image = d[self.image_key]
        if not torch.isfinite(torch.as_tensor(image)).all():
            raise DataError(f"{file_name(d, self.image_key)}: image has NaN or infinite intensities")
        if self.label_key not in d:
            return d
        label = d[self.label_key]
        image_name, label_name = file_name(d, self.image_key), file_name(d, self.label_key)
        if tuple(image.shape[1:]) != tuple(label.shape[1:]):
            raise DataError(f"{label_name}: label shape {tuple(label.shape[1:])} does not match "
                            f"image shape {tuple(image.shape[1:])} ({image_name})")
        a_img, a_lab = np.asarray(image.affine, dtype=np.float64), np.asarray(label.affine, dtype=np.float64)
        if not np.allclose(a_img, a_lab, atol=self.affine_tolerance, rtol=1e-5):
            raise DataError(f"{label_name}: label affine differs from the image's ({image_name}):\n"
                            f"{np.round(a_lab, 4)}\nvs\n{np.round(a_img, 4)}")
        values_t = torch.unique(torch.as_tensor(label))
        if not torch.equal(values_t, values_t.round()):
            fractional = values_t[values_t != values_t.round()][:5].tolist()
            raise DataError(f"{label_name}: label holds non-integer values {fractional}")
        values = set(values_t.long().tolist())
        unknown = sorted(values - set(self.label_values))
        if unknown:
            raise DataError(f"{label_name}: label ids {unknown[:10]} are not in the label map "
                            f"(allowed: {_ranges(self.label_values)})")
        if not values & set(self.organ_ids):
            raise DataError(f"{label_name}: label holds none of the expected organs {self.organ_ids}")
        return d


def _ranges(values: Sequence[int]) -> str:
    """[0, 1, 2, 3, 7] -> '0-3, 7'."""
    out, values = [], sorted(values)
    start = prev = values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)
