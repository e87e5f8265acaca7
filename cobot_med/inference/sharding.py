"""Which process segments which case, when several share a batch job (torchrun).

Cases are balanced by size (voxels), not by count: a 512 x 512 x 600 scan is worth many small ones. The
plan is a deterministic function of the cases still to do and the number of processes, so every process
computes the same plan without talking to the others, and a rerun with any number of processes plans
only what is left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .cases import Case


def voxels(case: Case) -> int:
    """A case's size from its file header (no voxel data read); 1 when it cannot be read (it will fail anyway)."""
    try:
        if case.kind == "nifti":
            import nibabel as nib

            shape = nib.load(str(case.image)).shape
        else:  # a DICOM series: one file per slice, every slice the size of the first
            import SimpleITK as sitk

            files = sorted(p for p in Path(case.image).iterdir() if p.is_file() and not p.name.startswith("."))
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(files[0]))
            reader.ReadImageInformation()
            shape = (*reader.GetSize()[:2], len(files))
        total = 1
        for n in shape[:3]:
            total *= int(n)
        return max(total, 1)
    except Exception:  # noqa: BLE001 - an unreadable case is reported when it is loaded
        return 1


def shard(cases: Sequence[Case], processes: int) -> list[list[Case]]:
    """Split ``cases`` over ``processes``: largest first, each to the process with the fewest voxels so far
    (ties to the lowest rank); within a process, cases keep their listing order."""
    sizes = [voxels(case) for case in cases]
    loads = [0] * processes
    plan: list[list[Case]] = [[] for _ in range(processes)]
    owner: dict[int, int] = {}
    for i in sorted(range(len(cases)), key=lambda i: (-sizes[i], cases[i].case_id)):
        target = min(range(processes), key=lambda r: (loads[r], r))
        owner[i] = target
        loads[target] += sizes[i]
    for i, case in enumerate(cases):
        plan[owner[i]].append(case)
    return plan
