"""Batch inference (issue #5) on phantoms with RAS, flipped (LPS), S-I-first (SRA) and oblique affines.

A "perfect" network with PromptableSam's call signature returns, for each box, the reference mask
inside that box (found by matching the slice image it is given) as large logits, at the output
size it is asked for. Run through the real predict/stitch/invert/write path it must give back the
label files voxel for voxel, in their exact geometry.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cobot_med.data.chains import volume_chain
from cobot_med.data.layouts import get_layout
from cobot_med.errors import SettingsError
from cobot_med.inference import run_inference
from cobot_med.inference.cases import find_cases
from cobot_med.metrics import organ_scores
from cobot_med.predict import BoxFile, PromptError, model_images
from cobot_med.settings import load_settings

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ADOME = get_layout("adome").organs  # liver 1, kidney 2, spleen 3, pancreas 4
S = 64  # model grid of the fake network


class PerfectSam(torch.nn.Module):
    """``(images, boxes, valid=None, output_size=None) -> logits (N, 1, X, Y)``: the reference mask of the
    prompted organ on the slice the image shows, inside the box, as +/-20 logits."""

    def __init__(self, volumes, organ_ids, image_size=S):
        super().__init__()
        self.image_size, self.organ_ids = image_size, list(organ_ids)
        self.cases = []  # (model images (Z,3,S,S), label (X,Y,Z))
        for image, label in volumes:
            volume = torch.as_tensor(image)[0]
            self.cases.append((model_images(volume, list(range(volume.shape[-1])), image_size),
                               torch.as_tensor(label)[0]))
        self.calls = []  # one (case, [slices]) per call: what reached the "encoder"

    def locate(self, image):
        """(case, slice) whose model image this is (the slices differ by their noise)."""
        matches = []
        for c, (stack, _) in enumerate(self.cases):
            distance = (stack - image).abs().amax(dim=(1, 2, 3))
            matches.append((float(distance.min()), c, int(distance.argmin())))
        best = min(matches)
        assert best[0] < 1e-4, "the network was given an image that is no slice of the volume"
        return best[1], best[2]

    def forward(self, images, boxes, valid=None, output_size=None):
        assert images.shape[1:] == (3, self.image_size, self.image_size) and valid is not None
        logits, located = [], []
        for b in range(images.shape[0]):
            c, z = self.locate(images[b])
            located.append(z)
            label = self.cases[c][1]
            X, Y = label.shape[:2]
            assert tuple(output_size) == (X, Y)
            for k in valid[b].nonzero(as_tuple=True)[0].tolist():
                x0, y0, x1, y1 = (boxes[b, k] / torch.tensor([S / Y, S / X, S / Y, S / X])).round().int().tolist()
                inside = torch.zeros(X, Y, dtype=torch.bool)
                inside[max(y0, 0) : y1, max(x0, 0) : x1] = True
                mask = (label[..., z] == self.organ_ids[k]) & inside
                logits.append(torch.where(mask, 20.0, -20.0)[None])
        self.calls.append((c, located))
        return torch.stack(logits) if logits else images.new_zeros(0, 1, *output_size)


def infer(input_dir, output_dir, network=None, check=True, progress=False, log=lambda _: None, prefetch=None,
          **settings):
    """``run_inference`` as the bundle's ``inference`` run id calls it: settings from the adome bundle, checked."""
    settings = load_settings("adome", input_dir=str(input_dir), output_dir=str(output_dir), device="cpu",
                             amp="false", arch="tiny", **{k: str(v) if hasattr(v, "is_dir") else v
                                                          for k, v in settings.items()})
    if check:
        settings.check("inference")
    return run_inference(settings, network=network, progress=progress, log=log, prefetch=prefetch)


def oriented(image_path, label_path=None):
    """The volume chain's output (the runner's own grid) for the fake network's lookup."""
    chain = volume_chain(list(ADOME.values()), get_layout("adome").ct_window)
    data = chain({"image": str(image_path), **({"label": str(label_path)} if label_path else {})})
    return data["image"], data.get("label")


