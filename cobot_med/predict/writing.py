"""Predictions back into the input file's exact geometry, written atomically.

The volume chain only reorients (``Orientationd("RAS")``); MONAI's ``Invertd`` undoes it from the
image's recorded operations, and MONAI's ``NibabelWriter`` writes the file's own affine. Used for
validation and test predictions and for ``cobot-med infer`` alike, so both write the same file for
the same label map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_path

SEG_SUFFIX = "_seg.nii.gz"


def segmentation_path(output_dir: str | Path, case_id: str) -> Path:
    return Path(output_dir) / f"{case_id}{SEG_SUFFIX}"


def to_input_geometry(tensor: torch.Tensor, image: Any, chain: Any, nearest: bool) -> Any:
    """An oriented (C, X, Y, Z) tensor -> MetaTensor in the input file's grid (MONAI ``Invertd`` of the chain)."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    item = MetaTensor(torch.as_tensor(tensor), meta=dict(image.meta), applied_operations=list(image.applied_operations))
    inverted = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=nearest)(
        {"image": image, "pred": item})
    return inverted["pred"]


def write_volume(volume: Any, path: str | Path, dtype: Any) -> Path:
    """Write a (C, X, Y, Z) MetaTensor (C = 1) in its input file's grid (the caller has inverted the orientation
    with ``Invertd``). Of a NIfTI input: with the input's own geometry fields, as stored (qform, sform, their
    codes, pixdim, units: :func:`cobot_med.data.geometry.nifti_geometry_header`); of any other input (a DICOM
    series): MONAI's ``NibabelWriter`` with the affine MONAI read, no resampling."""
    from monai.data import NibabelWriter

    from ..data.geometry import is_nifti

    source = (getattr(volume, "meta", None) or {}).get("filename_or_obj")
    if source and is_nifti(source):
        return _write_like(volume, source, path, dtype)
    writer = NibabelWriter(output_dtype=dtype)
    writer.set_data_array(volume, channel_dim=0)
    writer.set_metadata(volume.meta, resample=False)
    with atomic_path(path) as tmp:
        writer.write(str(tmp))
    return Path(path)


def label_map_in_input_geometry(seg: torch.Tensor, image: Any, chain: Any) -> Any:
    """An oriented (1, X, Y, Z) label map -> MetaTensor in the grid of ``image``'s file (nearest: labels stay)."""
    return to_input_geometry(torch.as_tensor(seg).float(), image, chain, nearest=True)


def write_label_map(seg: torch.Tensor, image: Any, chain: Any, path: str | Path, inverted: Any = None) -> Path:
    """An oriented (1, X, Y, Z) label map -> ``path`` (uint8 NIfTI) in the geometry of ``image``'s file;
    ``inverted``: the label map already in that grid (:func:`label_map_in_input_geometry`), when the caller
    needed it too (``cobot-med infer --dicom_seg``)."""
    if inverted is None:
        inverted = label_map_in_input_geometry(seg, image, chain)
    return write_volume(inverted, path, np.uint8)


def _write_like(volume: Any, source: str | Path, path: str | Path, dtype: Any) -> Path:
    import nibabel as nib

    from ..data.geometry import nifti_geometry_header

    array = np.asarray(torch.as_tensor(volume).detach().cpu().numpy()[0]).astype(dtype)
    original = nib.load(str(source))
    if tuple(array.shape) != tuple(original.shape[:3]):
        raise ValueError(f"{source}: the segmentation has the shape {tuple(array.shape)} in the file's grid, the file "
                         f"{tuple(original.shape[:3])}")
    kind = nib.Nifti2Image if isinstance(original, nib.Nifti2Image) else nib.Nifti1Image
    image = kind(array, None, header=nifti_geometry_header(source, array.shape, dtype))
    with atomic_path(path) as tmp:
        nib.save(image, str(tmp))
    return Path(path)
