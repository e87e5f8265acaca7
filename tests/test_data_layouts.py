"""Dataset layouts, phantoms and datalists on phantoms of all three layouts."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from cobot_med.cli import main
from cobot_med.data.datalist import SPLITS, build_datalist, load_datalist, scan_cases, split_counts
from cobot_med.data.layouts import LAYOUTS, SEGRAP_LABEL_VALUES, SEGRAP_OARS, SEGRAP_ORGANS, get_layout, label_values
from cobot_med.data.phantoms import make_phantoms
from cobot_med.data.validation import DataError

pytestmark = pytest.mark.usefixtures("single_torch_thread")

LAYOUT_NAMES = ("adome", "spleen", "segrap")


def all_label_files(case):
    return case["label"] if isinstance(case["label"], list) else [case["label"]]


def test_the_registry_writes_each_dataset_down_once():
    assert sorted(LAYOUTS) == sorted(LAYOUT_NAMES)
    assert get_layout("adome").organs == {"liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4}
    assert get_layout("spleen").organs == {"spleen": 1}
    for spec in LAYOUTS.values():
        low, high = spec.ct_window
        assert low < high and spec.modality == "CT" and spec.tree and spec.source
        assert set(spec.organ_ids) <= set(spec.allowed_label_values) and 0 in spec.allowed_label_values
    assert get_layout("adome").ct_window == get_layout("spleen").ct_window == (-500.0, 1000.0)  # the authors'
    assert get_layout("segrap").ct_window == (-160.0, 240.0)  # soft-tissue window for head-and-neck
    with pytest.raises(ValueError, match="unknown dataset layout 'brats'"):
        get_layout("brats")


def test_segrap_label_map_is_the_challenge_one():
    assert len(SEGRAP_OARS) == 45
    classes = {c for ids in SEGRAP_OARS.values() for c in ids}
    assert classes == set(range(1, 55)) == set(SEGRAP_LABEL_VALUES) - {0}  # every class belongs to an organ
    # the trained organs are single classes, so a merged volume's values are their ids
    assert all(SEGRAP_OARS[name] == (organ_id,) for name, organ_id in SEGRAP_ORGANS.items())
    assert get_layout("segrap").organs == SEGRAP_ORGANS and len(SEGRAP_ORGANS) == 7
    assert SEGRAP_ORGANS["BrainStem"] == 2 and SEGRAP_ORGANS["SpinalCord"] == 46
    # a chain without a layout accepts the values of the layout whose organs it was given
    assert label_values(None, list(SEGRAP_ORGANS.values())) == list(range(55))
    assert label_values(None, [3, 5]) == [0, 3, 5]
    assert label_values("adome", [1]) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_phantoms_are_realistic(phantom_dirs, layout):
    spec = get_layout(layout)
    cases, problems = scan_cases(layout, phantom_dirs[layout])
    assert len(cases) == 5 and not problems
    codes, oblique = set(), False
    for case in cases:
        image = nib.load(case["image"])
        assert image.header["qform_code"] == 1 and image.header["sform_code"] == 1
        data = np.asarray(image.dataobj)
        assert data.dtype == np.int16 and data.ndim == 3
        assert data.min() <= -900 and data.max() >= 650  # air and bone, in HU
        assert -150 < np.median(data[data > -500]) < 200  # fat, soft tissue and organs
        zooms = sorted(image.header.get_zooms())
        assert zooms[2] > 2 * zooms[1] and 0.6 < zooms[0] < 1.0  # anisotropic: ~0.8 x 0.8 x 2.5 mm
        codes.add(nib.aff2axcodes(image.affine))
        rotation = image.affine[:3, :3] / np.linalg.norm(image.affine[:3, :3], axis=0)
        oblique |= bool(np.abs(rotation).max(axis=0).min() < 0.999)
        values = set()
        for path in all_label_files(case):
            label = nib.load(path)
            assert label.shape == image.shape and np.allclose(label.affine, image.affine)
            values |= set(np.unique(np.asarray(label.dataobj)).tolist())
        if isinstance(case["label"], list):
            assert values == {0, 1} and len(case["label"]) == len(spec.organs)  # binary per-organ files
        else:
            assert set(spec.organ_ids) <= values <= set(spec.allowed_label_values)
    assert {("R", "A", "S"), ("L", "P", "S"), ("S", "R", "A")} <= codes  # identity-like, flipped, permuted
    assert oblique


def test_segrap_phantoms_have_both_label_variants(phantom_dirs):
    root = phantom_dirs["segrap"]
    cases = {c["case_id"]: c for c in scan_cases("segrap", root)[0]}
    assert cases["segrap_0000"]["label"].endswith("segrap_0000/label.nii.gz")  # merged, trained organs only
    assert set(np.unique(nib.load(cases["segrap_0000"]["label"]).dataobj)) == {0, *SEGRAP_ORGANS.values()}
    merged_full = set(np.unique(nib.load(cases["segrap_0002"]["label"]).dataobj))  # merged, other classes too
    assert {1, 10, 11} <= merged_full and set(SEGRAP_ORGANS.values()) <= merged_full
    lower, official = cases["segrap_0001"]["label"], cases["segrap_0003"]["label"]
    assert [p.split("/")[-1] for p in lower][:2] == ["brainstem.nii.gz", "oralcavity.nii.gz"]
    assert [p.split("/")[-1] for p in official] == [f"{name}.nii.gz" for name in SEGRAP_ORGANS]  # label-map order
    assert (root / "segrap_0003" / "labels" / "Eye_L.nii.gz").is_file()  # an untrained organ's file is ignored
    assert all(c["image"].endswith("/image.nii.gz") for c in cases.values())  # not image_contrast.nii.gz
    assert (root / "segrap_0000" / "image_contrast.nii.gz").is_file()


def test_phantoms_are_deterministic_for_a_seed(tmp_path):
    a = make_phantoms("spleen", tmp_path / "a", cases=2, seed=7, shape=(32, 32, 12))
    b = make_phantoms("spleen", tmp_path / "b", cases=2, seed=7, shape=(32, 32, 12))
    c = make_phantoms("spleen", tmp_path / "c", cases=2, seed=8, shape=(32, 32, 12))
    for name in ("imagesTr/spleen_1.nii.gz", "labelsTr/spleen_2.nii.gz"):
        assert np.array_equal(nib.load(a / name).get_fdata(), nib.load(b / name).get_fdata())
        assert np.allclose(nib.load(a / name).affine, nib.load(b / name).affine)
    assert not np.array_equal(nib.load(a / "imagesTr/spleen_1.nii.gz").get_fdata(),
                              nib.load(c / "imagesTr/spleen_1.nii.gz").get_fdata())
    manifest = json.loads((a / "dataset.json").read_text())
    assert manifest["numTraining"] == 2 and manifest["labels"] == {"0": "background", "1": "spleen"}


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_datalist_splits_by_case_and_is_stable_for_a_seed(phantom_dirs, layout, tmp_path):
    root = phantom_dirs[layout]
    first = build_datalist(layout, root, 0.2, 0.2, seed=3)
    assert build_datalist(layout, root, 0.2, 0.2, seed=3) == first
    ids = [c["case_id"] for split in SPLITS for c in first[split]]
    assert len(ids) == len(set(ids)) == 5  # every case in exactly one split
    assert [len(first[s]) for s in SPLITS] == [3, 1, 1]
    assert all(set(c) == {"image", "label", "case_id"} for s in SPLITS for c in first[s])
    tests = {tuple(c["case_id"] for c in build_datalist(layout, root, 0.2, 0.2, seed=s)["test"]) for s in range(8)}
    assert len(tests) > 1  # the seed matters

    out = tmp_path / "lists" / "datalist.json"
    assert main(["datalist", "--layout", layout, "--data", str(root), "--out", str(out), "--seed", "3"]) == 0
    written = json.loads(out.read_text())
    assert written["layout"] == layout and written["seed"] == 3
    assert load_datalist(out) == first  # every later step can take the file instead of the folder


def test_a_hand_written_datalist_resolves_relative_paths_and_msd_test_lists(phantom_dirs, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(phantom_dirs["spleen"], root)
    (root / "list.json").write_text(json.dumps({
        "training": [{"image": "imagesTr/spleen_1.nii.gz", "label": "labelsTr/spleen_1.nii.gz"},
                     {"image": "imagesTr/spleen_2.nii.gz", "label": "labelsTr/spleen_2.nii.gz", "case_id": "imagesTr"}],
        "test": ["imagesTr/spleen_3.nii.gz"],
    }))
    loaded = load_datalist(root / "list.json")
    assert loaded["training"][0] == {"image": str(root / "imagesTr/spleen_1.nii.gz"),
                                     "label": str(root / "labelsTr/spleen_1.nii.gz"), "case_id": "spleen_1"}
    assert loaded["training"][1]["case_id"] == "imagesTr"  # a case id is never taken for a path
    assert loaded["validation"] == [] and loaded["test"] == [{"image": str(root / "imagesTr/spleen_3.nii.gz"),
                                                              "case_id": "spleen_3"}]
    (root / "empty.json").write_text("{}")
    with pytest.raises(DataError, match="empty.json: a datalist needs"):
        load_datalist(root / "empty.json")
    with pytest.raises(DataError, match="absent.json: not a readable datalist"):
        load_datalist(root / "absent.json")


def test_split_counts():
    assert split_counts(5, 0.2, 0.2) == (3, 1, 1)
    assert split_counts(10, 0.2, 0.1) == (7, 2, 1)
    assert split_counts(3, 0.05, 0.05) == (1, 1, 1)  # a non-zero fraction gets at least one case
    assert split_counts(4, 0.0, 0.25) == (3, 0, 1)
    assert split_counts(2, 0.2, 0.2) == (2, 0, 0)  # too few to hold any out
    with pytest.raises(ValueError, match="must each be in"):
        split_counts(10, 0.6, 0.5)


def test_a_case_with_a_missing_file_is_left_out_and_named(phantom_dirs, tmp_path, capsys):
    root = tmp_path / "adome"
    shutil.copytree(phantom_dirs["adome"], root)
    (root / "Mask" / "Case_00002.nii.gz").unlink()
    cases, problems = scan_cases("adome", root)
    assert [c["case_id"] for c in cases] == ["Case_00001", "Case_00003", "Case_00004", "Case_00005"]
    assert problems == [f"Case_00002: left out, {root / 'Mask' / 'Case_00002.nii.gz'} not found"]
    assert main(["datalist", "--layout", "adome", "--data", str(root), "--out", str(tmp_path / "l.json")]) == 0
    assert "skipped Case_00002" in capsys.readouterr().err
    segrap = tmp_path / "segrap"
    shutil.copytree(phantom_dirs["segrap"], segrap)
    (segrap / "segrap_0003" / "labels" / "Parotid_R.nii.gz").unlink()
    problems = scan_cases("segrap", segrap)[1]
    assert len(problems) == 1 and "segrap_0003" in problems[0] and "Parotid_R.nii.gz not found" in problems[0]


def test_missing_dataset_pieces_are_named(tmp_path, capsys):
    with pytest.raises(DataError, match="dataset.json is missing"):
        get_layout("spleen").scan(tmp_path)
    with pytest.raises(DataError, match="no Image/Case_XXXXX_0000.nii.gz"):
        get_layout("adome").scan(tmp_path)
    with pytest.raises(DataError, match="no case folders with image.nii.gz"):
        get_layout("segrap").scan(tmp_path)
    with pytest.raises(DataError, match="dataset folder not found"):
        build_datalist("adome", tmp_path / "absent")
    assert main(["datalist", "--layout", "spleen", "--data", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert "dataset.json is missing" in capsys.readouterr().err


def test_make_phantoms_command(tmp_path, capsys):
    out = tmp_path / "seg"
    argv = ["make-phantoms", "--layout", "segrap", "--out", str(out), "--cases", "2", "--shape", "32", "32", "16"]
    assert main(argv) == 0
    assert "wrote 2 segrap phantom cases" in capsys.readouterr().out
    assert (out / "segrap_0000" / "label.nii.gz").is_file() and (out / "segrap_0001" / "labels").is_dir()
    assert nib.load(out / "segrap_0000" / "image.nii.gz").shape[:2] != (64, 64)