@pytest.fixture(scope="module")
def phantoms(phantom_factory):
    """Four adome cases (read-only): RAS, flipped LPS, S-I stored first (SRA), oblique (12 deg + 8 deg tilt)."""
    root = phantom_factory("adome", cases=4, seed=5, shape=(40, 36, 12))
    images, labels = root / "Image", root / "Mask"
    codes = [nib.aff2axcodes(nib.load(p).affine) for p in sorted(images.iterdir())]
    assert codes[:3] == [("R", "A", "S"), ("L", "P", "S"), ("S", "R", "A")]
    oblique = nib.load(sorted(images.iterdir())[3]).affine[:3, :3]
    assert np.count_nonzero(np.abs(oblique) > 1e-6) > 3  # really oblique
    return images, labels


def label_of(labels_dir, image_path):
    return labels_dir / image_path.name.replace("_0000.nii.gz", ".nii.gz")


def perfect(images_dir, labels_dir, organs=tuple(ADOME)):
    """The fake network for the cases of ``images_dir``, answering for ``organs`` (the run's selection, in order)."""
    pairs = [oriented(p, label_of(labels_dir, p)) for p in sorted(images_dir.glob("*.nii.gz"))]
    return PerfectSam(pairs, [ADOME[o] for o in organs])


def assert_same_geometry(seg_path, image_path):
    seg, image = nib.load(str(seg_path)), nib.load(str(image_path))
    assert seg.shape == image.shape
    assert np.array_equal(seg.affine, image.affine)  # exact
    assert np.array_equal(seg.get_sform(), image.get_sform())
    np.testing.assert_allclose(seg.get_qform(), image.get_qform(), atol=1e-5)
    assert int(seg.header["qform_code"]) == int(image.header["qform_code"])
    assert int(seg.header["sform_code"]) == int(image.header["sform_code"])
    assert nib.aff2axcodes(seg.affine) == nib.aff2axcodes(image.affine)
    assert seg.get_data_dtype() == np.uint8


def stored(path):
    return np.asarray(nib.load(str(path)).dataobj)


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_perfect_predictor_gives_back_the_labels_in_the_inputs_exact_geometry(phantoms, tmp_path):
    images, labels = phantoms
    before = snapshot(images.parent)
    network = perfect(images, labels)
    out = tmp_path / "out"
    report = infer(images, out, network=network, labels_dir=labels, eval_batch_size=4)
    assert report.exit_code == 0 and len(report.done) == 4
    for image in sorted(images.glob("*.nii.gz")):
        case = image.name[: -len(".nii.gz")]
        seg = out / f"{case}_seg.nii.gz"
        assert_same_geometry(seg, image)
        assert np.array_equal(stored(seg), stored(label_of(labels, image)))  # every organ, voxel for voxel
        prompts = json.loads((out / f"{case}_prompts.json").read_text())
        assert prompts["source"] == "labels" and set(prompts["organs"]) == set(ADOME)
        assert (out / f"{case}_overlay.png").stat().st_size > 1000
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    per_case = [r for r in rows if r["case"] != "mean"]
    assert len(per_case) == 16 and {r["organ"] for r in per_case} == set(ADOME)
    notes = {r["organ"]: r["note"] for r in rows if r["case"] == "mean"}  # what is counted, in words
    assert notes["liver"].startswith("4 cases counted") and notes["all"].startswith(
        "16 (case, organ) pairs counted over 4 cases")
    assert all(float(r["dsc"]) == 1.0 and float(r["nsd"]) == 1.0 and float(r["hd95_mm"]) == 0.0 for r in per_case)
    means = json.loads((out / "metrics.json").read_text())
    assert means["mean"]["all"]["dsc"] == 1.0 and means["mean"]["all"]["cases"] == 16
    assert means["nsd_tolerance_mm"] == 2.0 and "both empty" in means["empty_mask_policy"]
    assert json.loads((out / "labels.json").read_text())["labels"] == ADOME
    assert '"liver"' in (out / "labels.itksnap.txt").read_text()
    assert "3 spleen" in (out / "labels.ctbl").read_text()
    assert not list(out.glob(".tmp-*"))  # nothing left under a temporary name
    assert snapshot(images.parent) == before  # the input folder is never written

    # the encoder saw each prompted slice exactly once, in batches, and no slice without a prompt
    sent = {}
    for c, zs in network.calls:
        assert 1 <= len(zs) <= 4
        for z in zs:
            sent.setdefault(c, []).append(z)
    for c, (_, label) in enumerate(network.cases):
        prompted = sorted(np.nonzero(label.numpy().any(axis=(0, 1)))[0].tolist())
        assert sorted(sent[c]) == prompted


