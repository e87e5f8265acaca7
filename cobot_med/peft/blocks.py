"""Where block-level PEFT methods attach: one list of an encoder's adaptable blocks.

LoRA, Conv-LoRA, AdaptFormer, Adapter and COBOT need the same few facts about a transformer
block — its width, its attention's fused ``qkv`` Linear and which output columns of it are q,
k and v, its MLP and where that MLP's normalised input comes from. :func:`adaptable_blocks`
gives them for segment-anything's ``ImageEncoderViT`` (every block of ``encoder.blocks``), for
LiteMedSAM's TinyViT (the attention blocks of stages 2-4, ``encoder.layers[1:]``; stage 1
is convolutional) and for SAM 2's Hiera (every ``MultiScaleBlock`` of ``encoder.trunk.blocks``),
so no method special-cases an architecture.

Hiera (sam2's ``hieradet.py``): 4 stages whose width doubles (T: 96, 192, 384, 768 over 1, 2, 7, 2
blocks); the first block of stages 2-4 takes the previous width ``dim`` and gives ``dim_out = 2 dim``:
its fused ``attn.qkv`` is Linear(dim, 3 dim_out), its queries are max-pooled 2 x 2 after qkv (the
token grid halves), and its shortcut is ``block.proj`` Linear(dim, dim_out) on the pooled
``norm1`` output. The qkv layout is SAM's, [q | k | v] of ``dim_out`` each (``reshape(B, HW, 3,
heads, -1)``); the MLP (``mlp.layers.0/1``, GELU) runs on ``norm2(x)`` at ``dim_out``. So a block's
``width`` here is ``dim_out``, the width its attention output and MLP have; methods that read the
qkv input take ``in_features`` from the Linear itself.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import SettingsError

QKV_TARGETS = ("q", "k", "v")


@dataclasses.dataclass(frozen=True)
class AdaptableBlock:
    """One transformer block as the PEFT methods see it.

    ``qkv_heads_interleaved``: segment-anything lays the fused qkv output out as [q | k | v]
    (``reshape(B, N, 3, heads, d)``); TinyViT as [q_h k_h v_h] per head
    (``view(B, N, heads, -1).split([key_dim, key_dim, d])``).
    ``mlp_norm_inside``: TinyViT's ``Mlp`` starts with its own LayerNorm (``mlp.norm``); SAM's
    block applies ``norm2`` before calling ``mlp``, so its MLP input is normalised already.
    """

    block: nn.Module
    width: int
    num_heads: int
    key_dim: int
    value_dim: int
    qkv_heads_interleaved: bool
    mlp_norm_inside: bool

    @property
    def attention(self) -> nn.Module:
        return self.block.attn

    def qkv_columns(self, target: str) -> torch.Tensor:
        """Indices of the fused qkv output that hold ``target`` (q, k or v), head by head."""
        if target not in QKV_TARGETS:
            raise ValueError(f"qkv target must be one of {QKV_TARGETS}, got {target!r}")
        kd, d, heads = self.key_dim, self.value_dim, self.num_heads
        if not self.qkv_heads_interleaved:
            width = kd * heads if target != "v" else d * heads
            start = QKV_TARGETS.index(target) * kd * heads
            return torch.arange(start, start + width)
        offset, size = {"q": (0, kd), "k": (kd, kd), "v": (2 * kd, d)}[target]
        stride = 2 * kd + d
        return torch.cat([torch.arange(h * stride + offset, h * stride + offset + size) for h in range(heads)])


def adaptable_blocks(encoder: nn.Module) -> list[AdaptableBlock]:
    """The blocks of ``encoder`` that LoRA, Conv-LoRA, AdaptFormer, Adapter and COBOT adapt, in order."""
    if encoder_kind(encoder) == "hiera":  # SAM 2's ImageEncoder: Hiera trunk + FPN neck
        found = []
        for block in encoder.trunk.blocks:
            width, heads = block.dim_out, block.attn.num_heads
            found.append(AdaptableBlock(block, width, heads, width // heads, width // heads, False, False))
        return found
    if isinstance(getattr(encoder, "blocks", None), nn.ModuleList):  # segment-anything ImageEncoderViT
        found = []
        for block in encoder.blocks:
            width, heads = block.norm1.normalized_shape[0], block.attn.num_heads
            found.append(AdaptableBlock(block, width, heads, width // heads, width // heads, False, False))
        return found
    if hasattr(encoder, "layers"):  # TinyViT: stage 1 holds MBConv blocks, stages 2-4 attention blocks
        found = []
        for layer in encoder.layers:
            for block in getattr(layer, "blocks", ()):
                if not hasattr(block, "attn"):
                    continue
                attn = block.attn
                found.append(AdaptableBlock(block, block.dim, attn.num_heads, attn.key_dim, attn.d, True, True))
        return found
    raise SettingsError(f"no adaptable transformer blocks in a {type(encoder).__name__} image encoder")


def encoder_kind(encoder: nn.Module) -> str:
    """``"vit"`` for segment-anything's ImageEncoderViT, ``"tiny_vit"`` for LiteMedSAM's TinyViT, ``"hiera"``
    for SAM 2's ImageEncoder (a Hiera ``trunk``)."""
    if isinstance(getattr(getattr(encoder, "trunk", None), "blocks", None), nn.ModuleList):
        return "hiera"
    return "vit" if isinstance(getattr(encoder, "blocks", None), nn.ModuleList) else "tiny_vit"


def require_vit(encoder: nn.Module, method: str, why: dict[str, str]) -> None:
    """Refuse a method defined on SAM's plain ViT for another encoder, saying why it does not apply there
    (``why``: the reason for each other encoder kind)."""
    kind = encoder_kind(encoder)
    if kind != "vit":
        name = "Hiera (SAM 2)" if kind == "hiera" else type(encoder).__name__
        raise SettingsError(f"peft {method!r} does not apply to the {name} image encoder: {why[kind]}")
