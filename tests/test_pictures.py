"""What a person sees in the pictures a run draws: overlays in the radiological convention with orientation
letters, and a loss curve per step with the epochs marked, whole across a resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from cobot_med.handlers.epoch_loss import EpochLoss
from cobot_med.handlers.overlays import draw_overlay, overlay_figure

ORGANS = {"liver": 1, "spleen": 3}


def rendered_axes(fig) -> np.ndarray:
    """The picture inside the axes, as rendered (rows top to bottom, columns left to right)."""
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float).mean(axis=-1)
    box = fig.axes[0].get_window_extent()
    height = pixels.shape[0]
    return pixels[int(height - box.y1) + 2:int(height - box.y0) - 2, int(box.x0) + 2:int(box.x1) - 2]


def test_the_patients_right_is_on_the_pictures_left_with_letters():
    """A bright organ at high X of the RAS grid (the patient's right) shows in the left half of the picture,
    one at high Y (anterior) in the top half, and the edges carry R, L, A, P where a radiologist expects them."""
    image = np.zeros((60, 60), np.float32)
    image[45:55, 5:25] = 255  # patient's right, posterior
    liver = np.zeros((2, 60, 60), bool)
    fig = overlay_figure(image, None, liver, ORGANS, "case")
    view = rendered_axes(fig)
    rows, cols = view.shape
    lower = view[rows // 2:]  # the legend sits at the upper right
    assert lower[:, : cols // 2].mean() > 4 * lower[:, cols // 2:].mean()
    assert view[rows // 2:].mean() > view[: rows // 2, : cols // 2].mean()  # posterior is down
    letters = {t.get_text(): t.get_position() for t in fig.axes[0].texts}
    assert set(letters) == {"R", "L", "A", "P"}
    assert letters["R"][0] < 0.1 < 0.9 < letters["L"][0] and letters["A"][1] > 0.9 > 0.1 > letters["P"][1]
    assert "radiological" in fig.axes[0].get_title()


def test_an_overlay_file_is_written(tmp_path):
    image = np.random.default_rng(0).normal(size=(40, 30)).astype(np.float32)
    pred = np.zeros((2, 40, 30), bool)
    pred[0, 10:20, 5:15] = True
    draw_overlay(image, pred[0].astype(int), pred, ORGANS, tmp_path / "o.png", title="x")
    assert (tmp_path / "o.png").stat().st_size > 1000


def losses_engine(values):
    """An engine whose step i outputs loss values[i - 1]."""
    return Engine(lambda engine, _: {"loss": torch.tensor(values[engine.state.iteration - 1])})


def test_the_loss_curve_has_every_step_and_the_epoch_means(tmp_path):
    values = [float(v) for v in np.linspace(2.0, 1.0, 10)]
    handler = EpochLoss(tmp_path / "loss_curve.png")
    engine = losses_engine(values)
    handler.attach(engine)
    engine.run(range(5), max_epochs=2)
    saved = json.loads((tmp_path / "loss_curve.json").read_text())
    assert [i for i, _ in saved["steps"]] == list(range(1, 11))
    assert [e for e, _, _ in saved["epochs"]] == [1, 2] and [i for _, i, _ in saved["epochs"]] == [5, 10]
    assert saved["epochs"][0][2] == pytest.approx(np.mean(values[:5]))
    assert engine.state.metrics["train_loss"] == pytest.approx(np.mean(values[5:]))
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000


def test_a_resumed_run_draws_the_whole_curve(tmp_path):
    """Killed after epoch 1 of 3 with the points of a later, lost epoch on disk: the resumed run keeps the
    first epoch's points, drops what it redoes, and ends with every step once."""
    values = [float(v) for v in np.linspace(3.0, 1.0, 15)]
    first = losses_engine(values)
    EpochLoss(tmp_path / "loss_curve.png").attach(first)
    first.run(range(5), max_epochs=2)  # the points of epochs 1 and 2 are saved
    resumed = losses_engine(values)
    handler = EpochLoss(tmp_path / "loss_curve.png")
    handler.attach(resumed)
    resumed.load_state_dict({"epoch": 1, "epoch_length": 5, "max_epochs": 3})  # resume.pt had epoch 1
    resumed.run(range(5), max_epochs=3)
    saved = json.loads((tmp_path / "loss_curve.json").read_text())
    assert [i for i, _ in saved["steps"]] == list(range(1, 16))
    assert [e for e, _, _ in saved["epochs"]] == [1, 2, 3]
    assert handler.history == pytest.approx([np.mean(values[i:i + 5]) for i in (0, 5, 10)])
