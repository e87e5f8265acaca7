"""The pieces MONAI's engines take from us, checked without a dataset."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch
from ignite.engine import Engine, Events

from cobot_med.adapter import CONFIG_NAME
from cobot_med.data.boxes import MaskToBoxesd, mask_boxes
from cobot_med.engine.losses import PeftLoss
from cobot_med.engine.network import make_optimizer
from cobot_med.engine.prepare import PrepareSliceBatch
from cobot_med.handlers import AdapterSaver, EpochSeeds, ResumeCheckpoint, StopOnNanLoss
from cobot_med.handlers.nan_guard import NonFiniteLossError
from cobot_med.metrics import OrganDiceMetric, SliceDiceMetric, dice
from cobot_med.model import ModelSpec, build_model
from cobot_med.predict import SlicePredictor, from_labels, organ_channels, predict_volume, to_label_map
from cobot_med.settings import load_settings


def tiny(peft="lora+cobot", size=64):
    torch.manual_seed(0)
    return build_model(ModelSpec(arch="tiny", image_size=size, peft=peft))


def test_tight_boxes_have_exclusive_ends_as_an_array_and_a_dictionary_transform():
    label = torch.zeros(1, 10, 12, 3)
    label[0, 2:5, 3:9, 1] = 4
    prompts = from_labels(label, {"a": 4, "b": 7})
    boxes, present = prompts.fixed()
    assert present.tolist() == [[False, False], [True, False], [False, False]]
    assert boxes[1, 0].tolist() == [3.0, 2.0, 9.0, 5.0]  # x along columns (Y), y along rows (X), ends exclusive
    assert boxes[0].abs().sum() == 0 and boxes[1, 1].abs().sum() == 0
    masks = organ_channels(label, [4]).permute(3, 0, 1, 2)  # (Z, K, X, Y)
    out = MaskToBoxesd("masks", box_keys="b", present_keys="p")({"masks": masks})
    assert torch.equal(out["b"], boxes[:, :1]) and torch.equal(out["p"], present[:, :1])
    single, found = mask_boxes(torch.zeros(5, 5, dtype=torch.bool))
    assert not found and single.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_label_map_resolves_overlaps_by_probability():
    probs = torch.zeros(2, 2, 2, 1)
    probs[0, 0, 0, 0], probs[1, 0, 0, 0] = 0.9, 0.6  # both organs claim this voxel: organ 0 is surer
    probs[0, 1, 1, 0], probs[1, 1, 1, 0] = 0.55, 0.8
    probs[1, 0, 1, 0] = 0.4  # below threshold: background
    merged = to_label_map(probs, [3, 9])
    assert merged.dtype == torch.uint8
    assert merged[0, ..., 0].tolist() == [[3, 0], [0, 9]]


def test_dice_policy_counts_one_sided_empties_and_skips_double_empties():
    ref = torch.zeros(3, 4, 4, 2, dtype=torch.bool)
    pred = torch.zeros_like(ref)
    ref[0, :2, :2] = True
    pred[0, :2, :1] = True  # 2*4/(4+8) = 2/3
    pred[1, 0, 0, 0] = True  # reference empty, prediction not: 0, counted
    values = dice(pred, ref)  # organ 2: both empty -> NaN, not counted
    assert values[0].item() == pytest.approx(2 / 3) and values[1].item() == 0 and torch.isnan(values[2])
    metric = OrganDiceMetric()
    metric(pred[None].float(), ref[None].float())
    assert metric.aggregate().item() == pytest.approx((2 / 3 + 0) / 2)


def test_slice_dice_pools_over_slices_with_reference():
    ref = torch.zeros(1, 1, 4, 4, 3)
    ref[0, 0, :2, :2, 0] = 1  # slice 0: 4 voxels
    ref[0, 0, :2, :2, 1] = 1  # slice 1: 4 voxels
    pred = torch.zeros_like(ref)
    pred[0, 0, :2, :2, 0] = 1  # perfect on slice 0
    pred[0, 0, :2, :1, 1] = 1  # half on slice 1: 2*2/(2+4) = 2/3
    pred[0, 0, :, :, 2] = 1  # a slice without reference does not count
    metric = SliceDiceMetric()
    metric(pred, ref)
    mean, per_organ = metric.aggregate()
    assert torch.isclose(mean, torch.tensor((1 + 2 / 3) / 2))


def test_predictor_skips_slices_without_prompts():
    network = tiny("frozen")
    calls = []
    network.sam.image_encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    volume = torch.rand(30, 40, 7) * 255
    label = torch.zeros(1, 30, 40, 7)
    label[0, 5:20, 8:30, 2:5] = 1
    probs, used = predict_volume(SlicePredictor(network, "cpu", batch_size=2), volume, from_labels(label, {"x": 1}))
    assert probs.shape == (1, 30, 40, 7)
    assert sum(calls) == 3  # slices 2, 3, 4 only, in batches of two: 2 + 1
    assert (probs[..., [0, 1, 5, 6]] == 0).all() and (probs[..., 2:5] > 0).all()
    assert sorted(used[0]) == [2, 3, 4]


def test_prepare_batch_packs_present_organs():
    batch = {
        "image": torch.rand(2, 3, 8, 8),
        "masks": torch.arange(2 * 3 * 64, dtype=torch.float32).reshape(2, 3, 8, 8),
        "boxes": torch.rand(2, 3, 4),
        "valid": torch.tensor([[True, False, True], [False, True, False]]),
    }
    images, targets, (boxes, valid), kwargs = PrepareSliceBatch()(batch, "cpu")
    assert targets.shape == (3, 1, 8, 8)
    assert torch.equal(targets[2, 0], batch["masks"][1, 1])
    assert boxes.shape == (2, 3, 4) and valid.dtype == torch.bool and kwargs == {}


def test_peft_loss_adds_conv_lora_aux_loss():
    from monai.losses import DiceCELoss

    network = tiny("conv_lora").train()
    loss = PeftLoss(DiceCELoss(sigmoid=True, squared_pred=True), network)
    images = torch.rand(1, 3, 64, 64) * 255
    boxes = torch.tensor([[[5.0, 5, 40, 40]]])
    pred = network(images, boxes, valid=torch.tensor([[True]]), output_size=(64, 64))
    target = torch.zeros_like(pred)
    with_aux = loss(pred, target)
    plain = DiceCELoss(sigmoid=True, squared_pred=True)(pred, target)
    assert with_aux > plain
    assert "network" not in dict(loss.named_modules())  # the network is referenced, not owned


def test_nan_loss_stops_with_a_message():
    engine = Engine(lambda e, b: {"loss": torch.tensor(float("nan"))})
    StopOnNanLoss().attach(engine)
    with pytest.raises(NonFiniteLossError, match="loss became nan at epoch 1, iteration 1"):
        engine.run([0, 1], max_epochs=1)


def _session(tmp_path, checkpoint=None):
    """The parts of a TrainingSession the checkpoint handler reads."""
    return types.SimpleNamespace(identity={"peft": "lora"}, run_key="k1", run_name="r-k1",
                                 checkpoint_path=tmp_path / "resume.pt", checkpoint=checkpoint)


def test_resume_checkpoint_restores_epoch_optimizer_and_adapter(tmp_path):
    network = tiny("lora")
    settings = types.SimpleNamespace(lr=1e-2, cobot_lr=1e-2, weight_decay=0.0)
    optimizer = make_optimizer(network, settings)
    images, boxes = torch.rand(1, 3, 64, 64) * 255, torch.tensor([[[4.0, 4, 50, 50]]])

    def step(engine, batch):
        optimizer.zero_grad()
        loss = network(images, boxes).sigmoid().mean()
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    first = Engine(step)
    ResumeCheckpoint(_session(tmp_path), network, optimizer).attach(first)
    first.run([0, 1], max_epochs=2)
    trained = {k: v.clone() for k, v in network.sam.state_dict().items() if "lora_B" in k}

    from cobot_med.engine.session import read_checkpoint

    state = read_checkpoint(tmp_path / "resume.pt")
    assert state["run_key"] == "k1" and state["identity"] == {"peft": "lora"} and not state["finished"]
    fresh = tiny("lora")
    fresh_optimizer = make_optimizer(fresh, settings)
    second = Engine(lambda e, b: {"loss": torch.tensor(0.0)})
    epochs_run = []
    second.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs_run.append(e.state.epoch))
    ResumeCheckpoint(_session(tmp_path, state), fresh, fresh_optimizer).attach(second)
    second.run([0, 1], max_epochs=3)
    assert epochs_run == [3]  # epochs 1-2 were done before the interruption
    for key, value in trained.items():
        assert torch.equal(fresh.sam.state_dict()[key], value)
    assert fresh_optimizer.state_dict()["state"]  # Adam moments came back


def test_resume_checkpoint_is_written_after_every_other_end_of_epoch_handler(tmp_path):
    """A kill between logging and checkpointing must redo the epoch, not lose its log."""
    network = tiny("lora")
    optimizer = make_optimizer(network, types.SimpleNamespace(lr=1e-2, cobot_lr=1e-2, weight_decay=0.0))
    engine = Engine(lambda e, b: {"loss": torch.tensor(0.0)})
    path = tmp_path / "resume.pt"
    ResumeCheckpoint(_session(tmp_path), network, optimizer).attach(engine)
    from cobot_med.engine.session import epochs_done

    seen = []  # attached after the checkpoint handler, like MLflow logging in the bundles
    engine.add_event_handler(Events.EPOCH_COMPLETED,
                             lambda e: seen.append(epochs_done(torch.load(path, weights_only=True))))
    engine.run([0], max_epochs=2)
    assert seen == [0, 1]  # at the end of epoch N the checkpoint still holds N - 1 (the start: 0, issue 27)
    engine.run([0], max_epochs=3)  # a second run does not register the save twice
    assert sum(1 for h, *_ in engine._event_handlers[Events.EPOCH_COMPLETED] if h == ResumeCheckpoint.save) <= 1


def test_epoch_seeds_make_every_epoch_depend_on_its_number_only():
    from cobot_med.data.slices import BoxPromptsd

    def draws(start_epoch, epochs):
        jitter = BoxPromptsd(jitter=50)
        seen = []
        engine = Engine(lambda e, b: seen.append((e.state.epoch, torch.rand(1).item(), jitter.R.randint(1000))))
        EpochSeeds(seed=3, transform=jitter).attach(engine)
        if start_epoch:  # as ResumeCheckpoint loads a killed run's progress
            engine.load_state_dict({"epoch": start_epoch, "epoch_length": 1, "max_epochs": epochs})
        engine.run([0], max_epochs=epochs)
        return seen

    uninterrupted = draws(0, 3)
    resumed = draws(1, 3)  # epoch 1 was done before a kill
    assert resumed == uninterrupted[1:]
    assert uninterrupted[0][1:] != uninterrupted[1][1:]


def test_adapter_saver_keeps_the_best_of_its_own_run(tmp_path):
    network = tiny("lora")
    scores = iter([0.3, 0.5, 0.4])
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_dsc=next(scores)))
    AdapterSaver(tmp_path / "best", network, key_metric_name="val_dsc", run_key="k1").attach(engine)
    engine.run([0], max_epochs=3)
    config = json.loads((tmp_path / "best" / CONFIG_NAME).read_text())
    assert config["metric"]["val_dsc"] == 0.5 and config["epoch"] == 2 and config["run_key"] == "k1"
    assert AdapterSaver(tmp_path / "best", network, key_metric_name="val_dsc", run_key="k1").best == 0.5
    assert AdapterSaver(tmp_path / "best", network, key_metric_name="val_dsc", run_key="k2").best == -float("inf")


def test_settings_are_checked_once_with_clear_messages(tmp_path):
    from cobot_med.errors import SettingsError

    with pytest.raises(SettingsError, match="unknown peft 'lora-cobot'"):
        load_settings("adome", peft="lora-cobot")
    with pytest.raises(SettingsError, match="multiple of the patch size"):
        load_settings("adome", arch="tiny", image_size=100)
    with pytest.raises(SettingsError, match="lr must be > 0"):
        load_settings("adome", lr=-1e-3)
    settings = load_settings("adome", dataset_dir=str(tmp_path), output_dir=str(tmp_path / "out"))
    with pytest.raises(SettingsError, match="sam_checkpoint is empty.*sam_vit_b_01ec64.pth"):
        settings.check("training")


def test_run_params_record_what_the_model_runs():
    """MLflow params: where the resolved speed choices and the built model differ (an adapter's recorded
    attention, compile), the model's values win."""
    from cobot_med.engine.tracking import run_params

    settings = load_settings("adome", arch="tiny", image_size=64, peft="lora")
    torch.manual_seed(0)
    network = build_model(ModelSpec(arch="tiny", image_size=64, peft="lora", attention="eager"))
    speed = {"amp": "auto", "amp_dtype": "fp32", "attention": "auto", "attention_kind": "onehot", "compile": True}
    params = run_params(network, settings, speed)
    assert (params["attention"], params["compile"], params["amp_dtype"]) == ("eager", False, "fp32")
    speed = settings.speed_choices("cpu", training=True, network=network)
    params = run_params(network, settings, speed.describe())
    assert (params["attention"], params["attention_kind"]) == ("eager", "eager")


