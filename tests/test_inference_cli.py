"""``cobot-med infer`` through the adome bundle's ``inference`` run id, with a real (tiny) SAM: a saved
LoRA+COBOT adapter merged for inference, zero-shot SAM, failures and exit statuses."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from test_inference import ADOME, assert_same_geometry, label_of, oriented

from toy import acting_adapter
from cobot_med.cli import main
from cobot_med.inference import load_network
from cobot_med.predict import SlicePredictor, from_labels, predict_volume
from cobot_med.settings import load_settings

pytestmark = [pytest.mark.usefixtures("single_torch_thread"), pytest.mark.slow, pytest.mark.timeout(300)]  # 2 s alone each


@pytest.fixture(scope="module")
def phantoms(phantom_factory):
    """The same four adome phantoms as tests/test_inference.py (RAS, LPS, SRA, oblique), read-only."""
    root = phantom_factory("adome", cases=4, seed=5, shape=(40, 36, 12))
    return root / "Image", root / "Mask"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A tiny lora+cobot adapter whose LoRA up-projections are non-zero (so merging changes weights)."""
    return acting_adapter(tmp_path_factory.mktemp("adapter") / "adapter_best")


def test_infer_command_runs_the_bundle_with_the_adapters_own_settings(phantoms, adapter, tmp_path, capsys):
    images, labels = phantoms
    out = tmp_path / "out"
    code = main(["infer", "--config", "bundles/adome.json", "--input", str(images), "--output", str(out),
                 "--adapter", str(adapter), "--labels", str(labels), "--organs", "liver,spleen", "--device", "cpu",
                 "--no-amp", "--probabilities"])
    printed = capsys.readouterr().out
    assert code == 0 and "4 done, 0 skipped (already done), 0 failed" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["arch"] == "tiny" and summary["model"]["peft"] == "lora+cobot"
    assert summary["model"]["image_size"] == 64 and summary["model"]["merged_layers"] == 4
    assert summary["organs"] == {"liver": 1, "spleen": 3}
    for image in sorted(images.glob("*.nii.gz")):
        case = image.name[: -len(".nii.gz")]
        seg = out / f"{case}_seg.nii.gz"
        assert_same_geometry(seg, image)
        assert set(np.unique(np.asarray(nib.load(str(seg)).dataobj))) <= {0, 1, 3}
        probability = nib.load(str(out / f"{case}_prob_spleen.nii.gz"))
        assert probability.shape == nib.load(str(image)).shape
        assert np.array_equal(probability.affine, nib.load(str(image)).affine)
        values = np.asarray(probability.dataobj)
        assert values.dtype == np.float32 and 0 <= values.min() and values.max() <= 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["mean"]) == {"liver", "spleen", "all"} and metrics["mean"]["all"]["cases"] == 8
    assert json.loads((out / "labels.json").read_text())["labels"] == {"liver": 1, "spleen": 3}

    # a second run skips everything; the exit status stays 0
    assert main(["infer", "--config", "adome", "--input", str(images), "--output", str(out), "--adapter", str(adapter),
                 "--labels", str(labels), "--organs", "liver", "spleen", "--device", "cpu", "--no-amp"]) == 0
    assert "0 done, 4 skipped" in capsys.readouterr().out


def test_speed_switches_off_on_the_command_line_give_the_same_probabilities(phantoms, adapter, tmp_path, capsys):
    images, labels = phantoms
    outputs = {}
    for name, extra in {"fast": [], "slow": ["--attention", "eager", "--no-merge"]}.items():
        outputs[name] = tmp_path / name
        assert main(["infer", "--config", "adome", "--input", str(images), "--output", str(outputs[name]),
                     "--adapter", str(adapter), "--labels", str(labels), "--organs", "liver", "--device", "cpu",
                     "--no-amp", "--probabilities", *extra]) == 0
    capsys.readouterr()
    summaries = {name: json.loads((out / "summary.json").read_text()) for name, out in outputs.items()}
    ran = {name: (s["model"]["merged_layers"], s["model"]["attention"], s["settings"]["attention_kind"])
           for name, s in summaries.items()}
    assert ran["fast"][:2] == (4, "auto") and ran["fast"][2] in ("onehot", "sdpa")  # what auto picks on this CPU
    assert ran["slow"] == (0, "eager", "eager")
    for fast in sorted(outputs["fast"].glob("*_prob_liver.nii.gz")):
        a = np.asarray(nib.load(str(fast)).dataobj)
        b = np.asarray(nib.load(str(outputs["slow"] / fast.name)).dataobj)
        assert a.max() > 0.5 and np.abs(a - b).max() < 1e-4


