"""The pieces MONAI's engines take from us, checked without a dataset."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Engine, Events

from cobot_med.adapter import CONFIG_NAME
from cobot_med.engine.evaluation import (
    SliceDiceMetric,
    label_prompts,
    merge_organs,
    organ_channels,
    predict_volume,
    tight_boxes,
)
from cobot_med.engine.losses import PeftLoss
from cobot_med.engine.prepare import PrepareSliceBatch
from cobot_med.engine.setup import (
    SettingsError,
    build_network,
    check_distributed_split,
    check_model_settings,
    make_optimizer,
)
from cobot_med.handlers import AdapterSaver, ResumeCheckpoint, StopOnNanLoss
from cobot_med.handlers.nan_guard import NonFiniteLossError
from cobot_med.model import ModelSpec, build_model


def tiny(peft="lora+cobot", size=64):
    torch.manual_seed(0)
    return build_model(ModelSpec(arch="tiny", image_size=size, peft=peft))


def test_tight_boxes_and_exclusive_edges():
    label = torch.zeros(1, 10, 12, 3)
    label[0, 2:5, 3:9, 1] = 4
    boxes, present = label_prompts(label, [4, 7])
    assert present.tolist() == [[False, False], [True, False], [False, False]]
    assert boxes[1, 0].tolist() == [3.0, 2.0, 9.0, 5.0]  # x along columns (Y), y along rows (X), ends exclusive
    assert boxes[0].abs().sum() == 0 and boxes[1, 1].abs().sum() == 0
    raw, _ = tight_boxes(organ_channels(label, [4]).permute(3, 0, 1, 2).bool())
    assert raw[1, 0].tolist() == [3.0, 2.0, 8.0, 4.0]


def test_merge_organs_resolves_overlaps_by_probability():
    probs = torch.zeros(2, 2, 2, 1)
    probs[0, 0, 0, 0], probs[1, 0, 0, 0] = 0.9, 0.6  # both organs claim this voxel: organ 0 is surer
    probs[0, 1, 1, 0], probs[1, 1, 1, 0] = 0.55, 0.8
    probs[1, 0, 1, 0] = 0.4  # below threshold: background
    merged = merge_organs(probs, [3, 9])
    assert merged.dtype == torch.uint8
    assert merged[0, ..., 0].tolist() == [[3, 0], [0, 9]]


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


def test_predict_volume_skips_slices_without_prompts():
    network = tiny("frozen")
    calls = []
    network.sam.image_encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    volume = torch.rand(30, 40, 7) * 255
    label = torch.zeros(1, 30, 40, 7)
    label[0, 5:20, 8:30, 2:5] = 1
    boxes, present = label_prompts(label, [1])
    probs = predict_volume(network, volume, boxes, present, image_size=64, batch_size=2)
    assert probs.shape == (1, 30, 40, 7)
    assert sum(calls) == 3  # slices 2, 3, 4 only, in batches of two: 2 + 1
    assert (probs[..., [0, 1, 5, 6]] == 0).all() and (probs[..., 2:5] > 0).all()


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


def test_settings_errors_are_clear(tmp_path):
    with pytest.raises(SettingsError, match="sam_checkpoint is empty.*sam_vit_b_01ec64.pth"):
        check_model_settings("vit_b", 1024, "lora", "")
    with pytest.raises(SettingsError, match="unknown peft method 'lora-cobot'"):
        check_model_settings("tiny", 64, "lora-cobot", "")
    with pytest.raises(SettingsError, match="multiple of the patch size"):
        check_model_settings("tiny", 100, "lora", "")
    with pytest.raises(SettingsError, match="does not exist"):
        check_model_settings("vit_b", 1024, "lora", str(tmp_path / "missing.pth"))
    with pytest.raises(SettingsError, match="not an adapter checkpoint"):
        build_network("tiny", 64, "lora", adapter=str(tmp_path))


def test_nan_loss_stops_with_a_message():
    engine = Engine(lambda e, b: {"loss": torch.tensor(float("nan"))})
    StopOnNanLoss().attach(engine)
    with pytest.raises(NonFiniteLossError, match="loss became nan at epoch 1, iteration 1"):
        engine.run([0, 1], max_epochs=1)


def test_resume_checkpoint_restores_epoch_optimizer_and_adapter(tmp_path):
    network = tiny("lora")
    optimizer = make_optimizer(network, lr=1e-2)
    images, boxes = torch.rand(1, 3, 64, 64) * 255, torch.tensor([[[4.0, 4, 50, 50]]])

    def step(engine, batch):
        optimizer.zero_grad()
        loss = network(images, boxes).sigmoid().mean()
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    first = Engine(step)
    ResumeCheckpoint(tmp_path / "resume.pt", network, optimizer).attach(first)
    first.run([0, 1], max_epochs=2)
    trained = {k: v.clone() for k, v in network.sam.state_dict().items() if "lora_B" in k}

    fresh = tiny("lora")
    fresh_optimizer = make_optimizer(fresh, lr=1e-2)
    second = Engine(lambda e, b: {"loss": torch.tensor(0.0)})
    epochs_run = []
    second.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs_run.append(e.state.epoch))
    ResumeCheckpoint(tmp_path / "resume.pt", fresh, fresh_optimizer).attach(second)
    second.run([0, 1], max_epochs=3)
    assert epochs_run == [3]  # epochs 1-2 were done before the interruption
    for key, value in trained.items():
        assert torch.equal(fresh.sam.state_dict()[key], value)
    assert fresh_optimizer.state_dict()["state"]  # Adam moments came back


def test_resume_checkpoint_is_written_after_every_other_end_of_epoch_handler(tmp_path):
    """A kill between logging and checkpointing must redo the epoch, not lose its log."""
    network = tiny("lora")
    optimizer = make_optimizer(network, lr=1e-2)
    engine = Engine(lambda e, b: {"loss": torch.tensor(0.0)})
    path = tmp_path / "resume.pt"
    ResumeCheckpoint(path, network, optimizer).attach(engine)
    seen = []  # attached after the checkpoint handler, like MLflow logging in the bundles
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(path.is_file()))
    engine.run([0], max_epochs=2)
    assert seen == [False, True]  # at the end of epoch 1 the checkpoint was not yet written
    engine.run([0], max_epochs=3)  # a second run does not register the save twice
    assert sum(1 for h, *_ in engine._event_handlers[Events.EPOCH_COMPLETED] if h == ResumeCheckpoint.save) <= 1


def test_adapter_saver_keeps_the_best(tmp_path):
    network = tiny("lora")
    scores = iter([0.3, 0.5, 0.4])
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_dsc=next(scores)))
    AdapterSaver(tmp_path / "best", network, key_metric_name="val_dsc").attach(engine)
    engine.run([0], max_epochs=3)
    config = json.loads((tmp_path / "best" / CONFIG_NAME).read_text())
    assert config["metric"]["val_dsc"] == 0.5 and config["epoch"] == 2
    again = AdapterSaver(tmp_path / "best", network, key_metric_name="val_dsc")
    assert again.best == 0.5  # survives a restart


def test_distributed_runs_need_a_case_per_process_to_evaluate():
    split = {"training": [{}] * 6, "validation": [{}] * 2, "test": [{}]}
    check_distributed_split(split, world_size=1)
    with pytest.raises(SettingsError, match=r"the test split has 1 case\(s\) but 2 processes were started"):
        check_distributed_split(split, world_size=2)
    with pytest.raises(SettingsError, match=r"the validation split has 2 case\(s\) but 4 processes"):
        check_distributed_split(split, world_size=4)
    check_distributed_split({"training": [{}], "validation": [], "test": []}, world_size=4)  # nothing to evaluate
