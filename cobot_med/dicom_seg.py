"""Label maps as DICOM Segmentation objects (DICOM-SEG), and back, with highdicom.

One writer for every place a label map leaves the project as DICOM: ``cobot-med infer --dicom-seg`` and the
MONAI Label app's saved labels. A SEG written here

- references the source series: every frame names the source instance (SOP Instance UID) it lies on, and the
  SEG is a new series of the source's study (highdicom copies the patient and study modules from the source);
- is BINARY, with one segment per organ of ``organs`` (all of them, in their order: segment ``k`` is the ``k``-th
  organ whatever a case holds, and an organ looked for but not found is an empty segment, which says so to a
  viewer; highdicom writes no frame for it, and dcmqi reads it as an empty mask), or with ``keep_empty=False``
  one per organ present (a label map holding none is then refused: a SEG needs a segment);
- names each segment with the organ's name (SegmentLabel) and codes it with SNOMED-CT (:func:`organ_code`):
  category ``Anatomical Structure`` (SCT 91723000), type the organ, and for a sided organ (``Parotid_L``) a
  type modifier ``Left``/``Right``; the algorithm that made it is identified (cobot-med, its version, the model
  and method as parameters), or none for a label drawn by hand (``algorithm_type="MANUAL"``);
- gives each segment its recommended display colour (RecommendedDisplayCIELabValue): by default the colour the
  project draws the organ in (overlays, ``labels.ctbl``, ``labels.itksnap.txt``:
  :func:`cobot_med.inference.outputs.organ_colours`), so a viewer shows the SEG as the NIfTI's label tables do.

The codes are taken from pydicom's copy of the DICOM code dictionary, never typed in: the table below names each
organ's SNOMED-CT keyword and value and :func:`organ_code` reads the concept from the dictionary (a value missing
there is an error, which the tests check for every organ of every dataset layout). pydicom 2.4 lists two values
under some keywords (``AnatomicalStructure``: 123037004 in CID 7150 then, 91723000 now), so the value is named
and looked up with its keyword; both pydicom 2.4.4 (highdicom 0.22, the MONAI Label environment) and pydicom 3
(highdicom 0.28) give the same codes. An organ name not in the table (a layout's selection changed) gets the
fallback: type ``Anatomical Structure`` (SCT 91723000), the organ's name only in SegmentLabel
(:data:`FALLBACK_ORGANS` lists the SegRap organs at risk that fall back, for want of a dictionary concept).

Frames follow the source instances one to one: ``label_map[i]`` is the mask on ``source_datasets[i]``, whatever
order they come in. :func:`frames_on_instances` gives those frames from a volume and its affine (a label map read
by ITK / MONAI / nibabel), finding each instance by its own position, orientation and pixel spacing
(``cobot-med infer --dicom_seg``: :mod:`cobot_med.inference.dicom_output`).
:func:`read_dicom_seg` reads one back into a label map, frames in the order the SEG lists its source instances
(the writer's order) or in a given order of SOP Instance UIDs.

pydicom and highdicom are the ``dicom`` extra (``pip install 'cobot-med[dicom]'``); without them a write is one
named error (:class:`DicomSegError`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import CobotMedError
from .files import atomic_path

INSTALL = "pip install 'cobot-med[dicom]'"
ON_VOXEL = 0.1  # how far (in voxels) a source pixel's centre may be from the voxel it is given
CONTENT_LABEL = "COBOT_MED"


class DicomSegError(CobotMedError):
    """A DICOM-SEG that cannot be written or read (missing extra, a label map that does not fit its series)."""


# organ name (as the dataset layouts spell it) -> (SNOMED-CT keyword in pydicom's dictionary, code value).
# Names ending _L / _R are sided: the same organ with a Left / Right type modifier.
ORGAN_CODES: dict[str, tuple[str, str]] = {
    # AbdomenCT-1K, MSD spleen
    "liver": ("Liver", "10200004"),
    "kidney": ("Kidney", "64033007"),
    "spleen": ("Spleen", "78961009"),
    "pancreas": ("Pancreas", "15776009"),
    # SegRap2023 organs at risk (the label-map selection and the rest of the challenge's list)
    "Brain": ("Brain", "12738006"),
    "BrainStem": ("BrainStem", "119238007"),
    "Chiasm": ("OpticChiasm", "244453006"),
    "TemporalLobe": ("TemporalLobe", "78277001"),
    "Hippocampus": ("Hippocampus", "5366008"),
    "Eye": ("Eye", "81745001"),
    "Lens": ("Lens", "78076003"),
    "OpticNerve": ("OpticNerve", "18234004"),
    "MiddleEar": ("MiddleEar", "25342003"),
    "IAC": ("InternalAuditoryCanal", "361078006"),
    "Pituitary": ("Pituitary", "56329008"),
    "OralCavity": ("OralCavity", "74262004"),
    "Mandible": ("Mandible", "91609006"),
    "Submandibular": ("SubmandibularGland", "54019009"),
    "Parotid": ("ParotidGland", "45289007"),
    "Mastoid": ("MastoidBone", "59066005"),
    "TMjoint": ("TemporomandibularJoint", "53620006"),
    "SpinalCord": ("SpinalCord", "2748008"),
    "Esophagus": ("Esophagus", "32849002"),
    "Larynx": ("Larynx", "4596009"),
    "Larynx_Glottic": ("Glottis", "1307006"),
    "Larynx_Supraglot": ("Supraglottis", "119255006"),
    "Thyroid": ("Thyroid", "69748006"),
    "Trachea": ("Trachea", "44567001"),
}
CATEGORY = ("AnatomicalStructure", "91723000")  # CID 7150, Segmentation Property Categories
FALLBACK_TYPE = CATEGORY  # an organ without a concept of its own: "Anatomical Structure"
SIDES = {"_L": ("Left", "7771000"), "_R": ("Right", "24028007")}
# SegRap organs at risk with no concept in pydicom's dictionary (checked against pydicom 2.4.4 and 3.0):
# they are written with FALLBACK_TYPE and their name.
FALLBACK_ORGANS = ("TympanicCavity_L", "TympanicCavity_R", "VestibulSemi_L", "VestibulSemi_R", "Cochlea_L",
                   "Cochlea_R", "ETbone_L", "ETbone_R", "PharynxConst")


@dataclasses.dataclass(frozen=True)
class OrganCode:
    """An organ's SNOMED-CT codes, as pydicom ``Code`` objects: ``coded`` is False for the fallback."""

    name: str
    category: Any
    type: Any
    modifier: Any = None  # Left / Right for a sided organ
    coded: bool = True


