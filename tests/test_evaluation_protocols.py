"""Honest evaluation (issue 23): the prompt protocols, scored on the whole volume through the one predictor and the
one metric policy.

Stand-in networks with PromptableSam's call signature make the checks exact: ``Bright`` segments the bright pixels
inside each box (a "perfect" model on an image whose organs are its bright pixels); with ``hallucinate`` it fills a
box that holds none, the false positive a real model makes on a slice without the organ.
"""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from cobot_med.data.layouts import get_layout
from cobot_med.engine.evaluation import VolumeSliceInferer
from cobot_med.engine.tracking import protocol_metric, split_protocol_metric
from cobot_med.errors import SettingsError, project_error
from cobot_med.handlers.protocol_scores import ProtocolScores, plot_robustness, robustness_points
from cobot_med.metrics import case_scores
from cobot_med.predict.protocols import case_prompts, parse_protocol, parse_protocols
from cobot_med.settings import load_settings

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ADOME = get_layout("adome").organs  # liver 1, kidney 2, spleen 3, pancreas 4
S = 32  # the stand-ins' model grid


class Bright(torch.nn.Module):
    """Logits +20 on the pixels of each box at least as bright as ``level`` (default: the box's mean, so never
    empty), -20 elsewhere; ``hallucinate``: a box without such a pixel is filled whole."""

    def __init__(self, level: float | None = None, hallucinate: bool = False, image_size: int = S):
        super().__init__()
        self.level, self.hallucinate, self.image_size = level, hallucinate, image_size

    def forward(self, images, boxes, valid=None, output_size=None, points=None):
        logits = []
        for b in range(images.shape[0]):
            for k in valid[b].nonzero(as_tuple=True)[0].tolist():
                x0, y0, x1, y1 = boxes[b, k].tolist()
                inside = torch.zeros(self.image_size, self.image_size, dtype=torch.bool)
                inside[max(int(y0), 0): int(np.ceil(y1)), max(int(x0), 0): int(np.ceil(x1))] = True
                image = images[b, 0]
                level = image[inside].mean() if self.level is None else self.level
                mask = inside & (image >= level)
                if self.hallucinate and not mask.any():
                    mask = inside
                logits.append(torch.where(mask, 20.0, -20.0)[None])
        out = torch.stack(logits) if logits else images.new_zeros(0, 1, self.image_size, self.image_size)
        return F.interpolate(out, size=tuple(output_size), mode="bilinear", align_corners=False)


def constructed_case():
    """A 32 x 32 x 16 volume, 1 x 1 x 2.5 mm: a bright liver box on slices 6-9 and a bright kidney box on 3-5,
    far enough apart that one's grown 3D box never reaches the other."""
    label = torch.zeros(1, S, S, 16, dtype=torch.uint8)
    label[0, 8:16, 10:20, 6:10] = ADOME["liver"]
    label[0, 24:30, 2:9, 3:6] = ADOME["kidney"]
    image = torch.where(label > 0, 200.0, 20.0)
    affine = torch.diag(torch.tensor([1.0, 1.0, 2.5, 1.0], dtype=torch.float64))
    return MetaTensor(image, affine=affine), MetaTensor(label.float(), affine=affine)


def scores(protocol, network, image, label, organs=None):
    organs = organs or {"liver": ADOME["liver"], "kidney": ADOME["kidney"]}
    seg, _, _ = VolumeSliceInferer(organs, batch_size=16, protocol=protocol).predict(image, network, label, "c")
    per_organ = case_scores(seg, label.as_tensor(), organs, [1.0, 1.0, 2.5])
    return {organ: row["dsc"] for organ, row in per_organ.items()}


# --- the setting -----------------------------------------------------------------------------------


