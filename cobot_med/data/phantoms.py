"""Synthetic CT phantoms written as real NIfTI files in each dataset's own folder layout.

Realistic where the pipeline cares: HU intensities (air -1000, fat -100, soft tissue 40,
organs 40-150, bone 700+), anisotropic spacing (about 0.8 x 0.8 x 2.5 mm), and non-identity
affines -- cycling over the cases: RAS storage, flipped axes (LPS), the superior-inferior axis
stored first (SRA), and an oblique affine (rotated about the S axis and tilted like a gantry)
-- so that reorientation and stitching back are exercised; organ-shaped (ellipsoid) labels with
the dataset's own label ids, on the anatomical side they belong to (patient left = low x in RAS).

SegRap cases alternate: a merged label volume with only the trained organs (case 0, 4, ...),
one binary file per organ with lower-case names (1, 5, ...), a merged volume with the
challenge's other classes as well (brain, eyes, lenses: 2, 6, ...), and one file per organ with
the challenge's own names plus a file of an organ that is not trained, Eye_L (3, 7, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from .layouts import SEGRAP_OARS, SEGRAP_ORGANS, get_layout

# organ -> list of ellipsoids (centre as a fraction of the RAS grid, semi-axes as fractions), HU.
# RAS: x grows towards the patient's right, y towards anterior, z towards superior.
_ABDOMEN = {
    "liver": ([((0.68, 0.55, 0.66), (0.20, 0.18, 0.22))], 60.0),
    "kidney": ([((0.70, 0.32, 0.42), (0.08, 0.10, 0.15)), ((0.30, 0.32, 0.45), (0.08, 0.10, 0.15))], 150.0),
    "spleen": ([((0.25, 0.42, 0.64), (0.09, 0.11, 0.14))], 50.0),
    "pancreas": ([((0.47, 0.52, 0.50), (0.15, 0.05, 0.08))], 40.0),
}
_HEAD_NECK = {  # trained organs, by the challenge's names
    "BrainStem": ([((0.50, 0.42, 0.78), (0.07, 0.08, 0.13))], 35.0),
    "SpinalCord": ([((0.50, 0.28, 0.32), (0.05, 0.05, 0.30))], 30.0),
    "Parotid_L": ([((0.22, 0.50, 0.52), (0.08, 0.10, 0.12))], 10.0),
    "Parotid_R": ([((0.78, 0.50, 0.52), (0.08, 0.10, 0.12))], 10.0),
    "Mandible_L": ([((0.36, 0.74, 0.36), (0.12, 0.14, 0.07))], 1000.0),
    "Mandible_R": ([((0.64, 0.74, 0.36), (0.12, 0.14, 0.07))], 1000.0),
    "OralCavity": ([((0.50, 0.70, 0.46), (0.11, 0.09, 0.06))], 30.0),
}
_HEAD_NECK_EXTRA = {  # other Task001 classes in full merged volumes: class id -> ellipsoids, HU
    1: ([((0.50, 0.50, 0.93), (0.30, 0.30, 0.08))], 35.0),  # brain (the part that is no other class)
    10: ([((0.36, 0.86, 0.84), (0.06, 0.06, 0.06))], 15.0),  # Eye_L without its lens
    11: ([((0.64, 0.86, 0.84), (0.06, 0.06, 0.06))], 15.0),  # Eye_R without its lens
    12: ([((0.36, 0.91, 0.84), (0.02, 0.02, 0.03))], 80.0),  # Lens_L
    13: ([((0.64, 0.91, 0.84), (0.02, 0.02, 0.03))], 80.0),  # Lens_R
}
# stored orientations, cycled over the cases: RAS, flipped (LPS), S-I stored first (SRA), oblique RAS
_ORIENTATIONS = [("R", "A", "S"), ("L", "P", "S"), ("S", "R", "A"), ("R", "A", "S")]


def _ellipsoid(grid, centre, axes) -> np.ndarray:
    return sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, axes)) <= 1.0


def _case(rng: np.random.Generator, organs: dict, label_of: dict, shape: tuple[int, int, int],
          head: bool) -> tuple[np.ndarray, np.ndarray]:
    """A canonical RAS volume (HU, int16) and its label map (uint8); ``label_of`` maps organ key -> label id."""
    grid = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    image = np.full(shape, -1000.0)  # air
    outline = ((0.5, 0.5), (0.40, 0.44)) if head else ((0.5, 0.5), (0.46, 0.40))
    image[_ellipsoid(grid[:2], *outline)] = -100.0  # fat
    image[_ellipsoid(grid[:2], outline[0], np.subtract(outline[1], 0.04))] = 40.0  # soft tissue
    image[_ellipsoid(grid[:2], (0.5, 0.2), (0.06, 0.06))] = 700.0  # vertebrae
    label = np.zeros(shape, np.uint8)
    for key, (parts, hu) in organs.items():
        shift, scale = rng.uniform(-0.03, 0.03, 3), rng.uniform(0.85, 1.15, 3)
        mask = np.zeros(shape, bool)
        for centre, axes in parts:
            mask |= _ellipsoid(grid, np.add(centre, shift), np.multiply(axes, scale))
        image[mask] = hu
        label[mask] = label_of[key]
    image += rng.normal(0, 12, shape)
    return np.round(image).astype(np.int16), label


def _affine(rng: np.random.Generator, spacing, oblique: bool) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = rng.uniform(-200, 200, 3)
    if oblique:  # 12 degrees about the superior axis, then an 8 degree gantry tilt about the R-L axis
        a, b = np.deg2rad(12), np.deg2rad(8)
        about_s = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        about_r = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        affine[:3, :3] = about_r @ about_s @ affine[:3, :3]
    return affine


def _store(array: np.ndarray, affine: np.ndarray, codes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Reorder a canonical RAS array to be stored with axis codes ``codes``, with the matching affine."""
    transform = ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes))
    stored = apply_orientation(array, transform)
    return np.ascontiguousarray(stored), affine @ inv_ornt_aff(transform, array.shape)


