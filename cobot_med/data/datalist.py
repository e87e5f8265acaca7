"""MONAI-style datalists (training / validation / test), split by case, deterministic for a seed.

A datalist file is what MONAI's ``load_decathlon_datalist`` reads: ``{"training": [...],
"validation": [...], "test": [...]}`` of ``{"image", "label", "case_id"}`` items (``label``
may be a list of per-organ files), plus a few descriptive keys (``layout``, ``seed``...).
Paths are written absolute; relative paths in a hand-written file are taken relative to it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from monai.data import load_decathlon_datalist, partition_dataset

from ..files import absolute, write_json
from .layouts import get_layout
from .validation import DataError

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "test")
# The fixed split of `cobot-med data fetch`, `data check --datalist` and `cobot-med reproduce` (docs/data.md): the
# defaults of `cobot-med datalist`, so the same folder gives the same cases in every split, for every training seed.
FIXED_SPLIT = {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 0}


def scan_cases(layout: str, data_dir: str | Path) -> tuple[list[dict], list[str]]:
    """The cases of ``data_dir`` in ``layout``'s folder tree, sorted by id, and the problems of those left out.

    A case whose image or label file is missing is left out with a message naming the file;
    a duplicate case id is an error.
    """
    data_dir = absolute(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: dataset folder not found")
    cases, problems = [], []
    for case in sorted(get_layout(layout).scan(data_dir), key=lambda c: c["case_id"]):
        missing = [p for p in _paths(case) if not Path(p).is_file()]
        if missing:
            problems.append(f"{case['case_id']}: left out, {', '.join(missing)} not found")
            continue
        cases.append(case)
    ids = [c["case_id"] for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(f"{data_dir}: duplicate case ids {duplicates}")
    return cases, problems


def _paths(case: dict) -> list[str]:
    out = []
    for key in ("image", "label"):
        value = case.get(key)
        out += [str(v) for v in value] if isinstance(value, (list, tuple)) else ([str(value)] if value else [])
    return out


def split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(training, validation, test) case counts: rounded fractions, at least one case for a non-zero
    fraction once there are 3 cases or more, and always at least one training case."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must each be in [0, 1) "
                         "and leave cases to train on")
    if n < 3:
        return n, 0, 0
    n_val = max(int(round(n * val_fraction)), 1 if val_fraction > 0 else 0)
    n_test = max(int(round(n * test_fraction)), 1 if test_fraction > 0 else 0)
    if n - n_val - n_test < 1:
        raise DataError(f"{n} cases are too few for validation {val_fraction} and test {test_fraction} fractions")
    return n - n_val - n_test, n_val, n_test


def build_datalist(layout: str, data_dir: str | Path, val_fraction: float = 0.2, test_fraction: float = 0.2,
                   seed: int = 0) -> dict[str, list[dict]]:
    """Scan ``data_dir`` in ``layout``'s folder tree and split its cases (whole cases, never slices).

    Cases are sorted by id before MONAI's seeded ``partition_dataset`` shuffles them, so the
    split depends only on the case ids, the fractions and the seed. Each split is sorted by id.
    With fewer than 3 cases every case goes to training.
    """
    cases, problems = scan_cases(layout, data_dir)
    for problem in problems:
        logger.warning(problem)
    if not cases:
        raise DataError(f"{data_dir}: no usable cases in the {get_layout(layout).title} layout")
    return split_cases(cases, val_fraction, test_fraction, seed)


def split_cases(cases: list[dict], val_fraction: float = 0.2, test_fraction: float = 0.2,
                seed: int = 0) -> dict[str, list[dict]]:
    """Split ``cases`` (sorted by id first) into training / validation / test with MONAI's seeded shuffle."""
    cases = sorted(cases, key=lambda c: c["case_id"])
    counts = split_counts(len(cases), val_fraction, test_fraction)
    parts = partition_dataset(cases, ratios=list(counts), shuffle=True, seed=seed)
    parts = list(parts) + [[]] * (3 - len(parts))
    out = {split: sorted(part, key=lambda c: c["case_id"]) for split, part in zip(SPLITS, parts)}
    if [len(out[s]) for s in SPLITS] != list(counts):  # partition_dataset rounds cumulative ratios
        raise AssertionError(f"split sizes {[len(out[s]) for s in SPLITS]} differ from {counts}")
    return out


def write_datalist(datalist: dict, path: str | Path, **description: object) -> Path:
    """Write ``datalist`` (splits of items) as JSON, with ``description`` keys (``layout``, ``seed``...) first."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give the datalist a file name (e.g. {path / 'datalist.json'})")
    content = {**description, **{split: datalist.get(split, []) for split in SPLITS}}
    return write_json(path, content)


def load_datalist(path: str | Path) -> dict[str, list[dict]]:
    """A datalist file (from ``cobot-med datalist`` or by hand) through MONAI's ``load_decathlon_datalist``.

    Relative paths resolve against the file's folder; a missing ``case_id`` is taken from the image
    file name; a missing split is empty.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable datalist ({err})") from err
    if not isinstance(content, dict) or not any(content.get(s) for s in SPLITS):
        raise DataError(f"{path}: a datalist needs a non-empty 'training', 'validation' or 'test' list")
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        if not content.get(split):
            out[split] = []
            continue
        items = content[split]
        if not isinstance(items, list):
            raise DataError(f"{path}: '{split}' must be a list of {{'image', 'label'}} items")
        for number, item in enumerate(items):
            if isinstance(item, dict) and "image" not in item:
                raise DataError(f"{path}: item {number} of '{split}' has no 'image' ({item})")
            if split != "test" and isinstance(item, dict) and "label" not in item:
                raise DataError(f"{path}: item {number} of '{split}' has no 'label' ({item}); "
                                f"{split} cases need their reference label")
        if split == "test" and not isinstance(items[0], dict):  # MSD style: a list of image paths
            items = [{"image": item} for item in items]
        ids = [item.get("case_id") if isinstance(item, dict) else None for item in items]
        try:
            items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=split,
                                            base_dir=absolute(path).parent)
        except (TypeError, KeyError) as err:
            raise DataError(f"{path}: '{split}' must be a list of {{'image', 'label'}} items ({err})") from err
        for item, case_id in zip(items, ids):
            item["case_id"] = str(case_id) if case_id else _image_case_id(item["image"])
        seen = [item["case_id"] for item in items]
        repeated = sorted({c for c in seen if seen.count(c) > 1})
        if repeated:
            raise DataError(f"{path}: case ids {repeated} appear more than once in '{split}'")
        out[split] = items
    check_leakage(out, str(path))
    return out


def check_leakage(split: dict[str, list[dict]], source: str) -> list[str]:
    """Warn about cases that are in more than one split (a test score from a trained-on case means little)."""
    owner: dict[str, str] = {}
    shared = []
    for name in SPLITS:
        for item in split.get(name) or []:
            key = str(item.get("image"))
            if key in owner and owner[key] != name:
                shared.append(f"{item.get('case_id')} ({owner[key]} and {name})")
            owner.setdefault(key, name)
    if shared:
        logger.warning("%s: cases in more than one split, their scores are not independent: %s", source,
                       ", ".join(shared[:10]) + (" ..." if len(shared) > 10 else ""))
    return shared


def _image_case_id(image: str | list) -> str:
    name = Path(str(image[0] if isinstance(image, list) else image)).name
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name[:-5] if name.endswith("_0000") else name
