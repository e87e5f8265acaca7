"""PEFT methods on LiteMedSAM's TinyViT encoder (issue 14 item 3)."""

from __future__ import annotations

import json

import pytest
import torch

from cobot_med.errors import SettingsError
from cobot_med.model import ModelSpec, build_model
from cobot_med.peft import count_parameters, merge_adapters, unmerge_adapters
from cobot_med.peft.blocks import adaptable_blocks

WIDTHS = [128] * 2 + [160] * 6 + [320] * 2  # stages 2-4: the 10 attention blocks
# per block of width C: LoRA q and v 2 x (4C + 4C); AdaptFormer LN 2C + down 16C + 16 + up 16C + C;
# Conv-LoRA A 3C + B 9C + experts 8 x 84 + gate 48; Adapter 2 x (8C + 8 + 8C + C)
EXPECTED = {
    "lora": 16 * sum(WIDTHS),  # 29,696
    "lora+cobot": 16 * sum(WIDTHS) + 4 * 20 + 20 * 20 + 4 * 20 + 20 * 4,  # + C, R, γ, heads = 30,336
    "adaptformer": sum(35 * c + 16 for c in WIDTHS),  # 65,120
    "adaptformer+cobot": sum(35 * c + 16 for c in WIDTHS) + 16 * 10 + 10 * 10 + 16 * 10 + 10 * 64,  # 66,180
    "conv_lora": sum(12 * c + 720 for c in WIDTHS),  # 29,472
    "adapter": sum(2 * (17 * c + 8) for c in WIDTHS),  # 63,264
}


def lite(peft, seed=0, **options):
    torch.manual_seed(seed)
    return build_model(ModelSpec(arch="lite_medsam", peft=peft, peft_options=options))


def slice_and_box():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 256, 256, generator=g) * 255
    return image, torch.tensor([[[60.0, 70, 180, 200]]])


def test_adaptable_blocks_of_tiny_vit():
    blocks = adaptable_blocks(lite("frozen").sam.image_encoder)
    assert [b.width for b in blocks] == WIDTHS
    assert [b.num_heads for b in blocks] == [4] * 2 + [5] * 6 + [10] * 2
    first = blocks[0]  # 4 heads of 32: per head [q k v], 96 columns
    assert first.qkv_columns("q")[:33].tolist() == list(range(32)) + [96]
    assert first.qkv_columns("v")[:2].tolist() == [64, 65]
    assert sorted(torch.cat([first.qkv_columns(t) for t in "qkv"]).tolist()) == list(range(3 * 128))


def test_adaptable_blocks_of_sam_vit():
    blocks = adaptable_blocks(build_model(ModelSpec(arch="tiny", image_size=64, peft="frozen")).sam.image_encoder)
    assert [b.width for b in blocks] == [64] * 4
    assert blocks[0].qkv_columns("v").tolist() == list(range(128, 192))


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_counts_on_lite_medsam(method):
    assert count_parameters(lite(method).sam)["image_encoder_trainable"] == EXPECTED[method]


def test_params_command_prints_the_lite_medsam_count(capsys):
    from cobot_med.cli import main

    assert main(["params", "--arch", "lite_medsam", "--peft", "adaptformer+cobot", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["image_encoder_trainable"] == 66180


def test_lora_lands_on_tiny_vits_q_and_v_heads():
    """TinyViT splits qkv per head ([q k v] of each head): LoRA's q update must land in every head's q."""
    model = lite("lora")
    block = adaptable_blocks(model.sam.image_encoder)[2]  # width 160, 5 heads
    layer = block.attention.qkv
    x = torch.randn(2, 196, 160)
    with torch.no_grad():
        out = layer(x).view(2, 196, 5, -1).split([32, 32, 32], dim=3)  # as TinyViT's Attention does
        base = layer.base_layer(x).view(2, 196, 5, -1).split([32, 32, 32], dim=3)
        for part, target in ((0, "q"), (2, "v")):
            delta = layer.lora_B[target](layer.lora_A[target](x)).view(2, 196, 5, 32)
            torch.testing.assert_close(out[part], base[part] + delta, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], base[1])  # k untouched


@pytest.mark.slow  # 2-11 s alone on 2 cores: the full suite, not the inner loop
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["lora", "lora+cobot", "adaptformer", "adaptformer+cobot", "conv_lora", "adapter", "bitfit"])
def test_forward_and_backward_on_lite_medsam(method):
    model = lite(method).train()
    image, box = slice_and_box()
    logits = model(image, box)
    assert logits.shape[:2] == (1, 1) and torch.isfinite(logits).all()
    logits.mean().backward()
    # every trained tensor gets a gradient from the task loss, except Conv-LoRA's MoE: experts only where the
    # top-1 gate routed a window, and the gate itself only through the load-balancing loss (AutoGluon's gates
    # are 1.0 and do not multiply the experts)
    grads = [p.grad for n, p in model.sam.image_encoder.named_parameters() if p.requires_grad and ".moe." not in n]
    assert grads and all(g is not None for g in grads)