def test_the_prompts_setting_takes_the_contracts_forms_and_names_a_protocol_that_does_not_exist(tmp_path):
    contract = ["tight", "jitter:25", "box3d:10", "key_slice"]
    assert load_settings("adome", prompts="tight,jitter:25,box3d:10,key_slice").prompts == contract
    assert load_settings("adome", prompts=json.dumps(contract)).prompts == contract
    assert load_settings("adome", prompts=("key_slice", "box3d:7.5")).prompts == ["tight", "key_slice", "box3d:7.5"]
    assert load_settings("adome").select_prompts == "tight"
    assert [p.canonical for p in parse_protocols("box3d:10.0,jitter:5")] == ["tight", "box3d:10", "jitter:5"]
    assert [p.name for p in parse_protocols("key_slice,tight")] == ["tight", "key_slice"]  # tight first
    for value, message in [("tight,jiter:25", "unknown protocol 'jiter:25' (did you mean 'jitter'?)"),
                           ("tight,box3d:", "box3d:<mm> takes a number >= 0"),
                           ("jitter:2.5", "jitter:<px> takes a whole number >= 0"),
                           ("key_slice:3", "key_slice takes no number"),
                           ("box3d:10,box3d:10.0", "'box3d:10.0' is given twice"),
                           ("clicks:0", "clicks:<n> takes at least one click")]:
        with pytest.raises(SettingsError, match=re.escape("prompts: " + message)):
            load_settings("adome", prompts=value)
    with pytest.raises(SettingsError, match="select_prompts: unknown protocol 'keyslice'"):
        load_settings("adome", select_prompts="keyslice")
    # one named error before any work: the settings refuse it before the (missing) data is looked at
    with pytest.raises(Exception) as err:
        from cobot_med.bundle import run_bundle

        run_bundle("adome", "evaluate", dataset_dir=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "out"),
                   peft="frozen", arch="tiny", prompts="tight,keyslice")
    assert isinstance(project_error(err.value), SettingsError)
    assert "unknown protocol 'keyslice'" in str(project_error(err.value))
    assert not (tmp_path / "out").exists()


def test_one_naming_rule_for_every_metric_under_a_protocol():
    assert protocol_metric("test_dsc", "tight") == "test_dsc"  # the papers' number keeps its name
    assert protocol_metric("test_dsc", "key_slice") == "test_dsc/key_slice"
    assert protocol_metric("test_dsc_liver", "box3d:10.0") == "test_dsc_liver/box3d:10"
    assert protocol_metric("val_dsc", parse_protocol("jitter:25")) == "val_dsc/jitter:25"
    assert split_protocol_metric("test_dsc_liver/box3d:10") == ("test_dsc_liver", "box3d:10")
    assert split_protocol_metric("test_dsc") == ("test_dsc", "tight")


# --- the protocols ---------------------------------------------------------------------------------


def test_jitter_0_is_tight_exactly_and_jitter_is_seeded_as_trainings():
    from cobot_med.model import ModelSpec, build_model

    image, label = constructed_case()
    organs = {"liver": ADOME["liver"], "kidney": ADOME["kidney"]}
    spacing = [1.0, 1.0, 2.5]
    tight = case_prompts(parse_protocol("tight"), label, organs, spacing, seed=0, case_id="c")
    zero = case_prompts(parse_protocol("jitter:0"), label, organs, spacing, seed=0, case_id="c")
    assert [p.boxes for p in zero.prompts] == [p.boxes for p in tight.prompts]
    jitter = parse_protocol("jitter:5")
    moved = case_prompts(jitter, label, organs, spacing, seed=0, case_id="c")
    assert moved.fixed()[1].equal(tight.fixed()[1])  # the oracle's slices, no others
    again = case_prompts(jitter, label, organs, spacing, seed=0, case_id="c").fixed()[0]
    other_case = case_prompts(jitter, label, organs, spacing, seed=0, case_id="d").fixed()[0]
    other_seed = case_prompts(jitter, label, organs, spacing, seed=1, case_id="c").fixed()[0]
    assert moved.fixed()[0].equal(again) and not moved.fixed()[0].equal(other_case)
    assert not moved.fixed()[0].equal(other_seed)
    outward = (moved.fixed()[0] - tight.fixed()[0]) * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    limit = torch.tensor([S, S, S, S], dtype=torch.float32)
    assert (outward >= 0).all() and (outward <= 5).all() and (moved.fixed()[0] <= limit).all()
    assert outward.sum() > 0

    torch.manual_seed(0)
    network = build_model(ModelSpec(arch="tiny", image_size=64, peft="frozen")).eval()
    inferer = VolumeSliceInferer(organs, batch_size=16)
    seg_tight, _, _ = inferer.predict(image, network, label, "c")
    seg_zero, _, _ = inferer.for_protocol("jitter:0").predict(image, network, label, "c")
    seg_moved, _, _ = inferer.for_protocol("jitter:5").predict(image, network, label, "c")
    assert torch.equal(seg_zero, seg_tight)
    assert not torch.equal(seg_moved, seg_tight)  # the comparison can fail


