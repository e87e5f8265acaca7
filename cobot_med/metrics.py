"""The one metric policy: how a predicted label volume is scored against its reference, everywhere.

Validation and test (MLflow's ``val_dsc`` / ``test_dsc``), ``cobot-med infer --labels``
(``metrics.csv``) and the MONAI Label app score the same thing the same way: the written label map
(overlaps already resolved, :func:`cobot_med.predict.to_label_map`) against the reference label, both
in the oriented grid, one binary mask per organ; DSC for all of them, plus normalised surface distance
(tolerance ``tolerance_mm``, 2 mm by default) and HD95 in mm for inference, with the voxel spacing of
the volume.

Empty masks (the policy, also in docs/inference.md):

- reference and prediction both empty: DSC 1, NSD 1, HD95 0, and the pair is left out of every mean
  (the organ is absent and correctly not found; counting it would inflate means);
- one of them empty: DSC 0 and NSD 0 (counted in those means); HD95 is undefined (no surface to
  measure from) and written as empty / null, left out of the HD95 mean, and counted in
  ``hd95_undefined``.

Means: per organ over its counted cases, and ``all`` over every counted (case, organ) pair.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from monai.metrics import CumulativeIterationMetric


def spacing_of(affine: Any) -> list[float]:
    """Voxel sizes (mm) of a grid: the lengths of its affine's first three columns."""
    affine = np.asarray(affine, dtype=np.float64)
    return [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]


def dice(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """DSC of binary masks (..., X, Y, Z) with the policy above: NaN where both are empty (not counted),
    0 where exactly one is."""
    dims = tuple(range(-3, 0))
    pred, ref = torch.as_tensor(pred).bool(), torch.as_tensor(ref).bool()
    inter = (pred & ref).sum(dim=dims).double()
    total = (pred.sum(dim=dims) + ref.sum(dim=dims)).double()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.full_like(total, float("nan")))


class OrganDiceMetric(CumulativeIterationMetric):
    """Per-case, per-organ DSC of label volumes with the policy above, as a MONAI metric.

    ``y_pred`` and ``y`` are (B, K, X, Y, Z) binary masks (one channel per organ, from the label maps);
    the buffer holds (cases, K) with NaN for pairs that are not counted, and :meth:`aggregate` is the
    mean over every counted (case, organ) pair -- ``metrics.csv``'s ``mean, all`` row.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return dice(y_pred > 0.5, y > 0.5)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        counted = data[~torch.isnan(data)]
        return counted.mean() if counted.numel() else torch.tensor(float("nan"))


class SliceDiceMetric(CumulativeIterationMetric):
    """The authors' pooled slice DSC: the mean 2D DSC over every (slice, organ) with reference foreground.

    Inputs are (B, K, X, Y, Z) binary volumes; aggregate returns (mean, per-organ DSC (K,)) --
    the mean first, as MONAI's metric handlers record the first value.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y_pred, y = y_pred.float(), y.float()
        inter = (y_pred * y).sum(dim=(2, 3))
        total = y_pred.sum(dim=(2, 3)) + y.sum(dim=(2, 3))
        has_ref = y.sum(dim=(2, 3)) > 0  # (B, K, Z)
        scores = torch.where(has_ref, 2 * inter / total.clamp_min(1e-8), torch.zeros_like(inter))
        return torch.stack([scores.sum(-1), has_ref.sum(-1).float()], dim=-1)  # (B, K, 2)

    def aggregate(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        totals = self.get_buffer().sum(dim=0)  # (K, 2)
        per_organ = totals[:, 0] / totals[:, 1].clamp_min(1)
        per_organ = torch.where(totals[:, 1] > 0, per_organ, torch.full_like(per_organ, float("nan")))
        valid = per_organ[~torch.isnan(per_organ)]
        return (valid.mean() if valid.numel() else torch.tensor(float("nan"))), per_organ


def organ_scores(pred: torch.Tensor, ref: torch.Tensor, spacing: Sequence[float], tolerance_mm: float = 2.0,
                 surface: bool = True) -> dict:
    """DSC, NSD and HD95 (mm) of two binary (X, Y, Z) masks, with the empty-mask policy above; with ``surface``
    off DSC only (NSD and HD95 None: validation's per-epoch scores under a protocol)."""
    from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric

    pred, ref = torch.as_tensor(pred).bool(), torch.as_tensor(ref).bool()
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    row: dict[str, Any] = {"reference_voxels": n_ref, "predicted_voxels": n_pred}
    if n_pred == 0 and n_ref == 0:
        return {**row, "dsc": 1.0, "nsd": 1.0, "hd95_mm": 0.0, "counted": False, "note": "both empty"}
    if n_pred == 0 or n_ref == 0:
        note = "reference empty" if n_ref == 0 else "prediction empty"
        return {**row, "dsc": 0.0, "nsd": 0.0, "hd95_mm": None, "counted": True, "note": note}
    dsc = dice(pred, ref)
    if not surface:
        return {**row, "dsc": float(dsc), "nsd": None, "hd95_mm": None, "counted": True, "note": ""}
    y_pred, y = pred[None, None].float(), ref[None, None].float()
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI 1.6 passes its own deprecated always_return_as_numpy inside these
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy")
        nsd = SurfaceDiceMetric(class_thresholds=[float(tolerance_mm)], include_background=True,
                                reduction="none")(y_pred, y, spacing=spacing)
        hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(y_pred, y,
                                                                                                spacing=spacing)
    return {**row, "dsc": float(dsc), "nsd": float(nsd.item()), "hd95_mm": float(hd95.item()),
            "counted": True, "note": ""}


def case_scores(seg: torch.Tensor, label: torch.Tensor, organs: Mapping[str, int], spacing: Sequence[float],
                tolerance_mm: float = 2.0, surface: bool = True) -> dict[str, dict]:
    """{organ: scores} for one case; ``seg`` and ``label`` are (X, Y, Z) label maps on the same grid."""
    seg, label = torch.as_tensor(seg).reshape(seg.shape[-3:]), torch.as_tensor(label).reshape(label.shape[-3:])
    return {organ: {"label_id": int(i), **organ_scores(seg == i, label == i, spacing, tolerance_mm, surface)}
            for organ, i in organs.items()}


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarise(cases: Mapping[str, Mapping[str, dict]], organs: Sequence[str]) -> dict[str, dict]:
    """Means per organ and over all counted (case, organ) pairs, with the counts behind them; summed in case
    order, so the same scores give the same bits whichever process or run produced them."""
    groups: dict[str, list[dict]] = {organ: [] for organ in organs}
    for case in sorted(cases):
        for organ, row in cases[case].items():
            if organ in groups and row.get("counted", True):
                groups[organ].append(row)
    groups["all"] = [row for organ in organs for row in groups[organ]]
    out = {}
    for name, rows in groups.items():
        hd = [r["hd95_mm"] for r in rows if r["hd95_mm"] is not None]
        out[name] = {"dsc": _mean([r["dsc"] for r in rows]), "nsd": _mean([r["nsd"] for r in rows if r["nsd"] is not None]),
                     "hd95_mm": _mean(hd), "cases": len(rows), "hd95_undefined": len(rows) - len(hd)}
    return out