def test_adaptformer_reads_tiny_vits_normalised_mlp_input():
    """The branch reads mlp.norm(x) by default and x with branch_input='residual_stream'."""
    outputs = {}
    for reads in ("mlp_input", "residual_stream"):
        block = adaptable_blocks(lite("adaptformer", branch_input=reads).sam.image_encoder)[0].block
        torch.manual_seed(1)
        with torch.no_grad():
            for p in block.mlp.adaptformer.parameters():
                p.normal_()
            x = torch.randn(1, 10, 128) * 3 + 1
            outputs[reads] = block.eval().mlp(x) - block.mlp.base_layer(x)  # eval: the branch (on the block) too
            branch = block.mlp.adaptformer
            source = block.mlp.base_layer.norm(x) if reads == "mlp_input" else x
            torch.testing.assert_close(outputs[reads], branch(source))
    assert not torch.allclose(outputs["mlp_input"], outputs["residual_stream"], atol=1e-3)


@pytest.mark.slow  # 2-11 s alone on 2 cores: the full suite, not the inner loop
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["lora", "lora+cobot"])
def test_merge_equals_unmerged_on_lite_medsam(method):
    model = lite(method).eval()
    image, box = slice_and_box()
    with torch.no_grad():
        frozen = lite("frozen").eval()(image, box)
        unmerged = model(image, box)
        assert merge_adapters(model) == 10
        merged = model(image, box)
        unmerge_adapters(model)
        again = model(image, box)
    assert not torch.allclose(unmerged, frozen, atol=1e-3)  # the authors' init: ΔW ≠ 0
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ssf", "vpt", "sam_adapter", "lst"])
def test_methods_that_do_not_apply_say_why(method):
    with pytest.raises(SettingsError, match=f"peft '{method}' does not apply to the TinyViT"):
        lite(method)


@pytest.mark.slow  # 2-11 s alone on 2 cores: the full suite, not the inner loop
@pytest.mark.timeout(300)
def test_training_leaves_the_frozen_batch_norms_of_tinyvit_alone():
    """A training step with an adapter must not move the frozen encoder's running statistics."""
    model = build_model(ModelSpec(arch="lite_medsam", peft="lora+cobot")).train()
    norms = [m for m in model.sam.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.training for m in norms)
    before = [m.running_mean.clone() for m in norms]
    images, boxes = torch.rand(2, 3, 256, 256), torch.tensor([[[40.0, 40.0, 160.0, 150.0]]] * 2)
    model(images, boxes).mean().backward()
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))
    full = build_model(ModelSpec(arch="lite_medsam", peft="full")).train()  # trainable norms do train
    assert all(m.training for m in full.sam.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.slow  # a few seconds: two LiteMedSAM forwards
@pytest.mark.timeout(300)
def test_full_fine_tuning_keeps_the_running_statistics_it_trained(tmp_path):
    """Under ``full`` TinyViT's batch norms train, so their running statistics belong to the adapter: saved,
    loaded, and marking the base as changed on unload."""
    from cobot_med.adapter import load_adapter, save_adapter

    model = lite("full")
    assert any(k.endswith("running_mean") for k in model.adapter_keys)
    assert not any(k.endswith("running_mean") for k in lite("lora").adapter_keys)  # frozen norms keep the base's
    image, box = slice_and_box()
    model.train()(image, box)  # one training-mode forward moves the running statistics
    with torch.no_grad():
        expected = model.eval()(image, box)
        loaded = load_adapter(save_adapter(model, tmp_path / "full"))
        torch.testing.assert_close(loaded.eval()(image, box), expected)
    model.unload()
    assert model.base_sha256 is None


def test_a_full_weights_adapter_of_lite_medsam_loads(tmp_path):
    """Once its base was changed in place, a LiteMedSAM model saves every tensor; loading that folder must not
    put the packaged base under it (and then refuse the extra keys)."""
    from cobot_med.adapter import load_adapter, save_adapter

    model = lite("decoder")
    with torch.no_grad():
        model.sam.mask_decoder.iou_prediction_head.layers[0].bias.add_(0.1)
    model.unload()
    assert model.base_sha256 is None
    loaded = load_adapter(save_adapter(model, tmp_path / "full"))
    assert loaded.base_sha256 is None
    state = loaded.sam.state_dict()
    assert all(torch.equal(state[k], v) for k, v in model.sam.state_dict().items())