def test_a_prediction_outside_the_organs_slices_lowers_box3d_and_leaves_tight_unchanged():
    """The same model but for false positives on slices without the organ: tight never prompts those slices, so
    its score cannot see them; box3d (and key_slice's propagation) does, on the whole volume."""
    image, label = constructed_case()
    clean, hallucinating = Bright(level=100.0), Bright(level=100.0, hallucinate=True)
    for protocol in ("tight", "jitter:3"):
        assert scores(protocol, hallucinating, image, label) == scores(protocol, clean, image, label)
    assert scores("tight", clean, image, label) == {"liver": 1.0, "kidney": 1.0}
    # 5 mm grows the box by 2 slices (2.5 mm) and 5 px (1 mm) each way: empty for the clean model there
    assert scores("box3d:5", clean, image, label) == {"liver": 1.0, "kidney": 1.0}
    worse = scores("box3d:5", hallucinating, image, label)
    assert worse["liver"] < 0.5 and worse["kidney"] < 0.5
    assert scores("key_slice", clean, image, label) == {"liver": 1.0, "kidney": 1.0}
    assert max(scores("key_slice", hallucinating, image, label).values()) < 1.0


def test_box3d_and_key_slice_prompts_are_the_ones_a_user_would_draw():
    image, label = constructed_case()
    organs = {"liver": ADOME["liver"], "kidney": ADOME["kidney"]}
    box3d = case_prompts(parse_protocol("box3d:5"), label, organs, [1.0, 1.0, 2.5])
    liver = box3d.prompts[0]
    assert sorted(liver.boxes) == list(range(4, 12))  # slices 6-9 grown by 2 each way
    assert all(box == [5.0, 3.0, 25.0, 21.0] for box in liver.boxes.values())  # rows 8-15, columns 10-19, +5 px
    kidney = box3d.prompts[1]
    assert sorted(kidney.boxes) == list(range(1, 8)) and kidney.boxes[1] == [0.0, 19.0, 14.0, 32.0]  # clipped
    key = case_prompts(parse_protocol("key_slice"), label, organs, [1.0, 1.0, 2.5])
    assert key.prompts[0].key == (6, [10.0, 8.0, 20.0, 16.0]) and not key.prompts[0].boxes  # first largest slice


# --- the handler, the files, and cobot-med infer ---------------------------------------------------------------


