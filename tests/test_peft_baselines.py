"""The Conv-LoRA table's remaining baselines (BitFit, SSF, VPT, Adapter, SAM-Adapter, LST)
through the PEFT library's shared checks, plus what each method's design promises."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

from cobot_med.adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from cobot_med.model import ModelSpec, build_model
from cobot_med.peft import METHODS, count_parameters
from cobot_med.peft.sam_adapter import high_pass
from cobot_med.peft.vpt import PromptedAttention
from cobot_med.sam import build_sam
from toy import SIZE, loss_fn, tiny, toy_batch

BASELINES = ["bitfit", "ssf", "vpt", "adapter", "sam_adapter", "lst"]
VIT_B_COUNTS = {  # image encoder trainable, as computed in each module's docstring
    "bitfit": 102_656,
    "ssf": 206_336,
    "vpt": 147_456,
    "adapter": 313_536,
    "sam_adapter": 63_312,
    "lst": 2_388_076,
}
OWN_PARAMETERS = {  # how each method's own encoder parameters are named
    "bitfit": lambda n: n.endswith(".bias"),
    "ssf": lambda n: ".ssf." in n,
    "vpt": lambda n: n.endswith(".attn.prompts"),
    "adapter": lambda n: ".adapter." in n,
    "sam_adapter": lambda n: n.startswith("image_encoder.sam_adapter."),
    "lst": lambda n: n.startswith("image_encoder.lst."),
}
# (method, options) whose init leaves SAM unchanged at step 0
IDENTITY_AT_INIT = [
    ("bitfit", {}),
    ("ssf", {}),
    ("adapter", {}),
    ("lst", {}),
    ("sam_adapter", {"zero_init": True}),
]











def own_encoder_parameters(model, method):
    return {n: p for n, p in model.sam.named_parameters() if n.startswith("image_encoder.") and OWN_PARAMETERS[method](n)}


def perturb(model, method, scale=0.05, seed=3):
    """Move the method's own encoder parameters off their init, so equality checks mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in own_encoder_parameters(model, method).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_every_baseline_is_registered():
    assert set(BASELINES) <= set(METHODS)


@pytest.mark.parametrize("method", BASELINES)
def test_vit_b_counts(method):
    counts = count_parameters(build_model(ModelSpec("vit_b", 1024, method)).sam)
    assert counts["image_encoder_trainable"] == VIT_B_COUNTS[method]
    assert counts["mask_decoder_trainable"] == 4_058_340
    assert counts["prompt_encoder_trainable"] == 0
    assert counts["total_trainable"] == VIT_B_COUNTS[method] + 4_058_340


