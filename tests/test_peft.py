"""The PEFT library's shared checks, run over every method (peft's test-matrix shape)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from cobot_med.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterError, load_adapter, save_adapter
from cobot_med.model import ModelSpec, build_model
from cobot_med.peft import (
    CobotConfig,
    auxiliary_loss,
    count_parameters,
    merge_adapters,
    parameter_groups,
    unmerge_adapters,
)
from cobot_med.peft.cobot import HypercomplexLinear
from cobot_med.peft.conv_lora import ConvMoE
from cobot_med.sam import build_sam
from toy import SIZE, loss_fn, tiny, toy_batch

CORE = ["frozen", "decoder", "full", "lora", "lora+cobot", "adaptformer", "adaptformer+cobot", "conv_lora"]
# methods whose init leaves SAM unchanged at step 0, with the options that make it so: LoRA's
# default is the SAM-COBOT authors' Xavier-normal A and B (ΔW ≠ 0 at step 0), zero_b is Hu et al.'s
ZERO_INIT = [
    ("lora", {"init": "zero_b"}),
    ("lora+cobot", {"init": "zero_b"}),
    ("adaptformer", {}),
    ("adaptformer+cobot", {}),
    ("conv_lora", {}),
]
OWN_PARAMETERS = {  # substrings that name each method's own encoder parameters
    "lora": ["lora_A", "lora_B"],
    "lora+cobot": ["lora_A", "lora_B", ".cobot."],
    "adaptformer": [".adaptformer."],
    "adaptformer+cobot": [".adaptformer.", ".cobot."],
    "conv_lora": ["lora_A", "lora_B", ".moe."],
}











def perturb_adapters(model, scale=0.05):
    """Give zero-initialised adapter weights values, so equality checks mean something."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in model.adapter_keys:
            tensor = model.sam.state_dict(keep_vars=True)[name]
            if tensor.is_floating_point() and not name.startswith("mask_decoder"):
                tensor.add_(torch.randn(tensor.shape, generator=g) * scale)


def test_vit_b_counts_match_the_paper():
    expected = {"frozen": 0, "decoder": 0, "lora": 147456, "lora+cobot": 148320,
                "adaptformer": 322752, "adaptformer+cobot": 324048, "conv_lora": 119232}
    for method, count in expected.items():
        counts = count_parameters(build_model(ModelSpec("vit_b", 1024, method)).sam)
        assert counts["image_encoder_trainable"] == count, method
        assert counts["mask_decoder_trainable"] == (0 if method == "frozen" else 4058340), method
        assert counts["prompt_encoder_trainable"] == 0