def test_a_run_resumed_on_another_machine_logs_the_same_params(tmp_path, monkeypatch):
    """MLflow refuses to change a param, and a resumed run logs its params again: thread counts, loader workers
    and reasons (which differ between machines) are not params; resolved_settings.json records them."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from cobot_med.engine.tracking import run_params
    from cobot_med.engine.workflow import write_resolved_settings

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    settings = load_settings("adome", arch="tiny", image_size=64, peft="lora", output_dir=str(tmp_path / "out"))
    network = tiny("lora")
    machines = [settings.speed_choices("cpu", training=True, network=network) for _ in range(2)]
    machines[1] = dataclasses.replace(machines[1], threads=dataclasses.replace(
        machines[1].threads, torch_threads=machines[0].threads.torch_threads + 2, reason="another machine"))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("resume"), run_name="r").info.run_id

    def log(params):
        client.log_batch(run, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])

    first, resumed = (run_params(network, settings, m.describe()) for m in machines)
    assert first == resumed
    assert not {"torch_threads", "num_workers", "threads_reason", "amp_reason", "attention_reason",
                "compile_reason"} & set(first)
    assert {"amp", "amp_dtype", "grad_scaler", "attention", "attention_kind", "compile"} <= set(first)
    log(first)
    log(resumed)  # the resumed run on the other machine: the same params, accepted
    log({"torch_threads": machines[0].threads.torch_threads})  # logging the threads as a param, as before:
    with pytest.raises(MlflowException, match="Changing param values is not allowed"):
        log({"torch_threads": machines[1].threads.torch_threads})  # the resumed run crashed
    session = types.SimpleNamespace(run_key="k1", run_name="r-k1", identity={"peft": "lora"})
    settings.output_path.mkdir(parents=True)
    record = json.loads(open(write_resolved_settings(settings, session, machines[1])).read())
    assert record["speed"] == json.loads(json.dumps(machines[1].describe()))
    assert record["speed"]["torch_threads"] == machines[0].threads.torch_threads + 2


def test_a_resume_with_more_epochs_logs_no_changed_param(tmp_path):
    """epochs may grow on resume; MLflow refuses a changed param, so the grown value goes to a tag that the
    sweep's matching and compare read (run_param), and the params logged before are not logged again."""
    import mlflow

    from cobot_med.engine import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = mlflow.MlflowClient(tracking_uri=uri)
    experiment = tracking.experiment_name("adome")
    run_id = store.create_run(store.create_experiment(experiment), run_name="r").info.run_id
    first = {"dataset": "adome", "peft": "lora", "seed": 0, "epochs": 2}
    store.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in first.items()])
    session = types.SimpleNamespace(tracking_uri=uri, experiment=experiment, run_name="r")

    resumed = tracking.params_for_run({**first, "epochs": 4, "lr": 0.001}, session)
    assert resumed == {"lr": 0.001}  # only what the run has not logged yet
    store.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in resumed.items()])
    run = store.get_run(run_id)
    assert run.data.params["epochs"] == "2" and tracking.run_param(run, "epochs") == "4"

    store.set_tag(run_id, tracking.STATUS_TAG, tracking.FINISHED)
    store.set_terminated(run_id, "FINISHED")
    assert tracking.find_finished_run(uri, "adome", "lora", 0, {"epochs": 4}) == run_id
    assert tracking.find_finished_run(uri, "adome", "lora", 0, {"epochs": 2}) is None
    assert tracking.params_for_run(first, session) == first  # a finished run is not reopened: a new run logs all
