"""The MONAI Label app's parts without a server: settings, the prompts of a request, label checks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch


from monai.data import MetaTensor

from cobot_med.adapter import save_adapter
from cobot_med.model import ModelSpec, build_model
from cobot_med.monailabel import clicks, settings
from cobot_med.monailabel.datastore import checked_label
from cobot_med.monailabel.errors import RequestError

ORGANS = {"liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4}


def test_settings_defaults_and_output_places(tmp_path):
    app = settings.from_conf({"models": "tiny"}, str(tmp_path))
    assert [m.name for m in app.models] == ["tiny"] and app.models[0].adapter is None
    assert app.dataset == "adome" and app.organs == ORGANS
    assert app.peft == "lora+cobot" and app.propagation == "box3d"
    assert app.output_dir == (tmp_path / "cobot_med").resolve()
    assert app.tracking_uri in (os.environ.get("MLFLOW_TRACKING_URI"), f"sqlite:///{app.output_dir / 'mlflow.db'}")
    run = app.models[0].run  # the bundle's settings object the app serves and trains with
    assert (run.dataset, run.arch, run.adapter, run.eval_batch_size, run.amp, run.tracking_uri) == (
        "adome", "tiny", "", "auto", "auto", app.tracking_uri)
    assert run.slice_batch("cpu") == 8  # auto: 1 only for LiteMedSAM on a CPU
    lite = settings.from_conf({"models": "lite_medsam"}, str(tmp_path)).models[0].run
    assert lite.slice_batch("cpu") == 1 and lite.slice_batch("cuda") == 8


@pytest.mark.parametrize("conf, message", [
    ({"models": "tiny", "epoch": "3"}, "--conf epoch: unknown key"),
    ({"models": "tiny", "dataset": "brats"}, "--conf dataset"),
    ({"models": "vit_b"}, "sam_checkpoint"),
    ({"models": "tiny", "peft": "lora+cobut"}, "--conf peft: unknown peft"),
    ({"models": "tiny", "propagation": "both"}, "--conf propagation"),
    ({"models": "tiny", "epochs": "0"}, "--conf epochs"),
    ({"models": "tiny", "amp": "maybe"}, "--conf amp"),
    ({"models": "tiny", "adapter": "/nowhere"}, "--conf adapter"),
    ({"models": "tiny", "propagator": "memory"}, r"--conf propagator: unknown propagator 'memory'"),
    ({"models": "tiny", "propagator": "sam2_memory"}, "--conf propagator: .*needs a SAM 2 base .*arch tiny"),
    ({"models": "tiny", "propagator": "sam2_memory", "backend": "openvino"}, "--conf propagator: .*in torch"),
])
def test_settings_refuse_what_cannot_work_naming_the_key(tmp_path, conf, message):
    with pytest.raises(settings.ConfError, match=message):
        settings.from_conf(conf, str(tmp_path))


def test_an_adapter_must_belong_to_a_served_base(tmp_path):
    torch.manual_seed(0)
    adapter = save_adapter(build_model(ModelSpec(arch="tiny", image_size=64, peft="lora")), tmp_path / "adapter")
    served = settings.from_conf({"models": "tiny", "adapter": str(adapter)}, str(tmp_path))
    assert served.models[0].adapter == str(adapter.resolve())
    with pytest.raises(settings.ConfError, match="trained on tiny, which is not among the served models"):
        settings.from_conf({"models": "vit_b", "sam_checkpoint": str(adapter), "adapter": str(adapter)}, str(tmp_path))


def test_slicer_roi_pairs_become_two_corners_in_either_order():
    prompted = clicks.parse({"label": "spleen", "roi": [9, 3, 4, 12, 7, 7], "foreground": [[5, 6, 7]]}, ORGANS,
                            ["box3d", "key_slice"])
    assert prompted.organ == "spleen" and prompted.organ_id == 3 and prompted.propagation == "box3d"
    assert prompted.interaction.roi == [9, 4, 7, 3, 12, 7]  # (i0, j0, k0), (i1, j1, k1): any order of corners
    assert prompted.interaction.foreground == [[5, 6, 7]] and prompted.interaction.background == []
    unnamed = clicks.parse({"foreground": [[1, 2, 3]], "propagation": ["key_slice", "box3d"]}, ORGANS,
                           ["box3d", "key_slice"])
    assert (unnamed.organ, unnamed.organ_id, unnamed.propagation) == ("foreground", 1, "key_slice")


@pytest.mark.parametrize("request_, message", [
    ({"label": "Segment_1", "roi": [0, 1, 0, 1, 0, 1]}, "unknown label 'Segment_1'"),
    ({"label": "liver", "roi": [0, 1, 0, 1, 0]}, "roi"),
    ({"label": "liver", "roi": [0, 1, 0, 1, 0, float("nan")]}, "finite"),
    ({"label": "liver", "roi": [0, 1.5, 0, 1, 0, 1]}, "whole voxel indices"),
    ({"label": "liver", "foreground": [[1, 2]]}, "foreground click"),
    ({"label": "liver", "background": [[1, 2, 3]]}, "no prompt"),
    ({"label": "liver", "roi": [0, 1, 0, 1, 0, 1], "propagation": "sideways"}, "propagation"),
])
def test_malformed_prompts_are_refused_with_the_reason(request_, message):
    with pytest.raises(RequestError, match=message) as caught:
        clicks.parse(request_, ORGANS, ["box3d", "key_slice"])
    assert caught.value.status == 422


def volume(array, shift=0.0):
    affine = np.diag([0.8, 0.7, 2.5, 1.0])
    affine[:3, 3] = [-10.0 + shift, 20.0, 5.0]
    return MetaTensor(torch.as_tensor(array), affine=torch.as_tensor(affine))


def test_saved_labels_are_mapped_by_label_info_to_the_dataset_ids():
    image = volume(np.zeros((5, 6, 4)))
    slicer = np.zeros((5, 6, 4), np.uint8)
    slicer[1, 1, 1], slicer[2, 2, 2], slicer[3, 3, 3] = 1, 2, 3  # Slicer's order: spleen, liver, pancreas
    info = [{"name": "spleen", "idx": 1}, {"name": "liver", "idx": 2}, {"name": "pancreas", "idx": 3}]
    stored = checked_label(volume(slicer), image, ORGANS, info)
    assert stored.dtype == np.uint8
    assert (stored[1, 1, 1], stored[2, 2, 2], stored[3, 3, 3]) == (3, 1, 4)
    assert int((stored > 0).sum()) == 3
    assert np.array_equal(checked_label(volume(stored[..., None]), image, ORGANS), stored)  # a 4th axis of one


@pytest.mark.parametrize("label, info, message", [
    (np.zeros((5, 6)), None, "one 3D label map"),
    (np.zeros((5, 6, 3)), None, r"shape \[5, 6, 3\] does not match the image's \[5, 6, 4\]"),
    (np.full((5, 6, 4), 0.5), None, "non-integer"),
    (np.full((5, 6, 4), 9), None, r"values \[9\]"),
    (np.full((5, 6, 4), 2), [{"name": "liver", "idx": 1}], r"values \[2\]"),
    (np.ones((5, 6, 4)), [{"name": "Segment_1", "idx": 1}], "Segment_1"),
])
def test_labels_that_cannot_be_used_are_refused(label, info, message):
    with pytest.raises(RequestError, match=message):
        checked_label(volume(label), volume(np.zeros((5, 6, 4))), ORGANS, info)


def test_a_label_in_another_place_is_refused():
    with pytest.raises(RequestError, match="geometry does not match"):
        checked_label(volume(np.ones((5, 6, 4)), shift=0.01), volume(np.zeros((5, 6, 4))), ORGANS)
    assert checked_label(volume(np.ones((5, 6, 4)), shift=1e-4), volume(np.zeros((5, 6, 4))), ORGANS).all()


def test_the_app_refuses_a_folder_next_to_the_code(tmp_path):
    """MONAI Label keeps model/, logs/ and bin/ in the app folder: the app starts only from a data folder."""
    import cobot_med
    from cobot_med.bundle import repository_root
    from cobot_med.monailabel.app import CobotMedApp

    (tmp_path / "studies").mkdir()
    for inside in (repository_root() / "apps" / "cobot_med", Path(cobot_med.__file__).parent / "monailabel"):
        with pytest.raises(settings.ConfError, match="inside .*python -m cobot_med.monailabel DIR"):
            CobotMedApp(str(inside), str(tmp_path / "studies"), {"models": "tiny"})


# --- adapter versions (issue 24, item 5) ------------------------------------------------------------


def test_the_held_out_split_is_fixed_by_the_image_id_and_never_moves():
    """Held out by the id's SHA-256 draw, or held out before; one more from the second label on; never moved."""
    import hashlib

    from cobot_med.monailabel import versions

    ids = [f"Case_{n:05d}_0000" for n in range(1, 41)]
    for image in ids[:5]:  # the draw, computed independently
        expected = int(hashlib.sha256(f"cobot-med held-out v1/{image}".encode()).hexdigest()[:16], 16) / 2 ** 64
        assert versions.held_out_draw(image) == expected
    by_rule = {i for i in ids if versions.held_out_draw(i) < versions.HELD_OUT_FRACTION}
    assert 0 < len(by_rule) < len(ids)

    assert versions.split(["Case_00001_0000"]) == ([], ["Case_00001_0000"])  # one label: nothing to judge with
    pair = ["Case_00001_0000", "Case_00002_0000"]  # both draw above the fraction (0.961, 0.960)
    assert versions.split(pair) == (["Case_00002_0000"], ["Case_00001_0000"])  # the smaller draw
    assert versions.split(pair, trained=["Case_00002_0000"]) == (["Case_00001_0000"], ["Case_00002_0000"])
    assert versions.split(pair, trained=pair) == ([], pair)  # a label a round learnt never judges

    # labels saved one by one, a round after each, as the train task records them: an id once held out stays
    # held out, an id once trained on is never held out, and from the second label on one is held out
    pinned: set[str] = set()
    trained: set[str] = set()
    for count in range(1, len(ids) + 1):
        held, training = versions.split(ids[:count], pinned, trained)
        assert pinned <= set(held) and not (set(held) & trained) and not (set(held) & set(training))
        assert set(held) | set(training) == set(ids[:count])
        assert by_rule & set(ids[:count]) <= set(held)
        assert count < 2 or held
        pinned |= set(held)
        trained |= set(training)

    # a train request whose saved labels are all held out is refused before a round starts (the server's 422)
    lone = sorted(by_rule)[0]
    assert versions.image_id(f"/studies/{lone}.nii.gz") == lone
    message = versions.nothing_to_train("/nowhere", [{"image": f"/studies/{lone}.nii.gz"}])
    assert message == f"every saved label is held out to judge rounds ({lone}): save a label on another image to train on"
    assert versions.nothing_to_train("/nowhere", [{"image": "/studies/Case_00001_0000.nii.gz"}]) is None