def test_an_adapters_recorded_attention_is_what_runs_and_what_is_recorded(phantoms, tmp_path, capsys):
    """An adapter saved with attention=eager, run with the default settings (no --attention): the model runs
    eager, and the log and summary.json say eager, not what auto would pick."""
    from cobot_med.adapter import save_adapter
    from cobot_med.model import ModelSpec, build_model

    images, labels = phantoms
    torch.manual_seed(0)
    eager = save_adapter(build_model(ModelSpec("tiny", 64, "lora", attention="eager")), tmp_path / "eager")
    out = tmp_path / "out"
    assert main(["infer", "--config", "adome", "--input", str(images), "--output", str(out), "--adapter", str(eager),
                 "--labels", str(labels), "--organs", "liver", "--device", "cpu"]) == 0
    assert "; attention eager (as the loaded model records it);" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["attention"] == "eager"
    assert (summary["settings"]["attention"], summary["settings"]["attention_kind"]) == ("eager", "eager")
    assert summary["settings"]["attention_reason"] == "attention=eager (as the loaded model records it)"


def test_merged_lora_predicts_what_the_unmerged_adapter_predicts(phantoms, adapter):
    images, labels = phantoms
    image, label = oriented(sorted(images.glob("*.nii.gz"))[1], label_of(labels, sorted(images.glob("*.nii.gz"))[1]))
    prompts = from_labels(label, ADOME)
    results = []
    for merge in (False, True):
        settings = load_settings("adome", adapter=str(adapter), merge_adapters=merge)
        network, info = load_network(settings, "cpu")
        assert info["merged_layers"] == (4 if merge else 0)
        probs, _ = predict_volume(SlicePredictor(network, "cpu", batch_size=3), image[0], prompts)
        results.append(probs)
    assert results[0].abs().max() > 0
    torch.testing.assert_close(results[0], results[1], atol=1e-4, rtol=0)


def test_zero_shot_with_a_boxes_file_reports_a_case_without_prompts(phantoms, tmp_path, capsys):
    images, _ = phantoms
    first = sorted(images.glob("*.nii.gz"))[0].name[: -len(".nii.gz")]
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"space": "voxel", "cases": {first: {"liver": {"box3d": [5, 5, 2, 30, 28, 8]}}}}))
    out = tmp_path / "out"
    code = main(["infer", "--config", "adome", "--input", str(images), "--output", str(out), "--boxes", str(boxes),
                 "--arch", "tiny", "--image-size", "64", "--device", "cpu", "--no-amp"])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 1
    assert "1 done, 0 skipped (already done), 3 failed" in printed
    assert "Case_00002_0000: no prompt for any organ" in printed
    assert "cobot-med: 3 of 4 cases failed (Case_00002_0000" in captured.err  # one line at the edge
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["zero_shot"] and summary["model"]["peft"] == "frozen"
    assert (out / f"{first}_seg.nii.gz").is_file() and (out / f"{first}_prompts.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--labels", "/no/such/folder"], "labels folder /no/such/folder does not exist"),
    ([], "no prompt source"),
    (["--labels", "{images}", "--organs", "heart"], "unknown organs ['heart']"),
    (["--labels", "{images}", "--arch", "vit_b"], "needs Meta's weights"),
])
def test_settings_that_cannot_work_exit_2_with_a_message(phantoms, tmp_path, capsys, extra, message):
    images, _ = phantoms
    extra = [e.replace("{images}", str(images.parent / "Mask")) for e in extra]
    code = main(["infer", "--config", "adome", "--input", str(images), "--output", str(tmp_path / "out"),
                 "--device", "cpu", "--arch", "tiny", "--image-size", "64", *extra])  # a later --arch wins
    assert code == 2
    assert message in capsys.readouterr().err
