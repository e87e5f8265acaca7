"""The three dataset layouts, written down once: folder trees, label maps, CT windows, scanning.

Every dataset-specific fact lives here (and nowhere else): which files make a case, which
label values may appear in a label file, which organs are trained (name -> label id, in
order: K = ``len(organs)``), and the default CT window.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable, Sequence

from .validation import DataError

# --- SegRap2023 ------------------------------------------------------------------------------
# Task001's merged label volume (the challenge's "one-hot" label, segrap_XXXX.nii.gz) holds 54
# mutually exclusive classes; each of the 45 organs at risk is one class or a union of classes
# (the Brain contains the brainstem, an eye contains its lens...). Source: the organisers'
# tutorial code, github.com/HiLab-git/SegRap2023, convert_one_hot_prediction_to_multi_organs_lesions.py.
# Organ names are the challenge's own, also the per-organ label file names (<Organ>.nii.gz).
SEGRAP_OARS: dict[str, tuple[int, ...]] = {
    "Brain": (1, 2, 3, 4, 5, 6, 7, 8, 9),
    "BrainStem": (2,),
    "Chiasm": (3,),
    "TemporalLobe_L": (4, 6),
    "TemporalLobe_R": (5, 7),
    "Hippocampus_L": (6, 8),
    "Hippocampus_R": (7, 9),
    "Eye_L": (10, 12),
    "Eye_R": (11, 13),
    "Lens_L": (12,),
    "Lens_R": (13,),
    "OpticNerve_L": (14,),
    "OpticNerve_R": (15,),
    "MiddleEar_L": (16, 18, 20, 24, 28, 30),
    "MiddleEar_R": (17, 19, 21, 25, 29, 31),
    "IAC_L": (18,),
    "IAC_R": (19,),
    "TympanicCavity_L": (20, 22),
    "TympanicCavity_R": (21, 23),
    "VestibulSemi_L": (24, 26),
    "VestibulSemi_R": (25, 27),
    "Cochlea_L": (28,),
    "Cochlea_R": (29,),
    "ETbone_L": (30, 32),
    "ETbone_R": (31, 33),
    "Pituitary": (34,),
    "OralCavity": (35,),
    "Mandible_L": (36,),
    "Mandible_R": (37,),
    "Submandibular_L": (38,),
    "Submandibular_R": (39,),
    "Parotid_L": (40,),
    "Parotid_R": (41,),
    "Mastoid_L": (42,),
    "Mastoid_R": (43,),
    "TMjoint_L": (44,),
    "TMjoint_R": (45,),
    "SpinalCord": (46,),
    "Esophagus": (47,),
    "Larynx": (48, 49, 50, 51),
    "Larynx_Glottic": (49,),
    "Larynx_Supraglot": (50,),
    "PharynxConst": (51, 52),
    "Thyroid": (53,),
    "Trachea": (54,),
}
SEGRAP_LABEL_VALUES: tuple[int, ...] = tuple(range(0, 55))

# The organs this project trains on: organs that are a single class of the merged volume, so
# their label id *is* the challenge's class id and a merged volume needs no remapping (its other
# classes become background). One label map cannot hold overlapping organs, so unions (Brain,
# Eye_L, ...) are not available as label-map organs. Change the selection here, nowhere else.
SEGRAP_ORGANS: dict[str, int] = {
    name: SEGRAP_OARS[name][0]
    for name in ("BrainStem", "OralCavity", "Mandible_L", "Mandible_R", "Parotid_L", "Parotid_R", "SpinalCord")
}
assert all(len(SEGRAP_OARS[name]) == 1 for name in SEGRAP_ORGANS), "SegRap organs must be single classes"


@dataclasses.dataclass(frozen=True)
class DatasetLayout:
    """One dataset: its folder tree, label map, intensity window and how to find its cases."""

    name: str
    title: str
    organs: dict[str, int]  # organ name -> label id, in order (the K of every sample)
    ct_window: tuple[float, float]  # HU clipped and scaled to [0, 255]
    tree: str  # the folder tree it expects, for docs and errors
    source: str  # where to get the data
    scan: Callable[[Path], list[dict]]  # data_dir -> [{"image", "label", "case_id"}] (label may be a list)
    label_values: tuple[int, ...] = ()  # every value a label file may hold (others are errors); organs' ids if empty
    modality: str = "CT"

    @property
    def organ_ids(self) -> list[int]:
        return list(self.organs.values())

    @property
    def allowed_label_values(self) -> list[int]:
        return sorted(set(self.label_values) | set(self.organs.values()) | {0})


def _case_id(path: Path, suffix: str = "") -> str:
    return re.sub(rf"{re.escape(suffix)}\.nii(\.gz)?$", "", path.name)


def _scan_adome(root: Path) -> list[dict]:
    images = sorted((root / "Image").glob("*_0000.nii*"))
    if not images:
        raise DataError(f"{root}: no Image/Case_XXXXX_0000.nii.gz files (AbdomenCT-1K layout)")
    cases = []
    for image in images:
        case_id = _case_id(image, "_0000")
        masks = sorted((root / "Mask").glob(f"{case_id}.nii*"))
        label = masks[0] if masks else root / "Mask" / f"{case_id}.nii.gz"
        cases.append({"image": str(image), "label": str(label), "case_id": case_id})
    return cases


def _scan_spleen(root: Path) -> list[dict]:
    from monai.data import load_decathlon_datalist

    manifest = root / "dataset.json"
    if not manifest.is_file():
        raise DataError(f"{root}: dataset.json is missing (MSD Task09_Spleen layout)")
    try:
        items = load_decathlon_datalist(str(manifest), is_segmentation=True, data_list_key="training",
                                        base_dir=str(root))
    except (ValueError, TypeError, KeyError) as err:
        raise DataError(f"{manifest}: not an MSD dataset.json with a 'training' list ({err})") from err
    return [{"image": item["image"], "label": item["label"], "case_id": _case_id(Path(item["image"]))}
            for item in items]


def _normalised(stem: str) -> str:
    return re.sub(r"[_\-\s]", "", stem).lower()


def segrap_organ_files(folder: Path, organs: Sequence[str] = tuple(SEGRAP_ORGANS)) -> list[str]:
    """The per-organ label files of one case folder, in label-map order.

    Files live in ``<case>/labels/`` and are matched to organ names ignoring case, ``_`` and
    ``-`` (``BrainStem.nii.gz``, ``brainstem.nii.gz`` and ``Brain_Stem.nii.gz`` all match). A
    missing organ file is left as its expected path, so loading reports it by name.
    """
    available = {}
    for path in sorted((folder / "labels").glob("*.nii*")):
        available.setdefault(_normalised(_case_id(path)), path)
    return [str(available.get(_normalised(organ), folder / "labels" / f"{organ}.nii.gz")) for organ in organs]


def _scan_segrap(root: Path) -> list[dict]:
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(folder.glob("image.nii*"))
        if not images:
            continue
        merged = sorted(folder.glob("label.nii*"))
        label: str | list[str] = str(merged[0]) if merged else segrap_organ_files(folder)
        cases.append({"image": str(images[0]), "label": label, "case_id": folder.name})
    if not cases:
        raise DataError(f"{root}: no case folders with image.nii.gz (SegRap2023 layout)")
    return cases


LAYOUTS: dict[str, DatasetLayout] = {
    "adome": DatasetLayout(
        name="adome",
        title="AbdomenCT-1K",
        organs={"liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4},
        ct_window=(-500.0, 1000.0),
        tree="DIR/\n  Image/Case_00001_0000.nii.gz ...\n  Mask/Case_00001.nii.gz ...",
        source="https://github.com/JunMa11/AbdomenCT-1K",
        scan=_scan_adome,
        label_values=(0, 1, 2, 3, 4),
    ),
    "spleen": DatasetLayout(
        name="spleen",
        title="MSD Task09_Spleen",
        organs={"spleen": 1},
        ct_window=(-500.0, 1000.0),
        tree="DIR/\n  dataset.json\n  imagesTr/spleen_2.nii.gz ...\n  labelsTr/spleen_2.nii.gz ...",
        source="http://medicaldecathlon.com (Task09_Spleen.tar)",
        scan=_scan_spleen,
        label_values=(0, 1),
    ),
    "segrap": DatasetLayout(
        name="segrap",
        title="SegRap2023 (Task001, organs at risk)",
        organs=dict(SEGRAP_ORGANS),
        ct_window=(-160.0, 240.0),  # soft-tissue window (W400 / L40) for head-and-neck organs at risk
        tree="DIR/\n  segrap_0000/image.nii.gz\n"
             "  segrap_0000/label.nii.gz              (merged Task001 label, classes 0-54), or\n"
             "  segrap_0001/image.nii.gz\n"
             "  segrap_0001/labels/BrainStem.nii.gz    (one binary file per organ: " + ", ".join(SEGRAP_ORGANS) + ")",
        source="https://segrap2023.grand-challenge.org",
        scan=_scan_segrap,
        label_values=SEGRAP_LABEL_VALUES,
    ),
}


def get_layout(name: str) -> DatasetLayout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown dataset layout {name!r}; choose one of {sorted(LAYOUTS)}") from None


def label_values(layout: str | None, organ_ids: Sequence[int]) -> list[int]:
    """Every value a label file of ``layout`` may hold.

    Without a layout: the values of the layout whose organ ids are exactly ``organ_ids`` (so a
    chain built from ``get_layout("segrap").organ_ids`` accepts SegRap's other classes), else
    just ``organ_ids`` and 0.
    """
    ids = [int(i) for i in organ_ids]
    if not layout:
        layout = next((name for name, spec in LAYOUTS.items() if spec.organ_ids == ids), None)
    if layout:
        return get_layout(layout).allowed_label_values
    return sorted({0, *ids})
