"""MONAI dictionary transforms from a CT volume to 2D slice samples with box prompts.

Volume level (``transforms/volume.json``, cached once per case, invertible with ``Invertd``):
load (MONAI's readers: NIfTI via nibabel, ITK for the rest) -> check -> channel first ->
per-organ files to one label map -> check -> keep the trained organs -> reorient to RAS ->
window to [0, 255]. After ``Orientationd("RAS")`` the last axis runs inferior -> superior
whatever the file's storage order, so ``volume[..., z]`` is an axial slice, and ``Invertd``
undoes the reorientation exactly on the way back.

Slice level (``transforms/slices.json``, per draw): per-organ binary masks and the area
threshold in the original slice grid, box prompts (tight box, each side widened by an
independent random 0-``jitter`` px, clipped, then mapped to the model grid), resize to the
model input (MONAI ``Resized``: bilinear image, nearest-exact masks), three channels.

Conventions: a slice is (X, Y) -- rows X, columns Y; boxes are XYXY with x along Y (columns),
in pixel-edge coordinates: a box [x0, y0, x1, y1] covers columns x0..x1-1 and rows y0..y1-1.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    LoadImaged,
    MapTransform,
    Randomizable,
    Resize,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
)
from monai.transforms.utils import generate_spatial_bounding_box

from . import layouts  # noqa: F401 - transforms/volume.json refers to cobot_med.data.layouts
from .validation import DataError, file_name, loaded_from_list

logger = logging.getLogger(__name__)

SOURCE_SUFFIX = "_source"


# --- volume level ------------------------------------------------------------------------------


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
            cause = _data_error(wrapped)
            if cause is None:
                raise
            raise DataError(str(cause)) from cause


def _data_error(err: BaseException | None) -> DataError | None:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, DataError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


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
    cause = _data_error(err)  # MONAI wraps a transform's error; the DataError is in the chain of causes
    if cause is not None:
        return str(cause)
    return f"{case.get('image')} / {case.get('label')}: unreadable, truncated or corrupt ({type(err).__name__}: {err})"


# --- chains from transforms/ -----------------------------------------------------------------


def load_chain(fragment: str, chain_id: str, **settings: Any) -> Compose:
    """A transform chain from ``transforms/<fragment>.json`` (the bundles' single source), with ``settings``
    standing in for the bundle ids it refers to (``organ_ids``, ``ct_window``, ``image_size``...)."""
    from monai.bundle import ConfigParser

    from ..bundle import repository_root

    content = ConfigParser.load_config_file(str(repository_root() / "transforms" / f"{fragment}.json"))
    parser = ConfigParser(dict(settings), globals={"torch": "torch", "monai": "monai", "cobot_med": "cobot_med"})
    parser.update({chain_id: content[chain_id]})
    return parser.get_parsed_content(chain_id, instantiate=True)


def volume_transforms(organ_ids: Sequence[int], window: Sequence[float] | None = (-500.0, 1000.0),
                      modality: str = "CT", layout: str | None = None) -> Compose:
    """The volume chain of ``transforms/volume.json`` (labels optional) for code outside a bundle.

    ``layout`` names the dataset whose label values are allowed in label files (without it, only
    ``organ_ids`` and 0); values that are not ``organ_ids`` become background.
    """
    return load_chain("volume", "transforms", organ_ids=[int(i) for i in organ_ids],
                      ct_window=list(window) if window is not None else None, modality=modality,
                      layout=layout or "")


def slice_chain(organ_ids: Sequence[int], image_size: int, jitter: int = 50, min_area: float = 100,
                training: bool = True) -> Compose:
    """The slice chain of ``transforms/slices.json``: ``train`` (jitter, area threshold) or ``eval``."""
    return load_chain("slices", "train" if training else "eval", organ_ids=[int(i) for i in organ_ids],
                      image_size=int(image_size), jitter=int(jitter), min_area=float(min_area))


# --- slice level -------------------------------------------------------------------------------


def organ_area_threshold(min_area: float, height: int, width: int) -> float:
    """The authors keep an organ on a slice when it covers > 100 px at 256 x 256: the same fraction here.

    An organ counts on an H x W slice when its area exceeds ``min_area * H * W / 256**2`` pixels.
    """
    return float(min_area) * height * width / (256.0 * 256.0)


class SliceOrganMasksd(MapTransform):
    """label (1, H, W) -> ``masks`` (K, H, W) float, ``valid`` (K,) bool (area above the threshold), ``organ_ids``.

    Without a label (inference) the masks are empty and nothing is valid.
    """

    def __init__(self, organ_ids: Sequence[int], min_area: float = 100, label_key: str = "label",
                 image_key: str = "image") -> None:
        super().__init__(label_key, allow_missing_keys=True)
        self.organ_ids, self.min_area = [int(i) for i in organ_ids], float(min_area)
        self.label_key, self.image_key = label_key, image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if self.label_key in d:
            label = _plain(d.pop(self.label_key))[0]
        else:
            label = torch.zeros(_plain(d[self.image_key]).shape[-2:])
        masks = torch.stack([label == i for i in self.organ_ids]).float()
        threshold = organ_area_threshold(self.min_area, *label.shape)
        d["masks"] = masks
        d["valid"] = masks.sum(dim=(1, 2)) > threshold
        d["organ_ids"] = torch.tensor(self.organ_ids, dtype=torch.int64)
        return d


class BoxPromptsd(Randomizable, MapTransform):
    """Box prompts from ``masks`` (K, H, W) in the original slice grid, mapped to the model grid.

    The tight box (MONAI's ``generate_spatial_bounding_box``, exclusive end) of each valid organ,
    each side widened by an independent integer drawn from [0, ``jitter``] px with ``self.R``,
    clipped to the slice, then scaled by S/W (x) and S/H (y). ``jitter=0`` (evaluation) gives the
    tight box. Adds ``boxes`` (K, 4) in the model grid and ``boxes_original`` in the slice grid;
    invalid organs get zeros.
    """

    backend = [torch.Tensor]

    def __init__(self, image_size: int, jitter: int = 50, masks_key: str = "masks") -> None:
        MapTransform.__init__(self, masks_key)
        if int(jitter) < 0:
            raise ValueError(f"jitter must be >= 0 px, got {jitter}")
        self.image_size, self.jitter, self.masks_key = int(image_size), int(jitter), masks_key
        self._offsets = np.zeros((0, 4), dtype=np.int64)

    def randomize(self, count: int) -> None:
        if self.jitter > 0:
            self._offsets = self.R.randint(0, self.jitter + 1, size=(count, 4))
        else:
            self._offsets = np.zeros((count, 4), dtype=np.int64)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        masks, valid = d[self.masks_key], d["valid"]
        K, H, W = masks.shape
        self.randomize(K)
        boxes = torch.zeros(K, 4)
        for k in range(K):
            if not valid[k]:
                continue
            start, end = generate_spatial_bounding_box(masks[k : k + 1], select_fn=lambda x: x > 0)
            (y0, x0), (y1, x1) = start, end
            dx0, dy0, dx1, dy1 = (int(v) for v in self._offsets[k])
            boxes[k] = torch.tensor([max(x0 - dx0, 0), max(y0 - dy0, 0), min(x1 + dx1, W), min(y1 + dy1, H)],
                                    dtype=torch.float32)
        d["boxes_original"] = boxes.clone()
        d["boxes"] = boxes * torch.tensor([self.image_size / W, self.image_size / H] * 2)
        return d


BoxPromptsD = BoxPromptsDict = BoxPromptsd


def axial_slice(volume: Mapping[str, Any], z: int) -> dict:
    """{"image": (1,H,W), "label": (1,H,W)} of slice ``z`` of an oriented volume (plain tensors)."""
    out = {"image": _plain(volume["image"])[..., z]}
    if volume.get("label") is not None:
        out["label"] = _plain(volume["label"])[..., z]
    return out


def _plain(x: Any) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


@functools.lru_cache(maxsize=16)
def _eval_chain(organ_ids: tuple[int, ...], image_size: int, min_area: float) -> Compose:
    chain = slice_chain(organ_ids, image_size, jitter=0, training=False)
    chain.transforms[0].min_area = float(min_area)  # SliceOrganMasksd
    return chain


def iter_slice_batches(volume: Mapping[str, Any], organ_ids: Sequence[int], image_size: int, batch_size: int = 8,
                       min_area: float = 0, all_slices: bool = False) -> Iterator[dict]:
    """The axial slices of one loaded, oriented, windowed volume as batches in the sample format (no jitter).

    ``volume`` holds ``image`` (1, X, Y, Z) in [0, 255] and optionally ``label`` (1, X, Y, Z) and
    ``case_id`` -- an item of ``VolumeDataset`` or the output of the volume chain. Each batch is
    what torch's default collate makes of samples: image (B,3,S,S), masks (B,K,S,S), boxes
    (B,K,4) in the model grid, valid (B,K), organ_ids (B,K), case_id (list of B), plus
    slice_index (B,) int64 along the volume's last axis. Slices come in increasing z; by default
    only those with at least one organ above ``min_area`` (0: any pixel), every slice with
    ``all_slices`` or without a label (then masks are empty and nothing is valid).
    """
    chain = _eval_chain(tuple(int(i) for i in organ_ids), int(image_size), float(min_area))
    depth = _plain(volume["image"]).shape[-1]
    has_label = volume.get("label") is not None
    case_id = str(volume.get("case_id", ""))
    pending: list[dict] = []
    for z in range(depth):
        sample = chain(axial_slice(volume, z))
        if has_label and not all_slices and not bool(sample["valid"].any()):
            continue
        sample.pop("boxes_original", None)
        sample["case_id"], sample["slice_index"] = case_id, z
        pending.append(sample)
        if len(pending) == batch_size:
            yield _collate(pending)
            pending = []
    if pending:
        yield _collate(pending)


def _collate(samples: list[dict]) -> dict:
    batch = torch.utils.data.default_collate(samples)
    batch["slice_index"] = torch.as_tensor(batch["slice_index"], dtype=torch.int64)
    return batch


def volume_to_slices(volume: Mapping[str, Any], organ_ids: Sequence[int], image_size: int, min_area: float = 0,
                     all_slices: bool = False) -> dict:
    """All of :func:`iter_slice_batches` as one batch (N slices); empty tensors when no slice qualifies.

    Memory: N x 3 x S x S floats -- for big volumes at S = 1024 prefer ``iter_slice_batches``.
    """
    batches = list(iter_slice_batches(volume, organ_ids, image_size, batch_size=64, min_area=min_area,
                                      all_slices=all_slices))
    if not batches:
        K, S = len(organ_ids), int(image_size)
        return {"image": torch.zeros(0, 3, S, S), "masks": torch.zeros(0, K, S, S), "boxes": torch.zeros(0, K, 4),
                "valid": torch.zeros(0, K, dtype=torch.bool), "organ_ids": torch.zeros(0, K, dtype=torch.int64),
                "case_id": [], "slice_index": torch.zeros(0, dtype=torch.int64)}
    return {key: (sum((b[key] for b in batches), []) if key == "case_id" else torch.cat([b[key] for b in batches]))
            for key in batches[0]}


def slices_to_volume(slices: torch.Tensor, slice_index: Sequence[int] | torch.Tensor, reference: torch.Tensor,
                     mode: str = "bilinear") -> torch.Tensor:
    """Stitch per-slice maps (N, C, h, w) back into a (C, X, Y, Z) volume shaped like ``reference`` (1, X, Y, Z).

    Each map is resized to the slice grid (X, Y) (``mode``: ``bilinear`` for probabilities or
    logits, ``nearest-exact`` for masks) and put at its ``slice_index``; other slices are 0. The
    result carries ``reference``'s metadata and applied operations when it is a ``MetaTensor``,
    so MONAI's ``Invertd`` (orig_keys = the image's key) takes it back to the file's geometry.
    """
    X, Y, Z = reference.shape[-3:]
    slices = torch.as_tensor(slices).float()
    out = torch.zeros((slices.shape[1], X, Y, Z), dtype=torch.float32)
    if len(slices):
        resize = Resize((X, Y), mode=mode, align_corners=None)
        for n, z in enumerate(torch.as_tensor(slice_index).tolist()):
            out[..., int(z)] = _plain(resize(slices[n]))
    if isinstance(reference, MetaTensor):
        out = MetaTensor(out, meta=dict(reference.meta), applied_operations=list(reference.applied_operations))
    return out
