"""One way to inject and a way back (issue 13 item 8): layers only, unload, disable_adapters, merge."""

from __future__ import annotations

import zlib

import pytest
import torch

from cobot_med.adapter import AdapterError, adapter_keys, load_adapter_weights, save_adapter
from cobot_med.model import ModelSpec, build_model
from cobot_med.peft import METHODS, apply_peft, disable_adapters, merge_adapters, unload, unmerge_adapters
from cobot_med.peft.layer import AdapterLayer, AdapterModule, adapter_layers
from cobot_med.sam import build_sam
from toy import SIZE, tiny, toy_batch

# every method that adds layers, with the options that place them differently
LAYERED = [
    ("lora", {}),
    ("lora+cobot", {}),
    ("adaptformer", {}),
    ("adaptformer+cobot", {}),
    ("adaptformer", {"branch_input": "residual_stream"}),
    ("conv_lora", {}),
    ("ssf", {}),
    ("vpt", {}),
    ("adapter", {}),
    ("sam_adapter", {}),
    ("lst", {}),
]
IDS = [m + ("-" + "-".join(map(str, o.values())) if o else "") for m, o in LAYERED]
MERGEABLE = {"lora", "lora+cobot", "ssf"}  # SSF: all but its layers after the neck's bias-free convs
NO_LAYERS = ["frozen", "decoder", "full", "bitfit"]  # they add nothing: what trains is the base's own


def perturb_added(model, scale=0.05):
    """Move every tensor the method added off its init (non-zero, different per key), the decoder left alone."""
    added = [k for k in model.adapter_keys if not k.startswith("mask_decoder.")]
    state = model.sam.state_dict(keep_vars=True)
    with torch.no_grad():
        for key in added:
            tensor = state[key]
            if tensor.is_floating_point():
                g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                tensor.add_(torch.randn(tensor.shape, generator=g, dtype=tensor.dtype) * scale)
    return added


def forward(model):
    images, boxes, _ = toy_batch()
    with torch.no_grad():
        return model.eval()(images, boxes)


