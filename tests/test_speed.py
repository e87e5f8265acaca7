"""Every speed switch leaves the outputs equal: attention kinds, padded-token skip, bf16, checkpointing,
merged LoRA, one encoder pass for K boxes, torch.compile (opt-in: slow to compile on CPU)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, Block

from cobot_med.model import ModelSpec, build_model
from cobot_med.peft import merge_adapters, unmerge_adapters
from cobot_med.sam.attention import DEFAULT_KIND, KINDS, OneHotAttention, SdpaAttention, attention_kind, set_attention
from cobot_med.sam.speed import (
    FastBlock,
    compile_model,
    enable_gradient_checkpointing,
    is_compiled,
    set_window_padding,
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def make_model(peft="lora+cobot", image_size=128, seed=0, **spec):
    """Tiny SAM with rel-pos tables and adapter branches set non-zero, so every path is exercised.

    At 128 px the tiny encoder sees 8 x 8 tokens: its windowed blocks (window 7) pad to 14 x 14
    (one full window and three partial ones per image), its global blocks see 8 x 8.
    """
    torch.manual_seed(seed)
    model = build_model(ModelSpec(arch="tiny", image_size=image_size, peft=peft, **spec))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.sam.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(batch=2, size=128, organs=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g) * 255
    lo = torch.rand(batch, organs, 2, generator=g) * size * 0.5
    boxes = torch.cat([lo, lo + size * 0.3], dim=-1)
    targets = (torch.rand(batch, organs, size // 4, size // 4, generator=g) > 0.5).float()
    return images, boxes, targets


def run(model, images, boxes, targets, amp=False):
    """Logits, loss and the gradients of every trainable parameter (by name)."""
    torch.manual_seed(0)  # Conv-LoRA's noisy gating draws in training mode
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = model(images, boxes)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), loss.detach(), grads


def configure(model, kind="eager", skip=False, core=None, checkpointing="none"):
    encoder = model.sam.image_encoder
    set_attention(encoder, kind)
    set_window_padding(encoder, skip)
    enable_gradient_checkpointing(model, checkpointing)
    for block in encoder.blocks:
        block.attn.__dict__.pop("core", None)
        if core is not None:
            block.attn.core = core


def assert_close(a, b, tol):
    """Relative closeness: max |a - b| <= tol * max |b| (dicts of gradients: over all their values)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        a, b = torch.cat([a[k].flatten() for k in b]), torch.cat([b[k].flatten() for k in b])
    scale = b.abs().max().clamp_min(1e-12)
    assert (a - b).abs().max() <= tol * scale, f"{(a - b).abs().max() / scale:.2e} > {tol}"


def relative_l2(a, b):
    a = torch.cat([t.flatten() for t in a.values()]) if isinstance(a, dict) else a.flatten()
    b = torch.cat([t.flatten() for t in b.values()]) if isinstance(b, dict) else b.flatten()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def reference():
    """segment-anything's own computation (eager attention, padded tokens, fp32) of the tiny model."""
    model = make_model()
    configure(model, "eager", skip=False)
    return run(model, *inputs())


@pytest.mark.parametrize(
    "kind, core, skip",
    [
        ("sdpa", None, False),
        ("sdpa", None, True),
        ("onehot", "matmul", False),
        ("onehot", "matmul", True),
        ("onehot", "sdpa", False),
        ("onehot", "sdpa", True),
        ("onehot", None, True),  # core "auto": SDPA in fp32 on CPU
        ("auto", None, True),  # the kind AUTO_RULES names for fp32 on CPU
        ("eager", None, True),  # eager blocks cannot skip: the switch falls back to SAM's forward
    ],
)
def test_attention_kinds_and_padding_skip_equal_segment_anything(reference, kind, core, skip):
    model = make_model()
    configure(model, kind, skip, core)
    logits, loss, grads = run(model, *inputs())
    ref_logits, ref_loss, ref_grads = reference
    assert any("lora_A" in n for n in grads) and any("rel_pos" not in n and "cobot" in n for n in grads)
    assert_close(logits, ref_logits, 1e-5)
    assert_close(loss, ref_loss, 1e-5)
    assert_close(grads, ref_grads, 1e-5)  # LoRA, COBOT and mask-decoder gradients


