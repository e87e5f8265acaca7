"""Datasets: volumes read once and cached, slices drawn from the cache with fresh box jitter.

``VolumeDataset`` runs every case through the volume chain exactly once (MONAI
``CacheDataset``); ``SliceDataset`` indexes the (case, slice) pairs of the cached volumes and
runs the slice chain per draw, so a volume is never re-read for a slice.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from monai.data import CacheDataset
from torch.utils.data import Dataset

from .datalist import build_datalist, load_datalist, write_datalist
from .slices import axial_slice, organ_area_threshold
from .volume import GuardedVolume
from .validation import DataError

logger = logging.getLogger(__name__)


class VolumeDataset(Dataset):
    """Every case through the volume chain exactly once, cached in memory by MONAI's ``CacheDataset``.

    Items are the chain's output: ``image`` (1, X, Y, Z) float32 in [0, 255] and ``label``
    (1, X, Y, Z) uint8 as ``MetaTensor`` (oriented RAS, invertible with ``Invertd``), ``case_id``.
    A case that fails (missing, unreadable or inconsistent files...) is reported in ``failures``
    as ``{"case_id", "image_path", "error"}`` and left out; the other cases go on.
    Memory: the cache holds every volume (about 5 bytes per voxel).
    """

    def __init__(self, cases: Sequence[dict], transform: Any, num_workers: int | None = 0, progress: bool = False):
        self.volume_transform = transform
        self.cache = CacheDataset(list(cases), transform=GuardedVolume(transform), cache_rate=1.0,
                                  num_workers=num_workers, progress=progress, copy_cache=False)
        items = [self.cache[i] for i in range(len(self.cache))]  # served from the cache: no re-read
        self.failures = [item for item in items if "error" in item]
        self.items = [item for item in items if "error" not in item]
        for failure in self.failures:
            logger.error("case %s left out: %s", failure["case_id"], failure["error"])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class SliceDataset(Dataset):
    """Axial slices of cached volumes as samples of docs/CONTRACTS.md (all organs of a slice together).

    The slice index is built once from the cached labels: a slice enters when at least one organ's
    area passes the threshold (``min_area`` px at 256 x 256, scaled by area to the slice grid; the
    slice chain must use the same ``min_area``). ``transform`` is the slice chain
    (``transforms/slices.json``); its randomness (box jitter) is seeded with ``seed`` and drawn anew
    at every access. Volumes are only indexed, never copied or re-read.
    """

    def __init__(self, volumes: VolumeDataset | Sequence[dict], transform: Any, organ_ids: Sequence[int],
                 min_area: float = 100, seed: int = 0) -> None:
        self.volumes, self.organ_ids = volumes, [int(i) for i in organ_ids]
        self.transform = transform
        if hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed)  # a training run re-seeds it every epoch (EpochSeeds)
        self.index: list[tuple[int, int]] = []
        for v in range(len(volumes)):
            volume = volumes[v]
            if volume.get("label") is None:
                raise DataError(f"case {volume.get('case_id')}: no label, so no training slices")
            label = torch.as_tensor(volume["label"])[0]  # (X, Y, Z)
            threshold = organ_area_threshold(min_area, label.shape[0], label.shape[1])
            areas = torch.stack([(label == i).sum(dim=(0, 1)) for i in self.organ_ids])  # (K, Z)
            for z in (areas > threshold).any(dim=0).nonzero(as_tuple=True)[0].tolist():
                self.index.append((v, z))
        if not self.index:
            failures = getattr(volumes, "failures", [])
            why = "; ".join(f"{f['case_id']}: {f['error']}" for f in failures[:5]) or (
                f"no slice of the {len(volumes)} case(s) has an organ above min_area {min_area}")
            raise DataError(f"no training slices: {why}")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        v, z = self.index[i]
        volume = self.volumes[v]
        sample = self.transform(axial_slice(volume, z))
        sample["case_id"] = str(volume["case_id"])
        sample["slice_index"] = int(z)
        return sample


def resolve_datalist(settings: Any) -> dict[str, list[dict]]:
    """The run's split: the given datalist file, or a split of ``dataset_dir`` (a training run's session
    writes it to ``output_dir/datalist.json`` once it has decided the run, so a refused resume never
    replaces the record of the run in the folder). Checked: a training split to learn from, and under
    torchrun at least one validation and test case per process (a process with none would stall the
    others' metric gathering). Nothing is written here."""
    from ..distributed import world_size
    from ..errors import SettingsError

    if settings.datalist:
        split = load_datalist(settings.datalist)
    else:
        split = build_datalist(settings.layout, settings.dataset_dir, settings.val_fraction, settings.test_fraction,
                               settings.seed)
    source = settings.datalist or settings.dataset_dir
    if not split.get("training"):
        raise SettingsError(f"{source}: no training cases (the split has "
                            f"{', '.join(f'{k} {len(v)}' for k, v in split.items())}); training needs some")
    processes = world_size()
    for name in ("validation", "test"):
        cases = len(split.get(name) or [])
        if 0 < cases < processes:
            raise SettingsError(
                f"the {name} split has {cases} case(s) but {processes} processes were started: every process "
                f"needs at least one {name} case; raise val_fraction / test_fraction, give a datalist with more "
                f"{name} cases, or start at most {cases} processes")
    return split


def record_split(settings: Any, split: dict[str, list[dict]]) -> None:
    """Write the split a run uses to ``output_dir/datalist.json`` (a split drawn from ``dataset_dir``; a given
    datalist file is its own record), on the first process, once the run has been decided."""
    from ..distributed import rank as process_rank

    if settings.datalist or process_rank() != 0:
        return
    write_datalist(split, settings.output_path / "datalist.json", layout=settings.layout, seed=settings.seed,
                   val_fraction=settings.val_fraction, test_fraction=settings.test_fraction)
