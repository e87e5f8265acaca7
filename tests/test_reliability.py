"""Bad settings, bad files and reruns (issue 15): one named line, the right exit status, nothing lost, and never
another run's model or score reported as this run's."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest
import torch

from cobot_med.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterError, load_adapter, load_adapter_weights, save_adapter
from cobot_med.bundle import repository_root
from cobot_med.cli import main
from cobot_med.engine.session import CHECKPOINT_NAME, TrainingSession, identity
from cobot_med.errors import SettingsError
from cobot_med.model import ModelSpec, build_model
from cobot_med.sam import build_sam
from cobot_med.settings import load_settings

ROOT = repository_root()


def settings_for(tmp_path, **values):
    values = {"arch": "tiny", "image_size": 64, "peft": "lora", "output_dir": str(tmp_path / "out"),
              "dataset_dir": str(tmp_path), **values}
    return load_settings("spleen", **values)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 'checkpoint' of the tiny SAM (a plain state dict, like Meta's files) and a second, different one."""
    folder = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    torch.save(build_sam("tiny", 64).state_dict(), folder / "a.pth")
    torch.manual_seed(1)
    torch.save(build_sam("tiny", 64).state_dict(), folder / "b.pth")
    return folder / "a.pth", folder / "b.pth"


def network_of(settings):
    torch.manual_seed(0)
    return build_model(settings.model_spec(), settings.sam_checkpoint or None)


# --- A: reruns and resumes never report another run's results ---------------------------------------------


@pytest.mark.parametrize("text, value", [("false", False), ("False", False), ("0", False), ("no", False),
                                         ("true", True), ("yes", True)])
def test_every_yes_no_setting_goes_through_one_parser(tmp_path, text, value):
    settings = settings_for(tmp_path, resume=text, val_at_start=text, merge_adapters=text)
    assert settings.resume is value and settings.val_at_start is value and settings.merge_adapters is value


def test_amp_false_is_fp32_and_not_a_crash(tmp_path):
    from cobot_med.engine.amp import resolve_precision

    settings = settings_for(tmp_path, amp="false")
    precision = resolve_precision(settings.amp, "cpu")
    assert settings.amp == "fp32" and precision.dtype is torch.float32 and not precision.grad_scaler
    with pytest.raises(SettingsError, match="amp must be one of"):
        settings_for(tmp_path, amp="maybe")


def write_checkpoint(settings, network, out, **extra):
    out.mkdir(parents=True, exist_ok=True)
    state = {"identity": identity(settings, network.spec.image_size, network.base_sha256, network.recipe,
                                  spec=network.spec), "run_key": "old00000",
             "run_name": "spleen-lora-tiny-64-seed0-old00000", "trainer": {"epoch": 1, "max_epochs": 25},
             "optimizer": {}, "adapter": {}, "finished": False, **extra}
    torch.save(state, out / CHECKPOINT_NAME)


@pytest.mark.parametrize("changed, named", [
    (dict(peft="lora+cobot"), "peft: 'lora' there, 'lora\\+cobot' now"),
    (dict(seed=1), "seed: 0 there, 1 now"),
    (dict(image_size=128), "image_size: 64 there, 128 now"),
    (dict(sam_checkpoint="b"), "sam_checkpoint_sha256"),
])
def test_a_resume_with_other_settings_is_refused_naming_them(tmp_path, base, changed, named):
    first = settings_for(tmp_path, sam_checkpoint=str(base[0]))
    write_checkpoint(first, network_of(first), first.output_path)
    values = {**changed, "sam_checkpoint": str(base[1] if changed.get("sam_checkpoint") else base[0])}
    second = settings_for(tmp_path, **values)
    with pytest.raises(SettingsError, match=named):
        TrainingSession.start(second, network_of(second))
    assert not (second.output_path / "resolved_settings.json").exists()  # nothing written before the refusal


