"""SAM 2.1 / MedSAM2 bases: built from sam2's own yaml, strict checkpoints, recipes, and parity with sam2's
``SAM2ImagePredictor`` on randomly initialised weights (no SAM 2 weights can be downloaded here, docs/sam2.md).

The reference side is sam2 1.1.0's own ``SAM2ImagePredictor`` (``set_image`` + ``predict``) on the same
``SAM2VideoPredictor`` instance, fed a uint8 RGB slice as its docstring asks; for MedSAM2 it is fed the slice
after ``medsam2_infer_3D_CT.py``'s ``resize_grayscale_to_rgb_and_resize`` (PIL, 512 x 512) and its low-res
logits go to the slice as MedSAM2's video predictor sends them (``_get_orig_video_res_output``: bilinear).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cobot_med.errors import SettingsError
from cobot_med.model import ModelSpec, build_model
from cobot_med.sam import CheckpointError
from cobot_med.sam.recipes import MedSam2Recipe, Sam2Recipe

SLICE = (200, 160)
BOXES = np.array([[20, 30, 120, 150], [50, 10, 90, 60]], dtype=np.float32)


def ct_like_slice(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full(SLICE, 60.0)
    image[40:160, 30:130] = 170.0
    return np.clip(image + rng.normal(0, 25, SLICE), 0, 255).astype(np.uint8)


def sam2_predictor(model):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model.sam2)
    # sam2 1.1.0 hard-codes the 1024-px feature grids; MedSAM2's fork derives them from the image size
    predictor._bb_feat_sizes = [(model.image_size // 4 // 2**k,) * 2 for k in range(3)]
    return predictor


def reference_logits(model, image: np.ndarray, boxes: np.ndarray, medsam2: bool) -> torch.Tensor:
    """Slice logits (K, H, W) from sam2's image predictor, each box alone (``predict(box=...)``)."""
    predictor = sam2_predictor(model)
    H, W = image.shape
    if not medsam2:
        predictor.set_image(np.repeat(image[..., None], 3, axis=2))
        return torch.stack([torch.as_tensor(predictor.predict(box=box, multimask_output=False,
                                                              return_logits=True)[0][0]) for box in boxes])
    S = model.image_size
    predictor.set_image(np.asarray(Image.fromarray(image).convert("RGB").resize((S, S))))
    out = []
    for box in boxes:  # add_new_points_or_box: box / [W, H] * S
        low = predictor._predict(None, None, predictor._transforms.transform_boxes(
            torch.as_tensor(box), normalize=True, orig_hw=(H, W)), None, False, return_logits=True)[2]
        out.append(F.interpolate(low.float(), (H, W), mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(out)


@pytest.mark.slow
@pytest.mark.timeout(120)  # 15 s (Hiera-T at 1024 px) and 9 s (MedSAM2 at 512) alone
@pytest.mark.parametrize("arch", ["sam2.1_hiera_t", "medsam2"])
def test_parity_with_sam2_image_predictor_at_the_recipe_size(arch):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch=arch, peft="frozen")).eval()
    assert model.image_size == {"sam2.1_hiera_t": 1024, "medsam2": 512}[arch]
    image = ct_like_slice()
    ours = model.predict_slice(image.astype(np.float32), torch.as_tensor(BOXES))
    reference = reference_logits(model, image, BOXES, medsam2=arch == "medsam2")
    assert ours.shape == reference.shape == (2, *SLICE)
    assert reference.abs().max() > 0.05  # random weights still answer something to compare
    assert (ours - reference).abs().max() < 1e-4
    assert torch.equal(ours > 0, reference > 0)


def test_sam2_recipe_is_sam2_transforms():
    from sam2.utils.transforms import SAM2Transforms

    image = ct_like_slice(1)
    recipe = Sam2Recipe(256)
    ours, geometry = recipe.prepare(image[None].astype(np.float32))
    theirs = SAM2Transforms(256, 0.0)(np.repeat(image[..., None], 3, axis=2))
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (recipe.pixel_mean, recipe.pixel_std))
    assert torch.allclose((ours[0] - mean) / std, theirs, atol=1e-5)
    boxes = recipe.boxes_to_model(torch.as_tensor(BOXES), geometry)
    expected = SAM2Transforms(256, 0.0).transform_boxes(torch.as_tensor(BOXES), normalize=True, orig_hw=SLICE)
    assert torch.allclose(boxes, expected.reshape(-1, 4))


def test_medsam2_recipe_is_its_inference_script():
    image = ct_like_slice(2).astype(np.float32) + 0.7  # the script truncates to uint8 before PIL
    recipe = MedSam2Recipe()
    assert recipe.image_size == 512 and recipe.ct_window is None
    ours, _ = recipe.prepare(image[None])
    rgb = Image.fromarray(image.astype(np.uint8)).convert("RGB").resize((512, 512))
    expected = torch.as_tensor(np.asarray(rgb).transpose(2, 0, 1) / 255.0, dtype=torch.float32)
    assert torch.equal(ours[0], expected)


@pytest.mark.slow
@pytest.mark.timeout(40)  # 6 s alone
def test_checkpoints_load_strictly_and_a_wrong_size_is_one_named_error(tmp_path):
    """Meta's format loads strictly at another input size; another variant's file is one named error; and the
    loaded model is refused by the exporter in one line (SAM 2 is not exported)."""
    from cobot_med.sam2_base.build import build_sam2

    small = build_sam2("sam2.1_hiera_s", 128)
    path = tmp_path / "sam2.1_hiera_small.pt"
    torch.save({"model": small.state_dict()}, path)  # Meta's format
    loaded = build_model(ModelSpec(arch="sam2.1_hiera_s", image_size=256, peft="frozen"), path)
    state = loaded.sam2.state_dict()
    assert all(torch.equal(state[k], v) for k, v in small.state_dict().items())
    assert loaded.base_sha256 and loaded.image_size == 256
    from cobot_med.export.exporter import export_model
    from cobot_med.export.manifest import ExportError

    with pytest.raises(ExportError, match="sam2.1_hiera_s: exporting SAM 2 bases is not implemented"):
        export_model(loaded, tmp_path / "exported")  # refused in one line, nothing written
    assert not (tmp_path / "exported").exists()
    with pytest.raises(CheckpointError, match=r"does not match the model \(checkpoint holds sam2.1_hiera_s "
                                              r"\(Hiera, width 96, 16 blocks\)\)") as err:
        build_model(ModelSpec(arch="sam2.1_hiera_t", image_size=128, peft="frozen"), path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch, owner, where", [
    ("sam2.1_hiera_b+", "Meta's", "dl.fbaipublicfiles.com/segment_anything_2/092824"),
    ("medsam2", "MedSAM2's", "huggingface.co/wanglab/MedSAM2"),
])
def test_a_named_base_without_weights_says_where_they_come_from(arch, owner, where):
    from cobot_med.engine.checks import check_model_files

    settings = SimpleNamespace(adapter="", sam_checkpoint="", arch=arch)
    with pytest.raises(SettingsError, match=f"arch {re.escape(arch)} needs {owner} weights: download .*{where}") as err:
        check_model_files(settings)
    assert "\n" not in str(err.value)