def voxel_box(label, organ_id, axial_axis, fraction=(0.25, 0.75), inplane=0.7):
    """Part of an organ's bounding box in the file's own voxel indices: the middle of its axial range,
    ``inplane`` of its in-plane extent (so the box cuts the organ on every side it narrows)."""
    where = np.argwhere(label == organ_id)
    lo, hi = where.min(0), where.max(0)
    box_lo, box_hi = lo.copy(), hi.copy()
    for axis in range(3):
        length = hi[axis] - lo[axis]
        if axis == axial_axis:
            box_lo[axis] = lo[axis] + int(round(fraction[0] * length))
            box_hi[axis] = lo[axis] + int(round(fraction[1] * length))
        else:
            box_hi[axis] = lo[axis] + int(round(inplane * length))
    return box_lo, box_hi


def axial_axis_of(affine):
    return [i for i, code in enumerate(nib.aff2axcodes(affine)) if code in "SI"][0]


def inside(shape, lo, hi):
    region = np.zeros(shape, bool)
    region[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = True
    return region


def test_3d_boxes_in_voxels_ras_and_lps_prompt_exactly_their_slices(phantoms, tmp_path):
    images, labels = phantoms
    cases, expected = {}, {}
    for n, image in enumerate(sorted(images.glob("*.nii.gz"))):
        case = image.name[: -len(".nii.gz")]
        affine, label = nib.load(str(image)).affine, stored(label_of(labels, image))
        axis = axial_axis_of(affine)
        entries, want = {}, np.zeros(label.shape, np.uint8)
        for organ, space in (("liver", "voxel"), ("spleen", "ras"), ("kidney", "lps")):
            if n == 3 and space != "voxel":
                continue  # a world box is not a voxel box on an oblique grid (tested below for containment)
            lo, hi = voxel_box(label, ADOME[organ], axis)
            box = [*lo.tolist(), *hi.tolist()]
            if space != "voxel":  # the same box as world millimetres of its corner voxels' centres
                corners = nib.affines.apply_affine(affine, np.array([lo, hi]))
                if space == "lps":
                    corners[:, :2] *= -1
                box = [*corners[0].tolist(), *corners[1].tolist()]
            entries[organ] = {"box3d": box, "space": space}
            want[(label == ADOME[organ]) & inside(label.shape, lo, hi)] = ADOME[organ]
        cases[case], expected[case] = entries, want
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"space": "voxel", "cases": cases}))

    out = tmp_path / "out"
    report = infer(images, out, network=perfect(images, labels), boxes_file=boxes)
    assert report.exit_code == 0
    for image in sorted(images.glob("*.nii.gz")):
        case = image.name[: -len(".nii.gz")]
        seg = out / f"{case}_seg.nii.gz"
        assert_same_geometry(seg, image)
        assert np.array_equal(stored(seg), expected[case])  # the right slices and the right part of each
        record = json.loads((out / f"{case}_prompts.json").read_text())["organs"]
        assert record["pancreas"]["source"] == "none" and record["pancreas"]["slices"] == {}
        assert record["liver"]["source"] == "box3d" and record["liver"]["given"]["space"] == "voxel"
        lo, hi = record["liver"]["oriented_box"]["lo"], record["liver"]["oriented_box"]["hi"]
        assert sorted(map(int, record["liver"]["slices"])) == list(range(lo[2], hi[2] + 1))
    assert not (out / "metrics.csv").exists()  # no labels given: nothing to score


