"""``cobot-med sweep``: which pairs run, which are skipped as finished, and that a failure does not stop
the sweep. The bundle is replaced by a fake runner that logs runs the way the training bundle does
(docs/CONTRACTS.md) into a real MLflow SQLite store; one test runs real subprocesses."""

from __future__ import annotations

import json
import sys
import textwrap
import time

import pytest

from cobot_med import cli, sweep
from cobot_med.bundle import repository_root
from cobot_med.engine.tracking import ensure_experiment, find_finished_run
from cobot_med.sweep import bundle_settings, parse_methods, parse_overrides, parse_seeds, run_sweep

COMMON = str(repository_root() / "bundles" / "common.json")


def layers(config):
    """The ``--config_file`` value of a sweep's commands: the workflow, then the given bundle."""
    return repr([COMMON, str(config)])


def log_run(uri, dataset, peft, seed, status="FINISHED", tag="finished", arch="tiny", image_size=64, epochs=1):
    """A run as the training bundle logs it (params of the contract, the status tag when evaluated)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    name = f"cobot-med/{dataset}"
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    run_id = client.create_run(experiment_id).info.run_id
    params = {"dataset": dataset, "peft": peft, "seed": seed, "arch": arch, "image_size": image_size, "epochs": epochs}
    metrics = [Metric("test_dsc", 0.5, int(time.time() * 1000), 0)] if status == "FINISHED" else []
    client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()],
                     tags=[RunTag("cobot_med.status", tag)] if tag else [])
    if status != "RUNNING":
        client.set_terminated(run_id, status=status)
    return run_id


class FakeBundle:
    """Stands in for ``python -m monai.bundle run training``: logs an MLflow run per call, fails where told."""

    def __init__(self, fail=(), crash=()):
        self.fail, self.crash, self.commands, self.envs = set(fail), set(crash), [], []

    def __call__(self, command, env=None):
        command = list(command)
        self.commands.append(command)
        self.envs.append(env)
        assert command[1:5] == ["-m", "monai.bundle", "run", "training"]
        args = parse_overrides(command[5:])
        key = (args["peft"], int(args["seed"]))
        if key in self.crash:
            raise OSError("cannot start")
        failed = key in self.fail
        log_run(args["tracking_uri"], "adome", args["peft"], int(args["seed"]), status="FAILED" if failed else "FINISHED",
                tag=None if failed else "finished", arch=args.get("arch", "tiny"),
                image_size=int(args.get("image_size", 64)), epochs=int(args.get("epochs", 1)))
        return 1 if failed else 0


@pytest.fixture
def bundle(tmp_path):
    config = tmp_path / "adome.json"
    config.write_text(json.dumps({"dataset": "adome", "arch": "vit_b", "image_size": 1024, "epochs": 25,
                                  "network": "$@model", "lr": 1.25e-4}))
    return config


def _pairs(jobs):
    return [(job.peft, job.seed) for job in jobs]


@pytest.mark.slow  # ~2 s; the fast tier's time budget
@pytest.mark.timeout(60)
def test_sweep_skips_finished_and_goes_on_after_failures(tmp_path, bundle):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    overrides = ["--arch", "tiny", "--image_size", "64", "--epochs", "1", "--output_dir", str(out), "--amp", "false"]
    methods = ["lora", "adaptformer", "conv_lora"]
    fake = FakeBundle(fail={("adaptformer", 1)}, crash={("conv_lora", 0), ("conv_lora", 1)})
    lines = []
    result = run_sweep(bundle, methods, [0, 1], overrides, uri, runner=fake, log=lines.append)

    # seeds outer: every method has seed 0 before any has seed 1; nothing stopped after a failure
    assert [(c[8], c[10]) for c in fake.commands] == [
        ("lora", "0"), ("adaptformer", "0"), ("conv_lora", "0"), ("lora", "1"), ("adaptformer", "1"), ("conv_lora", "1")]
    assert fake.commands[0] == [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", layers(bundle),
                                "--peft", "lora", "--seed", "0", "--tracking_uri", uri, "--arch", "tiny",
                                "--image_size", "64", "--epochs", "1", "--amp", "false",
                                "--output_dir", str(out / "lora" / "seed0")]
    assert _pairs(result.ran) == [("lora", 0), ("adaptformer", 0), ("lora", 1)]
    assert [(job.peft, job.seed, reason) for job, reason in result.failed] == [
        ("conv_lora", 0, "OSError: cannot start"), ("adaptformer", 1, "exit status 1"),
        ("conv_lora", 1, "OSError: cannot start")]
    assert not result.ok and not result.skipped
    assert "adome/adaptformer on tiny seed 1: FAILED (exit status 1); going on" in "\n".join(lines)
    assert lines[-1].startswith("sweep: 3 ran, 0 skipped, 3 failed")

    # again: the finished pairs are skipped, the failed ones (a FAILED run in the store) run again
    fake = FakeBundle()
    result = run_sweep(bundle, methods, [0, 1], overrides, uri, runner=fake, log=lines.append)
    assert _pairs(job for job, _ in result.skipped) == [("lora", 0), ("adaptformer", 0), ("lora", 1)]
    assert _pairs(result.ran) == [("conv_lora", 0), ("adaptformer", 1), ("conv_lora", 1)]
    assert result.ok

    # a third time everything is there; at another input size nothing counts
    assert run_sweep(bundle, methods, [0, 1], overrides, uri, runner=FakeBundle(crash=set(_pairs(result.ran))),
                     log=lines.append).ok
    other = [o if o != "64" else "128" for o in overrides]
    dry = run_sweep(bundle, methods, [0, 1], other, uri, runner=None, dry_run=True, log=lines.append)
    assert not dry.skipped and not dry.ran and not dry.failed
    assert sum("would run" in line for line in lines[-8:]) == 6


def test_only_finished_and_evaluated_runs_count(tmp_path, bundle):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert find_finished_run(uri, "adome", "lora", 0) is None  # no store: none, and none created
    assert not (tmp_path / "mlflow.db").exists()
    log_run(uri, "adome", "lora", 0, status="RUNNING", tag=None)  # killed or still running
    log_run(uri, "adome", "lora", 0, status="FAILED", tag=None)
    log_run(uri, "adome", "lora", 0, tag=None)  # trained, but its evaluation never finished
    log_run(uri, "adome", "lora", 1)
    log_run(uri, "spleen", "lora", 0)
    assert find_finished_run(uri, "adome", "lora", 0) is None
    assert find_finished_run(uri, "adome", "lora+cobot", 1) is None
    done = log_run(uri, "adome", "lora", 0, arch="tiny", image_size=64, epochs=1)
    assert find_finished_run(uri, "adome", "lora", 0) == done
    assert find_finished_run(uri, "adome", "lora", 0, {"arch": "tiny", "image_size": 64, "epochs": None}) == done
    assert find_finished_run(uri, "adome", "lora", 0, {"arch": "vit_b"}) is None
    assert find_finished_run(uri, "adome", "lora", 0, {"epochs": 25}) is None
    # the bundle's own literal settings count when no override is given
    fake = FakeBundle()
    result = run_sweep(bundle, ["lora"], [0, 1], ["--arch", "tiny", "--image_size", "64", "--epochs", "1"], uri,
                       runner=fake, log=lambda _: None)
    assert [job.seed for job, _ in result.skipped] == [0, 1] and not fake.commands
    result = run_sweep(bundle, ["lora"], [0], [], uri, dry_run=True, log=lambda _: None)
    assert not result.skipped  # vit_b at 1024 for 25 epochs (the bundle's values) is not there


def test_real_subprocesses_and_exit_status(tmp_path, bundle, monkeypatch, capsys):
    """The default runner runs the command for real; the CLI exits 1 when a pair failed."""
    fake_python = tmp_path / "python"
    fake_python.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        args = sys.argv[1:]
        with open({str(tmp_path / 'calls.txt')!r}, "a") as f:
            f.write(" ".join(args) + "\\n")
        sys.exit(3 if args[args.index("--peft") + 1] == "adaptformer" else 0)
        """))
    fake_python.chmod(0o755)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_sweep(bundle, ["lora", "adaptformer"], [0], [], uri, python=str(fake_python), log=lambda _: None)
    assert _pairs(result.ran) == [("lora", 0)]
    assert [(job.peft, reason) for job, reason in result.failed] == [("adaptformer", "exit status 3")]
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[0].startswith(f"-m monai.bundle run training --config_file {layers(bundle)} --peft lora --seed 0")

    fake = FakeBundle(fail={("adaptformer", 0)})
    monkeypatch.setattr(sweep, "subprocess_runner", fake)
    argv = ["sweep", "--config", str(bundle), "--peft", "lora,adaptformer", "--seeds", "1", "--tracking-uri", uri,
            "--arch", "tiny", "--image-size", "64", "--epochs", "1", "--", "--lr", "1e-4"]
    assert cli.main(argv) == 1
    assert fake.commands[0][-10:-2] == ["--arch", "tiny", "--image_size", "64", "--epochs", "1", "--lr", "1e-4"]
    assert "adome/adaptformer on tiny seed 0: FAILED (exit status 1)" in capsys.readouterr().out
    fake.fail.clear()
    assert cli.main(argv) == 0  # lora skipped, adaptformer now finishes
    assert [c[8] for c in fake.commands] == ["lora", "adaptformer", "adaptformer"]
    assert cli.main(argv) == 0 and len(fake.commands) == 3
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(argv[:3] + ["--peft", "lora+cobot", "--dataset_dir", "data", "--output_dir", "o"]) == 0
    assert fake.commands[-1][-4:] == ["--dataset_dir", str(tmp_path / "data"), "--output_dir",
                                      str(tmp_path / "o" / "lora+cobot" / "seed0")]
    assert cli.main(["sweep", "--config", str(bundle), "--peft", "lora,nope"]) == 2
    assert "unknown PEFT method nope" in capsys.readouterr().err