def test_params_command_prints_the_count(capsys):
    from cobot_med.cli import main

    assert main(["params", "--arch", "vit_b", "--peft", "sam_adapter", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peft"] == "sam_adapter" and out["image_encoder_trainable"] == VIT_B_COUNTS["sam_adapter"]


@pytest.mark.parametrize("method", BASELINES)
def test_only_the_method_trains(method):
    model = tiny(method)
    trainable = {n for n, p in model.sam.named_parameters() if p.requires_grad}
    encoder = {n for n in trainable if n.startswith("image_encoder.")}
    assert encoder and encoder == set(own_encoder_parameters(model, method)), sorted(encoder)
    assert {n for n in trainable if n.startswith("mask_decoder.")} == {
        "mask_decoder." + n for n, _ in model.sam.mask_decoder.named_parameters()
    }
    assert not any(n.startswith("prompt_encoder.") for n in trainable)
    # the base SAM's keys survive injection (official checkpoints load before it; nothing renamed)
    assert set(build_sam("tiny", SIZE).state_dict()) <= set(model.sam.state_dict())


@pytest.mark.parametrize(("method", "options"), IDENTITY_AT_INIT, ids=[m for m, _ in IDENTITY_AT_INIT])
def test_identity_at_step_zero(method, options):
    images, boxes, _ = toy_batch()
    with torch.no_grad():
        reference = tiny("frozen").eval()(images, boxes)
        adapted = tiny(method, **options).eval()(images, boxes)
    assert torch.allclose(adapted, reference, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "options"), [("vpt", {}), ("sam_adapter", {}), ("ssf", {"init_std": 0.02})], ids=str
)
def test_inits_that_are_not_the_identity(method, options):
    """VPT's prompts add keys; SAM-Adapter's and SSF's original inits are random: all change SAM at step 0."""
    images, boxes, _ = toy_batch()
    with torch.no_grad():
        reference = tiny("frozen").eval()(images, boxes)
        adapted = tiny(method, **options).eval()(images, boxes)
    assert not torch.allclose(adapted, reference, atol=1e-4)


def train_steps(model, parameters, lr: float, steps: int = 5) -> list[float]:
    """Adam on ``parameters`` over the toy batch; the loss before each step."""
    images, boxes, target = toy_batch()
    optimizer = torch.optim.Adam(parameters, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model(images, boxes, output_size=(SIZE, SIZE)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", BASELINES)
def test_a_few_steps_lower_the_loss(method):
    model = tiny(method).train()
    losses = train_steps(model, [p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert losses[-1] < losses[0] - 1e-3, losses
    moved = own_encoder_parameters(model, method)
    assert all(p.grad is not None for p in moved.values()), [n for n, p in moved.items() if p.grad is None]


@pytest.mark.parametrize("method", BASELINES)
def test_the_method_alone_lowers_the_loss(method):
    """With the mask decoder left out of the optimiser, the encoder-side parameters do the work."""
    model = tiny(method).train()
    losses = train_steps(model, list(own_encoder_parameters(model, method).values()), lr=1e-2)
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("method", BASELINES)
def test_adapter_round_trip_on_a_base_checkpoint(tmp_path, method):
    base = tmp_path / "sam_tiny.pth"
    torch.manual_seed(5)
    torch.save(build_sam("tiny", SIZE).state_dict(), base)
    model = tiny(method, checkpoint=base).eval()
    perturb(model, method)
    images, boxes, _ = toy_batch()
    with torch.no_grad():
        expected = model(images, boxes)
    folder = save_adapter(model, tmp_path / "adapter")
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["model"]["peft"] == method and config["full_weights"] is False
    saved = load_file(str(folder / WEIGHTS_NAME))
    assert set(saved) == set(model.adapter_keys)
    assert set(own_encoder_parameters(model, method)) <= set(saved)
    trainable = {n for n, p in model.sam.named_parameters() if p.requires_grad}
    frozen_base = {k for k in torch.load(base, weights_only=True) if k.startswith("image_encoder.")} - trainable
    assert frozen_base and not frozen_base & set(saved)  # adapter only: no frozen encoder tensor in the file
    with torch.no_grad():
        reloaded = load_adapter(folder, sam_checkpoint=base).eval()(images, boxes)
    assert torch.equal(reloaded, expected)


@pytest.mark.parametrize("method", ["ssf", "vpt", "adapter", "sam_adapter", "lst"])
def test_deep_copies_run_their_own_parameters(method):
    """Hooks are bound methods and VPT's norm is a plain reference: a copy must not use the original's."""
    model = tiny(method).eval()
    images, boxes, _ = toy_batch()
    with torch.no_grad():
        before = model(images, boxes)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(images, boxes), before)
        perturb(twin, method, scale=0.5)
        assert torch.equal(model(images, boxes), before)
        assert not torch.allclose(twin(images, boxes), before, atol=1e-4)


@pytest.mark.parametrize(
    ("method", "options", "error"),
    [
        ("bitfit", {"norm_bias": "yes"}, "norm_bias"),
        ("ssf", {"init_std": -1.0}, "init_std"),
        ("vpt", {"num_tokens": 0}, "num_tokens"),
        ("vpt", {"dropout": 1.0}, "dropout"),
        ("adapter", {"bottleneck": 0}, "bottleneck"),
        ("sam_adapter", {"scale_factor": 7}, "must divide the width 64"),
        ("sam_adapter", {"freq_ratio": 1.0}, "freq_ratio"),
        ("lst", {"reduction": 3}, "must divide the width 64"),
        ("lst", {"gate_temperature": 0.0}, "gate_temperature"),
        ("lst", {"ranks": 2}, "unknown option"),
    ],
    ids=str,
)
def test_bad_options_fail_clearly(method, options, error):
    with pytest.raises(ValueError, match=error):
        tiny(method, **options)


# --- BitFit -------------------------------------------------------------------------------


def test_bitfit_norm_bias_switch():
    with_norms = own_encoder_parameters(tiny("bitfit"), "bitfit")
    without = {n for n, p in tiny("bitfit", norm_bias=False).sam.named_parameters() if p.requires_grad}
    norms = {n for n in with_norms if ".norm" in n or n.startswith("image_encoder.neck.1") or ".neck.3" in n}
    assert norms and not norms & without
    assert {n for n in without if n.startswith("image_encoder.")} == set(with_norms) - norms


# --- SSF ----------------------------------------------------------------------------------


def test_ssf_sits_after_every_operation():
    model = tiny("ssf")
    encoder = model.sam.image_encoder
    wrapped = {n.removesuffix(".ssf") for n, m in encoder.named_modules() if n.endswith(".ssf")}
    per_block = {"norm1", "attn.qkv", "attn.proj", "norm2", "mlp.lin1", "mlp.lin2"}
    expected = {"patch_embed"} | {f"neck.{i}" for i in range(4)}
    expected |= {f"blocks.{b}.{op}" for b in range(len(encoder.blocks)) for op in per_block}
    assert wrapped == expected
    no_neck = {n for n, _ in tiny("ssf", neck=False).sam.image_encoder.named_modules() if n.endswith(".ssf")}
    assert not any(n.startswith("neck.") for n in no_neck) and len(no_neck) == len(expected) - 4


# --- VPT ----------------------------------------------------------------------------------


def test_vpt_attention_is_softmax_over_grid_and_prompt_keys():
    """Against an explicit computation with segment-anything's own relative-position bias."""
    torch.manual_seed(0)
    model = tiny("vpt", num_tokens=3)
    block = model.sam.image_encoder.blocks[0]
    attn = block.attn
    with torch.no_grad():
        attn.rel_pos_h.normal_(std=0.5)  # non-zero tables, so the bias matters
        attn.rel_pos_w.normal_(std=0.5)
        x = torch.randn(2, 7, 7, 64)  # two windows of 7 x 7
        B, H, W, C = x.shape
        heads = attn.num_heads
        q, k, v = attn.qkv(x).reshape(B, H * W, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(3, B * heads, H * W, -1)
        p = attn.qkv(block.norm1(attn.prompts)).reshape(3, 3, heads, -1).permute(1, 2, 0, 3)  # (3, heads, T, d)
        pk, pv = p[1].repeat(B, 1, 1), p[2].repeat(B, 1, 1)
        grid = add_decomposed_rel_pos((q * attn.scale) @ k.transpose(-2, -1), q, attn.rel_pos_h, attn.rel_pos_w, (H, W), (H, W))
        logits = torch.cat([grid, (q * attn.scale) @ pk.transpose(-2, -1)], dim=-1)
        out = logits.softmax(-1) @ torch.cat([v, pv], dim=1)
        out = out.reshape(B, heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
        expected = attn.proj(out)
        assert torch.allclose(attn(x), expected, atol=1e-5)


def test_vpt_prompts_join_every_window():
    """At 128 px the tiny grid is 8 x 8 in windows of 7: four windows, all of which see the prompts."""
    model = tiny("vpt", size=128).eval()
    block = model.sam.image_encoder.blocks[0]
    assert block.window_size == 7 and isinstance(block.attn, PromptedAttention)
    x = torch.randn(1, 8, 8, 64)
    with torch.no_grad():
        before = block(x)
        block.attn.prompts.add_(torch.randn_like(block.attn.prompts))
        changed = (block(x) - before).abs().amax(-1)
    assert (changed > 1e-6).all(), changed


# --- SAM-Adapter --------------------------------------------------------------------------


def test_high_pass_is_the_authors_centred_mask():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    side = 32
    half = int((side * side * 0.25) ** 0.5 // 2)
    mask = torch.ones(side, side)
    mask[side // 2 - half : side // 2 + half, side // 2 - half : side // 2 + half] = 0  # centred after fftshift
    shifted = torch.fft.fftshift(torch.fft.fft2(images), dim=(-2, -1)) * mask
    expected = torch.fft.ifft2(torch.fft.ifftshift(shifted, dim=(-2, -1))).real.abs()
    assert torch.allclose(high_pass(images, 0.25), expected, atol=1e-5)
    flat = torch.full((1, 3, 32, 32), 7.0)
    assert high_pass(flat, 0.25).abs().max() < 1e-4  # no high frequencies in a constant image


def test_sam_adapter_adds_a_prompt_to_every_block_input():
    model = tiny("sam_adapter").eval()
    encoder = model.sam.image_encoder
    seen = []  # pre-hooks on the base blocks (inside SAM-Adapter's layers): the input after the prompt
    handles = [b.base_layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone())) for b in encoder.blocks]
    images, _, _ = toy_batch()
    x = (images - model.sam.pixel_mean) / model.sam.pixel_std
    with torch.no_grad():
        encoder(x)
        patches = encoder.patch_embed.proj(x).permute(0, 2, 3, 1)  # the conv alone (the base's, read through the layer)
        features = encoder.sam_adapter.features(x, patches)
        expected = patches + encoder.pos_embed + encoder.sam_adapter.prompt(0, features)
    for h in handles:
        h.remove()
    assert len(seen) == len(encoder.blocks)
    assert torch.allclose(seen[0], expected, atol=1e-5)
    assert encoder.sam_adapter._features is None  # released after the forward
    with pytest.raises(RuntimeError, match="outside the image encoder"):
        encoder.blocks[0](seen[0])


# --- LST ----------------------------------------------------------------------------------


def test_lst_keeps_no_graph_through_the_backbone_and_trains_the_side():
    model = tiny("lst").train()
    encoder = model.sam.image_encoder
    with torch.no_grad():
        encoder.lst.up.weight.normal_(std=0.1)  # past the first step: the side network gets gradients
    outputs = []
    handle = encoder.blocks[-1].register_forward_hook(lambda m, a, out: outputs.append(out))
    images, boxes, target = toy_batch()
    loss_fn(model(images, boxes, output_size=(SIZE, SIZE)), target).backward()
    handle.remove()
    assert not outputs[0].requires_grad  # the frozen backbone keeps no autograd graph
    side = dict(encoder.lst.named_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in side.values()), [
        n for n, p in side.items() if p.grad is None or not p.grad.abs().sum()
    ]
    assert len(encoder.lst.blocks) == len(encoder.blocks)
    assert [b.window_size for b in encoder.lst.blocks] == [b.window_size for b in encoder.blocks]
    assert torch.allclose(encoder.lst.gate(0), torch.tensor(0.5))
