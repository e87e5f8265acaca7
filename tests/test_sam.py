"""SAM building, strict checkpoint loading, SDPA attention and the promptable forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor

from cobot_med.model import ModelSpec, build_model
from cobot_med.sam import CheckpointError, build_sam, load_sam_checkpoint
from cobot_med.sam.attention import SdpaAttention, set_attention
from cobot_med.sam.build import ARCHITECTURES, SamArchitecture


def randomise_rel_pos(sam):
    """rel-pos tables start at zero; give them values so the bias path is exercised."""
    g = torch.Generator().manual_seed(1)
    for block in sam.image_encoder.blocks:
        for p in (block.attn.rel_pos_h, block.attn.rel_pos_w):
            p.data = torch.randn(p.shape, generator=g) * 0.5


def official_checkpoint(tmp_path, image_size=64, seed=0):
    """A state dict in the official key layout (plain dict of tensors, as sam_vit_b_01ec64.pth)."""
    torch.manual_seed(seed)
    sam = build_sam("tiny", image_size)
    randomise_rel_pos(sam)
    path = tmp_path / f"sam_tiny_{image_size}.pth"
    torch.save(sam.state_dict(), path)
    return path, sam


def test_official_layout_loads_strictly_and_exactly(tmp_path):
    path, source = official_checkpoint(tmp_path)
    target = build_sam("tiny", 64)
    sha = load_sam_checkpoint(target, path)
    assert len(sha) == 64
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_other_input_size_resizes_position_tensors(tmp_path):
    path, source = official_checkpoint(tmp_path, image_size=128)
    target = build_sam("tiny", 64)
    load_sam_checkpoint(target, path)
    assert target.image_encoder.pos_embed.shape == (1, 4, 4, 64)
    # global block (index 1) tables follow the 4x4 grid: 2*4-1 rows; windowed ones keep 2*7-1
    assert target.image_encoder.blocks[1].attn.rel_pos_h.shape[0] == 7
    assert target.image_encoder.blocks[0].attn.rel_pos_h.shape[0] == 13
    assert torch.equal(target.image_encoder.blocks[0].attn.rel_pos_h, source.image_encoder.blocks[0].attn.rel_pos_h)
    expected = torch.nn.functional.interpolate(
        source.image_encoder.pos_embed.permute(0, 3, 1, 2), size=(4, 4), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1)
    assert torch.allclose(target.image_encoder.pos_embed, expected)
    # prompt encoder follows the input size
    assert target.prompt_encoder.image_embedding_size == (4, 4)


def test_checkpoint_of_other_architecture_names_keys_and_shapes(tmp_path, monkeypatch):
    wide = SamArchitecture("tiny_wide", 96, 3, 4, (1,), window_size=7, prompt_embed_dim=64, decoder_mlp_dim=128,
                           iou_head_hidden_dim=64, default_image_size=64)
    monkeypatch.setitem(ARCHITECTURES, "tiny_wide", wide)
    path = tmp_path / "wide.pth"
    torch.save(build_sam("tiny_wide", 64).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_sam_checkpoint(build_sam("tiny", 64), path)
    message = str(err.value)
    assert "wide.pth" in message
    assert "missing keys: image_encoder.blocks.3" in message
    assert "image_encoder.patch_embed.proj.weight: checkpoint (96, 3, 16, 16) vs model (64, 3, 16, 16)" in message


@pytest.mark.parametrize(
    "content, expected",
    [
        (lambda p: torch.save({"encoder.weight": torch.zeros(3)}, p), "missing keys"),
        (lambda p: torch.save({"model": "not tensors"}, p), "not a SAM checkpoint"),
        (lambda p: p.write_bytes(b"\x00garbage" * 10), "not a readable PyTorch checkpoint"),
    ],
)
def test_wrong_files_fail_clearly(tmp_path, content, expected):
    path = tmp_path / "bad.pth"
    content(path)
    with pytest.raises(CheckpointError, match=expected) as err:
        load_sam_checkpoint(build_sam("tiny", 64), path)
    assert str(path) in str(err.value)


def test_truncated_and_missing_checkpoint(tmp_path):
    path, _ = official_checkpoint(tmp_path)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth: not a readable"):
        load_sam_checkpoint(build_sam("tiny", 64), truncated)
    with pytest.raises(CheckpointError, match="not found"):
        load_sam_checkpoint(build_sam("tiny", 64), tmp_path / "absent.pth")


def test_wrapped_and_ddp_prefixed_state_dict_loads(tmp_path):
    path, source = official_checkpoint(tmp_path)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, wrapped)
    target = build_sam("tiny", 64)
    load_sam_checkpoint(target, wrapped)
    assert torch.equal(target.mask_decoder.iou_token.weight, source.mask_decoder.iou_token.weight)


def test_bad_image_size_is_rejected():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        build_sam("tiny", 100)
    with pytest.raises(ValueError, match="unknown SAM architecture"):
        build_sam("vit_x", 64)


def test_sdpa_attention_equals_segment_anything(tmp_path):
    torch.manual_seed(0)
    sam = build_sam("tiny", 128)  # 8x8 tokens: windowed blocks pad to 14, global blocks see 8x8
    randomise_rel_pos(sam)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        set_attention(sam.image_encoder, "eager")
        reference = sam.image_encoder(x)
        assert set_attention(sam.image_encoder, "sdpa") == 4
        assert all(isinstance(b.attn, SdpaAttention) for b in sam.image_encoder.blocks)
        fast = sam.image_encoder(x)
    assert torch.allclose(fast, reference, atol=1e-5, rtol=1e-5)


def test_sdpa_is_the_default_and_keeps_state_dict_keys():
    model = build_model(ModelSpec(arch="tiny", image_size=64, peft="frozen"))
    assert all(isinstance(b.attn, SdpaAttention) for b in model.sam.image_encoder.blocks)
    assert set(model.sam.state_dict()) == set(build_sam("tiny", 64).state_dict())


def test_encoder_runs_once_for_all_boxes():
    model = build_model(ModelSpec(arch="tiny", image_size=64, peft="frozen")).eval()
    calls = []
    model.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    images = torch.rand(2, 3, 64, 64) * 255
    boxes = torch.tensor([[[4.0, 4, 30, 30], [10, 12, 60, 50], [0, 0, 63, 63]]]).repeat(2, 1, 1)
    with torch.no_grad():
        logits = model(images, boxes)
        upsampled = model(images, boxes, output_size=(64, 64))
    assert logits.shape == (2, 3, 16, 16)
    assert upsampled.shape == (2, 3, 64, 64)
    assert len(calls) == 2  # one per forward, whatever K
    # each box is decoded on its own image: image 1 alone gives the same logits
    with torch.no_grad():
        alone = model(images[1:], boxes[1:])
    assert torch.allclose(alone[0], logits[1], atol=1e-5)


def test_forward_rejects_bad_shapes():
    model = build_model(ModelSpec(arch="tiny", image_size=64, peft="frozen"))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 64, 64\)"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, 4))
    with pytest.raises(ValueError, match="boxes must be"):
        model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 4))


@pytest.mark.parametrize("height, width", [(48, 80), (64, 64)])
def test_frozen_prediction_equals_sam_predictor(tmp_path, height, width):
    path, _ = official_checkpoint(tmp_path)
    model = build_model(ModelSpec(arch="tiny", image_size=64, peft="frozen"), sam_checkpoint=path).eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    box = np.array([5, 6, width - 10, height - 8], dtype=np.float32)

    predictor = SamPredictor(model.sam)
    predictor.set_image(image)
    reference, _, _ = predictor.predict(box=box, multimask_output=False, return_logits=True)

    ours = model.predict_slice(image, box[None], resize="longest_side")
    assert ours.shape == (1, height, width)
    assert np.allclose(ours.numpy(), reference, atol=1e-4)
    if height == width == 64:  # a slice already at the model size: the square path is the same computation
        square = model.predict_slice(image, box[None], resize="square")
        assert np.allclose(square.numpy(), reference, atol=1e-4)


# --- input recipes (cobot_med.sam.recipes): SAM's is what the project has always done ---------------


def test_sam_recipe_is_todays_pipeline_bit_for_bit():
    from monai.transforms import Resize, Resized

    from cobot_med.sam.recipes import SamRecipe

    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="tiny", image_size=64, peft="frozen")).eval()
    recipe = model.recipe
    assert isinstance(recipe, SamRecipe) and recipe.ct_window is None
    volume = torch.rand(80, 48, 5) * 255  # (X, Y, Z): shrinks rows, grows columns
    zs = [1, 3]
    slices = volume[..., zs].permute(2, 0, 1)
    images, geometry = recipe.prepare(slices)
    reference = Resize((64, 64), mode="bilinear", anti_aliasing=True)(slices.float())  # the training chain's resize
    assert torch.equal(images, torch.as_tensor(reference)[:, None].expand(-1, 3, -1, -1))
    boxes = torch.tensor([[[4.0, 10.0, 30.0, 70.0], [0.0, 0.0, 48.0, 80.0]]]).repeat(2, 1, 1)
    scale = torch.tensor([64 / 48, 64 / 80, 64 / 48, 64 / 80])
    assert torch.equal(recipe.boxes_to_model(boxes, geometry), boxes * scale)
    with torch.no_grad():
        low_res = model(images, recipe.boxes_to_model(boxes, geometry))
        at_slice = model(images, recipe.boxes_to_model(boxes, geometry), output_size=(80, 48))
    assert torch.equal(recipe.logits_to_slices(low_res, geometry), at_slice)
    assert torch.equal(recipe.slice_probabilities(low_res, geometry), at_slice.sigmoid())
    # training targets: the slice chain's Resized(nearest-exact)
    masks = (torch.rand(2, 3, 80, 48) > 0.5).float()
    chain = Resized(keys="masks", spatial_size=(64, 64), mode="nearest-exact", anti_aliasing=False)
    expected = torch.stack([torch.as_tensor(chain({"masks": m})["masks"]) for m in masks])
    assert torch.equal(recipe.masks_to_model(masks, geometry), expected)
    # the one-slice convenience uses the recipe
    image = volume[..., 1]
    assert torch.allclose(model.predict_slice(image, boxes[0, :1]), at_slice[0, :1], atol=1e-5)  # batch of 1 vs 2


def test_recipe_is_recorded_and_overridable():
    spec = ModelSpec(arch="tiny", image_size=64, peft="frozen")
    assert spec.recipe["name"] == "sam" and spec.recipe["ct_window"] is None and spec.recipe["image_size"] == 64
    custom = ModelSpec(arch="tiny", image_size=64, peft="frozen", recipe={"ct_window": [-200, 300]})
    assert custom.input_recipe().window((-500, 1000)) == (-200.0, 300.0)
    assert spec.input_recipe().window((-500, 1000)) == (-500.0, 1000.0)  # None: the dataset's
    again = ModelSpec(**custom.to_dict())  # what an adapter config rebuilds
    assert again.recipe == custom.recipe
    legacy = {k: v for k, v in spec.to_dict().items() if k != "recipe"}  # adapters saved before recipes
    assert ModelSpec(**legacy).recipe == spec.recipe
    lite = ModelSpec(arch="lite_medsam", peft="frozen")
    assert lite.image_size == 256 and lite.recipe["ct_window"] == [-160.0, 240.0]
    assert ModelSpec(arch="lite_medsam", peft="frozen", recipe={"ct_window": None}).input_recipe().ct_window is None
    for bad, message in [
        ({"resize": "bicubic"}, "'resize' is fixed"),
        ({"window": [0, 1]}, "unknown recipe settings"),
        ({"ct_window": [300, -200]}, "low < high"),
        ({"name": "lite_medsam"}, "uses the 'sam' recipe"),
    ]:
        with pytest.raises(ValueError, match=message):
            ModelSpec(arch="tiny", image_size=64, peft="frozen", recipe=bad)


def test_recipe_normalisation_goes_into_the_model(monkeypatch):
    medsam_tiny = SamArchitecture("medsam_tiny", 64, 4, 4, (1, 3), window_size=7, prompt_embed_dim=64,
                                  decoder_mlp_dim=128, iou_head_hidden_dim=64, default_image_size=64, recipe="medsam")
    monkeypatch.setitem(ARCHITECTURES, "medsam_tiny", medsam_tiny)
    assert build_sam("medsam_tiny", 64).pixel_std.flatten().tolist() == [1.0, 1.0, 1.0]
    assert build_sam("medsam_tiny", 64).pixel_mean.flatten().tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(build_sam("tiny", 64).pixel_mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))
    assert ARCHITECTURES["medsam_vit_b"].recipe == "medsam"
    assert ARCHITECTURES["medsam_vit_b"].official_checkpoint == "medsam_vit_b.pth"


def test_medsam_recipe_follows_medsam_inference():
    """MedSAM_Inference.py (main): skimage resize order=3 -> uint8 -> min-max; boxes / [W, H, W, H] * 1024;
    masks: sigmoid, bilinear to (H, W), > 0.5."""
    transform = pytest.importorskip("skimage.transform")
    from cobot_med.sam.recipes import MedSamRecipe

    recipe = MedSamRecipe(image_size=128)
    assert recipe.ct_window == (-160.0, 240.0)
    rng = np.random.default_rng(0)
    img_np = rng.integers(0, 256, size=(90, 70), dtype=np.uint8)
    img_3c = np.repeat(img_np[:, :, None], 3, axis=-1)
    img_1024 = transform.resize(img_3c, (128, 128), order=3, preserve_range=True, anti_aliasing=True).astype(np.uint8)
    img_1024 = (img_1024 - img_1024.min()) / np.clip(img_1024.max() - img_1024.min(), a_min=1e-8, a_max=None)
    expected = torch.tensor(img_1024).float().permute(2, 0, 1).unsqueeze(0)
    images, geometry = recipe.prepare(torch.from_numpy(img_np.astype(np.float32))[None])
    assert torch.allclose(images, expected, atol=1e-6)
    box_np = np.array([[5, 6, 60, 80]])
    box_1024 = box_np / np.array([70, 90, 70, 90]) * 128
    assert np.allclose(recipe.boxes_to_model(torch.tensor(box_np).float(), geometry).numpy(), box_1024, atol=1e-5)
    low_res = torch.randn(1, 1, 32, 32) * 4
    reference = F.interpolate(torch.sigmoid(low_res), size=(90, 70), mode="bilinear", align_corners=False)
    assert torch.equal(recipe.slice_probabilities(low_res, geometry), reference)
    assert torch.equal(recipe.logits_to_slices(low_res, geometry) > 0, reference > 0.5)
