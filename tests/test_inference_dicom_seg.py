"""``cobot-med infer --dicom_seg``: a DICOM-SEG beside each DICOM series' NIfTI, read back by highdicom and by dcmqi.

Two CT series made from a phantom (test_inference's writer), each with its files renamed so that their order on
disk is not the slice order: one flipped (y and z), one oblique (rotated 20 degrees about z, then 10 about x). The
perfect stand-in network makes the NIfTI equal to the reference label; the SEG is then checked against the NIfTI,
voxel for voxel, through references that do not use the project's own mapping: each instance's slice of the NIfTI
found by ITK from the instance's ImagePositionPatient (highdicom's reading), and dcmqi's own reconstruction of
each segment resampled onto the NIfTI's grid (dcmqi).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cobot_med.dicom_seg import DicomSegError
from test_inference import ADOME, PerfectSam, infer, label_of, oriented, stored, write_dicom_series

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FLIPPED = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0)


def rotation(z_degrees, x_degrees):
    """A proper rotation (DICOM's slice normal is row x column), as ITK's row-major direction."""
    a, b = np.radians(z_degrees), np.radians(x_degrees)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel().tolist())


def series_case(phantom, label_path, inputs, refs, name, direction):
    """A DICOM series of ``phantom`` in ``inputs/name`` (files renamed out of slice order) and its reference label
    in ``refs/name.nii.gz``, in the series' grid."""
    import SimpleITK as sitk

    hu = stored(phantom).astype(np.int16)
    series = write_dicom_series(np.transpose(hu, (2, 1, 0)), inputs / name, (0.8, 0.75, 2.5), (-12.5, 30.0, 100.0),
                                direction)
    files = sorted((inputs / name).iterdir())
    order = np.random.default_rng(3).permutation(len(files))
    for path, new in zip(files, order):
        path.rename(path.with_name(f"tmp{new:03d}"))
    for path in (inputs / name).iterdir():
        path.rename(path.with_name(f"IM{path.name[3:]}.dcm"))
    refs.mkdir(exist_ok=True)
    reference = sitk.GetImageFromArray(np.transpose(stored(label_path).astype(np.uint8), (2, 1, 0)))
    reference.CopyInformation(series)
    sitk.WriteImage(reference, str(refs / f"{name}.nii.gz"))
    return order


@pytest.fixture(scope="module")
def dicom_run(phantom_factory, tmp_path_factory):
    """One run over a NIfTI case, the flipped series and the oblique series: first without --dicom_seg, then with."""
    phantoms = phantom_factory("adome", cases=4, seed=5, shape=(40, 36, 12))  # test_inference's (RAS first)
    images, labels = phantoms / "Image", phantoms / "Mask"
    source = sorted(images.glob("*.nii.gz"))[0]
    root = tmp_path_factory.mktemp("dicom_seg")
    inputs, refs, out = root / "inputs", root / "labels", root / "out"
    orders = {name: series_case(source, label_of(labels, source), inputs, refs, name, direction)
              for name, direction in (("flipped", FLIPPED), ("oblique", rotation(20, 10)))}
    assert list(orders["flipped"]) != sorted(orders["flipped"])  # files on disk are not in slice order
    shutil.copy(source, inputs / source.name)
    shutil.copy(label_of(labels, source), refs / source.name)
    network = PerfectSam([oriented(source, label_of(labels, source))]
                         + [oriented(inputs / n, refs / f"{n}.nii.gz") for n in ("flipped", "oblique")], ADOME.values())
    first = infer(inputs, out, network=network, labels_dir=refs)
    assert first.exit_code == 0 and not list(out.glob("*.dcm"))
    messages = []
    second = infer(inputs, out, network=network, labels_dir=refs, dicom_seg=True, log=messages.append)
    return inputs, out, first, second, messages, network


def instance_slices(nifti_path, series_folder):
    """{SOP Instance UID: the NIfTI's (rows, columns) slice on that instance}, found by ITK from the instance's
    ImagePositionPatient in the series as ITK reads it (whose grid the NIfTI must have)."""
    import pydicom
    import SimpleITK as sitk

    seg = sitk.ReadImage(str(nifti_path))
    series = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_folder)))
    np.testing.assert_allclose(seg.GetOrigin(), series.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(seg.GetDirection(), series.GetDirection(), atol=1e-6)
    array = sitk.GetArrayFromImage(seg)  # (slices, rows, columns)
    slices = {}
    for path in sorted(series_folder.iterdir()):  # disk order
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        index = seg.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient])
        assert index[:2] == (0, 0)
        slices[ds.SOPInstanceUID] = array[index[2]]
    return slices


