"""The DICOM-SEG writer (cobot_med.dicom_seg): codes from pydicom's dictionary, a round trip through highdicom.

Runs in both environments (noxfile.py): the core one (pydicom 3, the newest highdicom) and the MONAI Label one
(pydicom 2.4.4, highdicom 0.22.0), whose server writes saved labels with the same function.
"""

from __future__ import annotations

import sys

import highdicom  # the dicom extra, part of the test extra: both nox sessions install it
import numpy as np
import pydicom
import pytest

from cobot_med.data.layouts import LAYOUTS, SEGRAP_OARS
from cobot_med.dicom_seg import (FALLBACK_ORGANS, ORGAN_CODES, DicomSegError, cielab_value, organ_code,
                                 read_dicom_seg, write_dicom_seg)
from cobot_med.inference.outputs import organ_colours
from test_inference import write_dicom_series


SEGRAP = {2: "BrainStem", 35: "OralCavity", 36: "Mandible_L", 40: "Parotid_L", 41: "Parotid_R"}


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A 6-slice CT series (y and z flipped) and its datasets, read in an order that is not the slice order."""
    folder = tmp_path_factory.mktemp("seg") / "series"
    volume = np.random.default_rng(0).normal(40, 10, (6, 12, 14))
    write_dicom_series(volume, folder, (0.8, 0.75, 2.5), (-12.5, 30.0, 100.0), (1, 0, 0, 0, -1, 0, 0, 0, -1))
    files = sorted(folder.iterdir())
    shuffled = [files[i] for i in (3, 0, 5, 1, 4, 2)]
    return folder, [pydicom.dcmread(str(f)) for f in shuffled]


def segrap_labels():
    label = np.zeros((6, 12, 14), np.uint8)
    label[1:4, 2:6, 3:7] = 2
    label[2:5, 7:10, 8:12] = 36
    label[0, 0:2, 0:3] = 41
    return label  # OralCavity (35) and Parotid_L (40) are absent


def test_every_organ_of_every_layout_has_its_snomed_code_from_pydicom():
    from pydicom.sr.codedict import codes

    for layout in LAYOUTS.values():
        for name in layout.organs:
            code = organ_code(name)
            assert code.coded, name
            assert code.type.scheme_designator == "SCT" and code.category.value == "91723000"
    assert organ_code("liver").type.value == "10200004" and organ_code("spleen").type.value == "78961009"
    assert organ_code("kidney").type.value == "64033007" and organ_code("pancreas").type.value == "15776009"
    parotid = organ_code("Parotid_R")
    assert (parotid.type.value, parotid.modifier.value, parotid.modifier.meaning) == ("45289007", "24028007", "Right")
    assert organ_code("Mandible_L").modifier.meaning == "Left" and organ_code("BrainStem").modifier is None
    for keyword, value in ORGAN_CODES.values():  # the table agrees with pydicom's public keyword lookup
        assert getattr(codes.SCT, keyword).value == value, keyword
    fallback = [name for name in SEGRAP_OARS if not organ_code(name).coded]
    assert tuple(fallback) == FALLBACK_ORGANS  # what docs/inference.md lists
    assert organ_code("Cochlea_L").type.value == "91723000" and organ_code("heart").coded is False


@pytest.mark.slow  # about 0.6 s (highdicom's first writes and reads in the process)
@pytest.mark.timeout(10)
def test_display_colours_in_cielab():
    np.testing.assert_allclose(cielab_value((255, 255, 255)), (65535, 32896, 32896), atol=5)  # L* 100, a* = b* = 0
    assert cielab_value((0, 0, 0)) == (0, 32896, 32896)
    red = cielab_value((255, 0, 0))  # CIE L*a*b* of sRGB red (D65): 53.24, 80.09, 67.20
    np.testing.assert_allclose(red, (53.24 * 655.35, (80.09 + 128) * 257, (67.20 + 128) * 257), atol=60)
    reference = getattr(highdicom.color.CIELabColor, "from_rgb", None)  # highdicom >= 0.23 has its own
    if reference is not None:
        for rgb in organ_colours({f"o{k}": k for k in range(8)}).values():
            np.testing.assert_allclose(cielab_value(rgb), reference(*rgb).value, atol=2)


def test_a_seg_round_trip_references_the_series_frame_by_frame(series, tmp_path):
    folder, datasets = series
    label = segrap_labels()
    path = write_dicom_seg(label, datasets, SEGRAP, tmp_path / "case.seg.dcm",
                           parameters={"model": "tiny", "method": "lora+cobot"})
    assert path.is_file() and not list(tmp_path.glob(".tmp-*"))
    seg = highdicom.seg.segread(str(path))
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != datasets[0].SeriesInstanceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == datasets[0].SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence] == \
        [d.SOPInstanceUID for d in datasets]
    segments = [seg.get_segment_description(n) for n in seg.get_segment_numbers()]
    assert [s.segment_label for s in segments] == list(SEGRAP.values())  # every organ, the empty ones too
    assert [s.segmented_property_type.value for s in segments] == \
        ["119238007", "74262004", "91609006", "45289007", "45289007"]
    assert [s.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning for s in segments[2:]] == \
        ["Left", "Left", "Right"]
    assert "SegmentedPropertyTypeModifierCodeSequence" not in segments[1]
    colours = organ_colours({name: value for value, name in SEGRAP.items()})  # the label tables' colours
    assert [list(s.RecommendedDisplayCIELabValue) for s in segments] == \
        [list(cielab_value(colours[name])) for name in SEGRAP.values()]
    identification = segments[0].SegmentationAlgorithmIdentificationSequence[0]
    assert identification.AlgorithmName == "cobot-med" and "method=lora+cobot" in identification.AlgorithmParameters
    # every frame on the source instance whose mask it holds, at that instance's position
    by_uid = {d.SOPInstanceUID: (i, d) for i, d in enumerate(datasets)}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        _, source = by_uid[uid]
        np.testing.assert_allclose(frame.PlanePositionSequence[0].ImagePositionPatient,
                                   source.ImagePositionPatient, atol=1e-4)
    read, organs = read_dicom_seg(path, organs=SEGRAP)
    assert np.array_equal(read, label) and organs == SEGRAP
    numbered, names = read_dicom_seg(path)
    assert names == dict(enumerate(SEGRAP.values(), start=1))
    assert np.array_equal(numbered, np.select([label == 2, label == 36, label == 41], [1, 3, 5], 0))
    present = write_dicom_seg(label, datasets, SEGRAP, tmp_path / "present.seg.dcm", keep_empty=False)
    assert read_dicom_seg(present)[1] == {1: "BrainStem", 2: "Mandible_L", 3: "Parotid_R"}
    in_file_order = sorted(datasets, key=lambda d: int(d.InstanceNumber))
    reordered, _ = read_dicom_seg(path, source_uids=[d.SOPInstanceUID for d in in_file_order], organs=SEGRAP)
    order = [datasets.index(d) for d in in_file_order]
    assert np.array_equal(reordered, label[order])


@pytest.mark.slow  # about 0.5 s when it is the process's first SEG
@pytest.mark.timeout(10)
def test_a_manual_label_has_no_algorithm_and_the_layout_mapping_works(series, tmp_path):
    _, datasets = series
    label = np.zeros((6, 12, 14), np.uint8)
    label[2:4, 3:9, 3:9] = 1
    path = write_dicom_seg(label, datasets, LAYOUTS["spleen"].organs, tmp_path / "manual.seg.dcm",
                           algorithm_type="MANUAL")
    seg = pydicom.dcmread(str(path))
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"
    assert "SegmentationAlgorithmIdentificationSequence" not in seg.SegmentSequence[0]
    assert seg.SegmentSequence[0].SegmentLabel == "spleen"
    assert np.array_equal(read_dicom_seg(path, organs={"spleen": 1})[0], label)
    empty = write_dicom_seg(np.zeros_like(label), datasets, {1: "spleen"}, tmp_path / "empty.seg.dcm")
    nothing, names = read_dicom_seg(empty)  # an organ looked for and not found: an empty segment
    assert nothing.shape == label.shape and not nothing.any() and names == {1: "spleen"}


def test_a_label_map_that_does_not_fit_is_one_named_error(series, tmp_path, monkeypatch):
    _, datasets = series
    label = segrap_labels()
    with pytest.raises(DicomSegError, match=r"values \[7\] that name no organ"):
        write_dicom_seg(np.where(label == 2, 7, label), datasets, SEGRAP, tmp_path / "a.dcm")
    with pytest.raises(DicomSegError, match=r"shape \(5, 12, 14\) does not fit the series"):
        write_dicom_seg(label[:5], datasets, SEGRAP, tmp_path / "a.dcm")
    with pytest.raises(DicomSegError, match="not a readable DICOM-SEG"):
        read_dicom_seg(datasets[0].filename)  # a CT slice
    with pytest.raises(DicomSegError, match="holds no organ"):
        write_dicom_seg(np.zeros_like(label), datasets, SEGRAP, tmp_path / "a.dcm", keep_empty=False)
    assert not list(tmp_path.iterdir())
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(DicomSegError, match=r"pip install 'cobot-med\[dicom\]'"):
        write_dicom_seg(label, datasets, SEGRAP, tmp_path / "a.dcm")