@pytest.mark.parametrize("image_size", [64, 144, 256])
def test_padding_skip_at_other_grids(image_size):
    """4 x 4 tokens (one partial window), 9 x 9 (full + partial), 16 x 16 (2 full + partial per axis)."""
    model = make_model(image_size=image_size)
    x = torch.rand(1, 3, image_size, image_size) * 255
    with torch.no_grad():
        configure(model, "eager", skip=False)
        expected = model.encode(x)
        configure(model, DEFAULT_KIND, skip=True)
        assert all(type(b) is FastBlock for b in model.sam.image_encoder.blocks)
        assert all(b._can_skip_padding(torch.zeros(1, 4, 4, 1)) for b in model.sam.image_encoder.blocks
                   if b.window_size)
        assert_close(model.encode(x), expected, 1e-5)


@pytest.mark.parametrize("peft", ["adapter", "conv_lora", "vpt", "ssf", "bitfit"])
def test_padding_skip_with_other_methods_is_exact_or_falls_back(peft):
    """Hooks on the attention (adapter), a spatial qkv (Conv-LoRA), prompted attention (VPT) fall back."""
    model = make_model(peft=peft)
    configure(model, "eager", skip=False)
    expected = run(model, *inputs())
    configure(model, DEFAULT_KIND, skip=True)
    got = run(model, *inputs())
    for a, b in zip(got, expected):
        assert_close(a, b, 1e-5)
    windowed = [b for b in model.sam.image_encoder.blocks if b.window_size]
    can_skip = [b._can_skip_padding(torch.zeros(1, 8, 8, 1)) for b in windowed]
    assert all(can_skip) == (peft in ("ssf", "bitfit")), can_skip


def test_bf16_autocast_within_bf16_tolerance(reference):
    """bf16 on our path is as close to fp32 as bf16 on segment-anything's own path is (the bf16 tolerance)."""
    model = make_model()
    configure(model, "eager", skip=False)
    sam_bf16 = run(model, *inputs(), amp=True)
    configure(model, DEFAULT_KIND, skip=True)
    ours_bf16 = run(model, *inputs(), amp=True)
    assert relative_l2(ours_bf16[0], reference[0]) < 3e-2
    assert abs(float(ours_bf16[1] - reference[1])) < 1e-3 * float(reference[1])
    for i in (0, 2):  # logits, gradients
        assert relative_l2(ours_bf16[i], reference[i]) <= 1.5 * relative_l2(sam_bf16[i], reference[i]) + 1e-3


@pytest.mark.parametrize("blocks, count", [("global", 2), ("all", 4)])
def test_gradient_checkpointing_equal_loss_and_gradients(reference, blocks, count):
    model = make_model()
    configure(model, DEFAULT_KIND, skip=True)
    assert enable_gradient_checkpointing(model, blocks) == count
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        logits, loss, grads = run(model, *inputs())
    assert_close(loss, reference[1], 1e-5)
    assert_close(grads, reference[2], 1e-5)
    # fewer activations kept for backward than without checkpointing
    enable_gradient_checkpointing(model, "none")
    full = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: full.append(t.numel()) or t, lambda t: t):
        run(model, *inputs())
    assert sum(saved) < sum(full)


def test_checkpointing_from_model_spec():
    model = build_model(ModelSpec(arch="tiny", image_size=64, peft="lora", gradient_checkpointing="all"))
    assert all(b.checkpointing for b in model.sam.image_encoder.blocks)
    assert model.spec.gradient_checkpointing == "all" and model.spec.skip_window_padding
    with pytest.raises(ValueError, match="gradient checkpointing must be one of"):
        build_model(ModelSpec(arch="tiny", image_size=64, peft="lora", gradient_checkpointing="some"))


