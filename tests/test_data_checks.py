"""Input checks: every bad input raises DataError naming the file; a bad case is skipped, the others go on."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

from cobot_med.data.dataset import VolumeDataset
from cobot_med.data.layouts import SEGRAP_ORGANS, get_layout
from cobot_med.data.chains import volume_chain as volume_transforms
from cobot_med.data.volume import GuardedVolume
from cobot_med.data.validation import DataError

pytestmark = pytest.mark.usefixtures("single_torch_thread")

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def save(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def good_arrays(shape=(32, 32, 8)):
    image = np.full(shape, 40, np.int16)
    label = np.zeros(shape, np.uint8)
    label[8:20, 8:20, 2:6] = 1
    label[22:28, 22:28, 3:5] = 2
    return image, label


def case(folder, name, image=None, label=None, label_affine=None):
    good_image, good_label = good_arrays()
    image = good_image if image is None else image
    label = good_label if label is None else label
    return {"image": save(folder / f"{name}_img.nii.gz", image),
            "label": save(folder / f"{name}_lab.nii.gz", label, AFFINE if label_affine is None else label_affine),
            "case_id": name}


def bad_cases(folder):
    """{name: (case, phrase in the error, the file the error must name)}."""
    image, label = good_arrays()
    nan, inf = image.astype(np.float32), image.astype(np.float32)
    nan[0, 0, 0], inf[1, 1, 1] = np.nan, np.inf
    out = {
        "shape": (case(folder, "shape", label=label[:, :, :6]), "does not match image shape (32, 32, 8)", "label"),
        "affine": (case(folder, "affine", label_affine=np.diag([0.8, 0.8, 5.0, 1.0])), "label affine differs", "label"),
        "empty": (case(folder, "empty", label=np.zeros_like(label)), "none of the expected organs [1, 2]", "label"),
        "flat": (case(folder, "flat", image=image[:, :, 0], label=label[:, :, 0]), "expected a 3D volume, got 2D",
                 "image"),
        "fourd": (case(folder, "fourd", image=np.stack([image, image], -1)), "expected a 3D volume, got 4D", "image"),
        "nan": (case(folder, "nan", image=nan), "NaN or infinite intensities", "image"),
        "inf": (case(folder, "inf", image=inf), "NaN or infinite intensities", "image"),
        "unknown": (case(folder, "unknown", label=label * 7), "label ids [7, 14] are not in the label map", "label"),
        "fraction": (case(folder, "fraction", label=label.astype(np.float32) * 1.5), "non-integer values", "label"),
    }
    truncated = case(folder, "truncated")
    raw = open(truncated["image"], "rb").read()
    open(truncated["image"], "wb").write(raw[: len(raw) // 2])
    out["truncated"] = (truncated, "unreadable, truncated or corrupt", "image")
    garbage = case(folder, "garbage")
    open(garbage["label"], "wb").write(gzip.compress(b"definitely not a NIfTI header" * 20))
    out["garbage"] = (garbage, "unreadable, truncated or corrupt", "label")
    missing = dict(case(folder, "missing"), label=str(folder / "missing_nowhere.nii.gz"))
    out["missing"] = (missing, "file not found", "label")
    return out


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return bad_cases(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", ["shape", "affine", "empty", "flat", "fourd", "nan", "inf", "unknown", "fraction",
                                  "truncated", "garbage", "missing"])
def test_each_bad_input_raises_a_data_error_that_names_the_file(bad, name):
    item, phrase, culprit = bad[name]
    chain = volume_transforms([1, 2])
    with pytest.raises(DataError) as err:
        chain(dict(item))
    message = str(err.value)
    assert message.startswith(item[culprit] + ":"), message  # names the file first
    assert phrase in message, message
    assert GuardedVolume(chain)(item) == {"case_id": name, "image_path": item["image"], "error": message}


def test_a_volume_with_a_trailing_singleton_axis_is_3d(tmp_path):
    image, label = good_arrays()
    item = {"image": save(tmp_path / "img.nii.gz", image[..., None]), "label": save(tmp_path / "lab.nii.gz", label)}
    out = volume_transforms([1, 2])(item)
    assert out["image"].shape == out["label"].shape == (1, 32, 32, 8)


def test_per_organ_label_files_are_checked_and_named(tmp_path):
    image, label = good_arrays()
    img = save(tmp_path / "img.nii.gz", image)
    organs = [save(tmp_path / "organ1.nii.gz", (label == 1).astype(np.uint8)),
              save(tmp_path / "organ2.nii.gz", (label == 2).astype(np.uint8))]
    chain = volume_transforms([1, 2])
    merged = chain({"image": img, "label": organs})["label"]
    assert torch.equal(merged.as_tensor()[0], torch.as_tensor(label))  # the files make one label map
    broken = str(tmp_path / "organ2_broken.nii.gz")
    open(broken, "wb").write(open(organs[1], "rb").read()[:60])
    with pytest.raises(DataError, match=f"^{broken}: unreadable, truncated or corrupt"):
        chain({"image": img, "label": [organs[0], broken]})
    single = volume_transforms([2])({"image": img, "label": [organs[1]]})["label"]  # a list of one file
    assert set(torch.unique(single).tolist()) == {0, 2}
    with pytest.raises(DataError, match="1 per-organ label files for 2 organs"):
        chain({"image": img, "label": organs[:1]})
    other_grid = save(tmp_path / "organ2_other.nii.gz", (label == 2).astype(np.uint8)[:, :, :5])
    with pytest.raises(DataError, match="organ2_other.nii.gz: the files do not stack"):
        chain({"image": img, "label": [organs[0], other_grid]})


def test_segrap_other_classes_are_background_but_unknown_values_are_errors(tmp_path):
    spec = get_layout("segrap")
    image, label = good_arrays()
    label = np.where(label == 1, SEGRAP_ORGANS["BrainStem"], np.where(label == 2, 1, 0)).astype(np.uint8)  # 1: Brain
    chain = volume_transforms(spec.organ_ids, spec.ct_window, layout="segrap")
    out = chain({"image": save(tmp_path / "i.nii.gz", image), "label": save(tmp_path / "l.nii.gz", label)})
    assert set(torch.unique(out["label"]).tolist()) == {0, SEGRAP_ORGANS["BrainStem"]}
    label[0, 0, 0] = 99
    path = save(tmp_path / "l99.nii.gz", label)
    with pytest.raises(DataError, match=f"^{path}: label ids \\[99\\] are not in the label map \\(allowed: 0-54\\)"):
        chain({"image": save(tmp_path / "i.nii.gz", image), "label": path})


def test_a_bad_case_is_reported_and_skipped_and_the_others_go_on(bad, tmp_path):
    items = [item for item, _, _ in bad.values()]
    items.insert(4, case(tmp_path, "good"))
    items.append(case(tmp_path, "good_too"))
    volumes = VolumeDataset(items, volume_transforms([1, 2]))
    assert [v["case_id"] for v in volumes] == ["good", "good_too"]
    assert sorted(f["case_id"] for f in volumes.failures) == sorted(bad)
    for failure in volumes.failures:
        item, phrase, culprit = bad[failure["case_id"]]
        assert failure["error"].startswith(item[culprit]) and phrase in failure["error"]


def test_inference_needs_no_label(tmp_path):
    image, _ = good_arrays()
    out = volume_transforms([1, 2])({"image": save(tmp_path / "i.nii.gz", image)})
    assert "label" not in out and out["image"].shape == (1, 32, 32, 8)
    assert set(out) == {"image"}  # the paths kept for error messages are dropped at the end of the chain
