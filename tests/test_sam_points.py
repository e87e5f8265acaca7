"""Clicks (point prompts) through PromptableSam: the same logits as segment-anything's SamPredictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from cobot_med.model import ModelSpec, build_model

SIZE = 64


@pytest.fixture(scope="module")
def model():
    """A frozen tiny SAM with every weight random and non-zero (rel-pos tables and point embeddings too)."""
    torch.manual_seed(3)
    model = build_model(ModelSpec(arch="tiny", image_size=SIZE, peft="frozen")).eval()
    g = torch.Generator().manual_seed(4)
    for block in model.sam.image_encoder.blocks:
        for p in (block.attn.rel_pos_h, block.attn.rel_pos_w):
            p.data = torch.randn(p.shape, generator=g) * 0.5
    return model


def reference(model, image, box=None, coords=None, labels=None):
    """SamPredictor on an image already at the model size (its resize is then the identity)."""
    predictor = SamPredictor(model.sam)
    predictor.set_image(image)
    logits, _, _ = predictor.predict(point_coords=coords, point_labels=labels, box=box,
                                     multimask_output=False, return_logits=True)
    return torch.as_tensor(logits[0])


def ours(model, image, boxes=None, coords=None, labels=None, valid=None):
    x = torch.as_tensor(image).permute(2, 0, 1)[None].float()
    points = None if coords is None else (torch.as_tensor(coords, dtype=torch.float32)[None],
                                          torch.as_tensor(labels)[None])
    box_tensor = None if boxes is None else torch.as_tensor(boxes, dtype=torch.float32)[None]
    with torch.no_grad():
        return model(x, box_tensor, valid=valid, output_size=(SIZE, SIZE), points=points)


def test_box_and_clicks_equal_sam_predictor(model):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    box = np.array([6.0, 9.0, 50.0, 41.0])
    coords = np.array([[20.0, 30.0], [44.0, 12.0], [8.0, 60.0]])
    labels = np.array([1, 0, 1])
    expected = reference(model, image, box=box, coords=coords, labels=labels)
    got = ours(model, image, boxes=box[None], coords=coords[None], labels=labels[None])
    assert torch.allclose(got[0, 0], expected, atol=1e-4)
    # the clicks change the answer (they are not ignored)
    box_only = ours(model, image, boxes=box[None])
    assert (box_only[0, 0] - got[0, 0]).abs().max() > 1e-2


def test_clicks_without_a_box_equal_sam_predictor(model):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    coords = np.array([[31.0, 17.0], [5.0, 40.0]])
    labels = np.array([1, 0])
    expected = reference(model, image, coords=coords, labels=labels)
    got = ours(model, image, coords=coords[None], labels=labels[None])
    assert torch.allclose(got[0, 0], expected, atol=1e-4)


def test_padded_clicks_and_valid_mask_decode_each_prompt_as_alone(model):
    """Two prompts on one image (the second with its missing click padded by -1) decode as if each were alone;
    ``valid`` leaves the first out."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    boxes = np.array([[2.0, 3.0, 30.0, 33.0], [20.0, 14.0, 60.0, 52.0]])
    coords = np.array([[[10.0, 12.0], [25.0, 20.0]], [[40.0, 30.0], [0.0, 0.0]]])
    labels = np.array([[1, 0], [1, -1]])
    both = ours(model, image, boxes=boxes, coords=coords, labels=labels)
    assert both.shape == (1, 2, SIZE, SIZE)
    only_second = ours(model, image, boxes=boxes, coords=coords, labels=labels,
                       valid=torch.tensor([[False, True]]))
    assert only_second.shape == (1, 1, SIZE, SIZE)
    assert torch.allclose(only_second[0, 0], both[0, 1], atol=1e-5)
    first = reference(model, image, box=boxes[0], coords=coords[0], labels=labels[0])
    assert torch.allclose(both[0, 0], first, atol=1e-4)


def test_bad_point_shapes_are_refused(model):
    images = torch.zeros(1, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="points must be"):
        model(images, torch.zeros(1, 1, 4), points=(torch.zeros(1, 1, 2), torch.ones(1, 1)))
    with pytest.raises(ValueError, match="give boxes, points or both"):
        model(images, None)


def test_the_slice_predictor_sends_clicks_as_the_model_takes_them(model):
    """SlicePredictor.clicked (the MONAI Label app's clicks): the recipe's input and the same probabilities as the
    model called with the box and the points itself (a slice already at the model size: no resizing)."""
    from cobot_med.predict import SlicePredictor

    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    image[..., 1] = image[..., 2] = image[..., 0]  # a CT slice: one channel, three times
    volume = torch.stack([torch.zeros(SIZE, SIZE), torch.as_tensor(image[..., 0]).float()], dim=-1)  # (X, Y, 2)
    box = np.array([6.0, 9.0, 50.0, 41.0])
    coords = np.array([[20.0, 30.0], [44.0, 12.0]])
    labels = np.array([1, 0])
    predictor = SlicePredictor(model, "cpu")
    expected = ours(model, image, boxes=box[None], coords=coords[None], labels=labels[None])[0, 0].sigmoid()
    assert torch.allclose(predictor.clicked(volume, 1, coords, labels, box.tolist()), expected, atol=1e-5)
    clicks_only = ours(model, image, coords=coords[None], labels=labels[None])[0, 0].sigmoid()
    assert torch.allclose(predictor.clicked(volume, 1, coords, labels), clicks_only, atol=1e-5)
    assert predictor.images_sent == 2
