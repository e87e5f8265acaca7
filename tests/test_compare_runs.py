"""compare over real tiny training runs: two methods x two seeds on phantoms, plus one killed part-way."""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from cobot_med.cli import main
from cobot_med.compare import load_runs, summarize
from cobot_med.data.phantoms import make_phantoms
from cobot_med.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # sweep-then-compare: 44 s alone; 600 s was hit when shared


def killed_once_running(uri):
    """A sweep runner that starts the real command and kills it once its MLflow run is open (a lost machine)."""

    def run(command, env=None):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            experiment = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("cobot-med/spleen")
            runs = mlflow.MlflowClient(tracking_uri=uri).search_runs(
                [experiment.experiment_id], filter_string="params.peft = 'conv_lora'") if experiment else []
            if runs:
                break
            time.sleep(0.2)
        proc.kill()
        return proc.wait()

    return run


def test_sweep_then_compare_on_real_runs(tmp_path, capsys):
    data = make_phantoms("spleen", tmp_path / "spleen", cases=5, seed=2)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    common = ["--dataset_dir", str(data), "--arch", "tiny", "--image_size", "64", "--epochs", "1",
              "--eval_batch_size", "16"]
    result = run_sweep(ROOT / "bundles" / "spleen.json", ["lora", "lora+cobot"], [0, 1],
                       common + ["--output_dir", str(tmp_path / "out")], tracking_uri=uri)
    assert result.ok and len(result.ran) == 4
    # a run killed after its MLflow run opened
    broken = run_sweep(ROOT / "bundles" / "spleen.json", ["conv_lora"], [0],
                       common + ["--output_dir", str(tmp_path / "broken")], tracking_uri=uri,
                       runner=killed_once_running(uri))
    assert len(broken.failed) == 1
    # a rerun skips the finished pairs
    again = run_sweep(ROOT / "bundles" / "spleen.json", ["lora"], [0, 1],
                      common + ["--output_dir", str(tmp_path / "out")], tracking_uri=uri)
    assert len(again.skipped) == 2 and not again.ran

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("cobot-med/spleen")
    logged = {}
    for run in client.search_runs([experiment.experiment_id]):
        if run.info.status == "FINISHED":
            logged.setdefault(run.data.params["peft"], []).append(run.data.metrics["test_dsc"] * 100)

    out = tmp_path / "report"
    assert main(["compare", "--tracking-uri", uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = summarize(load_runs(uri))
    for method, values in logged.items():
        row = summary.methods[summary.methods["peft"] == method].iloc[0]
        assert math.isclose(row["spleen_mean"], np.mean(values), abs_tol=1e-6)
        assert math.isclose(row["spleen_std"], np.std(values, ddof=1), abs_tol=1e-6)
        assert f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}" in printed
    left_out = summary.left_out
    assert len(left_out) >= 1 and "conv_lora" in set(left_out["peft"])
    assert "conv_lora" in printed.split("Runs left out")[-1]
    assert (out / "dsc_vs_params.png").stat().st_size > 1000 and (out / "organ_dsc.png").stat().st_size > 1000
