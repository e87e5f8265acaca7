"""Per-case, per-organ DSC, normalised surface distance and HD95 (mm) with MONAI's metrics.

Scored on the written label map (overlaps already resolved) against the reference label, both
in the oriented grid, with the voxel spacing of the volume (mm). The NSD tolerance is
``tolerance_mm`` (2 mm by default).

Empty masks (the policy, also in docs/inference.md):

- reference and prediction both empty: DSC 1, NSD 1, HD95 0, and the pair is left out of every mean
  (the organ is absent and correctly not found; counting it would inflate means);
- one of them empty: DSC 0 and NSD 0 (counted in those means); HD95 is undefined (no surface to
  measure from) and written as empty / null, left out of the HD95 mean, and counted in
  ``hd95_undefined``.

Means: per organ over its counted cases, and ``all`` over every counted (case, organ) pair.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .io import write_json, write_text

FIELDS = ["case", "organ", "label_id", "dsc", "nsd", "hd95_mm", "reference_voxels", "predicted_voxels", "note"]


def spacing_of(affine: Any) -> list[float]:
    """Voxel sizes (mm) of a grid: the lengths of its affine's first three columns."""
    affine = np.asarray(affine, dtype=np.float64)
    return [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]


def organ_scores(pred: torch.Tensor, ref: torch.Tensor, spacing: Sequence[float], tolerance_mm: float = 2.0) -> dict:
    """DSC, NSD and HD95 (mm) of two binary (X, Y, Z) masks, with the empty-mask policy above."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric

    pred, ref = torch.as_tensor(pred).bool(), torch.as_tensor(ref).bool()
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    row: dict[str, Any] = {"reference_voxels": n_ref, "predicted_voxels": n_pred}
    if n_pred == 0 and n_ref == 0:
        return {**row, "dsc": 1.0, "nsd": 1.0, "hd95_mm": 0.0, "counted": False, "note": "both empty"}
    if n_pred == 0 or n_ref == 0:
        note = "reference empty" if n_ref == 0 else "prediction empty"
        return {**row, "dsc": 0.0, "nsd": 0.0, "hd95_mm": None, "counted": True, "note": note}
    y_pred, y = pred[None, None].float(), ref[None, None].float()
    spacing = [float(s) for s in spacing]
    dsc = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(y_pred, y)
    nsd = SurfaceDiceMetric(class_thresholds=[float(tolerance_mm)], include_background=True,
                            reduction="none")(y_pred, y, spacing=spacing)
    hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(y_pred, y, spacing=spacing)
    return {**row, "dsc": float(dsc.item()), "nsd": float(nsd.item()), "hd95_mm": float(hd95.item()),
            "counted": True, "note": ""}


def case_scores(seg: torch.Tensor, label: torch.Tensor, organs: Mapping[str, int], spacing: Sequence[float],
                tolerance_mm: float = 2.0) -> dict[str, dict]:
    """{organ: scores} for one case; ``seg`` and ``label`` are (X, Y, Z) label maps on the same grid."""
    seg, label = torch.as_tensor(seg).reshape(seg.shape[-3:]), torch.as_tensor(label).reshape(label.shape[-3:])
    return {organ: {"label_id": int(i), **organ_scores(seg == i, label == i, spacing, tolerance_mm)}
            for organ, i in organs.items()}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarise(cases: Mapping[str, Mapping[str, dict]], organs: Sequence[str]) -> dict[str, dict]:
    """Means per organ and over all counted (case, organ) pairs, with the counts behind them."""
    groups: dict[str, list[dict]] = {organ: [] for organ in organs}
    for scores in cases.values():
        for organ, row in scores.items():
            if organ in groups and row.get("counted", True):
                groups[organ].append(row)
    groups["all"] = [row for organ in organs for row in groups[organ]]
    out = {}
    for name, rows in groups.items():
        hd = [r["hd95_mm"] for r in rows if r["hd95_mm"] is not None]
        out[name] = {"dsc": _mean([r["dsc"] for r in rows]), "nsd": _mean([r["nsd"] for r in rows]),
                     "hd95_mm": _mean(hd), "cases": len(rows), "hd95_undefined": len(rows) - len(hd)}
    return out


def write_metrics(output_dir: str | Path, cases: Mapping[str, Mapping[str, dict]], organs: Mapping[str, int],
                  tolerance_mm: float) -> tuple[Path, Path]:
    """``metrics.csv`` (one row per case and organ, then the means) and ``metrics.json``."""
    out = Path(output_dir)
    means = summarise(cases, list(organs))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()

    def fmt(value: Any) -> Any:
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else (
            f"{value:.6f}" if isinstance(value, float) else value)

    for case in sorted(cases):
        for organ, row in cases[case].items():
            writer.writerow({"case": case, "organ": organ, **{k: fmt(row.get(k)) for k in FIELDS[2:]}})
    for name, row in means.items():
        writer.writerow({"case": "mean", "organ": name, "label_id": organs.get(name, ""),
                         "dsc": fmt(row["dsc"]), "nsd": fmt(row["nsd"]), "hd95_mm": fmt(row["hd95_mm"]),
                         "note": f"{row['cases']} cases counted, HD95 undefined in {row['hd95_undefined']}"})
    csv_path = write_text(out / "metrics.csv", buffer.getvalue())
    json_path = write_json(out / "metrics.json", {
        "nsd_tolerance_mm": float(tolerance_mm),
        "empty_mask_policy": "both empty: DSC 1, NSD 1, HD95 0, not counted in means; one empty: DSC 0, NSD 0, "
                             "HD95 undefined (null, left out of the HD95 mean)",
        "grid": "written label map vs reference, oriented volume, spacing from the image affine (mm)",
        "cases": {case: dict(cases[case]) for case in sorted(cases)},
        "mean": means,
    })
    return csv_path, json_path