def test_parsing(tmp_path):
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("0,2,5") == [0, 2, 5]
    assert parse_seeds("7,") == [7]
    for bad in ("0", "1,1", "x"):
        with pytest.raises(ValueError):
            parse_seeds(bad)
    assert parse_methods(["lora,adaptformer", "lora+cobot", "lora"]) == ["lora", "adaptformer", "lora+cobot"]
    assert parse_overrides(["--arch", "tiny", "--epochs=2", "--amp", "--image-size", "64"]) == {
        "arch": "tiny", "epochs": "2", "amp": "True", "image_size": "64"}
    yaml_config = tmp_path / "b.yaml"
    yaml_config.write_text("dataset: segrap\nimage_size: 256\nnetwork_def: '@model'\nexpr: $1+1\nlist: [1, 2]\n")
    assert bundle_settings([yaml_config]) == {"dataset": "segrap", "image_size": 256}
    jobs, _, match = sweep.plan_sweep(yaml_config, ["lora"], [4], ["--tracking_uri", "sqlite:///x.db",
                                                                   "--seed", "9", "--arch=tiny"])
    assert jobs[0].dataset == "segrap" and jobs[0].seed == 4
    assert match == {"arch": "tiny", "image_size": 256, "epochs": 25}  # epochs: the workflow's default
    assert list(jobs[0].command)[:-2] == [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                                          layers(yaml_config), "--peft", "lora", "--seed", "4", "--tracking_uri",
                                          "sqlite:///x.db", "--arch=tiny"]