def test_a_resume_whose_amp_resolves_to_another_dtype_is_refused(tmp_path):
    """amp=auto is fp32 on an AVX2 CPU and bf16 on an AMX one: the identity holds the dtype that ran, so a
    resume on a machine that resolves auto otherwise is refused, not switched from fp32 to bf16 mid-run."""
    from cobot_med.engine.precision import Precision

    settings = settings_for(tmp_path)
    network = network_of(settings)
    bf16, fp32 = Precision("auto", torch.bfloat16, "test: fast bf16"), Precision("auto", torch.float32, "test: none")
    ident = identity(settings, network.spec.image_size, network.base_sha256, network.recipe, bf16, spec=network.spec)
    assert ident["amp"] == "bf16"
    write_checkpoint(settings, network, settings.output_path, identity=ident)
    with pytest.raises(SettingsError, match="amp: 'bf16' there, 'fp32' now"):
        TrainingSession.start(settings, network, fp32)
    assert TrainingSession.start(settings, network, bf16).resuming  # where it resolves alike: resumed
    # a checkpoint written before the dtype was recorded holds the setting: compared as a setting
    write_checkpoint(settings, network, settings.output_path, identity={**ident, "amp": "auto"})
    assert TrainingSession.start(settings, network, fp32).resuming
    with pytest.raises(SettingsError, match="amp: 'auto' there, 'fp32' now"):
        TrainingSession.start(settings_for(tmp_path, amp="false"), network, fp32)


def test_a_matching_resume_continues_the_same_run_and_a_finished_one_is_not_reopened(tmp_path):
    settings = settings_for(tmp_path)
    network = network_of(settings)
    write_checkpoint(settings, network, settings.output_path)
    session = TrainingSession.start(settings, network)
    assert session.resuming and session.run_key == "old00000" and session.run_name.endswith("-old00000")
    write_checkpoint(settings, network, settings.output_path, finished=True)
    with pytest.raises(SettingsError, match="holds a finished run"):
        TrainingSession.start(settings, network)


def test_a_fresh_run_never_reuses_another_runs_results(tmp_path):
    settings = settings_for(tmp_path, resume="false")
    network = network_of(settings)
    out = settings.output_path
    save_adapter(network, out / "adapter_best", extra={"run_key": "old00000", "metric": {"val_dsc": 0.99}})
    write_checkpoint(settings, network, out)
    with pytest.raises(SettingsError, match=r"holds another run's results \(adapter_best, resume.pt\) and resume is off"):
        TrainingSession.start(settings, network)
    assert (out / "adapter_best").is_dir()  # nothing lost
    fresh = TrainingSession.start(settings_for(tmp_path, resume="false", overwrite="true"), network)
    assert not fresh.resuming and fresh.run_key != "old00000" and not (out / "adapter_best").exists()
    # another seed in the same folder, resume on: the checkpoint's identity differs -> refused
    write_checkpoint(settings, network, out)
    with pytest.raises(SettingsError, match="seed: 0 there, 1 now"):
        TrainingSession.start(settings_for(tmp_path, seed=1), network_of(settings_for(tmp_path, seed=1)))


def test_the_test_split_is_scored_only_with_this_runs_best_adapter(tmp_path):
    import types

    from cobot_med.engine.workflow import test_best_adapter

    settings = settings_for(tmp_path)
    network = network_of(settings)
    save_adapter(network, settings.output_path / "adapter_best", extra={"run_key": "someone"})
    session = types.SimpleNamespace(run_key="mine")
    with pytest.raises(AdapterError, match="written by another run"):
        test_best_adapter(network, session, settings, evaluator=None)