def test_world_box_on_an_oblique_grid_covers_its_voxels(phantoms, tmp_path):
    """On an oblique grid a world box is tilted against the voxels: its prompt is the voxels' bounding box."""
    from cobot_med.predict.prompts import oriented_extent, original_affine

    images, _ = phantoms
    image_path = sorted(images.glob("*.nii.gz"))[3]
    affine = nib.load(str(image_path)).affine
    image, _ = oriented(image_path)
    lo, hi = np.array([5, 6, 2]), np.array([20, 25, 6])
    corners = nib.affines.apply_affine(affine, np.array([lo, hi]))
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"space": "ras", "cases": {"x": {"liver": {"box3d": [*corners[0], *corners[1]]}}}}))
    prompt = BoxFile(boxes, ADOME).for_case("x", image, {"liver": 1}).prompts[0]
    v_lo, v_hi = oriented_extent([*lo, *hi], "voxel", original_affine(image), np.asarray(image.affine),
                                 image.shape[1:])
    assert prompt.kind == "box3d"
    assert np.all(np.array(prompt.extent["lo"]) <= v_lo) and np.all(np.array(prompt.extent["hi"]) >= v_hi)
    assert np.any(np.array(prompt.extent["lo"]) < v_lo) or np.any(np.array(prompt.extent["hi"]) > v_hi)


def test_key_slices_propagate_both_ways_until_the_organ_vanishes(phantoms, tmp_path):
    images, labels = phantoms
    cases, expected = {}, {}
    for image in sorted(images.glob("*.nii.gz")):
        case = image.name[: -len(".nii.gz")]
        affine, label = nib.load(str(image)).affine, stored(label_of(labels, image))
        axis = axial_axis_of(affine)
        liver = np.moveaxis(label == ADOME["liver"], axis, -1)
        key = int(liver.sum(axis=(0, 1)).argmax())  # the liver's largest axial slice
        where = np.argwhere(np.take(label == ADOME["liver"], key, axis=axis))
        lo, hi = where.min(0).tolist(), where.max(0).tolist()
        lo.insert(axis, key), hi.insert(axis, key)  # a 2D box on one slice: one voxel thick
        pancreas_slices = np.nonzero(np.moveaxis(label == ADOME["pancreas"], axis, -1).any(axis=(0, 1)))[0]
        empty = next(z for z in range(label.shape[axis]) if z not in pancreas_slices)
        p_lo, p_hi = [0, 0, 0], [n - 1 for n in label.shape]
        p_lo[axis] = p_hi[axis] = empty  # a key slice where the pancreas is not: nothing found
        cases[case] = {"liver": {"key_slice": [*lo, *hi]},
                       "spleen": {"key_slice": [*np.argwhere(label == ADOME["spleen"]).min(0).tolist(),
                                                *np.argwhere(label == ADOME["spleen"]).max(0).tolist()]},
                       "pancreas": {"key_slice": [*p_lo, *p_hi]}}
        expected[case] = label
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"space": "voxel", "cases": cases}))
    out = tmp_path / "out"
    report = infer(images, out, infer_organs="liver,spleen,pancreas",
                           network=perfect(images, labels, ("liver", "spleen", "pancreas")),
                           boxes_file=boxes, labels_dir=labels)
    assert report.exit_code == 0
    for image in sorted(images.glob("*.nii.gz")):
        case = image.name[: -len(".nii.gz")]
        seg, label = stored(out / f"{case}_seg.nii.gz"), expected[case]
        axis = axial_axis_of(nib.load(str(image)).affine)
        # the liver, from one 2D box on its largest slice, comes back whole: every slice, nothing more
        assert np.array_equal(seg == ADOME["liver"], label == ADOME["liver"])
        # the spleen from a 3D box's middle slice: on exactly its own slices
        def spleen_slices(v, axis=axis):
            return np.nonzero(np.moveaxis(v == ADOME["spleen"], axis, -1).any(axis=(0, 1)))[0].tolist()

        assert spleen_slices(seg) == spleen_slices(label)
        assert not (seg == ADOME["pancreas"]).any() and not (seg == ADOME["kidney"]).any()
        record = json.loads((out / f"{case}_prompts.json").read_text())["organs"]
        assert record["liver"]["source"] == "key_slice" and "kidney" not in record
        visited = sorted(map(int, record["liver"]["slices"]))
        oriented_label = np.asarray(oriented(image, label_of(labels, image))[1][0])
        liver_z = np.nonzero((oriented_label == ADOME["liver"]).any(axis=(0, 1)))[0].tolist()
        # each front stops one slice after the organ vanishes (or at the volume's end)
        assert set(liver_z) <= set(visited) and len(visited) <= len(liver_z) + 2
        assert list(record["pancreas"]["slices"]) == [str(record["pancreas"]["key_slice"]["slice"])]
    means = json.loads((out / "metrics.json").read_text())["mean"]
    assert means["liver"]["dsc"] == 1.0 and means["spleen"]["dsc"] > 0.9