@pytest.fixture(scope="module")
def scored(phantom_factory, tmp_path_factory):
    """Four phantom cases (stored RAS, LPS, S-I first, oblique) scored by the test split's handler under five protocols with the
    ``Bright`` stand-in, written where a run writes them."""
    from cobot_med.data.chains import run_volume_chain
    from cobot_med.sam.recipes import SamRecipe

    root = phantom_factory("adome", cases=4, seed=5, shape=(40, 36, 12))
    images = sorted((root / "Image").iterdir())
    out = tmp_path_factory.mktemp("protocols") / "test_predictions"
    settings = load_settings("adome", arch="tiny", device="cpu", amp="false")
    chain = run_volume_chain(settings, SamRecipe(S))
    network = Bright()
    inferer = VolumeSliceInferer(settings.organs, batch_size=16, seed=0)
    protocols = parse_protocols("tight,jitter:0,jitter:25,box3d:10,key_slice")
    handler = ProtocolScores(inferer, protocols, "test_dsc", out, chain, curve_path=out.parent / "robustness.png")
    handler.reset()
    cases = {}
    for path in images:
        case_id = path.name[: -len(".nii.gz")]
        label_path = root / "Mask" / path.name.replace("_0000.nii.gz", ".nii.gz")
        data = chain({"image": str(path), "label": str(label_path)})
        pred = inferer(data["image"][None], network, data["label"][None])[0]
        handler.score_case(network, case_id, data["image"], data["label"], pred)
        cases[case_id] = (path, label_path)
    engine = types.SimpleNamespace(state=types.SimpleNamespace(metrics={}))
    results = handler.complete(engine)
    return out, cases, results, engine.state, network, settings


def stored(path):
    return np.asarray(nib.load(str(path)).dataobj)


def test_a_dsc_recomputed_from_the_written_label_maps_equals_the_reported_one(scored):
    out, cases, results, state, _, settings = scored
    assert list(results) == ["tight", "jitter:0", "jitter:25", "box3d:10", "key_slice"]
    for name, block in results.items():
        dscs = []
        for case_id, (_, label_path) in cases.items():
            seg, reference = stored(out / name / f"{case_id}_seg.nii.gz"), stored(label_path)
            assert seg.shape == reference.shape  # the file's own grid
            for organ, label_id in settings.organs.items():
                pred, ref = seg == label_id, reference == label_id
                if not pred.any() and not ref.any():
                    continue
                dsc = 2 * np.logical_and(pred, ref).sum() / (pred.sum() + ref.sum())
                assert block["cases"][case_id][organ]["dsc"] == pytest.approx(dsc, abs=1e-12), (name, organ)
                dscs.append(dsc)
        assert block["dsc"] == pytest.approx(np.mean(dscs), abs=1e-12)
        written = json.loads((out / name / "metrics.json").read_text())
        assert written["mean"]["all"]["dsc"] == pytest.approx(block["dsc"], abs=1e-12)
        assert block["predictions"] == str(out / name)
        if name != "tight":
            assert state.metrics[protocol_metric("test_dsc", name)] == pytest.approx(block["dsc"])
            assert state.metrics[protocol_metric("test_dsc_liver", name)] == pytest.approx(
                block["organs"]["liver"]["dsc"])
    assert "test_dsc" not in state.metrics  # tight's name is the evaluator's own metric's
    assert state.protocol_scores is results
    assert json.loads((out / "protocols.json").read_text())["key_slice"]["dsc"] == pytest.approx(
        results["key_slice"]["dsc"])
    # the realistic protocols differ from the oracle here, and jitter:0 is tight to the voxel
    assert results["box3d:10"]["dsc"] != results["tight"]["dsc"]
    for case_id in cases:
        assert np.array_equal(stored(out / "jitter:0" / f"{case_id}_seg.nii.gz"),
                              stored(out / "tight" / f"{case_id}_seg.nii.gz"))


