"""MONAI Label's local datastore, with every saved label checked against its image and stored in the
dataset's label ids, so that a training round never meets a label it cannot use.

A label arrives from 3D Slicer as ``.nrrd`` (or ``.nii.gz``) with the values of the segments' order
in Slicer, and ``label_info`` ``[{"name": "liver", "idx": 1}, ...]`` saying which is which. Saved here:
the same voxels, values mapped by name to the dataset's ids, as NIfTI with the image's own affine.
Refused (HTTP 4xx with the reason, nothing stored): an unknown image, an unreadable file, a label
that is not 3D, whose shape or geometry differs from the image's, or with values that are not labels.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

import numpy as np
from monailabel.datastore.local import LocalDatastore

from . import project
from .errors import RequestError, http_error

GEOMETRY_TOLERANCE_MM = 1e-3  # largest difference allowed between the label's and the image's affines


def _array(volume: Any) -> np.ndarray:
    array = np.asarray(volume.array if hasattr(volume, "array") else volume)
    while array.ndim > 3 and array.shape[-1] == 1:  # a trailing singleton axis (4D NIfTI with one frame)
        array = array[..., 0]
    return array


def checked_label(label: Any, image: Any, organs: Mapping[str, int], label_info: Any = None) -> np.ndarray:
    """The label's voxels in the dataset's ids (uint8), or :class:`RequestError` saying why it cannot be used.

    ``label`` and ``image`` are volumes as :func:`project.read_volume` gives them (array and RAS affine).
    """
    array, shape = _array(label), tuple(int(n) for n in _array(image).shape[:3])
    if array.ndim != 3:
        raise RequestError(f"the label must be one 3D label map, got an array of shape {list(array.shape)} "
                           "(save a labelmap, not a multi-layer segmentation)")
    if tuple(array.shape) != shape:
        raise RequestError(f"the label's shape {list(array.shape)} does not match the image's {list(shape)}")
    difference = float(np.abs(np.asarray(label.affine, float) - np.asarray(image.affine, float)).max())
    if difference > GEOMETRY_TOLERANCE_MM:
        raise RequestError(f"the label's geometry does not match the image's (affines differ by up to "
                           f"{difference:.4g} mm): export the segmentation with the image as reference")
    if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
        raise RequestError("the label holds non-integer values; a label map holds whole numbers")
    values = {int(v) for v in np.unique(array)} - {0}
    mapping = {i: i for i in organs.values()}
    if label_info:
        mapping = _mapping_from_info(label_info, organs)
    unknown = sorted(values - set(mapping))
    if unknown:
        known = ", ".join(f"{v} = {name}" for name, v in organs.items())
        raise RequestError(f"the label holds values {unknown} that are not labels of this dataset ({known}"
                           f"{'; as named in label_info' if label_info else ''})")
    out = np.zeros(array.shape, np.uint8)
    for value in values:
        out[array == value] = mapping[value]
    return out


def _mapping_from_info(label_info: Any, organs: Mapping[str, int]) -> dict[int, int]:
    """Slicer's ``label_info`` ``[{"name", "idx"}]`` -> {value in the file: the dataset's id}."""
    if not isinstance(label_info, list) or not all(isinstance(e, dict) and "name" in e and "idx" in e
                                                   for e in label_info):
        raise RequestError(f"label_info must be a list of {{'name', 'idx'}}, got {label_info!r}")
    unknown = [e["name"] for e in label_info if e["name"] not in organs]
    if unknown:
        raise RequestError(f"label_info names segments {unknown} that are not labels of this dataset "
                           f"({', '.join(organs)}); name the segments after them")
    return {int(e["idx"]): int(organs[e["name"]]) for e in label_info}


class CheckedDatastore(LocalDatastore):
    """``LocalDatastore`` whose ``save_label`` checks and converts the label first (see the module)."""

    def __init__(self, datastore_path: str, organs: Mapping[str, int], **kwargs: Any) -> None:
        self.organs = dict(organs)
        super().__init__(datastore_path, **kwargs)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        try:
            converted = self._converted(image_id, label_filename, (label_info or {}).get("label_info"))
        except RequestError as err:
            raise http_error(err) from None
        try:
            return super().save_label(image_id, converted, label_tag, label_info)
        finally:
            os.unlink(converted)

    def _converted(self, image_id: str, label_filename: str, label_info: Any) -> str:
        if not self.get_image_uri(image_id):
            raise RequestError(f"image {image_id!r} is not in the datastore", status=404)
        try:
            label = project.read_volume(label_filename)
        except Exception as err:  # noqa: BLE001 - the reader's reason goes back to the client
            raise RequestError(f"cannot read the label file: {err}") from err
        image = project.read_volume(self.get_image_uri(image_id))
        array = checked_label(label, image, self.organs, label_info)
        path = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        project.write_label(array, image, path)
        return path