def test_bundle_speed_settings_switch_the_model_and_keep_its_outputs():
    """The bundles' settings (strings from a command line included) reach the blocks; bad values fail."""
    from cobot_med.engine.network import build_network
    from cobot_med.errors import SettingsError
    from cobot_med.settings import load_settings

    common = dict(arch="tiny", image_size=128, peft="lora+cobot")
    torch.manual_seed(0)
    model = build_network(load_settings("adome", **common), "cpu").eval()
    torch.manual_seed(0)
    switched = build_network(load_settings("adome", **common, attention="eager", skip_window_padding="false",
                                           gradient_checkpointing="all", compile="false"), "cpu").eval()
    images, boxes, _ = inputs()
    with torch.no_grad():
        fast, slow = model(images, boxes), switched(images, boxes)
    encoder = switched.sam.image_encoder
    assert attention_kind(encoder) == "eager"
    assert not any(b.skip_padding for b in encoder.blocks) and all(b.checkpointing for b in encoder.blocks)
    assert (switched.spec.attention, switched.spec.skip_window_padding, switched.spec.gradient_checkpointing) == (
        "eager", False, "all")
    assert not is_compiled(switched)
    assert_close(slow, fast, 1e-5)
    with pytest.raises(SettingsError, match="unknown attention 'flash'"):
        load_settings("adome", attention="flash")
    with pytest.raises(SettingsError, match="skip_window_padding must be true or false, got 'maybe'"):
        load_settings("adome", skip_window_padding="maybe")
    with pytest.raises(SettingsError, match=r"unknown setting\(s\) \['atention'\].*did you mean 'attention'"):
        from cobot_med.bundle import check_keys

        check_keys({"atention": "sdpa"})


def test_merged_equals_unmerged_on_the_fast_path():
    model = make_model().eval()
    configure(model, DEFAULT_KIND, skip=True)
    images, boxes, _ = inputs()
    with torch.no_grad():
        unmerged = model(images, boxes)
        assert merge_adapters(model) == 4
        merged = model(images, boxes)
        unmerge_adapters(model)
        again = model(images, boxes)
    assert_close(merged, unmerged, 1e-5)
    assert_close(again, unmerged, 1e-5)