# the tests on dicom_run: its runs take 5-14 s (the first test to ask for it pays them), the checks under 1 s, the
# tiny SAM run 5-7 s
@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["flipped", "oblique"])
def test_the_seg_equals_the_nifti_on_every_source_instance_read_by_highdicom(dicom_run, name):
    import highdicom

    inputs, out, *_ = dicom_run
    slices = instance_slices(out / f"{name}_seg.nii.gz", inputs / name)
    assert any(s.any() for s in slices.values())
    seg = highdicom.seg.segread(str(out / f"{name}_seg.dcm"))
    numbers = list(seg.get_segment_numbers())
    descriptions = [seg.get_segment_description(n) for n in numbers]
    assert [d.segment_label for d in descriptions] == list(ADOME)  # liver, kidney, spleen, pancreas
    assert [d.segmented_property_type.value for d in descriptions] == ["10200004", "64033007", "78961009", "15776009"]
    assert {d.segmented_property_category.value for d in descriptions} == {"91723000"}
    identification = descriptions[0].SegmentationAlgorithmIdentificationSequence[0]
    assert identification.AlgorithmName == "cobot-med" and "peft=PerfectSam" in identification.AlgorithmParameters
    import pydicom

    first = pydicom.dcmread(str(next((inputs / name).iterdir())), stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    uids = list(slices)
    masks = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers)  # (instances, rows, columns, organs)
    for k, (uid, expected) in enumerate(slices.items()):
        for s, label_id in enumerate(ADOME.values()):
            assert np.array_equal(masks[k, ..., s] > 0, expected == label_id), (uid, label_id)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_command_with_a_tiny_sam_writes_what_its_nifti_holds(dicom_run, tmp_path, capsys):
    """``cobot-med infer --dicom-seg`` end to end with a real (tiny, zero-shot) SAM: its SEG is its NIfTI."""
    import pydicom

    from cobot_med.cli import main
    from cobot_med.dicom_seg import read_dicom_seg

    inputs, *_ = dicom_run
    out = tmp_path / "out"
    code = main(["infer", "--config", "bundles/adome.json", "--input", str(inputs), "--output", str(out),
                 "--labels", str(inputs.parent / "labels"), "--arch", "tiny", "--device", "cpu", "--no-amp",
                 "--organs", "liver,kidney", "--dicom-seg"])
    printed = capsys.readouterr().out
    assert code == 0 and "3 done, 0 skipped (already done), 0 failed" in printed
    assert "Case_00001_0000: no DICOM-SEG: a NIfTI input has no DICOM series to reference" in printed
    for name in ("flipped", "oblique"):
        slices = instance_slices(out / f"{name}_seg.nii.gz", inputs / name)
        assert sum(int((s > 0).sum()) for s in slices.values()) > 100  # the tiny SAM does segment something
        label_map, organs = read_dicom_seg(out / f"{name}_seg.dcm", source_uids=list(slices), organs=ADOME)
        assert organs == {1: "liver", 2: "kidney"}
        assert np.array_equal(label_map, np.stack(list(slices.values())))
        parameters = pydicom.dcmread(str(out / f"{name}_seg.dcm")).SegmentSequence[0] \
            .SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
        assert parameters.startswith("arch=tiny,peft=frozen,image_size=")


