"""PEFT on SAM 2's Hiera (issue 26 item 2): sites, counts, merge and unload, and the methods that do not apply.

Counts are checked against formulas written from Hiera-T's block shapes as sam2's ``hieradet.py`` defines them
(stages of 1, 2, 7, 2 blocks at widths 96, 192, 384, 768; the first block of stages 2-4 takes the previous
width in and gives the doubled one out), not read back from the code under test. One random Hiera-T at 128 px
is built once; each method goes onto a copy.
"""

from __future__ import annotations

import copy
import zlib

import pytest
import torch

from cobot_med.errors import SettingsError
from cobot_med.peft import apply_peft, count_parameters, merge_adapters, unload
from cobot_med.peft.blocks import adaptable_blocks
from cobot_med.peft.layer import adapter_layers

SIZE = 128
# (dim in, dim out) of Hiera-T's 12 blocks
HIERA_T = [(96, 96), (96, 192), (192, 192), (192, 384)] + [(384, 384)] * 6 + [(384, 768), (768, 768)]
DIM_IN = sum(i for i, _ in HIERA_T)  # 4,032
DIM_OUT = sum(o for _, o in HIERA_T)  # 4,704
STAGE_CHANGES = [o for i, o in HIERA_T if i != o]  # their shortcut Linear(dim, dim_out)

EXPECTED = {  # image encoder trainable
    "lora": sum(2 * (4 * i + 4 * o) for i, o in HIERA_T),  # A (4 x dim) and B (dim_out x 4) for q and v
    "lora+cobot": sum(2 * (4 * i + 4 * o) for i, o in HIERA_T) + 4 * 24 + 24 * 24 + 24 * 4 + 24 * 4,
    "adaptformer": 35 * DIM_OUT + 16 * 12,  # LN 2C, down 16C + 16, up 16C + C at dim_out
    "adaptformer+cobot": 35 * DIM_OUT + 16 * 12 + 16 * 12 + 12 * 12 + 12 * 16 + 12 * 64,
    "conv_lora": 3 * DIM_IN + 9 * DIM_OUT + 12 * (8 * (3 * 3 * 3 * 3 + 3) + 2 * 3 * 8),
    "adapter": 12 * 2 * 8 + 2 * 17 * DIM_OUT,
    # patch embedding 96; per block norm1 (dim in), qkv 3, attn.proj 1, norm2 1, mlp 4 + 1 (dim out);
    # the stage changes' shortcut; the FPN neck's four 1x1 convolutions (256 each)
    "bitfit": 96 + DIM_IN + 10 * DIM_OUT + sum(STAGE_CHANGES) + 4 * 256,
}


@pytest.fixture(scope="module")
def base():
    from cobot_med.sam2_base.build import build_sam2

    torch.manual_seed(0)
    return build_sam2("sam2.1_hiera_t", SIZE)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, SIZE, SIZE, generator=g)
    return images, torch.tensor([[[10.0, 12.0, 90.0, 100.0], [40.0, 30.0, 70.0, 60.0]]])


def promptable(sam):
    from cobot_med.sam2_base.promptable import PromptableSam2

    return PromptableSam2(sam).eval()


def run(sam, inputs):
    with torch.no_grad():
        return promptable(sam)(*inputs)


def tensors(sam) -> set[int]:
    return {id(t) for t in sam.state_dict(keep_vars=True).values()}


def perturb_added(sam, before):
    """Move every tensor the method added off its init, so merge/unload checks see a real branch."""
    with torch.no_grad():
        for key, tensor in sam.state_dict(keep_vars=True).items():
            if id(tensor) not in before and tensor.is_floating_point():
                g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                tensor.add_(torch.randn(tensor.shape, generator=g) * 0.05)