def test_a_dataset_bundle_by_name(tmp_path, monkeypatch):
    """``--config spleen`` is the repository's layers, wherever the sweep is started; without a tracking URI the
    whole sweep shares one store under its output folder (the dataset's own folder under outputs/sweep/)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fake = FakeBundle()
    monkeypatch.setattr(sweep, "subprocess_runner", fake)
    monkeypatch.chdir(tmp_path)
    result = run_sweep("spleen", ["lora"], [0], ["--arch", "tiny"], log=lambda _: None)
    assert result.ok
    out = tmp_path / "outputs" / "sweep" / "spleen"
    assert fake.envs[0]["MLFLOW_TRACKING_URI"] == f"sqlite:///{out / 'mlflow.db'}"
    spleen = str(repository_root() / "bundles" / "spleen.json")
    assert fake.commands[0][5:] == ["--config_file", repr([COMMON, spleen]), "--peft", "lora", "--seed", "0",
                                    "--tracking_uri", f"sqlite:///{out / 'mlflow.db'}", "--arch", "tiny",
                                    "--output_dir", str(out / "lora" / "seed0")]


def test_ensure_experiment(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = ensure_experiment(uri, "segrap")
    assert ensure_experiment(uri, "segrap") == first
    assert MlflowClient(tracking_uri=uri).get_experiment(first).name == "cobot-med/segrap"