def test_an_evaluation_of_another_model_is_not_overwritten(tmp_path):
    """Zero-shot at another input size is another model: its evaluation.json is kept unless overwrite is on."""
    import types

    from cobot_med.engine.workflow import evaluate_adapter

    def evaluate(**values):
        settings = settings_for(tmp_path, peft="frozen", **values)
        evaluator = types.SimpleNamespace(run=lambda: None, state=types.SimpleNamespace(metrics={"test_dsc": 0.5}))
        evaluate_adapter(network_of(settings), settings, evaluator)
        return json.loads((settings.output_path / "evaluation.json").read_text())["adapter"]

    assert evaluate()["image_size"] == 64
    assert evaluate()["recipe"]["image_size"] == 64  # the same model again: its own file, rewritten
    with pytest.raises(AdapterError, match="holds the evaluation of another model"):
        evaluate(image_size=128)
    assert evaluate(image_size=128, overwrite="true")["image_size"] == 128


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable resume checkpoint"),
    (b"PK\x03\x04 truncated zip", "not a readable resume checkpoint"),
    ("malicious", "not a readable resume checkpoint"),
    ("a list", "not a cobot-med resume checkpoint"),
])
def test_an_unusable_resume_checkpoint_is_named_with_what_to_do(tmp_path, content, message):
    settings = settings_for(tmp_path)
    path = settings.output_path / CHECKPOINT_NAME
    path.parent.mkdir(parents=True)
    if content == "malicious":
        torch.save({"identity": os.system}, path)  # would run code if unpickled without weights_only
    elif content == "a list":
        torch.save([1, 2], path)
    else:
        path.write_bytes(content)
    with pytest.raises(SettingsError, match=f"{path}: {message}.*overwrite"):
        TrainingSession.start(settings, network_of(settings))


def test_flipped_bytes_in_adapter_weights_are_found(tmp_path, base):
    network = build_model(ModelSpec("tiny", 64, "lora"), base[0])
    folder = save_adapter(network, tmp_path / "adapter")
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert len(config["weights_sha256"]) == 64
    weights = folder / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one tensor value changes; the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="SHA-256 differs from the one recorded"):
        load_adapter(folder, base[0])