def test_bad_cases_are_reported_and_the_others_finish(phantoms, tmp_path):
    images, labels = phantoms
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = sorted(images.glob("*.nii.gz"))[:2]
    for path in good:
        shutil.copy(path, inputs / path.name)
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b not really a gzip'd NIfTI " * 20)
    flat = nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4))
    nib.save(flat, str(inputs / "flat.nii.gz"))
    shutil.copy(good[0], inputs / "unprompted.nii.gz")
    (inputs / "notes.txt").write_text("not a volume")
    (inputs / "empty_folder").mkdir()
    before = snapshot(inputs)
    case_ids = [p.name[: -len(".nii.gz")] for p in good]
    boxes = tmp_path / "boxes.json"
    whole = {"box3d": [0, 0, 0, 999, 999, 999]}
    boxes.write_text(json.dumps({"space": "voxel", "cases": {
        **{c: {"liver": whole} for c in case_ids}, "broken": {"liver": whole}, "flat": {"liver": whole}}}))
    out = tmp_path / "out"
    messages = []
    report = infer(inputs, out, network=perfect(images, labels), boxes_file=boxes, log=messages.append)
    status = {c.case_id: (c.status, c.reason) for c in report.cases}
    assert report.exit_code == 1
    assert [status[c][0] for c in case_ids] == ["done", "done"]
    assert status["broken"][0] == "failed" and "broken.nii.gz" in status["broken"][1]
    assert "unreadable" in status["broken"][1]
    assert status["flat"][0] == "failed" and "expected a 3D volume, got 2D" in status["flat"][1]
    assert status["unprompted"][0] == "failed" and "no prompt" in status["unprompted"][1]
    assert dict(report.ignored) == {"empty_folder": "a folder without DICOM files",
                                    "notes.txt": "not a .nii/.nii.gz file or a DICOM folder"}
    summary = messages[-1]
    assert "2 done" in summary and "3 failed" in summary and "broken: " in summary
    recorded = {c["case_id"]: c["status"] for c in json.loads((out / "summary.json").read_text())["cases"]}
    assert recorded == {**{c: "done" for c in case_ids}, "broken": "failed", "flat": "failed", "unprompted": "failed"}
    for c in ("broken", "flat", "unprompted"):
        assert not (out / f"{c}_seg.nii.gz").exists()
    for c in case_ids:
        assert (out / f"{c}_seg.nii.gz").is_file()
    assert snapshot(inputs) == before

    with pytest.raises(SettingsError, match="inside the input folder"):
        infer(inputs, inputs / "out", network=perfect(images, labels), boxes_file=boxes)
    assert snapshot(inputs) == before


def test_a_rerun_skips_finished_cases_unless_overwrite(phantoms, tmp_path):
    images, labels = phantoms
    network = perfect(images, labels, ("liver", "spleen"))
    out = tmp_path / "out"
    kwargs = dict(infer_organs="spleen,liver", network=network, labels_dir=labels)
    first = infer(images, out, **kwargs)
    assert len(first.done) == 4
    segs = sorted(out.glob("*_seg.nii.gz"))
    stamps = {p: p.stat().st_mtime_ns for p in segs}
    # a killed run: one case lost its segmentation (written last), a temporary file was left behind
    lost = segs[1]
    lost.unlink()
    (out / ".tmp-0badc0de-stale_seg.nii.gz").write_bytes(b"half")
    network.calls.clear()
    second = infer(images, out, **kwargs)
    assert [c.status for c in second.cases].count("skipped") == 3 and len(second.done) == 1
    assert second.done[0].case_id + "_seg.nii.gz" == lost.name
    assert {c for c, _ in network.calls} == {1}  # only that case reached the network
    assert all(p.stat().st_mtime_ns == stamps[p] for p in segs if p != lost)
    assert not list(out.glob(".tmp-*"))
    rows = [r for r in csv.DictReader((out / "metrics.csv").open()) if r["case"] != "mean"]
    assert len(rows) == 8 and [r["organ"] for r in rows[:2]] == ["liver", "spleen"]  # label-map order
    assert all(float(r["dsc"]) == 1.0 for r in rows)  # skipped cases' scores are kept
    third = infer(images, out, overwrite=True, **kwargs)
    assert len(third.done) == 4


