"""Volume-level MONAI transforms: from files on disk to one checked, oriented, windowed case.

The chain (``transforms/volume.json``, cached once per case, invertible with ``Invertd``):
load (MONAI's readers: NIfTI via nibabel, ITK for the rest) -> check -> channel first ->
per-organ files to one label map -> check -> keep the trained organs -> reorient to RAS ->
window to [0, 255]. After ``Orientationd("RAS")`` the last axis runs inferior -> superior
whatever the file's storage order, so ``volume[..., z]`` is an axial slice, and ``Invertd``
undoes the reorientation exactly on the way back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    LoadImaged,
    MapTransform,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
)

from ..errors import find_in_chain
from . import layouts  # noqa: F401 - transforms/volume.json refers to cobot_med.data.layouts
from .validation import DataError, file_name, loaded_from_list

logger = logging.getLogger(__name__)

SOURCE_SUFFIX = "_source"


class LoadVolumed(LoadImaged):
    """``LoadImaged`` whose failures are :class:`DataError` naming the file.

    A missing, unreadable or truncated file raises ``DataError("<path>: ...")``; for a list of
    files (one per organ) the failing file is found and named. The path(s) as given are kept
    under ``<key>_source`` for the later checks' messages (``DeleteItemsd`` drops them at the end
    of the chain). Always ``image_only``: metadata travels in the ``MetaTensor``.
    """

    def __init__(self, keys: KeysCollection, reader: Any = None, allow_missing_keys: bool = False,
                 **kwargs: Any) -> None:
        kwargs.pop("image_only", None)
        super().__init__(keys, reader=reader, image_only=True, allow_missing_keys=allow_missing_keys, **kwargs)

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            source = d[key]
            paths = [str(p) for p in source] if isinstance(source, (list, tuple)) else [str(source)]
            for path in paths:
                if not Path(path).exists():
                    raise DataError(f"{path}: file not found")
                check_geometry(path)
            try:
                loaded = self._loader(source, reader)
            except Exception as err:  # noqa: BLE001 - any reader failure becomes a named DataError
                raise DataError(self._explain(paths, err, reader)) from err
            if isinstance(source, (list, tuple)) and len(paths) == 1 and isinstance(loaded, MetaTensor):
                loaded = loaded.unsqueeze(0)  # a list of one file: stacked like longer lists
                loaded.meta["original_channel_dim"] = 0
            d[key] = loaded
            d[f"{key}{SOURCE_SUFFIX}"] = paths if isinstance(source, (list, tuple)) else paths[0]
        return d

    def _explain(self, paths: list[str], err: Exception, reader: Any) -> str:
        if len(paths) > 1:
            for path in paths:
                try:
                    self._loader(path, reader)
                except Exception as single:  # noqa: BLE001
                    return f"{path}: unreadable, truncated or corrupt ({type(single).__name__}: {single})"
            return f"{', '.join(paths)}: the files do not stack into one volume ({type(err).__name__}: {err})"
        return f"{paths[0]}: unreadable, truncated or corrupt ({type(err).__name__}: {err})"


LoadVolumeD = LoadVolumeDict = LoadVolumed


def check_geometry(path: str | Path) -> None:
    """Refuse an input whose geometry could not be written back exactly (:mod:`cobot_med.data.geometry`): a NIfTI
    with a non-invertible affine, a DICOM series with unevenly spaced slices."""
    from .geometry import check_dicom_series, check_nifti_affine, is_nifti

    if Path(path).is_dir():
        check_dicom_series(path)
    elif is_nifti(path):
        check_nifti_affine(path)


class _OrganIdsTransform(MapTransform):
    """A dictionary transform configured with the label map's organ ids."""

    def __init__(self, keys: KeysCollection, organ_ids: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.organ_ids = [int(i) for i in organ_ids]


class OrganFilesToLabeld(_OrganIdsTransform):
    """One binary file per organ (loaded from a list as K channels) -> one label map with the organs' ids.

    A label loaded from a single file passes through unchanged. The list must hold one file per
    organ of the label map, in its order; where files overlap, the later organ wins.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if not loaded_from_list(label):
                continue
            if label.shape[0] != len(self.organ_ids):
                raise DataError(f"{file_name(d, key)}: {label.shape[0]} per-organ label files for "
                                f"{len(self.organ_ids)} organs {self.organ_ids}")
            merged = torch.zeros_like(label[:1])
            for channel, organ_id in enumerate(self.organ_ids):
                merged = torch.where(label[channel : channel + 1] > 0, float(organ_id), merged)
            d[key] = merged
        return d


class SelectOrgansd(_OrganIdsTransform):
    """Label values that are not trained organs become background (e.g. SegRap's other classes)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            keep = torch.isin(torch.as_tensor(label), torch.tensor(self.organ_ids, dtype=torch.as_tensor(label).dtype))
            d[key] = torch.where(keep, label, torch.zeros_like(label))
        return d


def intensity_transform(modality: str = "CT", window: Sequence[float] | None = (-500.0, 1000.0)) -> MapTransform:
    """CT: clip ``window`` HU and scale it to [0, 255] (the authors' [-500, 1000]); MR: 0.5-99.5 percentiles."""
    if modality.upper() == "CT":
        if window is None or len(window) != 2 or not window[0] < window[1]:
            raise ValueError(f"the CT window must be [low, high] HU with low < high, got {window!r}")
        return ScaleIntensityRanged(keys="image", a_min=float(window[0]), a_max=float(window[1]),
                                    b_min=0.0, b_max=255.0, clip=True)
    if modality.upper() == "MR":
        return ScaleIntensityRangePercentilesd(keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=255.0, clip=True)
    raise ValueError(f"modality must be CT or MR, got {modality!r}")


class DataChain(Compose):
    """MONAI ``Compose`` that lets a :class:`DataError` out as itself.

    MONAI wraps any error raised inside a chain in ``RuntimeError("applying transform ...")``;
    this chain re-raises the ``DataError`` found in that chain of causes (a new ``DataError`` with
    the same message, chained to the original), so callers can catch the named error.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except RuntimeError as wrapped:
            cause = find_in_chain(wrapped, DataError)
            if cause is None:
                raise
            raise DataError(str(cause)) from cause


class GuardedVolume:
    """Runs the volume chain on one case; a failing case becomes ``{"case_id", "error"}`` instead of raising.

    So one corrupt, truncated or inconsistent file is reported and skipped, never stopping the
    other cases (``VolumeDataset`` filters the error markers out and keeps the reasons).
    """

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, case: Mapping[str, Any]) -> dict:
        try:
            return self.transform(dict(case))
        except Exception as err:  # noqa: BLE001 - every failure of one case is reported, not raised
            reason = _reason(err, case)
            logger.warning("skipping case %s: %s", case.get("case_id"), reason)
            return {"case_id": case.get("case_id"), "image_path": str(case.get("image")), "error": reason}


def _reason(err: BaseException, case: Mapping[str, Any]) -> str:
    cause = find_in_chain(err, DataError)  # MONAI wraps a transform's error; the DataError is in the chain of causes
    if cause is not None:
        return str(cause)
    return f"{case.get('image')} / {case.get('label')}: unreadable, truncated or corrupt ({type(err).__name__}: {err})"
