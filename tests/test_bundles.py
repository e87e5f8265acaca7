"""The MONAI bundles end to end on phantoms: train, resume, evaluate, track, stitch (tiny SAM, CPU)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch

from cobot_med.bundle import repository_root, run_bundle
from cobot_med.data.phantoms import make_phantoms

ROOT = repository_root()
FAST = dict(arch="tiny", image_size=64, eval_batch_size=16)
# each test here takes 0.2-15 s alone on 2 cores; 300 s is 20x or more (the demo and the resume: below)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def layers(*names):
    """The ``--config_file`` value of a layered run, as a user types it (a Python list literal)."""
    return repr([str(ROOT / "bundles" / f"{name}.json") for name in ("common", *names)])


@pytest.fixture(scope="module")
def phantom_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("bundle_phantoms")
    return {layout: make_phantoms(layout, base / layout, cases=5, seed=3) or base / layout
            for layout in ("adome", "spleen", "segrap")}


def mlflow_run(output_dir: Path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output_dir.absolute() / 'mlflow.db'}")
    experiments = [e for e in client.search_experiments() if e.name.startswith("cobot-med/")]
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert len(runs) == 1
    return client, runs[0]


def test_adome_training_learns_tracks_and_stitches(phantom_dirs, tmp_path):
    out = tmp_path / "adome"
    run_bundle("adome", "training", dataset_dir=str(phantom_dirs["adome"]), output_dir=str(out), epochs=3,
               peft="lora+cobot", lr=3e-3, cobot_lr=3e-3, val_at_start=True, **FAST)
    assert (out / "adapter_best" / "adapter_config.json").is_file()
    assert (out / "adapter_latest" / "adapter_model.safetensors").is_file()
    assert (out / "loss_curve.png").is_file() and list((out / "overlays").glob("*.png"))

    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED" and run.data.tags["cobot_med.status"] == "finished"
    params = run.data.params
    assert params["peft"] == "lora+cobot" and params["dataset"] == "adome" and params["arch"] == "tiny"
    assert int(params["image_encoder_trainable"]) > 0
    for organ in ("liver", "kidney", "spleen", "pancreas"):
        assert f"val_dsc_{organ}" in run.data.metrics and f"test_dsc_{organ}" in run.data.metrics
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]
    dsc = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_dsc"), key=lambda m: m.step)]
    assert len(loss) == 3 and loss[-1] < loss[0]
    assert len(dsc) == 4 and max(dsc[1:]) > dsc[0]  # epoch 0 is before training
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "resolved_settings.json", "adapter_best", "overlays", "test_predictions"} <= artifacts
    assert "adapter_model.safetensors" not in artifacts  # the adapter once, in its folder (it was also at the root)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "test_predictions")]

    # stitched validation volumes have their input's exact geometry
    datalist = json.loads((out / "datalist.json").read_text())
    for case in datalist["validation"]:
        image = nib.load(case["image"])
        name = f"{case['case_id']}_seg.nii.gz"  # named by case id, as cobot-med infer names its outputs
        seg = nib.load(out / "val_predictions" / name)
        assert seg.shape == image.shape
        np.testing.assert_allclose(seg.affine, image.affine, atol=1e-5)
        assert nib.aff2axcodes(seg.affine) == nib.aff2axcodes(image.affine)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 3, 4}

    # evaluate: a saved adapter on the test split, nothing repeated on the command line, the same score
    run_bundle("adome", "evaluate", dataset_dir=str(phantom_dirs["adome"]), output_dir=str(out / "eval"),
               adapter=str(out / "adapter_best"), eval_batch_size=16)
    report = json.loads((out / "eval" / "evaluation.json").read_text())
    assert report["test_dsc"] == pytest.approx(run.data.metrics["test_dsc"], abs=1e-6)
    assert report["adapter"]["weights_sha256"] == json.loads((out / "adapter_best" / "adapter_config.json").read_text())["weights_sha256"]

    # infer --labels on the test cases: the same predictor, label map and metric policy give the logged test_dsc
    from cobot_med.cli import main

    inputs, refs = tmp_path / "test_images", tmp_path / "test_labels"
    inputs.mkdir(), refs.mkdir()
    for case in datalist["test"]:
        (inputs / Path(case["image"]).name).symlink_to(case["image"])
        (refs / Path(case["label"]).name).symlink_to(case["label"])
    assert main(["infer", "--config", "adome", "--input", str(inputs), "--output", str(tmp_path / "infer"),
                 "--adapter", str(out / "adapter_best"), "--labels", str(refs), "--batch-size", "16"]) == 0
    inferred = json.loads((tmp_path / "infer" / "metrics.json").read_text())["mean"]
    assert inferred["all"]["dsc"] == pytest.approx(run.data.metrics["test_dsc"], abs=1e-6)
    for organ in ("liver", "kidney", "spleen", "pancreas"):
        if inferred[organ]["dsc"] is not None:
            assert inferred[organ]["dsc"] == pytest.approx(run.data.metrics[f"test_dsc_{organ}"], abs=1e-6)


SPEED_OFF = dict(attention="eager", skip_window_padding="false", gradient_checkpointing="global")


@pytest.mark.parametrize("dataset, speed", [("spleen", {}), ("segrap", SPEED_OFF)])
def test_other_bundles_train_and_evaluate(phantom_dirs, tmp_path, dataset, speed):
    """The speed settings are plain bundle settings: turned off here for segrap, recorded with the run."""
    out = tmp_path / dataset
    run_bundle(dataset, "training", dataset_dir=str(phantom_dirs[dataset]), output_dir=str(out), epochs=1,
               peft="adaptformer+cobot", **FAST, **speed)
    _, run = mlflow_run(out)
    assert run.info.status == "FINISHED" and "test_dsc" in run.data.metrics
    expected = {"attention": "auto", "skip_window_padding": "True", "gradient_checkpointing": "none",
                "compile": "False"} | {k: str(v).capitalize() if k == "skip_window_padding" else v
                                       for k, v in speed.items()}
    assert {k: run.data.params[k] for k in expected} == expected
    # machine-dependent values are not params (a resume elsewhere would change them): resolved_settings.json has them
    assert not [k for k in run.data.params if k in ("torch_threads", "num_workers") or k.endswith("_reason")]
    resolved = json.loads((out / "resolved_settings.json").read_text())
    assert resolved["speed"]["attention"] == expected["attention"] and resolved["speed"]["torch_threads"] >= 1
    assert resolved["identity"]["amp"] == run.data.params["amp_dtype"]  # the resolved dtype, not "auto"
    model = json.loads((out / "adapter_best" / "adapter_config.json").read_text())["model"]
    assert model["attention"] == expected["attention"]
    assert model["gradient_checkpointing"] == expected["gradient_checkpointing"]


def test_evaluate_resolves_its_speed_choices_for_inference(phantom_dirs, tmp_path, monkeypatch):
    """The evaluate run id trains nothing: its precision, attention and compile are resolved as for inference."""
    from cobot_med.settings import RunSettings

    asked = []
    resolve = RunSettings.speed_choices

    def speed_choices(self, device, training, network=None):
        asked.append(training)
        return resolve(self, device, training, network)

    monkeypatch.setattr(RunSettings, "speed_choices", speed_choices)
    run_bundle("adome", "evaluate", dataset_dir=str(phantom_dirs["adome"]), output_dir=str(tmp_path / "eval"),
               peft="frozen", **FAST)
    assert asked and not any(asked)
    assert (tmp_path / "eval" / "evaluation.json").is_file()


def test_a_killed_and_resumed_training_equals_an_uninterrupted_one(phantom_dirs, tmp_path):
    """Kill a training after its first epoch; the rerun goes on from there in the same MLflow run, and ends with
    exactly the weights and validation scores of a run that was never stopped."""
    import time

    from safetensors.torch import load_file

    settings = dict(dataset_dir=str(phantom_dirs["spleen"]), peft="lora", arch="tiny", image_size=64,
                    eval_batch_size=16, epochs=3, lr=3e-3)
    run_bundle("spleen", "training", output_dir=str(tmp_path / "whole"), **settings)

    out = tmp_path / "resumed"
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", layers("spleen"),
               "--output_dir", str(out), *[f"--{k}={v}" for k, v in settings.items()]]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "adapter_latest" / "adapter_config.json"
    deadline = time.time() + 600

    def epochs_checkpointed() -> int:  # resume.pt exists from the start (epoch 0): wait for epoch 1's
        from cobot_med.engine.session import epochs_done

        try:
            return epochs_done(torch.load(out / "resume.pt", weights_only=True))
        except (OSError, RuntimeError, EOFError):
            return 0

    while not (latest.is_file() and epochs_checkpointed() >= 1) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    interrupted_at = json.loads(latest.read_text())["epoch"]
    assert 1 <= interrupted_at < 3, "the run should have been stopped part-way"

    run_bundle("spleen", "training", output_dir=str(out), **settings)
    assert json.loads(latest.read_text())["epoch"] == 3
    client, run = mlflow_run(out)  # the interrupted (still running) MLflow run was taken up again
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == [1, 2, 3]
    whole_client, whole_run = mlflow_run(tmp_path / "whole")
    for metric in ("train_loss", "val_dsc"):
        ours = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
        theirs = sorted((m.step, m.value) for m in whole_client.get_metric_history(whole_run.info.run_id, metric))
        assert ours == theirs, metric
    assert run.data.metrics["test_dsc"] == whole_run.data.metrics["test_dsc"]
    for folder in ("adapter_latest", "adapter_best"):
        a = load_file(str(out / folder / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "whole" / folder / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


def error_chain(err: BaseException) -> str:
    """MONAI wraps a failing config expression; the user sees the whole chain."""
    messages = []
    while err is not None:
        messages.append(f"{type(err).__name__}: {err}")
        err = err.__cause__
    return "\n".join(messages)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dataset_dir="nowhere", arch="tiny", image_size=64), "SettingsError: dataset_dir .*nowhere.* does not exist. "
                                                                 "The adome bundle expects the AbdomenCT-1K layout"),
        (dict(arch="vit_b"), "sam_checkpoint is empty, but arch vit_b needs Meta's weights"),
        (dict(arch="tiny", peft="lora-cobot"), "unknown peft 'lora-cobot'"),
        (dict(arch="tiny", image_size=100), "image_size 100 is not usable for tiny"),
        (dict(arch="tiny", sam_checkpoint="missing.pth"), "sam_checkpoint missing.pth does not exist"),
    ],
)
def test_clear_errors_before_any_work(phantom_dirs, tmp_path, overrides, message):
    settings = {"dataset_dir": str(phantom_dirs["adome"]), "output_dir": str(tmp_path / "o"), **overrides}
    with pytest.raises(Exception) as err:
        run_bundle("adome", "training", **settings)
    assert re.search(message, error_chain(err.value)), error_chain(err.value)


def test_two_process_ddp_on_cpu(phantom_dirs, tmp_path):
    """torchrun, gloo, the multi_gpu override: the same path as on GPUs."""
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training",
        "--config_file", layers("spleen", "multi_gpu"),
        "--dataset_dir", str(phantom_dirs["spleen"]), "--output_dir", str(out),
        "--arch", "tiny", "--image_size", "64", "--epochs", "1", "--peft", "lora", "--eval_batch_size", "16",
        "--val_fraction", "0.4", "--test_fraction", "0.4",  # each rank needs at least one case to evaluate
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _, run = mlflow_run(out)  # rank 0 alone tracked
    assert run.info.status == "FINISHED"
    assert (out / "adapter_best" / "adapter_config.json").is_file()


@pytest.mark.timeout(600)  # 15 s alone; it hit 600 s on a 2-core machine shared with other jobs
def test_demo_finishes_and_training_helps(tmp_path, capsys):
    from cobot_med.cli import main

    status = main(["demo", "--arch", "tiny", "--out", str(tmp_path / "demo"), "--cases", "6", "--epochs", "4",
                   "--image-size", "64"])
    printed = capsys.readouterr().out
    before = float(re.search(r"validation DSC before training: ([0-9.]+)", printed).group(1))
    after = float(re.search(r"validation DSC after training:\s+([0-9.]+)", printed).group(1))
    assert status == 0 and after > before
    assert (tmp_path / "demo" / "outputs" / "adome-tiny" / "adapter_best" / "adapter_model.safetensors").is_file()
    assert "mlflow ui --backend-store-uri sqlite:///" in printed
    # the fine-tuned scores under tight (the papers' oracle) and key_slice are the run's own
    assert "tight (oracle)" in printed and "key_slice" in printed
    tight, key_slice = (float(v) for v in re.search(r"\n  mean\s+([0-9.]+)\s+([0-9.]+)\n", printed).groups())
    _, run = mlflow_run(tmp_path / "demo" / "outputs" / "adome-tiny")
    assert tight == pytest.approx(run.data.metrics["test_dsc"], abs=5e-5)
    assert key_slice == pytest.approx(run.data.metrics["test_dsc/key_slice"], abs=5e-5)


def test_lite_medsam_zero_shot_evaluate_equals_infer_without_adapter(tmp_path, capsys):
    """The packaged LiteMedSAM, no adapter: ``evaluate --peft frozen`` and ``infer`` score the test case alike,
    and the pretrained weights segment the phantoms' organs (a random-init model scores about 0). ``infer``
    is given no --arch and no checkpoint: the embedded base is its default, and it says so."""
    from cobot_med.cli import main

    data = make_phantoms("adome", tmp_path / "data", cases=5, seed=5, shape=(48, 48, 12))
    out = tmp_path / "zero_shot"
    run_bundle("adome", "evaluate", dataset_dir=str(data), output_dir=str(out), arch="lite_medsam", peft="frozen",
               eval_batch_size=16)
    report = json.loads((out / "evaluation.json").read_text())
    assert report["adapter"]["path"] is None and report["adapter"]["arch"] == "lite_medsam"
    assert report["test_dsc"] > 0.5

    datalist = json.loads((out / "datalist.json").read_text())
    inputs, refs = tmp_path / "test_images", tmp_path / "test_labels"
    inputs.mkdir(), refs.mkdir()
    for case in datalist["test"]:
        (inputs / Path(case["image"]).name).symlink_to(case["image"])
        (refs / Path(case["label"]).name).symlink_to(case["label"])
    capsys.readouterr()
    assert main(["infer", "--config", "adome", "--input", str(inputs), "--output", str(tmp_path / "infer"),
                 "--labels", str(refs), "--batch_size", "16"]) == 0
    assert "inference runs the LiteMedSAM base that ships with the install (arch lite_medsam)" in capsys.readouterr().err
    assert json.loads((tmp_path / "infer" / "summary.json").read_text())["model"]["arch"] == "lite_medsam"
    inferred = json.loads((tmp_path / "infer" / "metrics.json").read_text())["mean"]
    assert inferred["all"]["dsc"] == pytest.approx(report["test_dsc"], abs=1e-6)
