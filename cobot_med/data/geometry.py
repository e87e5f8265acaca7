"""The geometry written is the geometry read, or the input is refused.

- :func:`check_nifti_affine`: a NIfTI whose voxel-to-world affine is not invertible (a zero or repeated
  axis, NaN) has no geometry to write back; MONAI's reader would silently put an identity affine in its
  place. Refused, naming the file.
- :func:`check_dicom_series`: a DICOM series whose slices are not evenly spaced along their normal (a
  missing or duplicated slice, mixed orientations) would be resampled by ITK onto a uniform grid (ITK only
  warns); read from the slices' own ImagePositionPatient / ImageOrientationPatient, it is refused, naming
  the folder and the gap.
- :func:`nifti_geometry_header`: a segmentation of a NIfTI input gets the input's own geometry fields as
  stored (qform and sform with their codes, quaternion, pixdim with qfac, units, slice information), not an
  affine recomputed from them, so a viewer reads back exactly what it read from the input. A DICOM series'
  segmentation is a NIfTI with the series' origin, spacing and direction (MONAI's writer).

Both checks run in the volume chain's loader (:class:`cobot_med.data.volume.LoadVolumed`), so training,
evaluation, ``cobot-med infer`` and the MONAI Label app refuse the same inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .validation import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# every field of a NIfTI header that says where a voxel is (and how the axes and slices are timed), copied as is
GEOMETRY_FIELDS = ("pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x",
                   "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units", "dim_info", "slice_code",
                   "slice_start", "slice_end", "slice_duration", "toffset")
SPACING_TOLERANCE = 0.01  # a gap may differ from the series' usual step by 1 % (and 1 micrometre) at most


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES) and Path(path).is_file()


def check_nifti_affine(path: str | Path) -> None:
    """DataError when the NIfTI file's affine (the one nibabel, and so MONAI, uses) is not invertible."""
    import nibabel as nib

    try:
        affine = np.asarray(nib.load(str(path)).affine, dtype=np.float64)
    except Exception:  # noqa: BLE001 - an unreadable file is named by the loader itself
        return
    problem = affine_problem(affine)
    if problem:
        raise DataError(f"{path}: its voxel-to-world affine is not invertible ({problem}), so no segmentation can "
                        f"carry its geometry; fix the header's sform / qform (affine {np.round(affine, 4).tolist()})")


def affine_problem(affine: np.ndarray) -> str:
    """'' for an invertible 4x4 affine, else what is wrong with it."""
    if not np.all(np.isfinite(affine)):
        return "it holds NaN or infinite values"
    axes = affine[:3, :3]
    lengths = np.linalg.norm(axes, axis=0)
    if np.any(lengths == 0):
        return f"voxel axis {int(np.argmin(lengths))} has no extent"
    if abs(np.linalg.det(axes)) <= 1e-6 * float(np.prod(lengths)):
        return "its voxel axes are not independent (determinant 0)"
    return ""


def series_files(folder: str | Path) -> list[str]:
    """The files of the DICOM series MONAI's ``ITKReader`` reads from ``folder`` (the first series ITK lists), in
    ITK's order."""
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")  # series date, as MONAI's reader
    names.SetDirectory(str(folder))
    uids = names.GetSeriesUIDs()
    return [str(f) for f in names.GetFileNames(uids[0])] if len(uids) else []


def check_dicom_series(folder: str | Path) -> None:
    """DataError when the series' slices are not evenly spaced along their normal (see the module docstring).
    A series whose slices carry no position (one multi-frame file, a secondary capture) is left to ITK."""
    import SimpleITK as sitk

    files = series_files(folder)
    if len(files) < 3:
        return
    positions, orientations = [], []
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
            position = _numbers(reader.GetMetaData("0020|0032"), 3)
            orientation = _numbers(reader.GetMetaData("0020|0037"), 6)
        except RuntimeError:  # a tag that is not there
            return
        positions.append(position)
        orientations.append(orientation)
    orientations_array = np.asarray(orientations)
    if np.abs(orientations_array - orientations_array[0]).max() > 1e-4:
        raise DataError(f"{folder}: the series' slices have different orientations (ImageOrientationPatient); "
                        "they are not one volume")
    row, column = orientations_array[0][:3], orientations_array[0][3:]
    normal = np.cross(row, column)
    along = np.sort(np.asarray(positions) @ normal)
    gaps = np.diff(along)
    step = float(np.median(gaps))
    if step <= 1e-6:
        raise DataError(f"{folder}: several slices of the series lie at the same position; remove the duplicates")
    off = np.abs(gaps - step) > SPACING_TOLERANCE * step + 1e-3
    if off.any():
        first = int(np.argmax(off))
        missing = int(round(float(gaps[first]) / step)) - 1
        hint = f" ({missing} slice(s) missing?)" if missing >= 1 else ""
        raise DataError(f"{folder}: the slices are not evenly spaced: {step:g} mm apart, but {float(gaps[first]):g} mm "
                        f"between the slices at {along[first]:g} mm and {along[first + 1]:g} mm along the normal"
                        f"{hint}; resampling it onto an even grid would misplace the segmentation. Give the "
                        "complete series")


def _numbers(text: str, count: int) -> list[float]:
    values = [float(v) for v in text.replace(",", "\\").split("\\") if v.strip()]
    if len(values) != count:
        raise RuntimeError(f"expected {count} numbers, got {text!r}")
    return values


def nifti_geometry_header(source: str | Path, shape: Sequence[int], dtype: Any) -> Any:
    """A fresh NIfTI header for an array of ``shape`` and ``dtype`` with ``source``'s geometry fields, as stored
    (:data:`GEOMETRY_FIELDS`; nothing else: no description, intent, scaling or extensions of the input)."""
    import nibabel as nib

    original = nib.load(str(source)).header
    header = type(original)()
    header.set_data_shape(tuple(int(n) for n in shape))
    header.set_data_dtype(dtype)
    for field in GEOMETRY_FIELDS:
        header[field] = original[field]
    return header