def write_key_slice_boxes(path, label_files, organs):
    """A boxes file of ``key_slice`` entries written from label files alone, in each file's own voxel indices:
    per organ its largest axial slice (the first of equal ones from inferior to superior, whatever the storage
    order) and the organ's bounding box there."""
    entries = {}
    for case_id, label_path in label_files.items():
        image = nib.load(str(label_path))
        reference = np.asarray(image.dataobj)
        codes = nib.aff2axcodes(image.affine)
        axial = [code in "SI" for code in codes].index(True)
        entries[case_id] = {}
        for organ, label_id in organs.items():
            mask = np.moveaxis(reference == label_id, axial, -1)
            if not mask.any():
                continue
            areas = mask.sum(axis=(0, 1))
            order = range(len(areas)) if codes[axial] == "S" else range(len(areas) - 1, -1, -1)
            k = max(order, key=lambda z: (areas[z], -list(order).index(z)))
            a, b = np.nonzero(mask[..., k].any(axis=1))[0], np.nonzero(mask[..., k].any(axis=0))[0]
            low, high = [int(a.min()), int(b.min())], [int(a.max()), int(b.max())]
            low.insert(axial, k), high.insert(axial, k)
            entries[case_id][organ] = {"key_slice": low + high}
    Path(path).write_text(json.dumps({"space": "voxel", "cases": entries}))
    return Path(path)


def test_key_slice_equals_cobot_med_infer_with_a_key_slice_boxes_file(scored, tmp_path):
    """The boxes file is written from the label files alone (the file's own voxel indices, its largest axial
    slice); infer propagates it on the same network and cases, and must give the same label maps and scores."""
    from cobot_med.inference import run_inference

    out, cases, results, _, network, settings = scored
    inputs, labels = tmp_path / "images", tmp_path / "labels"
    inputs.mkdir(), labels.mkdir()
    for image_path, label_path in cases.values():
        (inputs / image_path.name).symlink_to(image_path)
        (labels / label_path.name).symlink_to(label_path)
    boxes = write_key_slice_boxes(tmp_path / "boxes.json", {c: p for c, (_, p) in cases.items()}, settings.organs)
    infer_settings = load_settings("adome", input_dir=str(inputs), output_dir=str(tmp_path / "infer"),
                                   labels_dir=str(labels), boxes_file=str(boxes), device="cpu", amp="false",
                                   arch="tiny", eval_batch_size=16).check("inference")
    report = run_inference(infer_settings, network=network, progress=False, log=lambda _: None)
    assert not report.failed
    inferred = json.loads((tmp_path / "infer" / "metrics.json").read_text())
    for case_id in cases:
        assert np.array_equal(stored(tmp_path / "infer" / f"{case_id}_seg.nii.gz"),
                              stored(out / "key_slice" / f"{case_id}_seg.nii.gz")), case_id
        for organ in settings.organs:
            assert inferred["cases"][case_id][organ]["dsc"] == results["key_slice"]["cases"][case_id][organ]["dsc"]
        ours = json.loads((out / "key_slice" / f"{case_id}_prompts.json").read_text())["organs"]
        theirs = json.loads((tmp_path / "infer" / f"{case_id}_prompts.json").read_text())["organs"]
        assert {o: e["slices"] for o, e in ours.items()} == {o: e["slices"] for o, e in theirs.items()}
        assert all(len(e["slices"]) > 1 for e in ours.values())  # propagated beyond the key slice
    assert inferred["mean"]["all"]["dsc"] == pytest.approx(results["key_slice"]["dsc"], abs=1e-12)


def test_the_robustness_curve_puts_tight_at_0_and_each_jitter_at_its_px(scored, tmp_path):
    out, _, results, _, _, settings = scored
    protocols = parse_protocols("tight,jitter:0,jitter:25,box3d:10,key_slice")
    points = robustness_points(results, protocols, list(settings.organs))
    assert list(points) == [0, 25]
    assert points[0]["mean"] == pytest.approx(results["tight"]["dsc"])
    assert points[25]["liver"] == pytest.approx(results["jitter:25"]["organs"]["liver"]["dsc"])
    assert (out.parent / "robustness.png").stat().st_size > 1000
    assert plot_robustness(results, parse_protocols("tight,box3d:10"), list(settings.organs),
                           tmp_path / "none.png") is None


