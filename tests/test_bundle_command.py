"""The command the project exists for, exactly as a user types it, in a subprocess:

    python -m monai.bundle run training --config_file bundles/adome.json [--key value ...]

for all three dataset layers, once with the relative path from the repository root and once with the
absolute path from another folder; then ``evaluate`` and ``inference`` the same way on the adapter it made,
and the layered form beside it. 1 epoch of the tiny SAM on small phantoms; the runs go two at a time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest

from cobot_med.bundle import repository_root
from cobot_med.data.phantoms import make_phantoms

ROOT = repository_root()
DATASETS = ("adome", "spleen", "segrap")
TINY = ["--arch", "tiny", "--image_size", "64", "--eval_batch_size", "16", "--epochs", "1", "--peft", "lora",
        "--val_fraction", "0.34", "--test_fraction", "0.34"]
# config noise and library chatter that tells a user nothing (cobot_med/logs.py), and what must never show
NOISE = ("Can't merge entry", "Traceback", "holds the", "Engine run resuming from", "nvImageCodec", "NvImgCodec",
         "MLflow database tables", "metric handler can only record", "always_return_as_numpy")
PROMPTS = "tight,jitter:0,jitter:25,box3d:10,key_slice"  # the contract's form of the prompts setting


def monai_bundle(run_id: str, config_file: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COBOT_MED_DEBUG": ""}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def ok(result: subprocess.CompletedProcess) -> str:
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed[-4000:]
    assert not [n for n in NOISE if n in printed], [n for n in NOISE if n in printed]
    return printed


def finished_run(output_dir: Path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output_dir / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments() if e.name.startswith("cobot-med/")]
    runs = client.search_runs(experiments)
    assert len(runs) == 1
    return runs[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every subprocess of this file, two at a time: each dataset layer trained by the literal command, as
    ``bundles/<name>.json`` from the root and by its absolute path from another folder; then, on the adapter
    the first made, ``evaluate`` by the absolute path from elsewhere and ``inference`` by the relative one;
    and a misspelled setting."""
    base = tmp_path_factory.mktemp("literal")
    data = {name: base / "data" / name for name in DATASETS}
    for name, folder in data.items():
        make_phantoms(name, folder, cases=3, seed=11, shape=(40, 40, 8))
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    out = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = {}
        for name in DATASETS:
            for form, config_file, cwd in (("relative", f"bundles/{name}.json", ROOT),
                                           ("absolute", str(ROOT / "bundles" / f"{name}.json"), elsewhere)):
                out[name, form] = base / "out" / f"{name}-{form}"
                started[name, form] = pool.submit(monai_bundle, "training", config_file, cwd, "--dataset_dir",
                                                  str(data[name]), "--output_dir", str(out[name, form]), *TINY)
        started["misspelled"] = pool.submit(monai_bundle, "training", "bundles/spleen.json", ROOT, "--dataset_dir",
                                            str(data["spleen"]), "--output_dir", str(base / "misspelled"),
                                            "--epoch", "2")
        adome = out["adome", "relative"]
        ok(started["adome", "relative"].result())
        adapter = str(adome / "adapter_best")
        images, labels = base / "images", base / "labels"
        images.mkdir(), labels.mkdir()
        for case in json.loads((adome / "datalist.json").read_text())["test"]:
            (images / Path(case["image"]).name).symlink_to(case["image"])
            (labels / Path(case["label"]).name).symlink_to(case["label"])
        out["evaluate"], out["inference"] = base / "evaluate", base / "inference"
        started["evaluate"] = pool.submit(
            monai_bundle, "evaluate", str(ROOT / "bundles" / "adome.json"), elsewhere, "--dataset_dir",
            str(data["adome"]), "--output_dir", str(out["evaluate"]), "--adapter", adapter,
            "--val_fraction", "0.34", "--test_fraction", "0.34", "--eval_batch_size", "16",
            "--prompts", PROMPTS)
        started["inference"] = pool.submit(
            monai_bundle, "inference", "bundles/adome.json", ROOT, "--input_dir", str(images), "--labels_dir",
            str(labels), "--output_dir", str(out["inference"]), "--adapter", adapter, "--eval_batch_size", "16")
        results = {key: future.result() for key, future in started.items()}
    return out, results, base


