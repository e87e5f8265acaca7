"""Cases in an input folder and their label files.

A case is one ``.nii`` / ``.nii.gz`` file, or one sub-folder of DICOM files (one series, read
through ITK by MONAI's ``ITKReader``). Its id is the file name without the extension, or the
folder's name. Nothing is ever written into the input folder.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ..errors import CobotMedError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class InputError(CobotMedError, ValueError):
    """Inputs of a run that cannot work (folders, files), with what to do."""


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