def dictionary_code(keyword: str, value: str) -> Any:
    """The SNOMED-CT concept ``keyword``/``value`` from pydicom's DICOM code dictionary (its meaning as listed
    there); a pair the dictionary lacks is a :class:`DicomSegError`."""
    _, Code = require_highdicom()
    # the dictionary behind pydicom's ``codes`` (a private module, the same shape in pydicom 2.4 and 3.0): by
    # keyword and value, as ``codes.SCT.<keyword>`` cannot choose where pydicom 2.4 lists two values
    from pydicom.sr._concepts_dict import concepts

    entry = concepts.get("SCT", {}).get(keyword, {}).get(value)
    if entry is None:
        raise DicomSegError(f"SNOMED-CT {keyword} {value} is not in pydicom's code dictionary")
    return Code(value, "SCT", entry[0])


def organ_code(name: str) -> OrganCode:
    """The SNOMED-CT codes of an organ named as the dataset layouts name it (``liver``, ``Parotid_L``)."""
    side = next((s for s in SIDES if name.endswith(s) and name not in ORGAN_CODES), None)
    base = name[: -len(side)] if side else name
    category = dictionary_code(*CATEGORY)
    if base not in ORGAN_CODES:
        return OrganCode(name, category, dictionary_code(*FALLBACK_TYPE), coded=False)
    return OrganCode(name, category, dictionary_code(*ORGAN_CODES[base]),
                     dictionary_code(*SIDES[side]) if side else None)


def require_highdicom() -> tuple[Any, Any]:
    """highdicom and pydicom's ``Code``, or the :class:`DicomSegError` that names the extra to install."""
    try:
        import highdicom
        from pydicom.sr.coding import Code
    except ImportError as err:
        raise DicomSegError(f"writing DICOM-SEG needs pydicom and highdicom ({err}); install them with "
                            f"{INSTALL}") from None
    return highdicom, Code


def label_values_to_names(organs: Mapping[Any, Any]) -> dict[int, str]:
    """``{label value: organ name}`` from either direction (the layouts' ``{name: value}`` is accepted as is)."""
    pairs = [(v, k) if isinstance(k, str) else (k, v) for k, v in organs.items()]
    result = {int(value): str(name) for value, name in pairs}
    if 0 in result:
        raise DicomSegError("label value 0 is the background and names no organ")
    return result


