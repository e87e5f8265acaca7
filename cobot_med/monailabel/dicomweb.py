"""MONAI Label's DICOMweb datastore (a PACS such as Orthanc: ``--studies http://HOST/dicom-web``), with the local
datastore's checks and the project's DICOM-SEG writer.

Images are the PACS's CT and MR series (MONAI Label's ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER``, ``{"Modality":
"CT"}`` by default), fetched once into MONAI Label's cache and read as one volume each. Before a series is used it
is checked, and refused with the reason (HTTP 4xx, nothing cached, nothing written to the PACS):

- 404: no series of that UID in the PACS; 422: a series that is not CT or MR (a SEG, a report, a photo), or whose
  slices are not one volume (a missing slice, mixed orientations: :func:`cobot_med.data.geometry.check_dicom_series`,
  the check ``cobot-med infer`` makes on a DICOM folder);
- 502: the PACS does not answer (refused, timed out, a 5xx): the request was right, the server behind it failed.

A saved label (``PUT /datastore/label``, tag ``final``) is checked as the local datastore checks it
(:func:`cobot_med.monailabel.datastore.checked_label`: shape, geometry, values, Slicer's ``label_info`` names; an
OHIF-style raw ``.bin`` must hold exactly one byte per voxel) and goes back to the PACS as a DICOM-SEG written by
:func:`cobot_med.dicom_seg.write_dicom_seg`: a new series of the image's study that references the source series
instance by instance, one segment per organ with the organ's name and its SNOMED-CT code, algorithm type
``SEMIAUTOMATIC`` (a person saved it). This replaces MONAI Label's own conversion (``nifti_to_dicom_seg``, which
names no organ code and needs dcmqi's binaries downloaded at start). The label is also kept in the cache as NIfTI
in the dataset's ids, for training rounds.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np
import requests
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from cobot_med.dicom_seg import frames_on_instances

from . import project
from .datastore import checked_label
from .errors import RequestError, http_error

logger = logging.getLogger(__name__)

MODALITIES = ("CT", "MR")  # what the models segment


def is_dicomweb(studies: str) -> bool:
    return studies.startswith(("http://", "https://"))


def dicomweb_datastore(studies: str, organs: Mapping[str, int]) -> "CheckedDicomWebDatastore":
    """The datastore of ``--studies URL``, with MONAI Label's DICOMweb settings (prefixes, login, cache path,
    search filter, fetch by frame)."""
    from monailabel.config import settings
    from dicomweb_client.session_utils import create_session_from_user_pass

    session = None
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                settings.MONAI_LABEL_DICOMWEB_PASSWORD)
    client = DICOMwebClientX(url=studies.rstrip("/").strip(), session=session,
                             qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                             wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                             stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    # dicomweb-client retries any failed request 5 times, waiting 2, 4, 8, 16 s: half a minute before a client
    # hears that the PACS is down. One retry after a second (a 429 / 503 / 504, or a refused connection).
    client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=500)
    cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
    return CheckedDicomWebDatastore(client, organs, search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
                                    cache_path=cache or None, fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME)


class PacsError(RequestError):
    """The PACS did not answer as a DICOMweb server does: 502 with its reason."""

    def __init__(self, url: str, err: Exception) -> None:
        super().__init__(f"the DICOMweb server {url} did not answer ({type(err).__name__}: {err}); "
                         "check that it runs and that --studies names its DICOMweb root", status=502)


class CheckedDicomWebDatastore(DICOMWebDatastore):
    """``DICOMWebDatastore`` whose series are checked before use and whose saved labels go back as the
    project's DICOM-SEG (see the module)."""

    def __init__(self, client: Any, organs: Mapping[str, int], **kwargs: Any) -> None:
        self.organs = dict(organs)
        super().__init__(client, convert_to_nifti=True, **kwargs)

    # --- reading ----------------------------------------------------------------------------------------------

    def _pacs(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """``call(*args, **kwargs)`` on the DICOMweb client; a PACS that does not answer is :class:`PacsError`."""
        try:
            return call(*args, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as err:
            raise PacsError(self._client.base_url, err) from None
        except requests.HTTPError as err:
            status = err.response.status_code if err.response is not None else 0
            if status >= 500 or status == 0:
                raise PacsError(self._client.base_url, err) from None
            raise

    def series(self, image_id: str) -> dict[str, Any]:
        """The QIDO-RS answer for series ``image_id`` (DICOM JSON), or :class:`RequestError` 404."""
        found = self._pacs(self._client.search_for_series, search_filters={"SeriesInstanceUID": image_id})
        found = [s for s in found or [] if s.get("0020000E", {}).get("Value") == [image_id]]
        if not found:
            raise RequestError(f"image {image_id!r} is not a series of the DICOMweb server {self._client.base_url}",
                               status=404)
        return found[0]

    def checked_series_dir(self, image_id: str) -> str:
        """The cached folder of series ``image_id``, fetched and checked (see the module) when not cached yet."""
        from cobot_med.data.geometry import DataError, check_dicom_series
        from monailabel.datastore.utils.dicom import dicom_web_download_series

        meta = self.series(image_id)
        modality = (meta.get("00080060", {}).get("Value") or [""])[0]
        if modality not in MODALITIES:
            raise RequestError(f"series {image_id} is {modality or 'of no modality'}, not "
                               f"{' or '.join(MODALITIES)}: the models segment CT and MR volumes")
        image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        if os.path.isdir(image_dir) and os.listdir(image_dir):
            return image_dir
        study = (meta.get("0020000D", {}).get("Value") or [None])[0]
        fetched = tempfile.mkdtemp(prefix=".fetch-", dir=self._datastore.image_path())
        try:
            self._pacs(dicom_web_download_series, study, image_id, fetched, self._client, self._fetch_by_frame)
            try:
                check_dicom_series(fetched)
            except DataError as err:
                raise RequestError(str(err).replace(fetched, f"series {image_id}")) from None
            os.replace(fetched, image_dir)
        finally:
            shutil.rmtree(fetched, ignore_errors=True)
        return image_dir

    def get_image_uri(self, image_id: str) -> str:
        try:
            self.checked_series_dir(image_id)
        except RequestError as err:
            raise http_error(err) from None
        return super().get_image_uri(image_id)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A final label: the one kept when it was saved here, else the SEG series ``label_id`` from the PACS read
        by its segments' names into the dataset's ids on the image's grid (MONAI Label's own reading numbers the
        segments 1.. whatever organ they are). A SEG that cannot be read so is left out of training, with the
        reason in the log."""
        if label_tag != DefaultLabelTag.FINAL or not image_id:
            return super().get_label_uri(label_id, label_tag, image_id)
        kept = os.path.realpath(os.path.join(self._datastore.label_path(DefaultLabelTag.FINAL), f"{image_id}.nii.gz"))
        if os.path.exists(kept):
            return kept
        from monailabel.datastore.utils.dicom import dicom_web_download_series
        from pydicom import dcmread

        from cobot_med.dicom_seg import DicomSegError, read_dicom_seg

        try:
            series_dir = self.checked_series_dir(image_id)
            image = project.read_volume(DICOMWebDatastore.get_image_uri(self, image_id))
            sources = [dcmread(os.path.join(series_dir, name)) for name in sorted(os.listdir(series_dir))]
            with tempfile.TemporaryDirectory() as seg_dir:
                self._pacs(dicom_web_download_series, None, label_id, seg_dir, self._client, False)
                [seg_file] = [os.path.join(seg_dir, name) for name in os.listdir(seg_dir)]
                frames, _ = read_dicom_seg(seg_file, source_uids=[str(s.SOPInstanceUID) for s in sources],
                                           organs=self.organs)
            volume = volume_from_frames(frames, sources, image)
        except (RequestError, DicomSegError, ValueError) as err:
            logger.warning(f"label {label_id} of image {image_id} left out: {err}")
            return ""
        path = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        try:
            project.write_label(volume, image, path)
            LocalDatastore.save_label(self, image_id, path, DefaultLabelTag.FINAL, self._dicom_info(label_id))
        finally:
            os.unlink(path)
        return kept

    def status(self) -> dict[str, Any]:
        """MONAI Label's counts; while the PACS does not answer, those of the cache and the reason (``GET /info/``
        keeps answering)."""
        try:
            return self._pacs(super().status)
        except PacsError as err:
            cached = LocalDatastore.list_images(self)
            return {"total": len(cached), "completed": len(LocalDatastore.get_labeled_images(self)),
                    "label_tags": {}, "error": str(err)}

    # --- saving -------------------------------------------------------------------------------------------------

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any],
                   label_id: str = "") -> str:
        label_info = dict(label_info or {})
        try:
            series_dir = self.checked_series_dir(image_id)
            image_uri = super().get_image_uri(image_id)
            converted = self._checked_label(image_uri, label_filename, label_info.get("label_info"))
        except RequestError as err:
            raise http_error(err) from None
        try:
            if label_tag == DefaultLabelTag.FINAL:
                try:
                    label_info.update(self._store_seg(series_dir, converted, image_id))
                except RequestError as err:
                    raise http_error(err) from None
            return LocalDatastore.save_label(self, image_id, converted, label_tag, label_info)
        finally:
            os.unlink(converted)

    def _checked_label(self, image_uri: str, label_filename: str, label_info: Any) -> str:
        """The label as NIfTI in the dataset's ids, in the image's grid (a temporary file)."""
        image = project.read_volume(image_uri)
        if label_filename.endswith(".bin"):  # OHIF's raw labelmap: one uint8 per voxel, Fortran order
            raw = np.fromfile(label_filename, dtype=np.uint8)
            shape = tuple(int(n) for n in image.shape[:3])
            if raw.size != int(np.prod(shape)):
                raise RequestError(f"the label holds {raw.size} voxels, the image {int(np.prod(shape))} "
                                   f"({list(shape)}): save the labelmap of this series")
            same_grid = SimpleNamespace(array=raw.reshape(shape, order="F"), affine=image.affine)
            array = checked_label(same_grid, image, self.organs, label_info)
        else:
            try:
                label = project.read_volume(label_filename)
            except Exception as err:  # noqa: BLE001 - the reader's reason goes back to the client
                raise RequestError(f"cannot read the label file: {err}") from err
            array = checked_label(label, image, self.organs, label_info)
        path = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        project.write_label(array, image, path)
        return path

    def _store_seg(self, series_dir: str, label_path: str, image_id: str) -> dict[str, Any]:
        """Write the label as the project's DICOM-SEG of the series and store it in the PACS (STOW-RS); the SEG's
        series and study, for the label's info."""
        from pydicom import dcmread

        from cobot_med.dicom_seg import DicomSegError, write_dicom_seg

        sources = [dcmread(os.path.join(series_dir, name)) for name in sorted(os.listdir(series_dir))]
        label = project.read_volume(label_path)
        with tempfile.TemporaryDirectory() as scratch:
            try:
                frames = frames_on_instances(_volume_array(label), np.asarray(label.affine, float), sources)
                if not frames.any():
                    raise RequestError("the label is empty: a DICOM-SEG needs at least one organ")
                path = write_dicom_seg(frames, sources, self.organs, os.path.join(scratch, "seg.dcm"),
                                       algorithm_type="SEMIAUTOMATIC", series_description="cobot-med label",
                                       keep_empty=False)  # the organs the annotator saved
            except DicomSegError as err:
                raise RequestError(str(err)) from None
            seg = dcmread(str(path))
        self._pacs(self._client.store_instances, [seg])
        return {"SeriesInstanceUID": str(seg.SeriesInstanceUID), "StudyInstanceUID": str(seg.StudyInstanceUID),
                "SOPInstanceUID": str(seg.SOPInstanceUID), "Modality": "SEG",
                "PatientID": str(getattr(seg, "PatientID", ""))}


def volume_from_frames(frames: np.ndarray, sources: list, image: Any) -> np.ndarray:
    """Frames on the source instances (a SEG read back) on ``image``'s voxel grid: the inverse of
    :func:`cobot_med.dicom_seg.frames_on_instances`, through that same mapping (each pixel's voxel is found by
    mapping a volume of voxel numbers onto the instances)."""
    shape = _volume_array(image).shape
    numbers = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    where = frames_on_instances(numbers, np.asarray(image.affine, float), sources)
    volume = np.zeros(int(np.prod(shape)), dtype=np.uint8)
    volume[where.ravel()] = np.asarray(frames, dtype=np.uint8).ravel()
    return volume.reshape(shape)


def _volume_array(volume: Any) -> np.ndarray:
    """A volume as ``project.read_volume`` gives it (channel first), as a (X, Y, Z) uint8 label array."""
    array = np.asarray(volume.array if hasattr(volume, "array") else volume)
    while array.ndim > 3:
        array = array[0] if array.shape[0] == 1 else array[..., 0]
    return np.rint(array).astype(np.uint8)  # label ids (read as floats)
