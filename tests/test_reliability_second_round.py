"""Reliability, second round (issue 27): a rerun or resume never keeps a stale result, a prompt is never dropped
silently, the geometry written is the geometry read, flags that cannot apply are refused, secrets stay out of
what is written, one folder has one writer, and every error a user can act on is one named line.

Each class is tested by its mechanism and at least two cases."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from cobot_med.adapter import CONFIG_NAME, AdapterError, load_adapter, save_adapter
from cobot_med.engine.session import CHECKPOINT_NAME, TrainingSession, epochs_done
from cobot_med.errors import CobotMedError, SettingsError, explain, run_at_edge
from cobot_med.model import ModelSpec, build_model
from cobot_med.settings import load_settings

from test_docker import postgres_store  # noqa: F401 - a fresh database on COBOT_MED_TEST_POSTGRES_URI's server

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
    pytest.param("add", "training: added Case_00004, Case_00099", marks=[pytest.mark.slow, pytest.mark.timeout(120)]),
    ("replace", "files changed Case_00002, Case_00003"),
    pytest.param("remove", "gone Case_00004", marks=[pytest.mark.slow, pytest.mark.timeout(120)]),
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
    (RuntimeError("(sqlite3.OperationalError) database or disk is full"), "no space left on the device", 1),
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


# --- 1: a rerun of infer redoes exactly the cases whose record differs, and says why --------------------


@pytest.fixture
def scans(tmp_path, phantom_factory):
    """Two small adome phantoms (RAS and LPS storage), writable: (images, labels)."""
    root = shutil.copytree(phantom_factory("adome", cases=2, seed=6, shape=(24, 24, 8)), tmp_path / "scans")
    return root / "Image", root / "Mask"


def rerun(images, out, network=None, **values):
    """``cobot-med infer`` in-process (test_inference.infer) with a box-filling model; (report, {case: why redone})."""
    from test_inference import BoxFiller, infer

    messages = []
    report = infer(images, out, network=network or BoxFiller([5.0] * 4), log=messages.append, **values)
    redone = {m.split(": redone, ")[0]: m.split(": redone, ")[1] for m in messages if ": redone, " in m}
    return report, redone


def rewrite(path, change):
    """Rewrite a NIfTI file with ``change(data)``, keeping its header."""
    import nibabel as nib
    import numpy as np

    image = nib.load(str(path))
    data = np.asarray(image.dataobj).copy()
    change(data)
    nib.save(nib.Nifti1Image(data, image.affine, image.header), str(path))


def test_a_rerun_redoes_exactly_the_cases_whose_record_differs(scans, tmp_path):
    images, labels = scans
    out = tmp_path / "out"
    first, _ = rerun(images, out, labels_dir=labels)
    assert len(first.done) == 2
    same, redone = rerun(images, out, labels_dir=labels)
    assert len(same.skipped) == 2 and redone == {}
    before = json.loads((out / "Case_00002_0000_metrics.json").read_text())["organs"]["liver"]

    rewrite(labels / "Case_00002.nii.gz", lambda d: d.__setitem__(d == 1, 0))  # the liver taken out of a label
    report, redone = rerun(images, out, labels_dir=labels)
    assert redone == {"Case_00002_0000": "its reference label changed"} and len(report.skipped) == 1
    after = json.loads((out / "Case_00002_0000_metrics.json").read_text())["organs"]["liver"]
    assert before["reference_voxels"] > 0 and after["reference_voxels"] == 0  # the new label's scores
    assert json.loads((out / "metrics.json").read_text())["cases"]["Case_00002_0000"]["liver"] == after

    rewrite(images / "Case_00001_0000.nii.gz", lambda d: d.__iadd__(1))  # another scan under the same name
    report, redone = rerun(images, out, labels_dir=labels)
    assert redone == {"Case_00001_0000": "its input file changed"} and len(report.done) == 1


@pytest.mark.parametrize("first, second, why", [
    (dict(nsd_tolerance_mm=2.0), dict(nsd_tolerance_mm=10.0), "nsd_tolerance_mm 2.0 -> 10.0"),
    (dict(), dict(probability_maps=True), "other outputs were asked for (+prob_kidney, +prob_liver)"),
    pytest.param(dict(probability_maps=True), dict(), None,  # fewer outputs than the case has: still its own
                 marks=[pytest.mark.slow, pytest.mark.timeout(120)]),
    pytest.param(dict(infer_organs="liver"), dict(), "other organs were asked for",
                 marks=[pytest.mark.slow, pytest.mark.timeout(120)]),
])
def test_a_setting_that_changes_an_output_redoes_every_case(scans, tmp_path, first, second, why):
    images, labels = scans
    out = tmp_path / "out"
    scored = "nsd_tolerance_mm" in first  # the metrics need labels; the other settings run from boxes (faster)
    source = dict(labels_dir=labels) if scored else dict(boxes_file=_whole_boxes(tmp_path, ["Case_00001_0000",
                                                                                          "Case_00002_0000"]))
    organs = {"infer_organs": "liver,kidney"}
    rerun(images, out, **{**source, **organs, **first})
    report, redone = rerun(images, out, **{**source, **organs, **second})
    if why is None:
        assert len(report.skipped) == 2 and redone == {}
    else:
        assert len(report.done) == 2 and set(redone.values()) == {why}
    if scored:
        assert json.loads((out / "metrics.json").read_text())["nsd_tolerance_mm"] == 10.0
        assert all(json.loads(p.read_text())["nsd_tolerance_mm"] == 10.0 for p in out.glob("*_metrics.json"))
    maps = sorted(p.name for p in out.glob("Case_00001_0000_prob_*.nii.gz"))
    assert maps == (["Case_00001_0000_prob_kidney.nii.gz", "Case_00001_0000_prob_liver.nii.gz"]
                    if second.get("probability_maps") or first.get("probability_maps") else [])
    if "infer_organs" in first:
        record = json.loads((out / "Case_00001_0000_prompts.json").read_text())
        assert set(record["organs"]) == {"liver", "kidney"}
    assert rerun(images, out, **{**source, **organs, **second})[1] == {}  # and then it is done


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_boxes_entry_that_changed_redoes_only_its_case(scans, tmp_path):
    images, _ = scans
    boxes = tmp_path / "boxes.json"
    cases = {f"Case_0000{n}_0000": {"liver": {"box3d": [2, 2, 1, 12, 12, 5]}} for n in (1, 2)}
    boxes.write_text(json.dumps({"space": "voxel", "cases": cases}))
    out = tmp_path / "out"
    assert len(rerun(images, out, boxes_file=boxes, infer_organs="liver")[0].done) == 2
    cases["Case_00001_0000"]["liver"]["box3d"] = [3, 2, 1, 12, 12, 5]
    cases["Case_00002_0000"]["spleen"] = {"box3d": [2, 2, 1, 12, 12, 5]}  # an organ this run does not segment
    boxes.write_text(json.dumps({"space": "voxel", "cases": cases}))
    report, redone = rerun(images, out, boxes_file=boxes, infer_organs="liver")
    assert redone == {"Case_00001_0000": "its prompts changed"} and len(report.skipped) == 1


# --- 3: prompts are never dropped silently -----------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ('{"space": "voxel", "cases": {"a": {"liver": {"box3d": [10, 10, 5, 2, 20, 6]}}}}',
     "case a, organ liver: box3d [10, 10, 5, 2, 20, 6]: a negative size along axis 0 (10 > 2)"),
    ('{"space": "voxel", "cases": {"a": {"liver": {"box3d": [-4, 0, 0, 5, 5, 5]}}}}',
     "case a, organ liver: box3d [-4, 0, 0, 5, 5, 5]: voxel indices start at 0"),
    ('{"space": "ras", "cases": {"a": {"liver": {"key_slice": [0, 0, 0, 1e9, 5, 5]}}}}',
     "case a, organ liver: key_slice [0, 0, 0, 1000000000.0, 5, 5]: 1000000000.0 is no place in a scan"),
    ('{"space": "voxel", "cases": {"a": {"liver": {"box3d": [0, 0, 0, 5, 5, 5]}, "liver": {"box3d": [1, 1, 1, 5, 5, 5]}}}}',
     "the key 'liver' is given twice"),
    ('{"space": "voxel", "cases": {"a": {"liver": {"box3d": [0, 0, 0, 5, 5, 5], "spaec": "ras"}}}}',
     "case a, organ liver: unknown key(s) ['spaec']"),
    ('{"spaces": "voxel", "cases": {}}', "unknown key(s) ['spaces'] at the top"),
    ('{"space": "voxel", "cases": {"a": {}, "a.nii.gz": {}}}', "case a.nii.gz: also given as 'a'"),
])
def test_anything_ambiguous_in_a_boxes_file_is_refused_before_any_work(scans, tmp_path, text, message):
    from cobot_med.predict import PromptError

    images, _ = scans
    boxes = tmp_path / "boxes.json"
    boxes.write_text(text)
    with pytest.raises(PromptError) as err:
        rerun(images, tmp_path / "out", boxes_file=boxes)
    assert str(err.value).startswith(f"{boxes}: ") and message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # before any work


def test_a_case_with_unusable_organs_fails_unless_told_to_drop_them(scans, tmp_path):
    images, _ = scans
    shutil.copy(images / "Case_00001_0000.nii.gz", images / "Case_00003_0000.nii.gz")  # a third, good case
    inside = {"box3d": [2, 2, 1, 12, 12, 5]}
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"space": "voxel", "cases": {
        "Case_00001_0000": {"liver": inside, "spleen": {"box3d": [100, 100, 50, 110, 110, 60]}},  # past the grid
        "Case_00002_0000": {"liver": inside, "kidney": {"box3d": [5000, 5000, 5000, 5100, 5100, 5100],
                                                        "space": "ras"}},  # a world box far away
        "Case_00003_0000": {"liver": inside}}}))
    out = tmp_path / "out"
    report, _ = rerun(images, out, boxes_file=boxes)
    status = {c.case_id: (c.status, c.reason) for c in report.cases}
    assert report.exit_code == 1 and status["Case_00003_0000"][0] == "done"
    assert status["Case_00001_0000"][0] == "failed" and "unusable prompt for spleen" in status["Case_00001_0000"][1]
    assert "lies outside the volume (the file's voxel grid is [24, 24, 8])" in status["Case_00001_0000"][1]
    assert status["Case_00002_0000"][0] == "failed" and "unusable prompt for kidney" in status["Case_00002_0000"][1]
    assert not (out / "Case_00001_0000_seg.nii.gz").exists()

    messages = []
    from test_inference import BoxFiller, infer

    dropped = infer(images, out, network=BoxFiller([5.0] * 4), boxes_file=boxes, drop_unusable_organs=True,
                    log=messages.append)
    assert dropped.exit_code == 0 and len(dropped.done) == 2 and len(dropped.skipped) == 1
    assert set(dropped.dropped) == {"Case_00001_0000", "Case_00002_0000"}
    assert list(dropped.dropped["Case_00001_0000"]) == ["spleen"]
    assert "dropped (--drop_unusable_organs): 2 organ(s) in 2 case(s), not segmented:" in messages[-1]
    assert "Case_00002_0000: kidney: the ras box" in messages[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["dropped_organs"]) == {"Case_00001_0000", "Case_00002_0000"}
    again = infer(images, out, network=BoxFiller([5.0] * 4), boxes_file=boxes, drop_unusable_organs=True)
    assert len(again.skipped) == 3 and set(again.dropped) == {"Case_00001_0000", "Case_00002_0000"}  # still named


# --- 4: the geometry written is the geometry read, or the case is refused -----------------------------------


def test_a_nifti_with_a_non_invertible_affine_is_refused_in_inference_and_training(tmp_path, scans):
    import nibabel as nib
    import numpy as np

    from cobot_med.data.dataset import VolumeDataset
    from cobot_med.data.chains import run_volume_chain

    images, labels = scans
    inputs = tmp_path / "inputs"
    shutil.copytree(images, inputs)
    source = nib.load(str(images / "Case_00001_0000.nii.gz"))
    flat = source.affine.copy()
    flat[:3, 2] = 0.0  # the third voxel axis has no extent
    twin = source.affine.copy()
    twin[:3, 1] = twin[:3, 0]  # two voxel axes point the same way
    for name, affine in (("flat", flat), ("twin", twin)):
        header = source.header.copy()
        header.set_sform(affine, code=1)
        header["qform_code"] = 0
        nib.save(nib.Nifti1Image(np.asarray(source.dataobj), None, header=header), str(inputs / f"{name}.nii.gz"))
    report, _ = rerun(inputs, tmp_path / "out", boxes_file=_whole_boxes(tmp_path, ["flat", "twin"]))
    status = {c.case_id: c for c in report.cases}
    assert status["flat"].status == "failed" and "voxel axis 2 has no extent" in status["flat"].reason
    assert status["twin"].status == "failed" and "not independent" in status["twin"].reason
    assert not (tmp_path / "out" / "flat_seg.nii.gz").exists()

    settings = settings_for(tmp_path)  # training reads the same chain: the case is left out, named
    chain = run_volume_chain(settings, build_model(settings.model_spec()).recipe)
    volumes = VolumeDataset([{"image": str(inputs / "flat.nii.gz"), "label": str(labels / "Case_00001.nii.gz"),
                              "case_id": "flat"}], chain)
    assert len(volumes) == 0 and "not invertible" in volumes.failures[0]["error"]


def _whole_boxes(tmp_path, case_ids):
    boxes = tmp_path / "whole.json"
    boxes.write_text(json.dumps({"space": "voxel", "cases": {c: {"liver": {"box3d": [0, 0, 0, 23, 23, 7]}}
                                                             for c in case_ids}}))
    return boxes


@pytest.mark.parametrize("drop", [[4], pytest.param([0, 9], marks=[pytest.mark.slow, pytest.mark.timeout(120)])])
def test_a_dicom_series_with_a_missing_slice_is_refused(tmp_path, drop):
    """ITK would only warn and resample the series onto an even grid: the positions are checked first."""
    import numpy as np

    from test_inference import write_dicom_series

    folder = tmp_path / "inputs" / "patient"
    write_dicom_series(np.random.default_rng(0).normal(40, 10, (10, 16, 16)), folder, (0.8, 0.75, 2.5),
                       (-12.5, 30.0, 100.0), (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0))
    for index in drop:
        (folder / f"slice{index:03d}.dcm").unlink()
    report, _ = rerun(tmp_path / "inputs", tmp_path / "out", boxes_file=_whole_boxes(tmp_path, ["patient"]))
    [case] = report.cases
    ends = not (1 <= min(drop) and max(drop) <= 8)
    if ends:  # the first and last slices gone: what is left is an even series, exactly read
        assert case.status == "done", case.reason
    else:
        assert case.status == "failed" and "the slices are not evenly spaced: 2.5 mm apart, but 5 mm" in case.reason
        assert "1 slice(s) missing?" in case.reason and str(folder) in case.reason


def test_the_segmentation_carries_the_inputs_geometry_fields_as_stored(tmp_path, scans):
    """qform and sform that differ (a sheared sform a quaternion cannot hold), their codes (aligned, MNI),
    units and slice timing: the segmentation's header holds each field as the input's does."""
    import nibabel as nib
    import numpy as np

    from cobot_med.data.geometry import GEOMETRY_FIELDS

    images, _ = scans
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source = nib.load(str(images / "Case_00002_0000.nii.gz"))
    for name, codes in (("aligned", (2, 4)), ("scanner", (1, 3))):
        header = source.header.copy()
        sheared = source.affine.copy()
        sheared[0, 1] += 0.05
        sheared[:3, 3] += 1.5
        header.set_qform(source.affine, code=codes[0])
        header.set_sform(sheared, code=codes[1])
        header.set_xyzt_units("mm", "msec")
        header["pixdim"][4] = 3.0
        header.set_dim_info(0, 1, 2)
        header["slice_duration"] = 0.25
        nib.save(nib.Nifti1Image(np.asarray(source.dataobj), None, header=header), str(inputs / f"{name}.nii.gz"))
    report, _ = rerun(inputs, tmp_path / "out", boxes_file=_whole_boxes(tmp_path, ["aligned", "scanner"]),
                      probability_maps=True, infer_organs="liver")
    assert report.exit_code == 0
    for name in ("aligned", "scanner"):
        given = nib.load(str(inputs / f"{name}.nii.gz")).header
        for written in (tmp_path / "out" / f"{name}_seg.nii.gz", tmp_path / "out" / f"{name}_prob_liver.nii.gz"):
            header = nib.load(str(written)).header
            for field in GEOMETRY_FIELDS:
                assert np.array_equal(header[field], given[field]), (written.name, field)
            assert np.array_equal(nib.load(str(written)).affine, nib.load(str(inputs / f"{name}.nii.gz")).affine)


# --- 7: one folder, one writer; one run's results never silently replaced ------------------------------------

HOLDER = """
import sys
from cobot_med.lock import acquire
acquire(sys.argv[1], sys.argv[2])
print("held", flush=True)
sys.stdin.read()  # until the test closes it (or kills this process)
"""


def hold(folder, run):
    """Another process holding ``folder``'s lock as ``run``: the Popen, once it holds it."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), run], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