def write_dicom_seg(label_map: np.ndarray, source_datasets: Sequence[Any], organs: Mapping[Any, Any],
                    path: str | Path, *, algorithm_type: str = "AUTOMATIC", algorithm: str = "cobot-med",
                    parameters: Mapping[str, str] | None = None, series_description: str = "cobot-med segmentation",
                    series_number: int = 900, content_creator: str | None = None, keep_empty: bool = True,
                    colours: Mapping[str, Sequence[int]] | None = None) -> Path:
    """Write ``label_map`` (``(len(source_datasets), Rows, Columns)``, integer labels; frame ``i`` lies on
    ``source_datasets[i]``) as a BINARY DICOM-SEG at ``path``, atomically.

    ``organs`` is ``{label value: organ name}`` (or the layouts' ``{name: value}``); every non-zero value in the
    label map must be one of them; each is a segment, also when empty, unless ``keep_empty=False``. ``colours``:
    ``{organ: (r, g, b)}`` (0-255, sRGB), by default the project's palette in the order of ``organs``.
    ``algorithm_type``: ``AUTOMATIC`` or ``SEMIAUTOMATIC`` (identified as
    ``algorithm``, cobot-med's version, ``parameters`` such as the model and method) or ``MANUAL`` (no algorithm).
    Returns ``path``."""
    hd, _ = require_highdicom()
    from pydicom.sr.codedict import codes

    from . import __version__

    names = label_values_to_names(organs)
    label_map = np.asarray(label_map)
    sources = list(source_datasets)
    _check_fits(label_map, sources)
    unknown = sorted(set(np.unique(label_map).tolist()) - set(names) - {0})
    if unknown:
        raise DicomSegError(f"the label map holds values {unknown} that name no organ (organs: {names})")
    present = [value for value in names if keep_empty or np.any(label_map == value)]
    if not present:
        raise DicomSegError("the label map holds no organ: a DICOM-SEG needs at least one segment")
    algorithm_type = algorithm_type.upper()
    identification = None
    if algorithm_type != "MANUAL":
        identification = hd.AlgorithmIdentificationSequence(
            name=algorithm, family=codes.DCM.ArtificialIntelligence, version=__version__,
            parameters=dict(parameters) if parameters else None)
    if colours is None:
        from .inference.outputs import organ_colours

        colours = organ_colours({name: value for value, name in names.items()})
    descriptions, segments = [], np.zeros(label_map.shape, dtype=np.uint16 if len(present) > 255 else np.uint8)
    for number, value in enumerate(present, start=1):
        code = organ_code(names[value])
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=names[value], segmented_property_category=code.category,
            segmented_property_type=code.type, algorithm_type=algorithm_type,
            algorithm_identification=identification)
        if code.modifier is not None:
            description.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(code.modifier)]
        if names[value] in colours:
            description.RecommendedDisplayCIELabValue = list(cielab_value(colours[names[value]]))
        descriptions.append(description)
        segments[label_map == value] = number
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=segments, segmentation_type="BINARY",
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=int(series_number),
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="cobot-med",
            manufacturer_model_name=algorithm, software_versions=__version__, device_serial_number="none",
            content_label=CONTENT_LABEL, content_description=series_description[:64],
            content_creator_name=content_creator)
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise DicomSegError(f"cannot make a DICOM-SEG of this series: {err}") from err
    seg.SeriesDescription = series_description[:64]
    path = Path(path)
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))
    return path


D65_WHITE = (0.95047, 1.0, 1.08883)  # sRGB's white point in CIE XYZ (Y = 1)
SRGB_TO_XYZ = ((0.4124, 0.3576, 0.1805), (0.2126, 0.7152, 0.0722), (0.0193, 0.1192, 0.9505))  # IEC 61966-2-1


def cielab_value(rgb: Sequence[float]) -> tuple[int, int, int]:
    """An sRGB colour (0-255) as DICOM's RecommendedDisplayCIELabValue: CIE 1976 L*a*b* (D65 white), each of L*
    (0-100) and a*, b* (-128-127) scaled to 0-65535 (PS3.3 C.10.7.1.1)."""
    unit = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(unit <= 0.04045, unit / 12.92, ((unit + 0.055) / 1.055) ** 2.4)
    x, y, z = (np.asarray(SRGB_TO_XYZ) @ linear) / np.asarray(D65_WHITE)
    edge = (6 / 29) ** 3

    def f(t: float) -> float:
        return t ** (1 / 3) if t > edge else t / (3 * (6 / 29) ** 2) + 4 / 29

    lightness, a, b = 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))
    return (int(round(lightness * 0xFFFF / 100)), int(round((a + 128) * 0xFFFF / 255)),
            int(round((b + 128) * 0xFFFF / 255)))


def _check_fits(label_map: np.ndarray, sources: list) -> None:
    if not sources:
        raise DicomSegError("no source instances to reference")
    first = sources[0]
    expected = (len(sources), int(first.Rows), int(first.Columns))
    if label_map.shape != expected:
        raise DicomSegError(f"label map of shape {label_map.shape} does not fit the series (instances, rows, "
                            f"columns) = {expected}")
    if not np.issubdtype(label_map.dtype, np.integer) and label_map.dtype != bool:
        raise DicomSegError(f"the label map must hold integer labels, not {label_map.dtype}")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in sources}
    if len(series) != 1:
        raise DicomSegError(f"the source instances come from {len(series)} series; a SEG references one")