def _write(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def make_phantoms(layout: str, out_dir: str | Path, cases: int = 3, seed: int = 0,
                  shape: tuple[int, int, int] = (64, 64, 32)) -> Path:
    """Write ``cases`` phantom cases of ``layout`` into ``out_dir`` (created); returns ``out_dir``.

    ``shape`` is the RAS grid (x, y, z) of case 0; each case varies it by up to 4 voxels per axis.
    The same ``seed`` gives the same files.
    """
    spec = get_layout(layout)
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    head = layout == "segrap"
    training = []
    for c in range(cases):
        if head:
            organs, label_of = dict(_HEAD_NECK), dict(SEGRAP_ORGANS)
            if c % 4 in (2, 3):  # the challenge's other classes too (brain, eyes, lenses)
                organs = {**{f"class_{k}": v for k, v in _HEAD_NECK_EXTRA.items()}, **organs}
                label_of.update({f"class_{k}": k for k in _HEAD_NECK_EXTRA})
        else:
            organs = {k: v for k, v in _ABDOMEN.items() if k in spec.organs}
            label_of = dict(spec.organs)
        case_shape = tuple(int(n + rng.integers(-4, 5)) for n in shape)
        image, label = _case(rng, organs, label_of, case_shape, head)
        spacing = (rng.uniform(0.7, 0.9), rng.uniform(0.7, 0.9), rng.uniform(2.0, 3.0))
        codes = _ORIENTATIONS[c % len(_ORIENTATIONS)]
        affine = _affine(rng, spacing, oblique=(c % len(_ORIENTATIONS) == 3))
        image_s, affine_s = _store(image, affine, codes)
        label_s, _ = _store(label, affine, codes)
        if layout == "adome":
            case_id = f"Case_{c + 1:05d}"
            _write(image_s, affine_s, out / "Image" / f"{case_id}_0000.nii.gz")
            _write(label_s, affine_s, out / "Mask" / f"{case_id}.nii.gz")
        elif layout == "spleen":
            name = f"spleen_{c + 1}.nii.gz"
            _write(image_s, affine_s, out / "imagesTr" / name)
            _write(label_s, affine_s, out / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            folder = out / f"segrap_{c:04d}"
            _write(image_s, affine_s, folder / "image.nii.gz")
            contrast = np.where(label_s > 0, image_s + 40, image_s).astype(np.int16)  # enhanced organs
            _write(contrast, affine_s, folder / "image_contrast.nii.gz")
            if c % 2 == 0:  # one merged label volume
                _write(label_s, affine_s, folder / "label.nii.gz")
            else:  # one binary file per organ
                official = c % 4 == 3
                for organ, organ_id in SEGRAP_ORGANS.items():
                    name = organ if official else organ.lower()
                    _write((label_s == organ_id).astype(np.uint8), affine_s, folder / "labels" / f"{name}.nii.gz")
                if official:  # the release has a file for every organ; untrained ones are ignored
                    eye = np.isin(label_s, SEGRAP_OARS["Eye_L"]).astype(np.uint8)
                    _write(eye, affine_s, folder / "labels" / "Eye_L.nii.gz")
    if layout == "spleen":
        manifest = {"name": "Spleen (phantoms)", "description": "cobot-med synthetic phantoms in the MSD layout",
                    "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
                    "numTraining": len(training), "numTest": 0, "training": training, "test": []}
        (out / "dataset.json").write_text(json.dumps(manifest, indent=2))
    return out