@pytest.mark.parametrize("form", ["relative", "absolute"])
@pytest.mark.parametrize("dataset", DATASETS)
def test_the_literal_training_command_trains(runs, dataset, form):
    out, results, _ = runs
    printed = ok(results[dataset, form])
    folder = out[dataset, form]
    assert (folder / "adapter_best" / "adapter_model.safetensors").is_file()
    assert json.loads((folder / "adapter_best" / "adapter_config.json").read_text())["model"]["arch"] == "tiny"
    run = finished_run(folder)
    assert run.info.status == "FINISHED" and run.data.tags["cobot_med.status"] == "finished"
    assert run.data.params["dataset"] == dataset and run.data.params["peft"] == "lora"
    assert "test_dsc" in run.data.metrics and "val_dsc" in run.data.metrics
    assert "Setting logging properties" not in printed.split("input summary")[-1]  # said once, not twice
    # the choices that change results, with their reasons, first; the loss named on the bar
    assert re.search(r"cobot-med training runs on: device cpu \(\w+\); precision (bf16|fp32) \(.+\); attention "
                     r"\w+ \(.+\); \d+ torch threads \(.+\)", printed)
    assert re.search(r"epoch(?: \[1/1\])?: \[\d+/\d+\].*loss=\d", printed)


def summary_of(printed: str, run_id: str) -> tuple[str, list[str], dict[str, str]]:
    """A run's end-of-run summary as printed: (heading, its scores table's lines, {what: where})."""
    lines = printed[printed.rindex(f"cobot-med {run_id} finished"):].splitlines()
    rows = [line for line in lines[1:] if re.match(r"  [a-zA-Z ]+: ", line)]
    table = [line for line in lines[1:lines.index(rows[0])]]
    return lines[0], table, {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in rows}


def test_a_run_ends_with_its_scores_paths_and_mlflow_run(runs):
    """The summary a user reads at the end: the model, the test scores by protocol (tight named the oracle, the
    numbers MLflow holds), where the adapter, predictions and pictures went (paths that exist), and the MLflow
    run id with the line that opens it; evaluate's names evaluation.json and says it has no MLflow run."""
    out, results, _ = runs
    printed = ok(results["adome", "absolute"])
    heading, table, where = summary_of(printed, "training")
    assert re.match(r"cobot-med training finished in \d+ (s|min \d+ s): adome, lora on tiny at 64 px, 1 epoch "
                    r"\(best epoch 1 by val_dsc under tight prompts: \d\.\d{4}\)$", heading), heading
    assert "tight (oracle)" in table[1] and "key_slice" in table[1]
    run = finished_run(out["adome", "absolute"])
    mean = table[[line.split()[0] for line in table].index("mean")].split()
    assert float(mean[1]) == pytest.approx(run.data.metrics["test_dsc"], abs=5e-5)
    uri = f"sqlite:///{out['adome', 'absolute'] / 'mlflow.db'}"
    assert where["MLflow run"] == f"{run.info.run_id} in {uri}  (mlflow ui --backend-store-uri {uri})"
    assert Path(where["adapter"]) == out["adome", "absolute"] / "adapter_best"
    assert all(Path(p).exists() for p in where["pictures"].split(", ")) and "robustness.png" in where["pictures"]
    assert Path(where["record"]).name == "resolved_settings.json"

    heading, table, where = summary_of(ok(results["evaluate"]), "evaluate")
    assert heading.startswith("cobot-med evaluate finished in ") and "lora, tiny at 64 px" in heading
    assert where["MLflow run"].startswith("none") and Path(where["record"]) == out["evaluate"] / "evaluation.json"


def test_the_same_run_from_either_path_gives_the_same_scores(runs):
    out, _, _ = runs
    for name in DATASETS:
        relative, absolute = (finished_run(out[name, form]) for form in ("relative", "absolute"))
        assert relative.data.metrics["test_dsc"] == absolute.data.metrics["test_dsc"], name