def write_dicom_series(volume_zyx, folder, spacing, origin, direction):
    """A CT series with SimpleITK (one file per slice), the geometry tags ITK reads back."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(volume_zyx.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    d = direction
    orientation = "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    for z in range(image.GetDepth()):
        slice_ = image[:, :, z]
        for tag, value in (("0008|0060", "CT"), ("0020|000d", uid + ".1"), ("0020|000e", uid + ".2"),
                           ("0020|0052", uid + ".3"),  # frame of reference: a DICOM-SEG needs it
                           ("0008|0016", "1.2.840.10008.5.1.4.1.1.2"), ("0020|0037", orientation),
                           ("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, z)))),
                           ("0020|0013", str(z + 1)), ("0018|0050", str(spacing[2])),
                           ("0028|1052", "0"), ("0028|1053", "1")):
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(slice_)
    return image


def test_a_dicom_series_is_one_case_in_its_own_geometry(phantoms, tmp_path):
    import SimpleITK as sitk

    images, labels = phantoms
    source = sorted(images.glob("*.nii.gz"))[0]  # RAS phantom: its arrays become the series
    hu = stored(source).astype(np.int16)
    label = stored(label_of(labels, source)).astype(np.uint8)
    inputs, refs = tmp_path / "inputs", tmp_path / "labels"
    direction = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0)  # y and z flipped (a rotation: DICOM is right-handed)
    series = write_dicom_series(np.transpose(hu, (2, 1, 0)), inputs / "patient7", (0.8, 0.75, 2.5),
                                (-12.5, 30.0, 100.0), direction)
    refs.mkdir()
    reference = sitk.GetImageFromArray(np.transpose(label, (2, 1, 0)))
    reference.CopyInformation(series)
    sitk.WriteImage(reference, str(refs / "patient7.nii.gz"))
    shutil.copy(source, inputs / source.name)  # a NIfTI case beside the DICOM folder
    shutil.copy(label_of(labels, source), refs / source.name)

    cases, _ = find_cases(inputs)
    assert [(c.case_id, c.kind) for c in cases] == [("Case_00001_0000", "nifti"), ("patient7", "dicom")]
    network = PerfectSam([oriented(source, label_of(labels, source)),
                          oriented(inputs / "patient7", refs / "patient7.nii.gz")], ADOME.values())
    out = tmp_path / "out"
    report = infer(inputs, out, network=network, labels_dir=refs)
    assert report.exit_code == 0 and len(report.done) == 2
    seg = sitk.ReadImage(str(out / "patient7_seg.nii.gz"))
    read_back = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(inputs / "patient7")))
    np.testing.assert_allclose(read_back.GetDirection(), direction, atol=1e-6)  # the series is what was written
    assert seg.GetSize() == read_back.GetSize()
    np.testing.assert_allclose(seg.GetOrigin(), read_back.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(seg.GetSpacing(), read_back.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(seg.GetDirection(), read_back.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(seg), np.transpose(label, (2, 1, 0)))
    dsc = [r for r in csv.DictReader((out / "metrics.csv").open()) if r["case"] == "patient7"]
    assert len(dsc) == 4 and all(float(r["dsc"]) == 1.0 for r in dsc)


def test_metrics_in_millimetres_and_the_empty_mask_policy():
    ref = torch.zeros(20, 20, 12, dtype=torch.bool)
    ref[5:15, 5:15, 3:8] = True
    shifted = torch.roll(ref, 1, dims=2)  # one slice up: 2.5 mm
    spacing = (0.8, 0.8, 2.5)
    scores = organ_scores(shifted, ref, spacing, tolerance_mm=2.0)
    assert scores["dsc"] == pytest.approx(2 * 400 / 1000)
    assert scores["hd95_mm"] == pytest.approx(2.5)
    assert 0 < scores["nsd"] < 1  # 2.5 mm apart, tolerance 2 mm
    assert organ_scores(shifted, ref, spacing, tolerance_mm=2.6)["nsd"] == pytest.approx(1.0)
    assert organ_scores(shifted, ref, (0.8, 0.8, 1.0))["hd95_mm"] == pytest.approx(1.0)  # spacing is used
    empty = torch.zeros_like(ref)
    both = organ_scores(empty, empty, spacing)
    assert (both["dsc"], both["nsd"], both["hd95_mm"], both["counted"]) == (1.0, 1.0, 0.0, False)
    missed = organ_scores(empty, ref, spacing)
    assert (missed["dsc"], missed["nsd"], missed["hd95_mm"], missed["counted"]) == (0.0, 0.0, None, True)
    extra = organ_scores(ref, empty, spacing)
    assert (extra["dsc"], extra["hd95_mm"], extra["note"]) == (0.0, None, "reference empty")


@pytest.mark.parametrize("content, message", [
    ({"cases": {"a": {"liver": {"box3d": [0, 0, 0, 1, 1, 1]}}}}, "space must be one of"),
    ({"space": "voxel", "cases": {"a": {"heart": {"box3d": [0, 0, 0, 1, 1, 1]}}}},
     "case a, organ heart: unknown organ"),
    ({"space": "voxel", "cases": {"a": {"liver": {"box3d": [0, 0, 1, 1]}}}}, "must be 6 finite numbers"),
    ({"space": "voxel", "cases": {"a": {"liver": {"box3d": [0, 0, 0, 1, 1, 1], "key_slice": [0] * 6}}}},
     "exactly one of"),
    ({"space": "voxel", "cases": {"a": {"liver": {"box3d": [0.5, 0, 0, 1, 1, 1]}}}}, "integer indices"),
    ({"space": "voxel", "cases": ["a"]}, "expected"),
])
def test_a_bad_boxes_file_fails_before_any_case(phantoms, tmp_path, content, message):
    images, _ = phantoms
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(content))
    with pytest.raises(PromptError, match=message) as err:
        infer(images, tmp_path / "out", network=PerfectSam([], []), boxes_file=boxes)
    assert str(boxes) in str(err.value)
    assert not (tmp_path / "out").exists()


class BoxFiller(torch.nn.Module):
    """Fills each prompted box with a per-organ logit (organ k: ``levels[k]``); -20 elsewhere."""

    image_size = S

    def __init__(self, levels):
        super().__init__()
        self.levels = levels

    def forward(self, images, boxes, valid=None, output_size=None):
        X, Y = output_size
        out = []
        for b, k in valid.nonzero(as_tuple=False).tolist():
            x0, y0, x1, y1 = (boxes[b, k] / torch.tensor([S / Y, S / X, S / Y, S / X])).round().int().tolist()
            logits = torch.full((X, Y), -20.0)
            logits[y0:y1, x0:x1] = self.levels[k]
            out.append(logits[None])
        return torch.stack(out)


def test_overlapping_organs_go_to_the_most_probable(phantoms, tmp_path):
    """Two 3D boxes overlap: the organ with the higher probability wins the shared voxels; the rest stays each one's."""
    images, _ = phantoms
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(sorted(images.glob("*.nii.gz"))[0], inputs / "ras.nii.gz")  # RAS storage: voxel box = oriented box
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"space": "voxel", "cases": {"ras": {
        "liver": {"box3d": [2, 2, 1, 20, 20, 6]}, "spleen": {"box3d": [10, 10, 3, 30, 30, 9]}}}}))
    report = infer(inputs, tmp_path / "out", infer_organs="liver,spleen",
                           network=BoxFiller([1.0, 3.0]), boxes_file=boxes)
    assert report.exit_code == 0
    seg = stored(tmp_path / "out" / "ras_seg.nii.gz")
    want = np.zeros_like(seg)
    want[2:21, 2:21, 1:7] = ADOME["liver"]
    want[10:31, 10:31, 3:10] = ADOME["spleen"]  # sigmoid(3) > sigmoid(1): the spleen takes the overlap
    assert np.array_equal(seg, want)