@pytest.mark.parametrize("run_id", ["training", pytest.param("inference", marks=[pytest.mark.slow, pytest.mark.timeout(120)])])
def test_a_second_run_into_a_held_folder_gets_one_line_naming_the_holder(tmp_path, scans, run_id):
    import socket

    from cobot_med.lock import FolderInUse

    images, labels = scans
    out = tmp_path / "out"
    holder = hold(out, "training")
    try:
        settings = settings_for(tmp_path, dataset_dir=str(images.parent), input_dir=str(images),
                                labels_dir=str(labels), output_dir=str(out))
        with pytest.raises(FolderInUse) as err:
            settings.check(run_id)
        line = explain(err.value)[0]
        assert line.startswith(f"output folder {out} is in use by another run (training by pid {holder.pid} on host "
                               f"{socket.gethostname()}, started ")
        assert "wait for it to finish, or choose another output folder" in line and "\n" not in line
        assert sorted(p.name for p in out.iterdir()) == [".cobot-med.lock"]  # nothing else written
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    settings.check(run_id)  # the holder ended: the folder is free


def test_a_lock_left_by_a_killed_run_is_taken_over_and_named(tmp_path, caplog):
    import signal

    from cobot_med import lock

    out = tmp_path / "out"
    holder = hold(out, "inference")
    holder.send_signal(signal.SIGKILL)  # kill -9: no chance to release anything
    holder.wait(timeout=60)
    assert json.loads((out / lock.LOCK_NAME).read_text())["pid"] == holder.pid  # the dead run's record is there
    note = lock.acquire(out, "training")
    assert f"left by a run that is no longer running (inference by pid {holder.pid}" in note
    assert json.loads((out / lock.LOCK_NAME).read_text())["pid"] != holder.pid
    lock.release(out)
    (out / lock.LOCK_NAME).write_text("garbage, not a record")  # a damaged lock file is no obstacle either
    assert lock.acquire(out, "training") == "" and lock.holds(out)
    lock.release(out)
    assert lock.acquire(out, "training") == ""  # a released lock is not 'taken over'
    lock.release(out)