@pytest.mark.slow  # the module's inference run it reads (dicom_run) takes a few seconds
@pytest.mark.timeout(120)
def test_dcmqi_reads_each_segment_back_onto_the_nifti_voxel_for_voxel(dicom_run, tmp_path):
    """dcmqi's segimage2itkimage writes one image per segment (its own reconstruction of the volume from the
    frames' positions); each, resampled onto the NIfTI's grid, is that organ's mask of the NIfTI."""
    import SimpleITK as sitk

    _, out, *_ = dicom_run
    tool = Path(sys.executable).parent / "segimage2itkimage"
    tool = str(tool) if tool.exists() else shutil.which("segimage2itkimage")
    assert tool, "dcmqi's segimage2itkimage is not installed (pip install dcmqi; the test extra has it)"
    for name in ("flipped", "oblique"):
        folder = tmp_path / name
        folder.mkdir()
        run = subprocess.run([tool, "--inputDICOM", str(out / f"{name}_seg.dcm"), "--outputDirectory", str(folder),
                              "--outputType", "nrrd"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        meta = json.loads((folder / "meta.json").read_text())
        segments = {int(s["labelID"]): s for group in meta["segmentAttributes"] for s in group}
        nifti = sitk.ReadImage(str(out / f"{name}_seg.nii.gz"))
        labels = sitk.GetArrayFromImage(nifti)
        assert len(segments) == len(ADOME)
        colours = json.loads((out / "labels.json").read_text())["colours"]
        for number, (organ, label_id) in enumerate(ADOME.items(), start=1):
            assert segments[number]["SegmentLabel"] == organ
            np.testing.assert_allclose(segments[number]["recommendedDisplayRGBValue"], colours[organ], atol=2)
            assert segments[number]["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == \
                {"liver": "10200004", "kidney": "64033007", "spleen": "78961009", "pancreas": "15776009"}[organ]
            image = sitk.ReadImage(str(folder / f"{number}.nrrd"))
            np.testing.assert_allclose(image.GetDirection(), nifti.GetDirection(), atol=1e-4)
            start = image.TransformPhysicalPointToContinuousIndex(nifti.GetOrigin())
            np.testing.assert_allclose(start, np.round(start), atol=1e-3)  # the same lattice of voxel centres
            on_grid = sitk.Resample(image, nifti, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            assert np.array_equal(sitk.GetArrayFromImage(on_grid) > 0, labels == label_id), (name, organ)
            assert (labels == label_id).any()


def test_frames_follow_the_instances_and_a_grid_that_does_not_fit_is_refused(tmp_path):
    """frames_on_instances against ITK's own reading of an oblique series: instance k's frame is ITK's slice at
    that instance's position; half a voxel off, or a grid too small, is a DicomSegError naming the instance."""
    import pydicom
    import SimpleITK as sitk

    from cobot_med.dicom_seg import frames_on_instances

    volume_zyx = np.random.default_rng(1).integers(0, 5, (5, 9, 11))
    write_dicom_series(volume_zyx, tmp_path / "s", (0.8, 0.75, 2.5), (-12.5, 30.0, 100.0), rotation(20, 10))
    image = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    array = sitk.GetArrayFromImage(image)  # (slices, rows, columns), ITK's order
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    volume = np.transpose(array, (2, 1, 0))  # (X, Y, Z) as MONAI holds it
    datasets = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in sorted((tmp_path / "s").iterdir())][::-1]
    frames = frames_on_instances(volume, ras, datasets)
    for ds, frame in zip(datasets, frames):
        k = image.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient])[2]
        assert np.array_equal(frame, array[k])
    assert np.array_equal(frames_on_instances(volume, lps, datasets, space="LPS"), frames)
    shifted = ras.copy()
    shifted[:3, 3] += 0.5 * ras[:3, 0]
    with pytest.raises(DicomSegError, match=r"instance .*: its pixels fall 0\.50 voxels from the segmentation's grid"):
        frames_on_instances(volume, shifted, datasets)
    with pytest.raises(DicomSegError, match=r"its pixels fall outside the segmentation's grid \(11, 9, 4\)"):
        frames_on_instances(volume[..., :4], ras, datasets)


def test_dicom_seg_without_the_extra_is_one_named_line(tmp_path, monkeypatch):
    """Refused when the settings are checked, before any work (the output folder is not made)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "labels").mkdir()
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(DicomSegError, match=r"^writing DICOM-SEG needs pydicom and highdicom .*pip install "
                                            r"'cobot-med\[dicom\]'$"):
        infer(tmp_path / "in", tmp_path / "out", labels_dir=tmp_path / "labels", dicom_seg=True)
    assert not (tmp_path / "out").exists()


def test_the_flag_reaches_the_bundle_setting():
    from cobot_med.cli import build_parser
    from cobot_med.commands.infer import bundle_overrides

    args = build_parser().parse_args(["infer", "--config", "adome", "--input", "a", "--output", "b", "--labels", "c",
                                      "--dicom-seg"])
    assert bundle_overrides(args)["dicom_seg"] is True
    args = build_parser().parse_args(["infer", "--config", "adome", "--input", "a", "--output", "b", "--labels", "c"])
    assert bundle_overrides(args)["dicom_seg"] is False


# last: its later runs change the output folder the tests above read
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_rerun_with_dicom_seg_writes_a_seg_beside_each_series_nifti(dicom_run):
    inputs, out, _, second, messages, network = dicom_run
    assert second.exit_code == 0
    assert sorted(c.case_id for c in second.done) == ["flipped", "oblique"]  # the record asks for the SEG now
    assert [c.case_id for c in second.skipped] == ["Case_00001_0000"]
    assert "flipped: redone, other outputs were asked for (+dicom_seg)" in messages
    assert sorted(p.name for p in out.glob("*.dcm")) == ["flipped_seg.dcm", "oblique_seg.dcm"]
    nifti = next(c for c in second.cases if c.case_id == "Case_00001_0000")
    assert nifti.note.startswith("no DICOM-SEG: a NIfTI input has no DICOM series")
    assert "notes:\n  Case_00001_0000: no DICOM-SEG: a NIfTI input has no DICOM series to reference" in messages[-1]
    record = json.loads((out / "flipped_prompts.json").read_text())["record"]
    assert "dicom_seg" in record["outputs"]
    assert json.loads((out / "summary.json").read_text())["settings"]["dicom_seg"] is True
    stamp = (out / "flipped_seg.dcm").stat().st_mtime_ns
    refs = inputs.parent / "labels"
    third = infer(inputs, out, network=network, labels_dir=refs)
    assert len(third.skipped) == 3 and (out / "flipped_seg.dcm").stat().st_mtime_ns == stamp  # still its own
    (out / "oblique_seg.dcm").unlink()
    messages.clear()
    fourth = infer(inputs, out, network=network, labels_dir=refs, dicom_seg=True, log=messages.append)
    assert [c.case_id for c in fourth.done] == ["oblique"] and (out / "oblique_seg.dcm").is_file()
    assert "oblique: redone, oblique_seg.dcm missing" in messages
    fifth = infer(inputs, out, network=network, labels_dir=refs, overwrite=True, infer_organs="liver")
    assert len(fifth.done) == 3 and not list(out.glob("*.dcm"))  # redone without it: the old SEGs would not match
