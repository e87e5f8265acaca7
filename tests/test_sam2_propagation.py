"""Key-slice propagation by SAM 2's memory (``propagator: sam2_memory``, cobot_med/sam2_base/propagation.py)
against SAM 2's own video predictor, and the propagator setting's errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cobot_med.errors import SettingsError
from cobot_med.predict import SlicePredictor, predict_volume
from cobot_med.predict.protocols import case_prompts, parse_protocol

SIZE = 128  # the model's input size (Hiera's smallest): the phantom's slices are cut to it, so no side resizes
ORGANS = {"spleen": 1}


def _sam2_base():
    """The SAM 2.1 Hiera-T base at SIZE px, random weights (sam2's own builder), zero-shot, in eval mode."""
    from cobot_med.model import ModelSpec, build_model

    torch.manual_seed(0)
    return build_model(ModelSpec(arch="sam2.1_hiera_t", image_size=SIZE, peft="frozen")).eval()


def _phantom(phantom_factory, tmp_path):
    """A spleen phantom through the project's volume chain (RAS, CT window to [0, 255]), cut to SIZE x SIZE,
    rounded to uint8 and written as one grayscale JPEG per axial slice (``<z>.jpg``, SAM 2's frame folder);
    returns the folder, the volume read back from those JPEGs with PIL (X, Y, Z) and the prompts the
    ``key_slice`` protocol gives from the cut label."""
    from PIL import Image

    from cobot_med.data.chains import volume_chain
    from cobot_med.metrics import spacing_of

    folder = phantom_factory("spleen", cases=1, seed=0, shape=(136, 136, 12))
    name = "spleen_1.nii.gz"
    data = volume_chain(list(ORGANS.values()))({"image": str(folder / "imagesTr" / name),
                                               "label": str(folder / "labelsTr" / name)})
    image, label = data["image"][0], data["label"][0]
    X, Y, _ = image.shape
    x0, y0 = (X - SIZE) // 2, (Y - SIZE) // 2
    slices = np.round(image.numpy()[x0 : x0 + SIZE, y0 : y0 + SIZE]).astype(np.uint8)
    label = label[x0 : x0 + SIZE, y0 : y0 + SIZE]
    frames = tmp_path / "frames"
    frames.mkdir()
    for z in range(slices.shape[-1]):
        Image.fromarray(slices[..., z], mode="L").save(frames / f"{z:05d}.jpg", quality=95)
    volume = np.stack([np.asarray(Image.open(frames / f"{z:05d}.jpg")) for z in range(slices.shape[-1])], axis=-1)
    prompts = case_prompts(parse_protocol("key_slice"), label, ORGANS, spacing_of(data["image"].affine))
    return frames, torch.from_numpy(volume).float(), prompts


def _reference(sam2, frames, z: int, box, threshold: float) -> dict[int, torch.Tensor]:
    """SAM 2's own way: ``init_state`` on the JPEG folder, the box on frame ``z`` in pixels
    (``normalize_coords``), ``propagate_in_video`` forward then reverse from ``z``, each direction stopped after
    its first frame with no probability above ``threshold``; {frame: logits at the frame's size}."""
    state = sam2.init_state(str(frames))
    sam2.add_new_points_or_box(state, frame_idx=z, obj_id=1, box=list(box))
    out = {}
    for reverse in (False, True):
        for frame, _, masks in sam2.propagate_in_video(state, start_frame_idx=z, reverse=reverse):
            out[frame] = masks[0, 0].float()
            if not (masks.sigmoid() > threshold).any():
                break
    return out


@pytest.mark.slow
@pytest.mark.timeout(250)  # 40-90 s on a 2-core CPU shared with other jobs
def test_memory_propagation_matches_sam2_video_predictor(phantom_factory, tmp_path):
    """The same masks as SAM 2's ``SAM2VideoPredictor`` (init_state / add_new_points_or_box / propagate_in_video,
    forward then reverse), random weights, one key-slice box on a phantom volume.

    Identical inputs on both sides: the phantom's prepared uint8 slices (volume chain, CT window, cut to the
    model's 128 px) are written as grayscale JPEGs; SAM 2 reads that folder its own way (PIL, RGB, /255, ImageNet
    mean/std) and our side reads the same JPEGs back with PIL into the volume that ``predict_volume`` gets, whose
    slices go through the base's input recipe (``sam2``: /255, then its ImageNet mean/std). At the model's size
    neither side resizes. Both sides run the one ``SAM2VideoPredictor`` (the base's ``.sam2``), each with its own
    inference state. The box is the ``key_slice`` protocol's (the label's largest slice), in pixels for SAM 2
    and in the slice grid for ours (the same numbers: x along the JPEG's width). Run twice: with the usual
    threshold (0.5), and with one at which a direction stops early (both sides stop after the first slice with
    no probability above it; the reverse pass then remembers fewer slices above the key)."""
    network = _sam2_base()
    sam2 = network.sam2
    frames, volume, prompts = _phantom(phantom_factory, tmp_path)
    X, Y, Z = volume.shape
    z, box = prompts.prompts[0].key
    full = _reference(sam2, frames, z, box, 0.5)
    assert sorted(full) == list(range(Z))  # on random weights the mask never vanishes: every slice is compared
    peaks = {f: float(full[f].sigmoid().max()) for f in full}
    above = [f for f in range(z + 1, Z) if peaks[f] < min(peaks[g] for g in range(z, f))]
    assert above, "no slice above the key is less sure than the ones before it: pick another phantom"
    stop = above[0]  # at its own peak as the threshold, the forward pass stops here
    for threshold in (0.5, peaks[stop]):
        expected = full if threshold == 0.5 else _reference(sam2, frames, z, box, threshold)
        predictor = SlicePredictor(network, "cpu", amp=False, propagator="sam2_memory")
        probs, used = predict_volume(predictor, volume, prompts, threshold=threshold)
        assert used == [{z: box}]
        assert predictor.images_sent == len(expected)  # each slice SAM 2 segmented, once
        for f in range(Z):
            if f not in expected:
                assert not probs[0, ..., f].any(), f"slice {f} lies beyond where propagation stopped"
                continue
            assert torch.equal(probs[0, ..., f] > 0.5, expected[f] > 0), f"slice {f}"
            torch.testing.assert_close(probs[0, ..., f], expected[f].sigmoid(), atol=1e-5, rtol=0)
        masks = probs[0] > 0.5
        assert 0 < int(masks.sum()) < X * Y * Z  # neither nothing nor everything
        if threshold != 0.5:
            assert max(expected) == stop and min(expected) < z
            assert not torch.equal(expected[z - 1], full[z - 1])  # the shorter forward pass changed the reverse one


class _NotSam2(torch.nn.Module):
    image_size = SIZE


def test_memory_propagator_refuses_a_base_without_sam2():
    with pytest.raises(SettingsError, match="propagator sam2_memory needs a SAM 2 base .*this model is _NotSam2"):
        SlicePredictor(_NotSam2(), "cpu", propagator="sam2_memory")
    with pytest.raises(SettingsError, match=r"unknown propagator 'memory'; choose one of \['boxes', 'sam2_memory'\]"):
        SlicePredictor(_NotSam2(), "cpu", propagator="memory")
    assert SlicePredictor(_NotSam2(), "cpu").propagator == "boxes"


@pytest.mark.slow
@pytest.mark.timeout(300)  # 18-71 s on a 2-core CPU shared with other jobs
def test_key_slice_under_sam2_memory_is_the_same_in_evaluate_and_infer(phantom_factory, tmp_path, capsys):
    """The real paths as a user runs them on a SAM 2.1 Hiera-T base (its random weights saved as Meta's checkpoint
    format): ``evaluate --prompts tight,key_slice --propagator sam2_memory`` and ``cobot-med infer --boxes`` (a
    key-slice boxes file written from the test label) ``--propagator sam2_memory`` give the same label map and
    scores; evaluation.json, the protocol's block, its prompts record and infer's record name the propagator; the
    mask reaches slices that no box was sent to."""
    import json
    from pathlib import Path

    import nibabel as nib
    from test_evaluation_protocols import write_key_slice_boxes

    from cobot_med.bundle import run_bundle
    from cobot_med.cli import main
    from cobot_med.sam2_base.build import build_sam2

    data = phantom_factory("spleen", cases=3, seed=0, shape=(40, 40, 10))
    torch.manual_seed(0)
    checkpoint = tmp_path / "sam2.1_hiera_t_random.pt"
    torch.save({"model": build_sam2("sam2.1_hiera_t", SIZE).state_dict()}, checkpoint)
    base = {"arch": "sam2.1_hiera_t", "image_size": SIZE, "sam_checkpoint": str(checkpoint), "device": "cpu",
            "amp": "false", "propagator": "sam2_memory"}
    out = tmp_path / "evaluate"
    run_bundle("spleen", "evaluate", dataset_dir=str(data), output_dir=str(out), peft="frozen",
               prompts="tight,key_slice", val_fraction=0.34, test_fraction=0.34, **base)
    assert "key_slice (sam2_memory)" in capsys.readouterr().out
    evaluation = json.loads((out / "evaluation.json").read_text())
    block = evaluation["protocols"]["key_slice"]
    assert evaluation["propagator"] == "sam2_memory" and block["propagator"] == "sam2_memory"
    assert evaluation["protocols"]["tight"]["propagator"] is None  # tight prompts every slice: nothing propagates

    (test,) = json.loads((out / "datalist.json").read_text())["test"]
    inputs, refs = tmp_path / "images", tmp_path / "labels"
    inputs.mkdir(), refs.mkdir()
    (inputs / Path(test["image"]).name).symlink_to(test["image"])
    (refs / Path(test["label"]).name).symlink_to(test["label"])
    name = Path(test["image"]).name[: -len(".nii.gz")]
    boxes = write_key_slice_boxes(tmp_path / "boxes.json", {name: test["label"]}, ORGANS)
    assert main(["infer", "--config", "spleen", "--input", str(inputs), "--output", str(tmp_path / "infer"),
                 "--boxes", str(boxes), "--labels", str(refs), "--arch", "sam2.1_hiera_t", "--image_size", str(SIZE),
                 "--sam_checkpoint", str(checkpoint), "--device", "cpu", "--no_amp",
                 "--propagator", "sam2_memory"]) == 0
    ours = np.asarray(nib.load(str(out / "test_predictions" / "key_slice" / f"{test['case_id']}_seg.nii.gz")).dataobj)
    theirs = np.asarray(nib.load(str(tmp_path / "infer" / f"{name}_seg.nii.gz")).dataobj)
    assert np.array_equal(ours, theirs)
    inferred = json.loads((tmp_path / "infer" / "metrics.json").read_text())
    assert inferred["cases"][name]["spleen"]["dsc"] == block["cases"][test["case_id"]]["spleen"]["dsc"]
    record = json.loads((tmp_path / "infer" / f"{name}_prompts.json").read_text())
    assert record["record"]["settings"]["propagator"] == "sam2_memory"
    sent = json.loads((out / "test_predictions" / "key_slice" / f"{test['case_id']}_prompts.json").read_text())
    assert sent["propagator"] == "sam2_memory"
    assert len(sent["organs"]["spleen"]["slices"]) == 1 == len(record["organs"]["spleen"]["slices"])  # one box
    axial = [code in "SI" for code in nib.aff2axcodes(nib.load(test["image"]).affine)].index(True)
    assert int(np.any(np.moveaxis(theirs, axial, -1) > 0, axis=(0, 1)).sum()) > 1  # the mask went beyond it


def test_the_propagator_setting_is_checked_against_the_base(tmp_path):
    """``sam2_memory`` on a base without SAM 2's memory, or on an exported model, is one named error before any
    work; an unknown propagator names the choices."""
    from cobot_med.settings import load_settings

    with pytest.raises(SettingsError, match=r"unknown propagator 'memory'; choose one of \['boxes', 'sam2_memory'\]"):
        load_settings("spleen", propagator="memory")
    settings = load_settings("spleen", propagator="sam2_memory", arch="tiny", input_dir=str(tmp_path),
                             output_dir=str(tmp_path / "out"), device="cpu")
    with pytest.raises(SettingsError, match="propagator sam2_memory needs a SAM 2 base .*arch tiny has no memory"):
        settings.check("inference")
    settings = load_settings("spleen", propagator="sam2_memory", backend="onnxruntime", input_dir=str(tmp_path),
                             output_dir=str(tmp_path / "out2"), device="cpu")
    with pytest.raises(SettingsError, match="propagator sam2_memory runs SAM 2's video predictor in torch"):
        settings.check("inference")