def test_an_adapter_loads_only_onto_its_own_base(tmp_path, base):
    trained = build_model(ModelSpec("tiny", 64, "lora"), base[0])
    folder = save_adapter(trained, tmp_path / "adapter")
    other = build_model(ModelSpec("tiny", 64, "lora"), base[1])
    with pytest.raises(AdapterError, match="trained on the checkpoint with sha256"):
        load_adapter_weights(other, folder)
    load_adapter_weights(build_model(ModelSpec("tiny", 64, "lora"), base[0]), folder)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model"].update(peft="lora-cobot"), "unknown PEFT method 'lora-cobot'"),
    (lambda c: c["model"].update(arch="vit_q"), "unknown arch 'vit_q'"),
    (lambda c: c["model"].update(image_size="big"), "cannot be built"),
    (lambda c: c["model"].update(colour="blue"), r"unknown model field\(s\) \['colour'\]"),
])
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_edited_adapter_config_exits_2_with_one_line(tmp_path, capsys, edit, message):
    folder = save_adapter(build_model(ModelSpec("tiny", 64, "lora")), tmp_path / "adapter")
    config = json.loads((folder / CONFIG_NAME).read_text())
    edit(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=message):
        load_adapter(folder)
    images = tmp_path / "images"
    images.mkdir()
    code = main(["infer", "--config", "adome", "--input", str(images), "--output", str(tmp_path / "o"),
                 "--adapter", str(folder), "--labels", str(images)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("cobot-med: ") and "Traceback" not in err


def test_infer_never_silently_replaces_another_models_cases(tmp_path, phantom_factory):
    from cobot_med.inference.cases import InputError
    from test_inference import BoxFiller, infer, perfect

    root = phantom_factory("adome", cases=2, seed=5, shape=(40, 36, 12))
    images, labels = root / "Image", root / "Mask"
    out = tmp_path / "out"
    first = infer(images, out, network=perfect(images, labels), labels_dir=labels)
    assert len(first.done) == 2
    # a corrupt per-case metrics file is redone, not a traceback
    metrics = sorted(out.glob("*_metrics.json"))[0]
    metrics.write_text("{not json")
    again = infer(images, out, network=perfect(images, labels), labels_dir=labels)
    assert len(again.done) == 1 and len(again.skipped) == 1
    # another model's segmentations are there: refused before any work, naming them (issue 27)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(InputError, match=r"holds segmentations another model made \(2 case\(s\): Case_00001_0000, "
                                         r"Case_00002_0000; made by custom/PerfectSam"):
        infer(images, out, network=BoxFiller([5.0] * 4), labels_dir=labels)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    messages = []
    other = infer(images, out, network=BoxFiller([5.0] * 4), labels_dir=labels, log=messages.append, overwrite=True)
    assert len(other.done) == 2 and not other.skipped  # --overwrite: redone
    assert any("redone, it was made by another model" in m for m in messages)
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*_prompts.json"))]
    assert all(r["model"]["peft"] == "BoxFiller" for r in records)


# --- B: bad settings are refused at the start, with their name ---------------------------------------------


@pytest.mark.parametrize("values, message", [
    (dict(lr=-1e-3), "lr must be > 0"),
    (dict(lr="nan"), "lr must be a finite number"),
    (dict(cobot_lr="inf"), "cobot_lr must be a finite number"),
    (dict(lr="abc"), "lr must be a number, got 'abc'"),
    (dict(image_size=0), "image_size must be >= 1"),
    (dict(image_size=100000), "image_size must be >= 1 and <= 4096"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(eval_batch_size=0), "eval_batch_size must be >= 1"),
    (dict(nsd_tolerance_mm=-1), "nsd_tolerance_mm must be > 0"),
    (dict(infer_organs="heart"), r"unknown organs \['heart'\]"),
    (dict(peft_options="{bad json"), "peft_options must be a JSON object"),
    (dict(peft_options={"rank": 0}), "peft_options for lora: lora rank must be >= 1"),
    (dict(val_fraction=0.6, test_fraction=0.5), "must leave cases to train on"),
    (dict(layout="abdomen"), "unknown layout 'abdomen'"),
])
def test_bad_settings_fail_at_once_naming_the_setting(tmp_path, values, message):
    with pytest.raises(SettingsError, match=message):
        settings_for(tmp_path, **values)


def test_machine_dependent_settings_are_checked_before_any_work(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(SettingsError, match="device 'cuda': this machine has no CUDA GPU"):
            settings_for(tmp_path, device="cuda").check("training")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SettingsError, match="is a file, not a folder"):
        settings_for(tmp_path, output_dir=str(tmp_path / "a_file" / "out")).check("training")
    for uri, message in (("http://127.0.0.1:9", "no MLflow server answers"), ("garbage://x", "not a tracking store"),
                         ("relative/folder", "no longer supports plain folders")):
        started = time.perf_counter()
        with pytest.raises(SettingsError, match=message):
            settings_for(tmp_path, tracking_uri=uri).check("training")
        assert time.perf_counter() - started < 30  # not minutes of retries
    not_a_db = tmp_path / "notes.db"
    not_a_db.write_text("hello")
    with pytest.raises(SettingsError, match="is not a SQLite database"):
        settings_for(tmp_path, tracking_uri=f"sqlite:///{not_a_db}").check("training")


def test_bad_datalists_are_refused_naming_the_file(tmp_path, caplog, phantom_factory):
    from cobot_med.data.datalist import load_datalist
    from cobot_med.data.validation import DataError

    root = phantom_factory("spleen", cases=3, seed=2, shape=(32, 32, 12))
    image, label = str(root / "imagesTr" / "spleen_0.nii.gz"), str(root / "labelsTr" / "spleen_0.nii.gz")
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": [{"label": label}]}))
    with pytest.raises(DataError, match="item 0 of 'training' has no 'image'"):
        load_datalist(path)
    path.write_text(json.dumps({"training": [{"image": image, "label": label}] * 2}))
    with pytest.raises(DataError, match=r"case ids \['spleen_0'\] appear more than once"):
        load_datalist(path)
    path.write_text(json.dumps({"training": [{"image": image, "label": label}],
                                "test": [{"image": image, "label": label}]}))
    load_datalist(path)
    assert "cases in more than one split" in caplog.text and "spleen_0 (training and test)" in caplog.text


def test_a_boxes_file_of_booleans_is_refused(tmp_path):
    from cobot_med.predict import BoxFile, PromptError

    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"space": "voxel", "cases": {"a": {"liver": {"box3d": [True] * 6}}}}))
    with pytest.raises(PromptError, match="must be 6 finite numbers"):
        BoxFile(path, {"liver": 1})


