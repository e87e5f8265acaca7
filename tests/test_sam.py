"""SAM building, strict checkpoint loading, SDPA attention and the promptable forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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
