"""Files beside the segmentations: label descriptions for viewers, prompts used, overlay pictures, metrics."""

from __future__ import annotations

import csv
import io
import math
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..files import atomic_path, write_json, write_text
from ..handlers.overlays import COLOURS, draw_overlay
from ..metrics import summarise

METRIC_FIELDS = ["case", "organ", "label_id", "dsc", "nsd", "hd95_mm", "reference_voxels", "predicted_voxels", "note"]

LABELS_JSON = "labels.json"
ITKSNAP_LABELS = "labels.itksnap.txt"
SLICER_COLOURS = "labels.ctbl"


def organ_colours(organs: Mapping[str, int]) -> dict[str, tuple[int, int, int]]:
    """The overlay pictures' colours (``cobot_med.handlers.overlays.COLOURS``), as 0-255 RGB, per organ."""
    out = {}
    for k, organ in enumerate(organs):
        hex_colour = COLOURS[k % len(COLOURS)].lstrip("#")
        out[organ] = tuple(int(hex_colour[i : i + 2], 16) for i in (0, 2, 4))
    return out


def write_label_files(output_dir: str | Path, organs: Mapping[str, int], dataset: str = "") -> list[Path]:
    """``labels.json``, an ITK-SNAP label description file and a 3D Slicer colour table for the label map."""
    out = Path(output_dir)
    colours = organ_colours(organs)
    content = {
        "dataset": dataset,
        "background": 0,
        "labels": {organ: int(label_id) for organ, label_id in organs.items()},
        "colours": {organ: list(colours[organ]) for organ in organs},
    }
    snap = [
        "################################################",
        "# ITK-SnAP Label Description File",
        "# File format: ",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields: ",
        "#    IDX:   Zero-based index ",
        "#    -R-:   Red color component (0..255)",
        "#    -G-:   Green color component (0..255)",
        "#    -B-:   Blue color component (0..255)",
        "#    -A-:   Label transparency (0.00 .. 1.00)",
        "#    VIS:   Label visibility (0 or 1)",
        "#    IDX:   Label mesh visibility (0 or 1)",
        "#  LABEL:   Label description ",
        "################################################",
        f"{0:>5} {0:>5} {0:>4} {0:>4} {0:>8} {0:>2} {0:>2}    \"Clear Label\"",
    ]
    slicer = [f"# Color table file {SLICER_COLOURS}", f"# {len(organs) + 1} values", "0 Background 0 0 0 0"]
    for organ, label_id in organs.items():
        r, g, b = colours[organ]
        snap.append(f"{int(label_id):>5} {r:>5} {g:>4} {b:>4} {1:>8} {1:>2} {1:>2}    \"{organ}\"")
        slicer.append(f"{int(label_id)} {organ.replace(' ', '_')} {r} {g} {b} 255")
    return [
        write_json(out / LABELS_JSON, content),
        write_text(out / ITKSNAP_LABELS, "\n".join(snap) + "\n"),
        write_text(out / SLICER_COLOURS, "\n".join(slicer) + "\n"),
    ]


def overlay_slices(seg: np.ndarray, label: np.ndarray | None, count: int = 3) -> list[int]:
    """``count`` axial slices spread over the foreground (prediction or reference), the middle one without any."""
    foreground = seg > 0
    if label is not None:
        foreground = foreground | (label > 0)
    zs = np.nonzero(foreground.any(axis=(0, 1)))[0]
    if zs.size == 0:
        return [seg.shape[-1] // 2]
    picks = np.linspace(zs[0], zs[-1], count + 2)[1:-1] if zs[-1] > zs[0] else [zs[0]]
    return sorted({int(round(z)) for z in picks})


def write_overlay(path: str | Path, image: np.ndarray, seg: np.ndarray, label: np.ndarray | None,
                  organs: Mapping[str, int], case_id: str, count: int = 3) -> Path:
    """One PNG of a few axial slices side by side: predicted contours (solid) and, with a reference, its contours
    (dashed), drawn with ``cobot_med.handlers.overlays.draw_overlay``. Arrays are the oriented (X, Y, Z) grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    ids = list(organs.values())
    panels = []
    with tempfile.TemporaryDirectory(prefix="cobot-med-overlay-") as scratch:
        for z in overlay_slices(seg, label, count):
            pred = np.stack([seg[..., z] == i for i in ids])
            panel = Path(scratch) / f"{z}.png"
            draw_overlay(image[..., z], None if label is None else label[..., z], pred, organs, panel,
                         title=f"{case_id}, axial slice {z}")
            panels.append(mpimg.imread(str(panel)))
    height = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=1.0) for p in panels]
    with atomic_path(path) as tmp:
        mpimg.imsave(str(tmp), np.concatenate(panels, axis=1), format="png")
    return Path(path)


def prompts_record(case_id: str, source: str, organs: Mapping[str, int], prompts: Sequence[Any],
                   used: Sequence[Mapping[int, Sequence[float]]], image: Any) -> dict:
    """What was sent to the model for one case, in the oriented grid (see docs/inference.md)."""
    record = {
        "case_id": case_id,
        "source": source,
        "grid": {
            "description": "the volume after reorientation to RAS: slice z is volume[..., z] (X rows, Y columns); "
                           "boxes are [x0, y0, x1, y1] with x along Y (columns), y along X (rows), "
                           "right/bottom edges exclusive",
            "shape": [int(n) for n in image.shape[-3:]],
            "affine": np.asarray(image.affine, dtype=np.float64).round(6).tolist(),
        },
        "organs": {},
    }
    for (organ, label_id), prompt, boxes in zip(organs.items(), prompts, used):
        entry: dict[str, Any] = {"label_id": int(label_id), "source": prompt.kind}
        if prompt.given is not None:
            entry["given"] = prompt.given
        if prompt.extent is not None:
            entry["oriented_box"] = prompt.extent
        if prompt.key is not None:
            entry["key_slice"] = {"slice": int(prompt.key[0]), "box": [float(v) for v in prompt.key[1]]}
        if prompt.note:
            entry["note"] = prompt.note
        entry["slices"] = {str(z): [float(v) for v in boxes[z]] for z in sorted(boxes)}
        record["organs"][organ] = entry
    return record


def write_metrics(output_dir: str | Path, cases: Mapping[str, Mapping[str, dict]], organs: Mapping[str, int],
                  tolerance_mm: float) -> tuple[Path, Path]:
    """``metrics.csv`` (one row per case and organ, then the means) and ``metrics.json``."""
    out = Path(output_dir)
    means = summarise(cases, list(organs))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()

    def fmt(value: Any) -> Any:
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else (
            f"{value:.6f}" if isinstance(value, float) else value)

    for case in sorted(cases):
        for organ, row in cases[case].items():
            writer.writerow({"case": case, "organ": organ, **{k: fmt(row.get(k)) for k in METRIC_FIELDS[2:]}})
    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"

    for name, row in means.items():
        counted = (f"{plural(row['cases'], '(case, organ) pair')} counted over {plural(len(cases), 'case')}"
                   if name == "all" else f"{plural(row['cases'], 'case')} counted")
        writer.writerow({"case": "mean", "organ": name, "label_id": organs.get(name, ""),
                         "dsc": fmt(row["dsc"]), "nsd": fmt(row["nsd"]), "hd95_mm": fmt(row["hd95_mm"]),
                         "note": f"{counted}, HD95 undefined in {row['hd95_undefined']}"})
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