def test_params_command_prints_exact_counts(capsys):
    from cobot_med.cli import main

    assert main(["params", "--arch", "vit_b", "--peft", "lora+cobot", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["image_encoder_trainable"] == 148320
    assert out["total_trainable"] == 148320 + 4058340
    assert out["total"] > 93_000_000


@pytest.mark.parametrize("method", CORE)
def test_only_the_method_trains(method):
    model = tiny(method)
    trainable = [n for n, p in model.sam.named_parameters() if p.requires_grad]
    encoder = [n for n in trainable if n.startswith("image_encoder.")]
    if method in ("frozen", "decoder"):
        assert encoder == []
    elif method == "full":
        assert len(encoder) == len(list(model.sam.image_encoder.parameters()))
    else:
        assert encoder and all(any(s in n for s in OWN_PARAMETERS[method]) for n in encoder), encoder
    decoder = [n for n in trainable if n.startswith("mask_decoder.")]
    assert bool(decoder) == (method != "frozen")
    assert not any(n.startswith("prompt_encoder.") for n in trainable)


@pytest.mark.parametrize("method, options", ZERO_INIT)
def test_identity_at_step_zero(method, options):
    images, boxes, _ = toy_batch()
    with torch.no_grad():
        reference = tiny("frozen").eval()(images, boxes)
        adapted = tiny(method, **options).eval()(images, boxes)
    assert torch.allclose(adapted, reference, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "lora+cobot"])
def test_authors_lora_init_changes_sam_at_step_zero(method):
    """The default (authors') init has ΔW = B A ≠ 0: the model is not SAM before training."""
    images, boxes, _ = toy_batch()
    with torch.no_grad():
        reference = tiny("frozen").eval()(images, boxes)
        adapted = tiny(method).eval()(images, boxes)
    assert not torch.allclose(adapted, reference, atol=1e-3)


@pytest.mark.parametrize("method", [m for m in CORE if m != "frozen"])
def test_a_few_steps_lower_the_loss(method):
    model = tiny(method).train()
    images, boxes, target = toy_batch()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        torch.manual_seed(0)  # same dropout / gate noise each step: the loss change is the optimiser's
        loss = loss_fn(model(images, boxes, output_size=(SIZE, SIZE)), target)
        aux = auxiliary_loss(model)
        if aux is not None:
            loss = loss + aux
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("method", ["lora", "lora+cobot", "adaptformer+cobot", "conv_lora", "decoder", "full"])
def test_adapter_round_trip_on_a_base_checkpoint(tmp_path, method):
    base = tmp_path / "sam_tiny.pth"
    torch.manual_seed(5)
    torch.save(build_sam("tiny", SIZE).state_dict(), base)
    model = tiny(method, checkpoint=base).eval()
    perturb_adapters(model)
    images, boxes, _ = toy_batch()
    with torch.no_grad():
        expected = model(images, boxes)
    folder = save_adapter(model, tmp_path / "adapter")
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["model"]["peft"] == method and config["full_weights"] is False
    from safetensors.torch import load_file

    saved = load_file(str(folder / WEIGHTS_NAME))
    assert set(saved) == set(model.adapter_keys)
    if method != "full":  # adapter only: no frozen encoder weight in the file
        assert not any(k.endswith("attn.proj.weight") for k in saved)
    for path in (folder, folder / WEIGHTS_NAME):  # the folder or the file inside it
        with torch.no_grad():
            reloaded = load_adapter(path, sam_checkpoint=base).eval()(images, boxes)
        assert torch.equal(reloaded, expected)


def test_adapter_refuses_another_base(tmp_path):
    base, other = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.manual_seed(1)
    torch.save(build_sam("tiny", SIZE).state_dict(), base)
    torch.save(build_sam("tiny", SIZE).state_dict(), other)
    folder = save_adapter(tiny("lora", checkpoint=base), tmp_path / "adapter")
    with pytest.raises(AdapterError, match="trained on the checkpoint with sha256"):
        load_adapter(folder, sam_checkpoint=other)
    with pytest.raises(AdapterError, match="pass that checkpoint"):
        load_adapter(folder)
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        load_adapter(tmp_path)


def test_adapter_with_wrong_keys_fails(tmp_path):
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base.pth"
    torch.save(build_sam("tiny", SIZE).state_dict(), base)
    folder = save_adapter(tiny("lora", checkpoint=base), tmp_path / "adapter")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    tensors["image_encoder.blocks.0.attn.qkv.lora_A.k.weight"] = torch.zeros(4, 64)
    save_file(tensors, str(folder / WEIGHTS_NAME))
    with pytest.raises(AdapterError, match="SHA-256 differs from the one recorded"):  # changed behind its record
        load_adapter(folder, sam_checkpoint=base)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["weights_sha256"] = hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    (folder / "adapter_config.json").write_text(json.dumps(config))  # a consistent file with a key SAM lacks
    with pytest.raises(AdapterError, match="unexpected.*lora_A.k"):
        load_adapter(folder, sam_checkpoint=base)


def test_model_without_base_saves_full_weights(tmp_path):
    model = tiny("lora+cobot").eval()
    perturb_adapters(model)
    images, boxes, _ = toy_batch()
    folder = save_adapter(model, tmp_path / "demo")
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["full_weights"] is True and config["base_checkpoint_sha256"] is None
    torch.manual_seed(123)  # a different random base: only the saved weights can restore the outputs
    reloaded = load_adapter(folder).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(images, boxes), model(images, boxes))


def test_ddp_prefix_is_stripped(tmp_path):
    model = tiny("lora")
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DistributedDataParallel looks like to save_adapter
    folder = save_adapter(wrapper, tmp_path / "ddp")
    from safetensors.torch import load_file

    assert not any(k.startswith("module.") for k in load_file(str(folder / WEIGHTS_NAME)))


@pytest.mark.parametrize("method", ["lora", "lora+cobot"])
def test_merge_equals_unmerged(method):
    model = tiny(method).eval()
    perturb_adapters(model, scale=0.2)
    images, boxes, _ = toy_batch()
    with torch.no_grad():
        unmerged = model(images, boxes)
        assert merge_adapters(model) == 4
        merged = model(images, boxes)
        with pytest.raises(AdapterError, match="merged"):
            save_adapter(model, "/tmp/never-written")
        unmerge_adapters(model)
        again = model(images, boxes)
    assert not torch.allclose(unmerged, tiny("frozen").eval()(images, boxes), atol=1e-3)  # the adapter matters
    assert torch.allclose(merged, unmerged, atol=1e-5)
    assert torch.allclose(again, unmerged, atol=1e-5)