def test_infer_refuses_a_training_runs_folder_and_training_refuses_infers(tmp_path, scans):
    from test_inference import BoxFiller

    images, labels = scans
    trained = tmp_path / "trained"
    save_adapter(build_model(ModelSpec("tiny", 64, "lora")), trained / "adapter_best")
    (trained / CHECKPOINT_NAME).write_bytes(b"x")
    with pytest.raises(SettingsError, match=rf"output folder {trained} holds a training run's results "
                                            r"\(adapter_best, resume.pt\)"):
        rerun(images, trained, labels_dir=labels)
    assert sorted(p.name for p in trained.iterdir()) == ["adapter_best", "resume.pt"]  # nothing written
    assert len(rerun(images, trained, labels_dir=labels, overwrite=True)[0].done) == 2  # told to: beside them

    segmented = tmp_path / "segmented"
    rerun(images, segmented, network=BoxFiller([5.0] * 4), labels_dir=labels)
    settings = settings_for(tmp_path, output_dir=str(segmented))
    with pytest.raises(SettingsError, match=r"holds cobot-med infer's segmentations \(2: Case_00001_0000_seg.nii.gz"):
        TrainingSession.start(settings, network_of(settings))


# --- the command line a user runs (slow: real trainings in subprocesses) ------------------------------------


