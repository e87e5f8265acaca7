"""A DICOM case's segmentation as a DICOM-SEG on its own series (``cobot-med infer --dicom_seg``).

The label map is the one written as ``<case>_seg.nii.gz``, in the grid ITK read the series into (MONAI's
``ITKReader``: its affine, RAS). Each source instance is found in that grid by its own ImagePositionPatient,
ImageOrientationPatient and PixelSpacing: pixel (row r, column c) of an instance lies at
``IPP + c * spacing_c * row_direction + r * spacing_r * column_direction`` (DICOM's patient space, LPS), which the
inverse affine takes to a voxel of the label map. So the frames follow the series' own instances whatever order
its files are in or ITK sorted them into, flipped or oblique (:func:`cobot_med.dicom_seg.frames_on_instances`);
a pixel that does not land on a voxel or lands outside the grid is a :class:`~cobot_med.dicom_seg.DicomSegError`
(the case fails, nothing misplaced is written). The SEG itself: :func:`cobot_med.dicom_seg.write_dicom_seg`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..dicom_seg import DicomSegError, frames_on_instances, write_dicom_seg

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
