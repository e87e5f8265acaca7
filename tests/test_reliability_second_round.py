"""Reliability, second round (issue 27): a rerun or resume never keeps a stale result, a prompt is never dropped
silently, the geometry written is the geometry read, flags that cannot apply are refused, secrets stay out of
what is written, one folder has one writer, and every error a user can act on is one named line.

Each class is tested by its mechanism and at least two cases."""

from __future__ import annotations

import errno
import json
import re
import shutil

import pytest
import torch

from cobot_med.adapter import CONFIG_NAME, AdapterError, load_adapter, save_adapter
from cobot_med.engine.session import CHECKPOINT_NAME, TrainingSession, epochs_done
from cobot_med.errors import CobotMedError, SettingsError, explain, run_at_edge
from cobot_med.model import ModelSpec, build_model
from cobot_med.settings import load_settings

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def settings_for(tmp_path, **values):
    values = {"arch": "tiny", "image_size": 64, "peft": "lora", "output_dir": str(tmp_path / "out"),
              "dataset_dir": str(tmp_path), "amp": "false", **values}
    return load_settings("adome", **values)


def network_of(settings):
    torch.manual_seed(0)
    return build_model(settings.model_spec(), settings.sam_checkpoint or None)


# --- 2: a resume refuses what it cannot continue --------------------------------------------------------


@pytest.fixture
def dataset(tmp_path, phantom_factory):
    """A writable copy of 5 small adome phantoms (Image/, Mask/)."""
    source = phantom_factory("adome", cases=5, seed=3, shape=(24, 24, 8))
    return shutil.copytree(source, tmp_path / "data")


def interrupted_run(settings, network, epochs=1):
    """A run's session and the resume.pt an interrupted training leaves (as ResumeCheckpoint saves it)."""
    from ignite.engine import Engine

    from cobot_med.data.dataset import resolve_datalist
    from cobot_med.engine.network import make_optimizer
    from cobot_med.handlers import ResumeCheckpoint

    session = TrainingSession.start(settings, network, split=resolve_datalist(settings))
    engine = Engine(lambda e, b: {"loss": torch.tensor(0.0)})
    ResumeCheckpoint(session, network, make_optimizer(network, settings)).attach(engine)
    engine.run([0, 1, 2], max_epochs=epochs)
    return session


@pytest.mark.parametrize("change, named", [
    ("add", "training: added Case_00004, Case_00099"),
    ("replace", "files changed Case_00002, Case_00003"),
    ("remove", "gone Case_00004"),
])
def test_a_resume_after_the_dataset_changed_is_refused_naming_the_cases(dataset, tmp_path, change, named):
    settings = settings_for(tmp_path, dataset_dir=str(dataset), val_fraction=0.2, test_fraction=0.2)
    network = network_of(settings)
    session = interrupted_run(settings, network)
    out = settings.output_path
    recorded = session.identity["split"]
    assert sorted(recorded) == ["test", "training", "validation"]
    assert all(len(row) == 3 and len(row[1]) == 64 and len(row[2]) == 64 for rows in recorded.values() for row in rows)
    written = (out / "datalist.json").read_text()
    assert TrainingSession.start(settings, network, split=_split(settings)).resuming  # unchanged: resumes

    images, labels = dataset / "Image", dataset / "Mask"
    if change == "add":  # a new case: the seeded shuffle redraws every split around it
        shutil.copy(images / "Case_00001_0000.nii.gz", images / "Case_00099_0000.nii.gz")
        shutil.copy(labels / "Case_00001.nii.gz", labels / "Case_00099.nii.gz")
    elif change == "replace":  # another scan under the same name: same ids, same split, other bytes
        shutil.copy(images / "Case_00002_0000.nii.gz", images / "tmp.nii.gz")
        shutil.copy(images / "Case_00003_0000.nii.gz", images / "Case_00002_0000.nii.gz")
        shutil.move(images / "tmp.nii.gz", images / "Case_00003_0000.nii.gz")
    else:
        (images / "Case_00004_0000.nii.gz").unlink()
        (labels / "Case_00004.nii.gz").unlink()
    with pytest.raises(SettingsError, match="belongs to a run with other settings") as err:
        TrainingSession.start(settings, network, split=_split(settings))
    assert "split: the cases differ (" in str(err.value) and named in str(err.value)
    assert (out / "datalist.json").read_text() == written  # the run's record of its split is kept


def _split(settings):
    from cobot_med.data.dataset import resolve_datalist

    return resolve_datalist(settings)


def test_the_epoch_check_reads_what_resume_pt_holds(tmp_path, dataset):
    """A checkpoint of 3 epochs refuses epochs=2 (it would end the run 'finished' with fewer epochs than it
    trained); epochs=3 or more resumes. Older checkpoints hold no epoch count: read from ignite's iteration."""
    settings = settings_for(tmp_path, dataset_dir=str(dataset), epochs=3)
    network = network_of(settings)
    interrupted_run(settings, network, epochs=3)
    state = torch.load(settings.output_path / CHECKPOINT_NAME, weights_only=True)
    assert "epoch" not in state["trainer"]  # what ignite saves: iteration and epoch_length
    assert epochs_done(state) == 3
    with pytest.raises(SettingsError, match="has trained 3 epochs already, more than epochs=2"):
        TrainingSession.start(settings_for(tmp_path, dataset_dir=str(dataset), epochs=2), network,
                              split=_split(settings))
    assert TrainingSession.start(settings_for(tmp_path, dataset_dir=str(dataset), epochs=4), network,
                                 split=_split(settings)).resuming
    older = {k: v for k, v in state.items() if k != "epochs_done"}
    assert epochs_done(older) == state["trainer"]["iteration"] // state["trainer"]["epoch_length"] == 3
    torch.save(older, settings.output_path / CHECKPOINT_NAME)
    with pytest.raises(SettingsError, match="has trained 3 epochs already, more than epochs=1"):
        TrainingSession.start(settings_for(tmp_path, dataset_dir=str(dataset), epochs=1), network,
                              split=_split(settings))


