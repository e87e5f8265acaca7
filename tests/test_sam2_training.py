"""Training SAM 2 slice-wise with box prompts through the same bundles (issue 26 item 3), the literal command:

    python -m monai.bundle run training --config_file bundles/adome.json --arch sam2.1_hiera_t --sam_checkpoint ...

on phantoms, one epoch, at 64 px (the SAM 2 recipe resizes any slice to any multiple of 32). The checkpoint is a
randomly initialised Hiera-T saved in Meta's format ({"model": state_dict}), so the run also loads a SAM 2.1 file
strictly, as it would Meta's (no SAM 2 weights can be downloaded here).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cobot_med.data.phantoms import make_phantoms
from test_bundle_command import ROOT, finished_run, monai_bundle, ok


@pytest.mark.slow
@pytest.mark.timeout(200)  # 38 s alone
def test_the_literal_training_command_trains_lora_cobot_on_sam2(tmp_path):
    from cobot_med.sam2_base.build import build_sam2

    torch.manual_seed(0)
    checkpoint = tmp_path / "sam2.1_hiera_tiny.pt"
    base = build_sam2("sam2.1_hiera_t", 64)
    torch.save({"model": base.state_dict()}, checkpoint)
    data, out = tmp_path / "data", tmp_path / "out"
    make_phantoms("adome", data, cases=3, seed=11, shape=(40, 40, 8))
    printed = ok(monai_bundle(
        "training", "bundles/adome.json", ROOT, "--dataset_dir", str(data), "--output_dir", str(out),
        "--arch", "sam2.1_hiera_t", "--sam_checkpoint", str(checkpoint), "--image_size", "64", "--epochs", "1",
        "--peft", "lora+cobot", "--eval_batch_size", "16", "--val_fraction", "0.34", "--test_fraction", "0.34",
        "--prompts", "tight"))
    assert "lora+cobot on sam2.1_hiera_t at 64 px, 1 epoch" in printed
    config = json.loads((out / "adapter_best" / "adapter_config.json").read_text())
    assert config["model"]["arch"] == "sam2.1_hiera_t" and config["model"]["image_size"] == 64
    assert config["model"]["recipe"]["name"] == "sam2" and not config["full_weights"]
    tensors = load_file(out / "adapter_best" / "adapter_model.safetensors")
    # the adapter: LoRA + COBOT in the Hiera blocks and the mask decoder; nothing of the memory modules
    assert {k.split(".")[0] for k in tensors} == {"image_encoder", "sam_mask_decoder"}
    assert any(".cobot." in k for k in tensors) and any(".attn.qkv.lora_A.q." in k for k in tensors)
    assert not [k for k in tensors if k.startswith("image_encoder.") and "lora" not in k and ".cobot." not in k]
    run = finished_run(out)
    assert run.info.status == "FINISHED" and run.data.params["arch"] == "sam2.1_hiera_t"
    assert run.data.params["image_encoder_trainable"] == "70752"  # README's count (docs/sam2.md)
    assert 0 <= run.data.metrics["test_dsc"] <= 1 and "val_dsc" in run.data.metrics