def test_conv_lora_aux_loss_is_finite_and_differentiable():
    model = tiny("conv_lora").train()
    images, boxes, _ = toy_batch()
    model(images, boxes)
    aux = auxiliary_loss(model)
    assert aux is not None and torch.isfinite(aux)
    aux.backward()
    moe = next(m for m in model.modules() if isinstance(m, ConvMoE))
    assert moe.w_noise.grad is not None and torch.isfinite(moe.w_noise.grad).all()
    assert auxiliary_loss(tiny("lora")) is None


def test_conv_lora_gate_routes_each_sample_to_one_expert():
    moe = ConvMoE(channels=3, num_experts=8, top_k=1, noisy_gating=True, aux_loss_weight=1.0).train()
    torch.nn.init.normal_(moe.w_gate)
    gates, load = moe.gates(torch.randn(16, 3))
    assert ((gates > 0).sum(1) == 1).all()
    assert load.shape == (8,) and torch.isfinite(load).all()


def test_quaternion_head_is_a_scaled_rotation():
    head = HypercomplexLinear(4)
    w = head.as_matrix().detach()
    parts = (head.r_weight, head.i_weight, head.j_weight, head.k_weight)
    norm = sum(float(p.detach()) ** 2 for p in parts)
    assert torch.allclose(w.t() @ w, torch.eye(4) * norm, atol=1e-6)
    assert float(head.r_weight) == 0.0  # authors' init
    with pytest.raises(ValueError, match="divisible by 4"):
        HypercomplexLinear(6)


@pytest.mark.parametrize(
    "options, extra",
    [
        ({}, 96 + 576 + 96 + 96),  # C, R, γ, quaternion heads
        ({"relation": "identity"}, 96 + 96 + 96),  # RM off: R frozen at I
        ({"relation": "fixed"}, 96 + 96 + 96),  # Table 2: frozen random R
        ({"head": "linear"}, 96 + 576 + 96 + 24 * 16),  # Table 3: plain 4x4 Linear
        ({"head": "none"}, 96 + 576 + 96),  # HL off
        ({"cross_block_coefficients": False, "relation": "identity"}, 96 + 96),  # CoS off: γ and heads
    ],
)
def test_cobot_ablation_switches_on_vit_b(options, extra):
    model = build_model(ModelSpec("vit_b", 1024, "lora+cobot", {"cobot": options}))
    assert count_parameters(model.sam)["image_encoder_trainable"] == 147456 + extra
    relation = getattr(model.sam.image_encoder.cobot, "relation", None)
    if options.get("relation") == "fixed":
        assert not relation.requires_grad and not torch.equal(relation, torch.eye(24))


def test_cobot_rejects_inconsistent_switches():
    with pytest.raises(ValueError, match="cross_block_coefficients=False"):
        CobotConfig(cross_block_coefficients=False)
    with pytest.raises(ValueError, match="relation"):
        CobotConfig(relation="sometimes")
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny("lora+cobot", rank=6)
    with pytest.raises(ValueError, match="unknown option"):
        tiny("lora", rnak=4)
    with pytest.raises(ValueError, match="unknown PEFT method"):
        tiny("lorra")


def test_cobot_changes_the_branch_and_still_merges():
    """With B non-zero, COBOT's coefficients and head change the LoRA update (and fold into ΔW)."""
    plain, cobot = tiny("lora"), tiny("lora+cobot")
    cobot.sam.load_state_dict(plain.sam.state_dict(), strict=False)  # same A, B, base
    perturb_adapters(plain)
    cobot.sam.load_state_dict(plain.sam.state_dict(), strict=False)
    images, boxes, _ = toy_batch()
    with torch.no_grad():
        assert not torch.allclose(plain.eval()(images, boxes), cobot.eval()(images, boxes), atol=1e-4)


def test_parameter_groups_follow_the_authors():
    groups = {g["name"]: g for g in parameter_groups(tiny("adaptformer+cobot"))}
    assert groups["cobot"]["lr"] == 1.25e-4 and groups["peft"]["lr"] == 1.25e-6
    cobot_count = sum(p.numel() for p in groups["cobot"]["params"])
    # tiny: 4 sites of width 16: C 64 + R 16 + heads 4*64 (γ trains with the rest, as METHODS.md lists C, R, H)
    assert cobot_count == 64 + 16 + 256
    assert "cobot" not in {g["name"] for g in parameter_groups(tiny("lora"))}