# --- 8: errors a user can act on are one named line -----------------------------------------------------


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model"].update(peft="adaptformer"), "do not fit the method adaptformer"),
    (lambda c: c["model"].update(peft="adaptformer", peft_options={}), "weights of another method"),
    (lambda c: c["model"].update(peft="ssf", peft_options={}), "weights of another method"),
])
def test_an_adapter_whose_config_names_another_method_is_an_adapter_error(tmp_path, edit, message):
    folder = save_adapter(build_model(ModelSpec("tiny", 64, "lora")), tmp_path / "adapter")
    config = json.loads((folder / CONFIG_NAME).read_text())
    edit(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=message) as err:
        load_adapter(folder)
    line, status = explain(err.value)
    assert status == 2 and str(folder) in line and "\n" not in line


@pytest.mark.parametrize("content, message", [
    (b"hello\n", "not a readable PyTorch checkpoint (truncated or not a PyTorch file"),
    ("malicious", "holds Python objects other than tensors"),
    (b"", "the file is empty"),
])
def test_a_bad_sam_checkpoint_is_a_project_error(tmp_path, content, message):
    """It was a ValueError, so a training run buried the refusal in MONAI's traceback."""
    import os

    from cobot_med.sam import CheckpointError, load_sam_checkpoint

    path = tmp_path / "sam.pth"
    if content == "malicious":
        torch.save({"x": os.system}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(message)) as err:
        load_sam_checkpoint(build_model(ModelSpec("tiny", 64, "frozen")).sam, path)
    assert isinstance(err.value, CobotMedError) and explain(RuntimeError("wrapped")) is None
    wrapped = RuntimeError("Failed to instantiate component")  # what MONAI raises around it
    wrapped.__cause__ = err.value
    assert explain(wrapped)[0].startswith(str(path))


@pytest.mark.parametrize("seeds, message", [
    ("a,b", "--seeds must be a number, got 'a'"),
    ("1,x", "--seeds must be a number, got 'x'"),
    ("2.5", "--seeds (a count) must be a whole number, got '2.5'"),
    ("0,-1", "--seeds must be >= 0, got '-1'"),
])
def test_seeds_that_are_not_numbers_are_named(capsys, seeds, message):
    from cobot_med.cli import main

    assert main(["sweep", "--config", "adome", "--peft", "lora", "--seeds", seeds, "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert err == f"cobot-med: {message}\n"


@pytest.mark.parametrize("raised, line, status", [
    (OSError(errno.ENOSPC, "No space left on device", "/out/resume.pt"), "no space left on the device writing /out/resume.pt", 1),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "no space left on the device (Disk quota exceeded)", 1),
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: No space left on device"),
     "no space left on the device", 1),
    (KeyboardInterrupt(), "interrupted", 130),
    (SettingsError("postgresql://bob:s3cret@db/mlflow: cannot connect"), "postgresql://bob:***@db/mlflow", 2),
])
def test_the_edge_says_what_a_user_can_act_on_in_one_line(capsys, raised, line, status):
    def main():
        try:
            raise raised
        except BaseException as err:  # as the engines do: the error arrives wrapped
            raise RuntimeError("applying transform / engine run") from err

    assert run_at_edge(main) == status
    err = capsys.readouterr().err
    assert err.startswith("cobot-med: ") and line in err and err.count("\n") == 1 and "s3cret" not in err


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        run_at_edge(lambda: 1 / 0)


def test_an_engine_error_is_not_logged_again_by_the_engines(caplog):
    """MONAI's StatsHandler logs every exception's traceback and ignite logs 'terminating' per engine: for an
    error the edge says in one line, neither appears (OneLineErrors, attached first)."""
    import logging

    from ignite.engine import Engine, Events
    from monai.handlers import StatsHandler

    from cobot_med.handlers import OneLineErrors

    def fail_with(err):
        engine = Engine(lambda e, b: None)
        OneLineErrors().attach(engine)
        StatsHandler(name=None, iteration_log=False).attach(engine)

        @engine.on(Events.ITERATION_COMPLETED)
        def _(e):
            raise err

        caplog.clear()
        with caplog.at_level(logging.INFO):
            with pytest.raises(type(err)):
                engine.run([0], max_epochs=1)
        return [r for r in caplog.records if r.levelno >= logging.ERROR]

    assert fail_with(SettingsError("bad")) == []
    assert fail_with(OSError(errno.ENOSPC, "No space left on device")) == []
    assert fail_with(KeyboardInterrupt()) == []
    bug = fail_with(ZeroDivisionError("a bug"))  # a bug: ignite's lines stay, its traceback comes once, at the edge
    assert bug and all("terminating due to exception: a bug" in r.getMessage() and not r.exc_info for r in bug)