def test_evaluate_and_inference_run_ids_score_the_adapter_as_training_did(runs):
    """``evaluate`` from another folder by the absolute path, ``inference`` from the root by the relative
    one: the adapter's test score, as the training run logged it."""
    out, results, _ = runs
    ok(results["evaluate"]), ok(results["inference"])
    test_dsc = finished_run(out["adome", "relative"]).data.metrics["test_dsc"]
    evaluation = json.loads((out["evaluate"] / "evaluation.json").read_text())
    assert evaluation["test_dsc"] == pytest.approx(test_dsc, abs=1e-6)
    metrics = json.loads((out["inference"] / "metrics.json").read_text())
    assert metrics["mean"]["all"]["dsc"] == pytest.approx(test_dsc, abs=1e-6)


def test_evaluate_scores_the_prompts_as_given_and_its_label_maps_say_so(runs):
    """``--prompts tight,jitter:0,...`` as typed: evaluation.json has a block per protocol under its name as given,
    each one's DSC is what its written label maps score, jitter:0 writes tight's maps; training (the default
    prompts) logged a metric per protocol and drew the robustness curve."""
    import nibabel as nib
    import numpy as np

    out, results, _ = runs
    ok(results["evaluate"])
    evaluation = json.loads((out["evaluate"] / "evaluation.json").read_text())
    names = PROMPTS.split(",")
    assert evaluation["prompts"] == names and list(evaluation["protocols"]) == names
    assert evaluation["protocols"]["tight"]["dsc"] == pytest.approx(evaluation["test_dsc"], abs=1e-6)
    labels = {case["case_id"]: case["label"] for case in
              json.loads((out["evaluate"] / "datalist.json").read_text())["test"]}
    for name in names:
        block, folder = evaluation["protocols"][name], out["evaluate"] / "test_predictions" / name
        assert block["cases"] and set(block["cases"]) <= set(labels)
        for case_id, organs in block["cases"].items():
            seg = np.asarray(nib.load(folder / f"{case_id}_seg.nii.gz").dataobj)
            reference = np.asarray(nib.load(labels[case_id]).dataobj)
            for row in organs.values():
                pred, ref = seg == row["label_id"], reference == row["label_id"]
                if pred.any() or ref.any():
                    assert row["dsc"] == pytest.approx(2 * (pred & ref).sum() / (pred.sum() + ref.sum()), abs=1e-9)
            if name == "jitter:0":
                tight = np.asarray(nib.load(out["evaluate"] / "test_predictions" / "tight" / f"{case_id}_seg.nii.gz").dataobj)
                assert np.array_equal(seg, tight)
    trained = finished_run(out["adome", "relative"]).data.metrics
    for name in ("jitter:10", "jitter:25", "jitter:50", "box3d:10", "key_slice"):
        assert f"test_dsc/{name}" in trained and f"test_dsc_liver/{name}" in trained
    assert (out["adome", "relative"] / "robustness.png").is_file()


def test_a_misspelled_setting_is_refused_by_name_in_either_form(runs, tmp_path):
    """``--epoch 2`` for ``--epochs 2`` used to train 25 epochs: refused with the nearest name, nothing written;
    the layered form (here in-process, as ``cobot-med`` runs it) refuses it alike."""
    from cobot_med.bundle import run_bundle
    from cobot_med.errors import SettingsError, project_error

    _, results, base = runs
    result = results["misspelled"]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[-1].startswith("cobot-med: unknown setting(s) ['epoch']") and "did you mean 'epochs'" in lines[-1]
    assert not (base / "misspelled").exists()
    with pytest.raises(Exception) as err:
        run_bundle("spleen", "training", dataset_dir=str(tmp_path), output_dir=str(tmp_path / "out"), epoch=2)
    ours = project_error(err.value)
    assert isinstance(ours, SettingsError) and "unknown setting(s) ['epoch']" in str(ours)
    assert "did you mean 'epochs'" in str(ours)
    assert not (tmp_path / "out").exists()