def frames_on_instances(volume: np.ndarray, affine: np.ndarray, datasets: list[Any], space: str = "RAS") -> np.ndarray:
    """The ``(len(datasets), Rows, Columns)`` frames of ``volume`` (X, Y, Z; voxel-to-world ``affine`` in
    ``space``, RAS or LPS) that lie on each instance, in ``datasets``' order.

    An instance's pixel grid is affine in the volume's voxels: voxel(r, c) = v0 + c * dc + r * dr. Rounded to
    integers, the error is largest at a corner, so the four corners decide whether every pixel lands on a voxel
    and inside the grid; the frame is then gathered with integer index arithmetic."""
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    to_space = np.array([-1.0, -1.0, 1.0]) if str(space).upper() == "RAS" else np.ones(3)
    shape = np.asarray(volume.shape[:3])
    flat = np.ascontiguousarray(volume).ravel()
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    frames = []
    for ds in datasets:
        rows, columns = int(ds.Rows), int(ds.Columns)
        position = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        spacing = np.asarray(ds.PixelSpacing, dtype=np.float64)  # between rows, between columns
        v0 = inverse[:3, :3] @ (position * to_space) + inverse[:3, 3]
        dc = inverse[:3, :3] @ (orientation[:3] * spacing[1] * to_space)  # one column to the right
        dr = inverse[:3, :3] @ (orientation[3:] * spacing[0] * to_space)  # one row down
        steps = [np.rint(v) for v in (v0, dc, dr)]
        corners = np.array([[0, 0], [0, columns - 1], [rows - 1, 0], [rows - 1, columns - 1]], dtype=np.float64)
        exact = v0 + corners[:, 1:] * dc + corners[:, :1] * dr
        rounded = steps[0] + corners[:, 1:] * steps[1] + corners[:, :1] * steps[2]
        off = float(np.abs(exact - rounded).max())
        if off > ON_VOXEL:
            raise DicomSegError(f"instance {ds.SOPInstanceUID}: its pixels fall {off:.2f} voxels from the "
                                "segmentation's grid; the series does not match the volume it was read as")
        if (rounded < 0).any() or (rounded >= shape).any():
            raise DicomSegError(f"instance {ds.SOPInstanceUID}: its pixels fall outside the segmentation's grid "
                                f"{tuple(int(n) for n in shape)}")
        start, column, row = (int(v.astype(np.int64) @ strides) for v in steps)  # in the flattened volume
        flat_index = start + np.arange(columns)[None, :] * column + np.arange(rows)[:, None] * row
        frames.append(np.take(flat, flat_index))
    return np.stack(frames)


def read_dicom_seg(path: str | Path, source_uids: Sequence[str] | None = None,
                   organs: Mapping[Any, Any] | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """A DICOM-SEG as ``(label_map, {value: organ name})``: frames in the order of ``source_uids`` (SOP Instance
    UIDs; by default the order the SEG lists its source instances, the writer's), rows and columns as stored.

    Values are the segment numbers, unless ``organs`` (``{value: name}`` or ``{name: value}``) is given: then each
    segment takes the value of the organ its SegmentLabel names (a label not among them is an error)."""
    hd, _ = require_highdicom()
    try:
        seg = hd.seg.segread(str(path))
    except (OSError, ValueError, AttributeError, KeyError) as err:
        raise DicomSegError(f"{path}: not a readable DICOM-SEG ({err})") from None
    if source_uids is None:
        source_uids = [str(item.ReferencedSOPInstanceUID)
                       for series in seg.ReferencedSeriesSequence for item in series.ReferencedInstanceSequence]
    numbers = list(seg.get_segment_numbers())
    labels = {n: str(seg.get_segment_description(n).segment_label) for n in numbers}
    values = {n: n for n in numbers}
    if organs is not None:
        by_name = {name: value for value, name in label_values_to_names(organs).items()}
        missing = sorted(set(labels.values()) - set(by_name))
        if missing:
            raise DicomSegError(f"{path}: segments {missing} name no organ of {sorted(by_name)}")
        values = {n: by_name[labels[n]] for n in numbers}
    try:
        masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=list(source_uids),
                                                  segment_numbers=numbers, assert_missing_frames_are_empty=True)
    except (ValueError, KeyError, IndexError) as err:
        raise DicomSegError(f"{path}: its frames cannot be read onto the source instances given ({err})") from None
    label_map = np.zeros(masks.shape[:3], dtype=np.uint16 if max(values.values()) > 255 else np.uint8)
    for index, number in enumerate(numbers):
        overlap = (label_map > 0) & (masks[..., index] > 0)
        if overlap.any():
            raise DicomSegError(f"{path}: segments overlap ({int(overlap.sum())} voxels); a label map cannot hold them")
        label_map[masks[..., index] > 0] = values[number]
    return label_map, {values[n]: labels[n] for n in numbers}