def test_one_encoder_pass_for_k_boxes_equals_k_passes(reference):
    """Logits and the gradients of the summed per-organ losses: one pass for K boxes == K passes."""
    model = make_model()
    configure(model, DEFAULT_KIND, skip=True)
    images, boxes, targets = inputs()
    K = boxes.shape[1]
    model.zero_grad(set_to_none=True)
    per_organ = []
    for k in range(K):
        logits = model(images, boxes[:, k : k + 1])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets[:, k : k + 1]) / K
        loss.backward()
        per_organ.append(logits.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_close(torch.cat(per_organ, dim=1), reference[0], 1e-5)
    assert_close(grads, reference[2], 1e-5)


def test_set_attention_kinds_and_default():
    model = build_model(ModelSpec(arch="tiny", image_size=64, peft="lora"))
    encoder = model.sam.image_encoder
    assert attention_kind(encoder) == ModelSpec().attention == DEFAULT_KIND == "auto"
    assert all(isinstance(b.attn, SdpaAttention) for b in encoder.blocks)  # auto picks among SDPA-family kinds
    assert set_attention(encoder, "auto") == 0
    assert set_attention(encoder, "onehot") == 4 and attention_kind(encoder) == "onehot"
    assert set_attention(encoder, "eager") == 4 and all(type(b.attn) is Attention for b in encoder.blocks)
    assert set_attention(encoder, "sdpa") == 4 and attention_kind(encoder) == "sdpa"
    assert set_attention(encoder) == 4 and attention_kind(encoder) == DEFAULT_KIND
    assert set(KINDS) == {"auto", "eager", "sdpa", "onehot"} and DEFAULT_KIND in KINDS
    with pytest.raises(ValueError, match="unknown attention kind"):
        set_attention(encoder, "flash")
    with pytest.raises(ValueError, match="unknown onehot attention core"):
        set_attention(encoder, "onehot")
        encoder.blocks[0].attn.core = "nope"
        model(torch.zeros(1, 3, 64, 64), torch.tensor([[[1.0, 1, 30, 30]]]))


def test_set_attention_leaves_vpt_prompted_attention_alone():
    model = build_model(ModelSpec(arch="tiny", image_size=64, peft="vpt"))
    encoder = model.sam.image_encoder
    before = [type(b.attn) for b in encoder.blocks]
    assert set_attention(encoder, "onehot") == 0
    assert [type(b.attn) for b in encoder.blocks] == before


def test_switches_keep_state_dict_keys_and_block_types():
    model = make_model()
    keys = list(model.state_dict())
    configure(model, "onehot", skip=True, checkpointing="all")
    assert list(model.state_dict()) == keys
    assert all(isinstance(b, Block) for b in model.sam.image_encoder.blocks)
    assert isinstance(model.sam.image_encoder.blocks[0].attn, OneHotAttention)


def test_compile_is_off_by_default():
    model = build_model(ModelSpec(arch="tiny", image_size=64, peft="lora"))
    assert getattr(model.sam.image_encoder, "_compiled_call_impl", None) is None


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")),
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler and none is on PATH")
@pytest.mark.slow  # 35 s alone on 2 cores with a cold compile cache: the full suite, not the inner loop
@pytest.mark.timeout(600)
def test_compiled_encoder_equals_eager():
    model = make_model(image_size=64).eval()
    configure(model, DEFAULT_KIND, skip=True)
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        expected = model.encode(x)
        keys = list(model.state_dict())
        compile_model(model)
        assert list(model.state_dict()) == keys
        assert_close(model.encode(x), expected, 1e-5)


def test_inference_benchmark_paths_agree():
    """The whole-volume benchmark's two paths (fp32): same logits for every (slice, organ) box, same labels."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _common
        import inference
    finally:
        sys.path.remove(str(BENCHMARKS))
    volume, labels = inference.make_volume((48, 40, 12), organs=3, seed=0)
    assert volume.shape == labels.shape and set(labels.flatten().tolist()) == {0, 1, 2, 3}
    slices = inference.prepare(volume, labels, 3, 64, "cpu")
    assert not slices.valid[0].any() and slices.valid.any(dim=1).sum() < 12  # empty slices exist
    model = _common.make_model("tiny", 64, "lora+cobot", "cpu").eval()
    ours_path = _common.OURS.__class__("ours fp32", amp=False)
    kept_ref, kept_ours = {}, {}
    ref = inference.reference(model, slices, _common.REFERENCE, "cpu", kept_ref)
    merge_adapters(model)
    _common.configure(model, ours_path)
    ours = inference.ours(model, slices, ours_path, "cpu", batch=4, keep=kept_ours)
    assert kept_ref.keys() == kept_ours.keys() and len(kept_ref) == int(slices.valid.sum())
    for key in kept_ref:
        assert_close(kept_ours[key], kept_ref[key], 1e-4)
    assert inference.dice_agreement(ours, ref, 3) > 0.999


def test_training_benchmark_check_compares_the_same_math():
    """The training benchmark's own check: our path (fp32) gives the reference's logits, loss and gradients
    with fewer FLOPs; in bf16 it stays within the bf16 tolerance the benchmark reports."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _common
        import train_step
    finally:
        sys.path.remove(str(BENCHMARKS))
    model = _common.make_model("tiny", 128, "lora+cobot", "cpu").train()
    batch = train_step.make_batch(2, 3, 128, "cpu")
    fp32 = _common.OURS.__class__("ours fp32", amp=False)
    report, flops = train_step.check(model, [_common.REFERENCE, fp32, _common.OURS], batch, "cpu")
    assert report["ours fp32"]["logits"] < 1e-5 and report["ours fp32"]["gradients"] < 1e-4
    assert report["ours fp32"]["loss"] < 1e-5
    assert report["ours"]["logits"] < 5e-2 and report["ours"]["gradients"] < 1e-1
    assert flops["ours"] < flops["reference"] / 2  # one encoder pass for 3 organs, padded tokens skipped