def test_clicks_are_seeded_distinct_pixels_of_the_organ_on_its_largest_slice_and_reach_the_model():
    from cobot_med.model import ModelSpec, build_model
    from cobot_med.predict import SlicePredictor
    from cobot_med.predict.protocols import click_prompts, predict_case

    image, label = constructed_case()
    label = label.as_tensor().clone()
    label[0, 8:12, 10:14, 8] = 0  # the liver's slice 8 smaller: its largest is 6 (the first of 6, 7, 9)
    organs = {"liver": ADOME["liver"], "kidney": ADOME["kidney"]}
    protocol = parse_protocol("clicks:3")
    clicks = click_prompts(protocol, label, organs, seed=0, case_id="c")
    assert clicks == click_prompts(protocol, label, organs, seed=0, case_id="c")
    assert clicks != click_prompts(protocol, label, organs, seed=0, case_id="d")
    for k, (z, points) in clicks.items():
        assert z == (6 if k == 0 else 3) and len({tuple(p) for p in points}) == 3
        assert all(label[0, int(y), int(x), z] == list(organs.values())[k] for x, y in points)  # x along Y

    torch.manual_seed(0)
    network = build_model(ModelSpec(arch="tiny", image_size=64, peft="frozen")).eval()
    predictor = SlicePredictor(network, "cpu", 16)
    probs, prompts, used = predict_case(predictor, image.as_tensor()[0], label, organs, protocol, [1.0, 1.0, 2.5],
                                        seed=0, case_id="c")
    for k, (z, points) in clicks.items():
        assert prompts.prompts[k].given["clicks"] == points
        assert prompts.prompts[k].key[0] == z and len(used[k]) > 1  # propagated from the clicked slice's box
        again = predictor.clicked(image.as_tensor()[0], z, points, [1, 1, 1], used[k][z])
        assert torch.equal(probs[k, :, :, z], again)  # the clicked slice: its clicks' own prediction, with its box