@pytest.mark.slow
@pytest.mark.timeout(60)  # 8 s alone
def test_sites_and_counts_on_hiera(base):
    blocks = adaptable_blocks(base.image_encoder)
    assert [(b.block.dim, b.width) for b in blocks] == HIERA_T
    assert [b.num_heads for b in blocks] == [1, 2, 2, 4, 4, 4, 4, 4, 4, 4, 8, 8]
    for method, expected in EXPECTED.items():
        sam = copy.deepcopy(base)
        apply_peft(sam, method)
        counts = count_parameters(sam)
        assert counts["image_encoder_trainable"] == expected, method
        # the mask decoder trains (with its high-resolution convs); the memory modules and prompt encoder do not
        assert counts["mask_decoder_trainable"] == sum(p.numel() for p in base.sam_mask_decoder.parameters())
        assert counts["prompt_encoder_trainable"] == 0
        frozen = [n for n, p in sam.named_parameters() if p.requires_grad and n.startswith(("memory_", "obj_ptr"))]
        assert not frozen, (method, frozen[:3])
    sam = copy.deepcopy(base)
    apply_peft(sam, "full")
    assert count_parameters(sam)["image_encoder_trainable"] == sum(p.numel() for p in base.image_encoder.parameters())


@pytest.mark.slow
@pytest.mark.timeout(60)  # 5 s alone
def test_lora_writes_q_and_v_rows_of_hieras_fused_qkv_and_merges(base, inputs):
    sam = copy.deepcopy(base)
    before = tensors(sam)
    apply_peft(sam, "lora+cobot")
    perturb_added(sam, before)
    unmerged = run(sam, inputs)
    assert merge_adapters(sam) == 12
    assert torch.allclose(run(sam, inputs), unmerged, atol=1e-5)
    for (_, o), block, original in zip(HIERA_T, sam.image_encoder.trunk.blocks, base.image_encoder.trunk.blocks):
        changed = (block.attn.qkv.base_layer.weight != original.attn.qkv.weight).any(dim=1)
        # sam2's reshape(B, HW, 3, heads, -1): q rows [0, o), k [o, 2o), v [2o, 3o)
        assert changed[:o].all() and not changed[o:2 * o].any() and changed[2 * o:].all()
    merged_state = {k: v.clone() for k, v in sam.state_dict().items()}
    unload(sam, merge=True)  # merge-and-unload: sam2's own model again, with the branch in its qkv weights
    assert list(sam.state_dict()) == list(base.state_dict())
    assert not adapter_layers(sam) and not hasattr(sam.image_encoder, "cobot")
    assert torch.allclose(run(sam, inputs), unmerged, atol=1e-5)
    assert torch.equal(sam.image_encoder.trunk.blocks[3].attn.qkv.weight,
                       merged_state["image_encoder.trunk.blocks.3.attn.qkv.base.weight"])


@pytest.mark.slow
@pytest.mark.timeout(120)  # 15 s alone
@pytest.mark.parametrize("method", ["lora", "adaptformer+cobot", "conv_lora", "adapter"])
def test_unload_gives_sam2_back(base, inputs, method):
    reference = run(base, inputs)
    sam = copy.deepcopy(base)
    before = tensors(sam)
    apply_peft(sam, method)
    perturb_added(sam, before)
    assert not torch.allclose(run(sam, inputs), reference, atol=1e-4)  # the branch changes the output
    unload(sam)
    state = sam.state_dict()
    assert list(state) == list(base.state_dict())
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    assert torch.equal(run(sam, inputs), reference)


@pytest.mark.slow
@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", ["vpt", "ssf", "sam_adapter", "lst"])
def test_methods_without_a_place_on_hiera_stop_with_one_line(base, method):
    sam = base  # refused before anything changes
    with pytest.raises(SettingsError, match=rf"peft '{method}' does not apply to the Hiera \(SAM 2\) image encoder: ") as err:
        apply_peft(sam, method)
    assert "\n" not in str(err.value) and "Hiera" in str(err.value).split(": ", 1)[1]
    assert not adapter_layers(sam) and list(sam.state_dict()) == list(base.state_dict())