def training_command(data, out, *extra):
    import sys

    from cobot_med.bundle import repository_root

    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
            str(repository_root() / "bundles" / "adome.json"), "--dataset_dir", str(data), "--output_dir", str(out),
            "--arch", "tiny", "--image_size", "64", "--amp", "false", "--num_workers", "0", *extra]


def start(command, cwd):
    import os
    import subprocess

    env = {**os.environ, "COBOT_MED_DEBUG": "", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def read_until(process, marker):
    """The lines a process printed up to (and with) the first holding ``marker``."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError("".join(lines[-40:]) + f"\n(ended before {marker!r})")


def said(lines):
    """What a user reads besides progress bars and INFO logs."""
    return [line.rstrip() for line in lines if line.strip() and " - INFO - " not in line and "%|" not in line
            and "it/s]" not in line]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_trainings_into_one_folder_one_trains_and_the_other_says_who(tmp_path, phantom_factory):
    import signal

    data = phantom_factory("adome", cases=5, seed=0, shape=(32, 32, 12))
    out = tmp_path / "out"
    first = start(training_command(data, out, "--epochs", "40"), tmp_path)
    try:
        read_until(first, "Epoch[1] Complete")
        second = start(training_command(data, out, "--epochs", "40"), tmp_path)
        lines = second.stdout.readlines()
        assert second.wait(timeout=300) != 0
        line = said(lines)[-1]
        assert line.startswith(f"cobot-med: output folder {out} is in use by another run (training by pid {first.pid} "
                               f"on host ")
        assert "python -m monai.bundle run training --config_file" in line and line.endswith("choose another output folder")
        assert "Traceback" not in "".join(lines)
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=300)
    import mlflow

    runs = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}").search_experiments()])
    assert len(runs) == 1  # one MLflow run: the second training never started one


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_and_a_full_disk_during_training_are_one_line_each(tmp_path, phantom_factory):
    import signal
    import sys

    data = phantom_factory("adome", cases=5, seed=0, shape=(32, 32, 12))
    out = tmp_path / "out"
    training = start(training_command(data, out, "--epochs", "3"), tmp_path)
    read_until(training, "Epoch[1] Complete")
    training.send_signal(signal.SIGINT)
    rest = training.stdout.readlines()
    assert training.wait(timeout=300) != 0
    assert said(rest)[-1] == ("cobot-med: interrupted; start the same command again to resume the run from its last "
                              f"finished epoch ({out / CHECKPOINT_NAME})")
    assert "Traceback" not in "".join(rest) and "KeyboardInterrupt" not in "".join(rest)
    resumed = start(training_command(data, out, "--epochs", "3"), tmp_path)
    lines = resumed.stdout.readlines()
    assert resumed.wait(timeout=600) == 0, "".join(lines[-30:])
    assert any("resumed" in line and "at epoch" in line for line in lines)

    # a full disk: every write of the run fails with ENOSPC (here: torch.save, the checkpoint of epoch 1)
    full = ("import errno, runpy, sys, torch\n"
            "def save(obj, f, *a, **k):\n"
            "    raise OSError(errno.ENOSPC, 'No space left on device', str(f))\n"
            "torch.save = save\n"
            "sys.argv = ['monai.bundle'] + sys.argv[1:]\n"
            "runpy.run_module('monai.bundle', run_name='__main__')\n")
    command = training_command(data, tmp_path / "full", "--epochs", "2")
    disk = start([sys.executable, "-c", full, *command[3:]], tmp_path)
    lines = disk.stdout.readlines()
    assert disk.wait(timeout=600) != 0
    assert "Traceback" not in "".join(lines), "".join(lines[-40:])
    assert said(lines)[-1].startswith(f"cobot-med: no space left on the device writing {tmp_path / 'full'}/.tmp-")
    assert said(lines)[-1].endswith("free some space or choose another output folder, then run the same command "
                                    "again; start the same command again to resume the run from its last finished "
                                    f"epoch ({tmp_path / 'full' / CHECKPOINT_NAME})")


# --- 5: flags that cannot apply are refused, and what is recorded is what ran ------------------------------


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory):
    torch.manual_seed(0)
    return save_adapter(build_model(ModelSpec("tiny", 64, "lora")), tmp_path_factory.mktemp("adapter") / "adapter_best")


@pytest.mark.parametrize("values, message", [
    (dict(peft="adaptformer"), "peft adaptformer does not apply: the adapter .* was trained with lora"),
    (dict(peft_options='{"rank": 8}'), r"peft_options \{'rank': 8\} do not apply"),
    (dict(arch="vit_b"), "arch vit_b does not apply"),
    (dict(image_size=128), "image_size 128 does not apply"),
])
def test_a_flag_an_adapter_contradicts_is_refused_by_name(tmp_path, lora_adapter, values, message):
    settings = settings_for(tmp_path, adapter=str(lora_adapter), **{"arch": "auto", "image_size": None, **values})
    with pytest.raises(SettingsError, match=message):
        settings.check("training")


def test_training_from_an_adapter_records_the_adapters_own_model(tmp_path, lora_adapter, dataset):
    """The bundles' default peft (lora+cobot) next to a lora adapter: lora trains, and every record says lora."""
    from cobot_med.engine.network import build_network
    from cobot_med.engine.workflow import write_resolved_settings

    settings = settings_for(tmp_path, dataset_dir=str(dataset), adapter=str(lora_adapter), arch="auto",
                            image_size=None, peft_options='{"rank": 4}').check("training")
    assert (settings.peft, settings.arch, settings.image_size) == ("lora", "tiny", 64)
    network = build_network(settings)
    session = TrainingSession.start(settings, network, split=_split(settings))
    record = json.loads(open(write_resolved_settings(settings, session)).read())
    for recorded in (record["settings"], record["identity"]):
        assert (recorded["peft"], recorded["arch"], recorded["image_size"]) == ("lora", "tiny", 64)
        assert recorded["peft_options"]["rank"] == 4 and recorded["peft_options"]["init"] == "xavier_normal"


# --- 6: secrets and places ------------------------------------------------------------------------------------

SECRET = "postgresql://bob:s3cr3t@db.example:5432/mlflow"


@pytest.mark.parametrize("uri, shown", [
    (SECRET, "postgresql://bob:***@db.example:5432/mlflow"),
    ("mysql+pymysql://root:p@ss:w0rd@10.0.0.1/runs", "mysql+pymysql://root:***@10.0.0.1/runs"),
    ("https://mlflow.example/api?token=abc123&x=1", "https://mlflow.example/api?token=***&x=1"),
    ("sqlite:////data/a@b/mlflow.db", "sqlite:////data/a@b/mlflow.db"),
])
def test_one_redaction_masks_credentials_in_any_uri(uri, shown):
    from cobot_med.redact import redact

    assert redact(uri) == shown
    assert redact({"a": [f"tracking_uri {uri}: cannot connect"]}) == {"a": [f"tracking_uri {shown}: cannot connect"]}


def test_no_record_or_log_holds_a_tracking_stores_password(tmp_path, dataset, capsys):
    import logging

    from ignite.engine import Engine

    from cobot_med.engine.network import make_optimizer
    from cobot_med.engine.workflow import write_resolved_settings
    from cobot_med.handlers import ResumeCheckpoint
    from cobot_med.monailabel import versions
    from cobot_med.redact import mask_logs

    settings = settings_for(tmp_path, dataset_dir=str(dataset), tracking_uri=SECRET)
    network = network_of(settings)
    session = TrainingSession.start(settings, network, split=_split(settings))
    assert session.tracking_uri == SECRET  # the store is reached with the URI as given
    engine = Engine(lambda e, b: {"loss": torch.tensor(0.0)})
    ResumeCheckpoint(session, network, make_optimizer(network, settings)).attach(engine)
    engine.run([0], max_epochs=1)
    versions.open_versions(tmp_path / "label-app" / "tiny", None)
    with versions.locked(tmp_path / "label-app" / "tiny") as record:  # the app's record of its rounds' runs
        record["versions"][0]["mlflow"] = {"tracking_uri": SECRET}
    written = [settings.output_path / CHECKPOINT_NAME, write_resolved_settings(settings, session),
               tmp_path / "label-app" / "tiny" / versions.RECORD]
    for path in map(str, written):
        content = open(path, "rb").read()
        assert b"s3cr3t" not in content and b"bob:***@db.example" in content, path

    logger = logging.getLogger("monai.bundle.test_secrets")  # as MONAI's summary of the overrides logs them
    handler = logging.StreamHandler()
    mlflow_like = logging.getLogger("mlflow")
    other = logging.StreamHandler()
    mlflow_like.addHandler(other)
    logger.addHandler(handler)
    try:
        mask_logs()
        logger.warning("store %s", SECRET)
        mlflow_like.warning("View run at %s/#/experiments/1", "http://bob:s3cr3t@mlflow.example")
    finally:
        logger.removeHandler(handler)
        mlflow_like.removeHandler(other)
    err = capsys.readouterr().err
    assert "s3cr3t" not in err and "store postgresql://bob:***@db" in err and "http://bob:***@mlflow" in err


@pytest.mark.parametrize("uri, place", [
    (SECRET, "out"), ("mysql://u:p@h/db", "out"), ("sqlite:////x/mlflow.db", "out"),
    ("http://127.0.0.1:5000", None), ("databricks", None),
])
def test_artifacts_go_beside_the_outputs_unless_a_server_keeps_them(tmp_path, uri, place):
    from cobot_med.engine.tracking import artifact_location

    expected = None if place is None else str(tmp_path / "out" / "mlartifacts")
    assert artifact_location(uri, tmp_path / "out") == expected


def test_the_monai_label_app_folder_is_a_data_folder_of_the_users(tmp_path, capsys):
    import cobot_med
    from cobot_med.bundle import repository_root
    from cobot_med.monailabel.__main__ import main
    from cobot_med.monailabel.folder import MAIN

    assert main([str(tmp_path / "label-app")]) == 0
    assert (tmp_path / "label-app" / "main.py").read_text() == MAIN
    assert f"monailabel start_server --app {tmp_path / 'label-app'}" in capsys.readouterr().out
    assert main([str(tmp_path / "label-app")]) == 0  # prepared again: the same file
    for inside in (repository_root() / "apps" / "cobot_med", Path(cobot_med.__file__).parent / "app"):
        assert main([str(inside)]) == 2
        assert "is inside" in capsys.readouterr().err and not inside.exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_database_store_keeps_its_password_out_and_its_artifacts_in_the_output_folder(tmp_path, phantom_factory,  # noqa: E501
                                                                                          postgres_store):  # noqa: F811
    """A real training against PostgreSQL (COBOT_MED_TEST_POSTGRES_URI, .ci/postgres.sh), started from another
    folder: artifacts in OUTPUT/mlartifacts (not ./mlruns), and the password in no file and no line."""
    from urllib.parse import urlsplit

    import mlflow

    from cobot_med.bundle import repository_root

    password = urlsplit(postgres_store).password
    assert password, "the test store's URI carries a password"
    data = phantom_factory("adome", cases=5, seed=0, shape=(32, 32, 12))
    out, work = tmp_path / "out", tmp_path / "elsewhere"
    work.mkdir()
    layers = repr([str(repository_root() / "bundles" / name) for name in ("common.json", "adome.json")])
    command = training_command(data, out, "--epochs", "1", "--tracking_uri", postgres_store)
    command[command.index("--config_file") + 1] = layers  # the layered form: MONAI's summary is masked too
    run = start(command, work)
    lines = run.stdout.readlines()
    assert run.wait(timeout=600) == 0, "".join(lines[-30:])
    assert f":{password}@" not in "".join(lines)
    assert not (work / "mlruns").exists() and (out / "mlartifacts").is_dir()
    leaked = [p for p in out.rglob("*") if p.is_file() and f":{password}@".encode() in p.read_bytes()]
    assert leaked == []
    client = mlflow.MlflowClient(postgres_store)
    [experiment] = [e for e in client.search_experiments() if e.name == "cobot-med/adome"]
    [finished] = client.search_runs([experiment.experiment_id])
    assert finished.info.artifact_uri.startswith(str(out / "mlartifacts"))
    assert "resolved_settings.json" in [a.path for a in client.list_artifacts(finished.info.run_id)]
    assert not any(f":{password}@" in str(v) for v in {**finished.data.params, **finished.data.tags}.values())