def assert_same_state(state, reference):
    assert list(state) == list(reference)
    different = [k for k in reference if not torch.equal(state[k], reference[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_injection_registers_no_hooks(method):
    model = tiny(method)
    hooked = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]
    assert not hooked
    layers = adapter_layers(model)
    assert bool(layers) == (method not in NO_LAYERS)
    assert all(not isinstance(layer.base_layer, AdapterLayer) for _, layer in layers)  # one layer per site


@pytest.mark.parametrize(("method", "options"), LAYERED, ids=IDS)
def test_unload_gives_back_the_base(method, options):
    base = tiny("frozen")
    reference_state, reference = base.sam.state_dict(), forward(base)
    model = tiny(method, **options)
    assert perturb_added(model)
    adapted = forward(model)
    assert not torch.allclose(adapted, reference, atol=1e-4)  # the adapter matters
    assert unload(model.sam) is model.sam
    assert not any(isinstance(m, (AdapterLayer, AdapterModule)) for m in model.modules())
    assert_same_state(model.sam.state_dict(), reference_state)
    assert [n for n, _ in model.sam.named_parameters()] == [n for n, _ in base.sam.named_parameters()]
    assert torch.equal(forward(model), reference)


@pytest.mark.parametrize(("method", "options"), LAYERED, ids=IDS)
def test_disable_adapters_runs_the_base_and_comes_back(method, options):
    reference = forward(tiny("frozen"))
    model = tiny(method, **options)
    perturb_added(model)
    adapted = forward(model)
    with disable_adapters(model) as inside:
        assert inside is model
        assert torch.equal(forward(model), reference)
    assert torch.equal(forward(model), adapted)
    with pytest.raises(ValueError), disable_adapters(model):  # restored on an error too
        raise ValueError
    assert not any(layer.disabled for _, layer in adapter_layers(model))


@pytest.mark.parametrize(("method", "options"), LAYERED, ids=IDS)
def test_merge_uses_each_layers_own_contract(method, options):
    model = tiny(method, **options)
    added = perturb_added(model)
    unmerged = forward(model)
    layers = [layer for _, layer in adapter_layers(model)]
    merged = merge_adapters(model)
    if method not in MERGEABLE:
        assert merged == 0 and not any(layer.merged for layer in layers)
        assert torch.equal(forward(model), unmerged)  # a no-op: the branches keep running
        with pytest.raises(TypeError, match="cannot merge"):
            layers[0].merge()
        return
    folding = [layer for layer in layers if layer.mergeable]
    assert merged == len(folding) > 0 and all(layer.merged == layer.mergeable for layer in layers)
    assert len(folding) == len(layers) - (2 if method == "ssf" and options.get("neck", True) else 0)
    assert torch.allclose(forward(model), unmerged, atol=1e-5)
    with disable_adapters(model):  # unmerged for the block: the base again
        assert torch.allclose(forward(model), forward(tiny("frozen")), atol=1e-5)
    assert all(layer.merged for layer in folding)
    assert unmerge_adapters(model) == len(folding)
    assert torch.allclose(forward(model), unmerged, atol=1e-5)
    assert_close_state(model.sam.state_dict(), tiny(method, **options).sam.state_dict(), skip=added)


def assert_close_state(state, reference, skip=()):
    """Same keys; equal to float rounding (after a merge and unmerge), the keys in ``skip`` aside."""
    assert list(state) == list(reference)
    for key, value in reference.items():
        assert key in skip or torch.allclose(state[key], value, rtol=1e-6, atol=1e-7), key


@pytest.mark.parametrize(("method", "options"), [("lora", {}), ("lora+cobot", {}), ("ssf", {"neck": False})])
def test_unload_merged_keeps_the_adapter_in_the_base_weights(method, options):
    model = tiny(method, **options)
    perturb_added(model)
    adapted = forward(model)
    merge_adapters(model)
    unload(model.sam, merge=True)
    assert not adapter_layers(model)
    assert list(model.sam.state_dict()) == list(tiny("frozen").sam.state_dict())
    assert torch.allclose(forward(model), adapted, atol=1e-5)


def test_merge_and_unload_refuses_layers_that_cannot_fold():
    """SSF after the neck's bias-free convolutions cannot fold: merge-and-unload would drop it, so it refuses,
    before changing anything."""
    model = tiny("ssf")
    perturb_added(model)
    adapted, state = forward(model), {k: v.clone() for k, v in model.sam.state_dict().items()}
    with pytest.raises(ValueError, match="neck"):
        unload(model.sam, merge=True)
    assert_same_state(model.sam.state_dict(), state)
    assert torch.equal(forward(model), adapted)
    layer = model.sam.image_encoder.neck[0]
    with pytest.raises(TypeError, match="without a bias"):
        layer.merge()


def test_a_refused_merge_changes_nothing():
    """A zero γ in the last SSF layer: merge_adapters and merge-and-unload refuse before folding any layer."""
    model = tiny("ssf", neck=False)
    perturb_added(model)
    layers = [layer for _, layer in adapter_layers(model)]
    with torch.no_grad():
        layers[-1].ssf.scale[0] = 0
    state = {k: v.clone() for k, v in model.sam.state_dict().items()}
    for attempt in (lambda: merge_adapters(model), lambda: unload(model.sam, merge=True)):
        with pytest.raises(ValueError, match="zero scale"):
            attempt()
        assert not any(layer.merged for layer in layers)
        assert_same_state(model.sam.state_dict(), state)


def test_ssf_merge_is_the_papers_reparameterisation():
    """A merged SSF site computes γ ⊙ op(x) + β with the op's own weights: W' = γ W, b' = γ b + β."""
    model = tiny("ssf", init_std=0.3)
    qkv = model.sam.image_encoder.blocks[0].attn.qkv
    x = torch.randn(5, qkv.in_features)
    with torch.no_grad():
        expected = qkv.ssf.scale * torch.nn.functional.linear(x, qkv.base_layer.weight, qkv.base_layer.bias) + qkv.ssf.shift
        qkv.merge()
        assert torch.allclose(qkv(x), expected, atol=1e-5)
        assert torch.allclose(qkv.base_layer.bias, qkv.ssf.scale * tiny("frozen").sam.image_encoder.blocks[0].attn.qkv.bias
                              + qkv.ssf.shift, atol=1e-6)
        qkv.ssf.scale[0] = 0
        qkv.unmerge()
        with pytest.raises(ValueError, match="zero scale"):
            qkv.merge()


@pytest.mark.parametrize("method", NO_LAYERS)
def test_methods_without_layers_have_nothing_to_take_back(method):
    model = tiny(method)
    before = {k: v.clone() for k, v in model.sam.state_dict().items()}
    out = forward(model)
    assert merge_adapters(model) == 0
    with disable_adapters(model):
        assert torch.equal(forward(model), out)
    unload(model.sam)
    assert_same_state(model.sam.state_dict(), before)


def test_swap_the_method_without_rebuilding():
    """unload, then apply another method: the same model as one built with that method."""
    target = tiny("adaptformer")
    perturb_added(target)
    model = tiny("lora")
    perturb_added(model)
    unload(model.sam)
    _, keys = apply_peft(model.sam, "adaptformer")
    assert keys == target.adapter_keys
    target_state = target.sam.state_dict()
    model.sam.load_state_dict({k: target_state[k] for k in keys}, strict=False)
    assert torch.equal(forward(model), forward(target))


def test_swap_the_adapter_of_one_method(tmp_path):
    """Another adapter's weights load into the same built model, and back."""
    base = tmp_path / "sam_tiny.pth"
    torch.manual_seed(0)
    torch.save(build_sam("tiny", SIZE).state_dict(), base)
    outputs, folders = [], []
    for seed in (1, 2):
        model = tiny("lora", checkpoint=base)
        perturb_added(model, scale=0.05 * seed)
        outputs.append(forward(model))
        folders.append(save_adapter(model, tmp_path / f"adapter{seed}"))
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)
    model = tiny("lora", checkpoint=base)
    for folder, expected in zip(folders + folders[:1], outputs + outputs[:1]):
        load_adapter_weights(model, folder)
        assert torch.equal(forward(model), expected)


def lite(peft):
    torch.manual_seed(0)
    return build_model(ModelSpec(arch="lite_medsam", peft=peft)).eval()


@pytest.fixture(scope="module")
def lite_base():
    """LiteMedSAM's state dict and its logits for one slice and box (a forward takes seconds on CPU)."""
    g = torch.Generator().manual_seed(0)
    inputs = torch.rand(1, 3, 256, 256, generator=g) * 255, torch.tensor([[[60.0, 70, 180, 200]]])
    base = lite("frozen")
    with torch.no_grad():
        return inputs, base.sam.state_dict(), base(*inputs)


@pytest.mark.slow  # 3 s alone on 2 cores: the full suite, not the inner loop
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["lora", "adaptformer"])
def test_unload_and_disable_on_lite_medsam(method, lite_base):
    inputs, reference_state, reference = lite_base
    model = lite(method)
    perturb_added(model)
    with torch.no_grad():
        assert not torch.allclose(model(*inputs), reference, atol=1e-4)
        with disable_adapters(model):
            assert torch.equal(model(*inputs), reference)
        unload(model.sam)
        assert torch.equal(model(*inputs), reference)
    assert_same_state(model.sam.state_dict(), reference_state)