def test_yes_no_settings_from_a_command_line_are_parsed_not_truthy(tmp_path):
    for text in ("false", "False", "0", "no", "off"):
        assert load_settings("adome", overwrite=text, probability_maps=text).overwrite is False
    for text in ("true", "TRUE", "1", "yes"):
        assert load_settings("adome", overwrite=text).overwrite is True
    assert load_settings("adome", amp="False").amp == "fp32" and load_settings("adome", amp="bf16").amp == "bf16"
    with pytest.raises(SettingsError, match="overwrite must be true or false"):
        load_settings("adome", overwrite="maybe")


def test_a_case_that_crashes_midway_leaves_no_segmentation_and_is_redone(phantoms, tmp_path, monkeypatch):
    """Files appear only complete (temporary name, then rename) and the segmentation last: a case that dies
    while writing its other outputs has no ``_seg.nii.gz``, so the next run does it again."""
    import cobot_med.inference.runner as runner
    from cobot_med.files import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []

    images, labels = phantoms
    inputs, refs = tmp_path / "inputs", tmp_path / "refs"
    inputs.mkdir(), refs.mkdir()
    source = sorted(images.glob("*.nii.gz"))[2]  # stored S-I first
    shutil.copy(source, inputs / "sra.nii.gz")
    shutil.copy(label_of(labels, source), refs / "sra.nii.gz")
    network = PerfectSam([oriented(inputs / "sra.nii.gz", refs / "sra.nii.gz")], ADOME.values())
    out = tmp_path / "out"

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(runner, "write_overlay", crash)
    first = infer(inputs, out, network=network, labels_dir=refs)
    assert first.exit_code == 1 and first.failed[0].reason == "OSError: disk full"
    assert not (out / "sra_seg.nii.gz").exists() and not list(out.glob(".tmp-*"))
    monkeypatch.undo()
    second = infer(inputs, out, network=network, labels_dir=refs)
    assert second.exit_code == 0 and [c.case_id for c in second.done] == ["sra"]
    assert np.array_equal(stored(out / "sra_seg.nii.gz"), stored(refs / "sra.nii.gz"))