# --- C: the right message, not buried --------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["make-phantoms", "--layout", "adome", "--out", "{tmp}/p", "--shape", "0", "0", "0"], "at least 8 voxels"),
    (["make-phantoms", "--layout", "adome", "--out", "{tmp}/file"], "is a file, not a folder"),
    (["datalist", "--layout", "adome", "--data", "{tmp}", "--out", "{tmp}"], "is a folder; give the datalist"),
    (["sweep", "--config", "adome", "--peft", ","], "--peft names no method"),
    (["sweep", "--config", "nowhere/else.json", "--peft", "lora"], "bundle config nowhere/else.json not found"),
    (["compare", "--tracking-uri", "garbage://x"], "not a tracking store"),
    (["compare", "--tracking-uri", "sqlite:///{tmp}/file"], "is not a SQLite database"),
    (["compare", "--tracking-uri", "sqlite:///{tmp}/none.db"], "no MLflow tracking store"),
    (["compare", "--out", "{tmp}/file"], "is a file, not a folder"),
])
def test_commands_fail_with_one_named_line(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cobot-med: ") and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing left behind


def test_debug_keeps_the_traceback():
    with pytest.raises(SettingsError, match="--peft names no method"):
        main(["--debug", "sweep", "--config", "adome", "--peft", ","])
    os.environ.pop("COBOT_MED_DEBUG", None)


@pytest.mark.slow
@pytest.mark.timeout(300)  # 14 s alone: two bundle runs in subprocesses
def test_a_bundle_run_ends_in_one_named_line(tmp_path):
    layers = repr([str(ROOT / "bundles" / "common.json"), str(ROOT / "bundles" / "adome.json")])
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", layers,
               "--dataset_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--arch", "tiny", "--lr", "-1"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COBOT_MED_DEBUG": ""})
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == "cobot-med: lr must be > 0 and <= 1, got -1"
    assert "Traceback" not in result.stderr
    alone = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(ROOT / "bundles" / "adome.json"),
             "--dataset_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--arch", "tiny", "--lr", "-1"]
    result = subprocess.run(alone, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COBOT_MED_DEBUG": ""})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and lines[-1] == "cobot-med: lr must be > 0 and <= 1, got -1"
    assert "Traceback" not in result.stderr


def test_a_crash_marks_the_open_mlflow_run_failed(tmp_path):
    import mlflow

    from cobot_med.engine import tracking
    from cobot_med.errors import run_at_edge

    settings = settings_for(tmp_path)
    session = TrainingSession.start(settings, network_of(settings))
    store = tracking.client(session.tracking_uri)
    experiment = store.create_experiment(session.experiment)
    run = store.create_run(experiment, run_name=session.run_name)

    def crash():
        raise SettingsError("something went wrong")

    assert run_at_edge(crash) == 2
    assert mlflow.MlflowClient(session.tracking_uri).get_run(run.info.run_id).info.status == "FAILED"


def test_outputs_follow_the_users_umask(tmp_path):
    from cobot_med.data.datalist import write_datalist

    previous = os.umask(0o022)
    try:
        folder = save_adapter(build_model(ModelSpec("tiny", 64, "lora")), tmp_path / "adapter")
        path = write_datalist({"training": []}, tmp_path / "datalist.json")
    finally:
        os.umask(previous)
    for file in (folder / WEIGHTS_NAME, folder / CONFIG_NAME, path):
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file