@pytest.fixture
def base_checkpoint(tmp_path):
    path = tmp_path / "sam_tiny.pth"
    torch.manual_seed(0)
    torch.save(build_sam("tiny", SIZE).state_dict(), path)
    return path


def test_set_peft_keeps_spec_and_keys_in_step(tmp_path, base_checkpoint):
    """PromptableSam.set_peft: the swapped model describes itself as the new method, so what it saves
    is that method's adapter, which a model built with that method loads and reproduces."""
    model = tiny("lora", checkpoint=base_checkpoint)
    model.set_peft("adaptformer", {"branch_input": "residual_stream"})
    target = tiny("adaptformer", checkpoint=base_checkpoint, branch_input="residual_stream")
    assert model.spec == target.spec
    assert model.adapter_keys == target.adapter_keys
    assert model.base_sha256 == target.base_sha256 is not None  # the decoder was not touched: still the base
    perturb_added(model)
    expected = forward(model)
    folder = save_adapter(model, tmp_path / "swapped")
    load_adapter_weights(target, folder)
    assert torch.equal(forward(target), expected)
    old = tiny("lora", checkpoint=base_checkpoint)
    with pytest.raises(AdapterError, match="adaptformer"):  # an adapter of the old method no longer fits
        load_adapter_weights(old, folder)


def test_unload_says_when_the_base_was_changed_in_place(base_checkpoint):
    """unload keeps base_sha256 only while every base tensor the method trained is the base's."""
    untouched = tiny("lora", checkpoint=base_checkpoint).unload()
    assert (untouched.spec.peft, untouched.adapter_keys) == ("frozen", [])
    assert untouched.base_sha256 is not None
    assert_same_state(untouched.sam.state_dict(), tiny("frozen", checkpoint=base_checkpoint).sam.state_dict())

    trained = tiny("lora", checkpoint=base_checkpoint)
    with torch.no_grad():
        trained.sam.mask_decoder.iou_prediction_head.layers[0].bias.add_(0.1)  # as training the decoder does
    trained.unload()
    assert trained.spec.peft == "frozen" and trained.base_sha256 is None
    assert set(adapter_keys(trained)) == set(trained.sam.state_dict())  # saving now holds every tensor

    merged = tiny("lora", checkpoint=base_checkpoint)
    perturb_added(merged)
    merge_adapters(merged)
    merged.unload(merge=True)
    assert merged.base_sha256 is None  # the LoRA update lives in the base weights now



def test_a_disabled_conv_lora_adds_no_stale_auxiliary_loss():
    """Under disable_adapters the MoE does not run, so the load-balancing loss of an earlier forward must not count."""
    from cobot_med.peft import auxiliary_loss

    model = tiny("conv_lora")
    forward(model)
    assert auxiliary_loss(model) is not None
    with disable_adapters(model):
        forward(model)
        assert auxiliary_loss(model) is None