# --- end to end (slow) -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_training_keeps_the_best_adapter_by_the_chosen_protocol(phantom_factory, tmp_path):
    """``select_prompts key_slice``: validation scores key_slice each epoch (``val_dsc/key_slice``, beside the
    papers' ``val_dsc``) and adapter_best is the epoch that scored it best; the run records the choice."""
    import mlflow

    from cobot_med.bundle import run_bundle

    data = phantom_factory("adome", cases=5, seed=3, shape=(40, 40, 12))
    out = tmp_path / "run"
    run_bundle("adome", "training", dataset_dir=str(data), output_dir=str(out), arch="tiny", image_size=64,
               eval_batch_size=16, epochs=3, peft="lora", lr=3e-3, cobot_lr=3e-3, select_prompts="key_slice",
               prompts="tight,key_slice")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_dsc/key_slice")}
    assert sorted(history) == [1, 2, 3] and len(client.get_metric_history(run.info.run_id, "val_dsc")) == 3
    best = json.loads((out / "adapter_best" / "adapter_config.json").read_text())
    assert best["metric"] == {"val_dsc/key_slice": pytest.approx(max(history.values()))}
    assert best["epoch"] == min(step for step, value in history.items() if value == max(history.values()))
    assert run.data.params["select_prompts"] == "key_slice"
    assert json.loads(run.data.params["prompts"]) == ["tight", "key_slice"]
    assert "test_dsc/key_slice" in run.data.metrics


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_key_slice_of_evaluate_equals_cobot_med_infer_on_the_same_adapter(phantom_factory, tmp_path, capsys):
    """The real paths, each as a user runs it, on one saved adapter (a tiny lora+cobot whose branches act):
    ``evaluate --prompts tight,key_slice`` and ``cobot-med infer --boxes`` (a key-slice boxes file written from the
    test labels) give the same label maps and scores; evaluate prints tight as the oracle."""
    from cobot_med.adapter import save_adapter
    from cobot_med.bundle import run_bundle
    from cobot_med.cli import main
    from cobot_med.model import ModelSpec, build_model

    data = phantom_factory("adome", cases=5, seed=3, shape=(40, 40, 12))
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="tiny", image_size=64, peft="lora+cobot"))
    with torch.no_grad():
        for parameter in model.sam.image_encoder.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    adapter = save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "evaluate"
    run_bundle("adome", "evaluate", dataset_dir=str(data), output_dir=str(out), adapter=str(adapter),
               eval_batch_size=16, prompts="tight,key_slice", val_fraction=0.2, test_fraction=0.4)
    printed = capsys.readouterr().out
    assert "tight (oracle)" in printed and "key_slice" in printed
    evaluation = json.loads((out / "evaluation.json").read_text())

    test = json.loads((out / "datalist.json").read_text())["test"]
    assert len(test) == 2
    inputs, refs = tmp_path / "images", tmp_path / "labels"
    inputs.mkdir(), refs.mkdir()
    for case in test:
        (inputs / Path(case["image"]).name).symlink_to(case["image"])
        (refs / Path(case["label"]).name).symlink_to(case["label"])
    named = {c["case_id"]: Path(c["image"]).name[: -len(".nii.gz")] for c in test}  # infer's case ids: file names
    boxes = write_key_slice_boxes(tmp_path / "boxes.json", {named[c["case_id"]]: c["label"] for c in test},
                                  get_layout("adome").organs)
    assert main(["infer", "--config", "adome", "--input", str(inputs), "--output", str(tmp_path / "infer"),
                 "--adapter", str(adapter), "--boxes", str(boxes), "--labels", str(refs), "--batch_size", "16"]) == 0
    inferred = json.loads((tmp_path / "infer" / "metrics.json").read_text())
    block = evaluation["protocols"]["key_slice"]
    for case in test:
        case_id = case["case_id"]
        ours = stored(out / "test_predictions" / "key_slice" / f"{case_id}_seg.nii.gz")
        theirs = stored(tmp_path / "infer" / f"{named[case_id]}_seg.nii.gz")
        assert np.array_equal(ours, theirs)
        for organ, row in block["cases"][case_id].items():
            assert inferred["cases"][named[case_id]][organ]["dsc"] == row["dsc"]
        sent = json.loads((out / "test_predictions" / "key_slice" / f"{case_id}_prompts.json").read_text())["organs"]
        assert max(len(entry["slices"]) for entry in sent.values()) > 1  # the key slices propagated
    assert inferred["mean"]["all"]["dsc"] == pytest.approx(block["dsc"], abs=1e-12)
    assert evaluation["test_dsc/key_slice"] == pytest.approx(block["dsc"])
    assert block["dsc"] != evaluation["protocols"]["tight"]["dsc"]


def test_the_evaluators_progress_names_the_case_as_the_datalist_does(capsys):
    """The evaluator's own (``tight``) pass gets the datalist's case id from the batch, so its per-volume bar says
    ``Case_00005`` as the other protocols' bars and every record do, not the image file's ``Case_00005_0000``."""
    from cobot_med.engine.prepare import PrepareVolumeBatch

    image, label = constructed_case()
    image.meta["filename_or_obj"] = "/data/Image/Case_00005_0000.nii.gz"
    batch = {"image": image[None], "label": label[None], "case_id": ["Case_00005"]}
    inputs, _, args, kwargs = PrepareVolumeBatch()(batch, "cpu")
    assert kwargs == {"case_id": "Case_00005"}
    organs = {"liver": ADOME["liver"], "kidney": ADOME["kidney"]}
    VolumeSliceInferer(organs, batch_size=16)(inputs, Bright(), *args, **kwargs)
    bars = capsys.readouterr().err
    assert "Case_00005 (tight) slices" in bars and "Case_00005_0000" not in bars
    # a batch of two volumes has no one name: the inferer falls back to the file's
    two = {**batch, "case_id": ["Case_00005", "Case_00006"]}
    assert PrepareVolumeBatch()(two, "cpu")[3] == {}