def test_slices_reach_the_model_as_in_training():
    """The batched resize of inference equals the slice chain's (MONAI Resized, bilinear, anti-aliased)."""
    from cobot_med.data.chains import slice_chain

    volume = torch.rand(100, 90, 5) * 255
    ours = model_images(volume, [1, 3, 4], 64)
    chain = slice_chain([1], 64, jitter=0)
    for i, z in enumerate([1, 3, 4]):
        sample = chain({"image": volume[..., z][None], "label": torch.zeros(1, 100, 90)})
        torch.testing.assert_close(ours[i], sample["image"], atol=1e-3, rtol=0)


@pytest.mark.slow  # ~2.5 s; the fast tier's time budget
@pytest.mark.timeout(60)
def test_the_next_case_is_read_in_the_background_and_changes_nothing(phantoms, tmp_path, monkeypatch):
    import threading

    from cobot_med.inference import runner

    images, labels = phantoms
    readers = []
    load = runner.CaseJob.load

    def recording_load(self, case):
        readers.append((case.case_id, threading.current_thread().name))
        return load(self, case)

    monkeypatch.setattr(runner.CaseJob, "load", recording_load)
    outputs = {}
    for prefetch in (True, False):
        readers.clear()
        outputs[prefetch] = tmp_path / f"prefetch_{prefetch}"
        report = infer(images, outputs[prefetch], network=perfect(images, labels), labels_dir=labels,
                       prefetch=prefetch)
        assert report.exit_code == 0 and len(report.done) == 4
        assert [case for case, _ in readers] == sorted(case for case, _ in readers)  # in order, each once
        background = {case for case, thread in readers if thread.startswith("cobot-med-read")}
        assert background == ({case for case, _ in readers} if prefetch else set())
    for seg in sorted(outputs[True].glob("*_seg.nii.gz")):
        assert np.array_equal(stored(seg), stored(outputs[False] / seg.name))
