"""A DICOM case's segmentation as a DICOM-SEG on its own series (``cobot-med infer --dicom_seg``).

The label map is the one written as ``<case>_seg.nii.gz``, in the grid ITK read the series into (MONAI's
``ITKReader``: its affine, RAS). Each source instance is found in that grid by its own ImagePositionPatient,
ImageOrientationPatient and PixelSpacing: pixel (row r, column c) of an instance lies at
``IPP + c * spacing_c * row_direction + r * spacing_r * column_direction`` (DICOM's patient space, LPS), which the
inverse affine takes to a voxel of the label map. So the frames follow the series' own instances whatever order
its files are in or ITK sorted them into, flipped or oblique; a pixel that does not land on a voxel (within
:data:`ON_VOXEL` of one) or lands outside the grid is a :class:`~cobot_med.dicom_seg.DicomSegError` (the case
fails, nothing misplaced is written). The SEG itself: :func:`cobot_med.dicom_seg.write_dicom_seg`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..dicom_seg import DicomSegError, write_dicom_seg

ON_VOXEL = 0.1  # how far (in voxels) a source pixel's centre may be from the voxel it is given
SEG_DCM_SUFFIX = "_seg.dcm"


def dicom_seg_path(output_dir: str | Path, case_id: str) -> Path:
    return Path(output_dir) / f"{case_id}{SEG_DCM_SUFFIX}"


def series_datasets(folder: str | Path) -> list[Any]:
    """The headers (no pixels) of the instances ITK read as the case's series
    (:func:`cobot_med.data.geometry.series_files`)."""
    import pydicom

    from ..data.geometry import series_files

    files = series_files(folder)
    if not files:
        raise DicomSegError(f"{folder}: no DICOM series found to reference")
    return [pydicom.dcmread(name, stop_before_pixels=True) for name in files]


def frames_on_instances(volume: np.ndarray, affine: np.ndarray, datasets: list[Any], space: str = "RAS") -> np.ndarray:
    """The ``(len(datasets), Rows, Columns)`` frames of ``volume`` (X, Y, Z; voxel-to-world ``affine`` in
    ``space``, RAS or LPS) that lie on each instance, in ``datasets``' order.

    An instance's pixel grid is affine in the volume's voxels: voxel(r, c) = v0 + c * dc + r * dr. Rounded to
    integers, the error is largest at a corner, so the four corners decide whether every pixel lands on a voxel
    and inside the grid; the frame is then gathered with integer index arithmetic."""
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    to_space = np.array([-1.0, -1.0, 1.0]) if str(space).upper() == "RAS" else np.ones(3)
    shape = np.asarray(volume.shape[:3])
    flat = np.ascontiguousarray(volume).ravel()
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    frames = []
    for ds in datasets:
        rows, columns = int(ds.Rows), int(ds.Columns)
        position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        spacing = np.asarray(ds.PixelSpacing, dtype=np.float64)  # between rows, between columns
        v0 = inverse[:3, :3] @ (position * to_space) + inverse[:3, 3]
        dc = inverse[:3, :3] @ (orientation[:3] * spacing[1] * to_space)  # one column to the right
        dr = inverse[:3, :3] @ (orientation[3:] * spacing[0] * to_space)  # one row down
        steps = [np.rint(v) for v in (v0, dc, dr)]
        corners = np.array([[0, 0], [0, columns - 1], [rows - 1, 0], [rows - 1, columns - 1]], dtype=np.float64)
        exact = v0 + corners[:, 1:] * dc + corners[:, :1] * dr
        rounded = steps[0] + corners[:, 1:] * steps[1] + corners[:, :1] * steps[2]
        off = float(np.abs(exact - rounded).max())
        if off > ON_VOXEL:
            raise DicomSegError(f"instance {ds.SOPInstanceUID}: its pixels fall {off:.2f} voxels from the "
                                "segmentation's grid; the series does not match the volume it was read as")
        if (rounded < 0).any() or (rounded >= shape).any():
            raise DicomSegError(f"instance {ds.SOPInstanceUID}: its pixels fall outside the segmentation's grid "
                                f"{tuple(int(n) for n in shape)}")
        start, column, row = (int(v.astype(np.int64) @ strides) for v in steps)  # in the flattened volume
        flat_index = start + np.arange(columns)[None, :] * column + np.arange(rows)[:, None] * row
        frames.append(np.take(flat, flat_index))
    return np.stack(frames)


def write_case_seg(inverted: Any, folder: str | Path, organs: Mapping[str, int], path: str | Path,
                   identity: Mapping[str, Any]) -> Path:
    """``inverted`` (the (1, X, Y, Z) label map in the series' grid, a MetaTensor with its affine) as a DICOM-SEG
    of the series in ``folder`` at ``path``: one segment per organ of ``organs`` (the organs segmented)."""
    datasets = series_datasets(folder)
    volume = np.asarray(inverted.detach().cpu().numpy()[0]).round().astype(np.uint16)
    space = (getattr(inverted, "meta", None) or {}).get("space", "RAS")
    frames = frames_on_instances(volume, np.asarray(inverted.affine, dtype=np.float64), datasets, space)
    weights = identity.get("adapter_weights_sha256")
    parameters = {"arch": str(identity.get("arch")), "peft": str(identity.get("peft")),
                  "image_size": str(identity.get("image_size")),
                  "adapter_weights_sha256": str(weights) if weights else "none (zero-shot)"}
    return write_dicom_seg(frames, datasets, {int(v): name for name, v in organs.items()}, path,
                           parameters=parameters, series_description="cobot-med segmentation")