def _series_folder(folder: Path, study: str, series: str, instances: int = 2) -> Path:
    """A folder as the DICOMweb datastore caches a series: DICOM files (headers only) and a file of its own."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    (folder / "cache.json").write_text("{}")  # not DICOM: skipped
    for k in range(instances):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(folder / f"{k}.dcm"), write_like_original=False)
    return folder


def test_the_series_of_one_study_are_held_out_or_trained_together(tmp_path):
    """Drawn per study: two series of one patient's study (UIDs that differ only in their last part) fall on the
    same side, so a round never trains on one phase and is judged on the other; volume files stay studies of
    their own."""
    from cobot_med.monailabel import versions

    root = "1.2.826.0.1.3680043.8.498.7"
    studies = {f"{root}.{n}": f"{root}.{n}.1" for n in range(1, 13)}  # 12 studies, two series each
    folders = [_series_folder(tmp_path / f"{study}.{s}", study, f"{study}.{s}")
               for study in studies for s in (2, 3)]
    assert versions.image_id(folders[0]) == f"{root}.1.2" and versions.image_id(folders[1]) == f"{root}.1.3"
    assert versions.study_of(folders[0]) == versions.study_of(folders[1]) == f"study {root}.1"
    assert versions.study_of(tmp_path / "Case_00001_0000.nii.gz") == "Case_00001_0000"
    datalist = [{"image": str(f)} for f in folders]
    found = versions.studies_of(datalist)
    ids = sorted(found)
    by_draw = {found[i] for i in ids if versions.held_out_draw(found[i]) < versions.HELD_OUT_FRACTION}
    assert 0 < len(by_draw) < len(studies)  # the rule holds some studies out, not all

    pinned: set[str] = set()
    trained: set[str] = set()
    for count in range(1, len(ids) + 1):  # series saved one by one, a round after each
        held, training = versions.split(ids[:count], pinned, trained, found)
        assert not {found[i] for i in held} & {found[i] for i in training}  # never one study on both sides
        assert pinned <= set(held) and not set(held) & trained
        assert {i for i in ids[:count] if found[i] in by_draw} <= set(held)
        pinned |= set(held)
        trained |= set(training)
    # the same ids drawn per image would split some study's two series
    per_image, _ = versions.split(ids)
    assert any((f"{s}.2" in per_image) != (f"{s}.3" in per_image) for s in studies)


def test_versions_are_written_once_and_served_by_number(tmp_path):
    from cobot_med.files import file_sha256
    from cobot_med.monailabel import versions

    torch.manual_seed(0)
    start = save_adapter(build_model(ModelSpec(arch="tiny", image_size=64, peft="lora")), tmp_path / "start")
    round_best = save_adapter(build_model(ModelSpec(arch="tiny", image_size=64, peft="lora")), tmp_path / "best")
    model_dir = tmp_path / "out" / "tiny"
    record = versions.open_versions(model_dir, str(start))
    assert record["served"] == 0 and record["versions"][0]["adapter"] == str(start)
    assert record["versions"][0]["weights_sha256"] == file_sha256(start / "adapter_model.safetensors")

    first = versions.add_version(model_dir, round_best, {"round": 1})
    assert first["version"] == 1 and first["adapter"] == str(model_dir / "adapters" / "v0001")
    (model_dir / "adapters" / "v0002").mkdir()  # a folder of that name already there: never written into
    second = versions.add_version(model_dir, round_best, {"round": 2})
    assert second["version"] == 3 and not any((model_dir / "adapters" / "v0002").iterdir())
    files = sorted(p for p in (model_dir / "adapters").rglob("*") if p.is_file())
    assert [p.relative_to(model_dir).as_posix() for p in files] == [
        "adapters/v0001/adapter_config.json", "adapters/v0001/adapter_model.safetensors",
        "adapters/v0003/adapter_config.json", "adapters/v0003/adapter_model.safetensors"]
    hashes = {p: file_sha256(p) for p in files}
    assert hashes[model_dir / "adapters/v0003/adapter_model.safetensors"] == file_sha256(
        round_best / "adapter_model.safetensors")
    assert versions.read(model_dir)["served"] == 0  # a new version is not served until judged

    for bad, status, message in [(7, 404, r"no adapter version 7: this model has versions \[0, 1, 3\]"),
                                 ("two", 422, "whole number"), (2, 404, "no adapter version 2")]:
        with pytest.raises(versions.VersionError, match=message) as caught:
            versions.serve(model_dir, bad, "request")
        assert caught.value.status == status
    assert versions.read(model_dir)["served"] == 0
    assert versions.serve(model_dir, "v3", "request")["served_version"] == 3
    assert versions.serve(model_dir, 0, "request")["served_adapter"] == str(start)
    assert [h["served"] for h in versions.read(model_dir)["history"]] == [0, 3, 0]

    # a round with no held-out label is not judged, and one judged against a version no longer served is kept
    unjudged = versions.decide(model_dir, 1, {"held_out_count": 0, "served_version": 0, "dsc": None,
                                             "served_dsc": None, "protocol": "tight", "held_out": []})
    assert unjudged["judged"]["decision"] == "not judged" and versions.read(model_dir)["served"] == 0
    assert unjudged["judged"]["reason"].startswith("not judged: no held-out labels yet (save labels on at least 2")
    versions.serve(model_dir, 1, "request")  # chosen while version 3 was being judged against version 0
    late = versions.decide(model_dir, 3, {"held_out_count": 1, "served_version": 0, "dsc": 0.5, "served_dsc": 0.4,
                                          "protocol": "tight", "held_out": ["Case_00003_0000"]})
    assert late["judged"]["decision"] == "kept" and versions.read(model_dir)["served"] == 1
    assert late["judged"]["reason"] == ("kept version 1: it was chosen (request) while version 3 was judged "
                                        "against version 0")
    assert versions.summary(versions.read(model_dir))["last_decision"]["version"] == 3
    versions.serve(model_dir, 0, "request")

    with pytest.raises(ValueError, match="grown from .*start.*, not from the base model"):
        versions.open_versions(model_dir, None)  # another start: these versions are not its
    with pytest.raises(ValueError, match="no adapter version 5"):
        versions.open_versions(model_dir, str(start), 5)
    assert versions.open_versions(model_dir, str(start), 1)["served"] == 1  # --conf adapter_version 1
    assert {p: file_sha256(p) for p in files} == hashes  # nothing was written again


@pytest.mark.parametrize("value, expected", [("2", {"tiny": 2}), ("tiny:v1", {"tiny": 1}), ("", {})])
def test_the_adapter_version_setting(tmp_path, value, expected):
    app = settings.from_conf({"models": "tiny", "adapter_version": value}, str(tmp_path))
    assert {m.name: m.version for m in app.models if m.version is not None} == expected


@pytest.mark.parametrize("value, message", [("latest", "expected a version number"),
                                            ("vit_b:1", "'vit_b' is not a served model"), ("-1", "version number")])
def test_a_bad_adapter_version_setting_is_refused(tmp_path, value, message):
    with pytest.raises(settings.ConfError, match=f"--conf adapter_version: .*{message}"):
        settings.from_conf({"models": "tiny", "adapter_version": value}, str(tmp_path))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_key_slice_travels_by_sam2_memory_when_the_app_is_set_to(phantom_factory):
    """``--conf propagator sam2_memory`` on a SAM 2 base: a key-slice ROI's answer is the label the slice
    predictor gives with SAM 2's memory (as ``cobot-med infer --boxes --propagator sam2_memory``), not box
    propagation's; a click on another slice is predicted with the box of the memory's mask there."""
    from cobot_med.data.boxes import mask_boxes
    from cobot_med.data.chains import volume_chain
    from cobot_med.monailabel import project
    from cobot_med.predict import THRESHOLD, CasePrompts, SlicePredictor, predict_volume, to_label_map

    size = 128  # Hiera's smallest input: the phantom's slices are cut to it
    folder = phantom_factory("spleen", cases=1, seed=0, shape=(136, 136, 12))
    name = "spleen_1.nii.gz"
    data = volume_chain([1])({"image": str(folder / "imagesTr" / name), "label": str(folder / "labelsTr" / name)})
    volume = data["image"].as_tensor()[0, 4 : 4 + size, 4 : 4 + size].float()  # a file of that grid, RAS
    organ = data["label"].as_tensor()[0, 4 : 4 + size, 4 : 4 + size] > 0
    eye = torch.eye(4, dtype=torch.float64)  # the file is already RAS: its voxels are the oriented grid's
    image = MetaTensor(volume[None], affine=eye, meta={"original_affine": eye.numpy()})
    xs, ys, zs = (torch.nonzero(organ.any(dim=d)).flatten() for d in ((1, 2), (0, 2), (0, 1)))
    roi = [int(xs[0]), int(ys[0]), int(zs[0]), int(xs[-1]), int(ys[-1]), int(zs[-1])]
    torch.manual_seed(0)
    network = build_model(ModelSpec(arch="sam2.1_hiera_t", image_size=size, peft="frozen")).eval()

    def answer(propagator, foreground=()):
        interaction = project.Interaction(roi, [list(f) for f in foreground], [])
        return project.segment(network, {"image": image}, "spleen", 1, interaction, "key_slice", "cpu", 8, False,
                               propagator)

    memory, record = answer("sam2_memory")
    boxes, _ = answer("boxes")
    prompt = project._roi_prompt(image, roi, "key_slice")
    probs, _ = predict_volume(SlicePredictor(network, "cpu", 8, False, propagator="sam2_memory"), volume,
                              CasePrompts({"spleen": 1}, [prompt], volume.shape[-1]))
    assert torch.equal(memory, to_label_map(probs, [1]))
    assert record["propagator"] == "sam2_memory" and memory.any()
    assert not torch.equal(memory, boxes)  # the setting changes the answer
    key = prompt.key[0]
    z = next(z for z in range(volume.shape[-1]) if z != key and memory[0, :, :, z].any())
    x, y = (int(v) for v in torch.nonzero(memory[0, :, :, z])[0])
    clicked, record = answer("sam2_memory", [(x, y, z)])
    box, found = mask_boxes(probs[0, :, :, z] > THRESHOLD)
    again = SlicePredictor(network, "cpu", 8, False).clicked(volume, z, [[float(y), float(x)]], [1], box.tolist())
    assert found and torch.equal(clicked[0, :, :, z] > 0, again > THRESHOLD)
    assert z in record["clicked_slices"]
