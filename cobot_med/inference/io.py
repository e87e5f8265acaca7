"""Cases in an input folder, their label files, and atomic writing of every output.

A case is one ``.nii`` / ``.nii.gz`` file, or one sub-folder of DICOM files (one series, read
through ITK by MONAI's ``ITKReader``). Its id is the file name without the extension, or the
folder's name. Nothing is ever written into the input folder; every output file is written
under a temporary name in its final folder and renamed when complete, so a killed run leaves
no half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")
TEMP_PREFIX = ".tmp-"
SEG_SUFFIX = "_seg.nii.gz"


class InputError(ValueError):
    """Settings of a run that cannot work (folders, files), with what to do."""


@dataclasses.dataclass
class Case:
    """One input volume: ``image`` is a NIfTI file or a DICOM folder; ``label`` a reference file or None."""

    case_id: str
    image: Path
    kind: str  # "nifti" or "dicom"
    label: Path | None = None
    error: str | None = None  # a problem found while listing (duplicate id, missing label...)


def case_id_of(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file (``DICM`` at byte 128) or a ``.dcm`` file."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def find_cases(input_dir: str | Path) -> tuple[list[Case], list[tuple[str, str]]]:
    """Cases of ``input_dir`` sorted by id, and the entries left out as (name, reason).

    Two entries with the same case id (``a.nii`` and ``a.nii.gz``) are both kept, the second
    marked with an error, so the run reports it instead of silently choosing one.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise InputError(f"input folder {root} does not exist or is not a folder")
    cases: list[Case] = []
    ignored: list[tuple[str, str]] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.lower().endswith(NIFTI_SUFFIXES):
            cases.append(Case(case_id_of(entry), entry, "nifti"))
        elif entry.is_dir():
            files = [p for p in sorted(entry.iterdir()) if p.is_file() and not p.name.startswith(".")]
            if any(is_dicom_file(p) for p in files):
                cases.append(Case(entry.name, entry, "dicom"))
            else:
                ignored.append((entry.name, "a folder without DICOM files"))
        else:
            ignored.append((entry.name, "not a .nii/.nii.gz file or a DICOM folder"))
    seen: dict[str, Case] = {}
    for case in cases:
        if case.case_id in seen:
            case.error = (f"{case.image}: case id {case.case_id!r} is also {seen[case.case_id].image}; "
                          "rename one of them")
        else:
            seen[case.case_id] = case
    return sorted(cases, key=lambda c: (c.case_id, str(c.image))), ignored


def label_candidates(case: Case) -> list[str]:
    """File names a case's label may have in the labels folder: the same name, then without an nnU-Net
    channel suffix ``_0000`` (AbdomenCT-1K's ``Case_00001_0000.nii.gz`` -> ``Case_00001.nii.gz``)."""
    stems = [case.case_id]
    stripped = re.sub(r"_\d{4}$", "", case.case_id)
    if stripped != case.case_id:
        stems.append(stripped)
    return [stem + suffix for stem in stems for suffix in NIFTI_SUFFIXES]


def attach_labels(cases: list[Case], labels_dir: str | Path) -> None:
    """Set each case's ``label`` from ``labels_dir``; a case without one gets an error naming the files tried."""
    root = Path(labels_dir)
    if not root.is_dir():
        raise InputError(f"labels folder {root} does not exist or is not a folder")
    for case in cases:
        names = label_candidates(case)
        found = next((root / n for n in names if (root / n).is_file()), None)
        if found is None:
            case.error = case.error or f"{root}: no label file for case {case.case_id} (tried {', '.join(names)})"
        case.label = found


def check_folders(input_dir: str | Path, output_dir: str | Path, *others: str | Path | None) -> None:
    """The output folder must not be, or lie inside, the input folder (or a labels folder): inputs are never written."""
    output = Path(output_dir).resolve()
    for folder in (input_dir, *others):
        if not folder:
            continue
        source = Path(folder).resolve()
        if output == source or source in output.parents:
            raise InputError(f"the output folder {output} is inside the input folder {source}; "
                             "choose an output folder elsewhere (inputs are never written)")


# --- atomic writing ---------------------------------------------------------------------------


def temporary_path(path: Path) -> Path:
    """A hidden name in the same folder with the same extension (writers choose the format by it)."""
    return path.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed to ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, content: Any) -> Path:
    return write_text(path, json.dumps(content, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.ndarray,)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def remove_stale_temporaries(output_dir: str | Path) -> int:
    """Delete the temporary files a killed run left behind (only this module's own names)."""
    count = 0
    for tmp in Path(output_dir).glob(f"{TEMP_PREFIX}*"):
        if tmp.is_file():
            tmp.unlink()
            count += 1
    return count


def write_volume(volume: Any, path: str | Path, dtype: Any) -> Path:
    """Write a (C, X, Y, Z) MetaTensor (C = 1) with MONAI's ``NibabelWriter``, its affine from the metadata,
    no resampling (the caller has inverted the orientation with ``Invertd``)."""
    from monai.data import NibabelWriter

    writer = NibabelWriter(output_dtype=dtype)
    writer.set_data_array(volume, channel_dim=0)
    writer.set_metadata(volume.meta, resample=False)
    with atomic_path(path) as tmp:
        writer.write(str(tmp))
    return Path(path)
