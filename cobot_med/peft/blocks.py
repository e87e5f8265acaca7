"""Where block-level PEFT methods attach: one list of an encoder's adaptable blocks.

LoRA, Conv-LoRA, AdaptFormer, Adapter and COBOT need the same few facts about a transformer
block — its width, its attention's fused ``qkv`` Linear and which output columns of it are q,
k and v, its MLP and where that MLP's normalised input comes from. :func:`adaptable_blocks`
gives them for segment-anything's ``ImageEncoderViT`` (every block of ``encoder.blocks``) and
for LiteMedSAM's TinyViT (the attention blocks of stages 2-4, ``encoder.layers[1:]``; stage 1
is convolutional), so no method special-cases an architecture.
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
    """``"vit"`` for segment-anything's ImageEncoderViT, ``"tiny_vit"`` for LiteMedSAM's TinyViT."""
    return "vit" if isinstance(getattr(encoder, "blocks", None), nn.ModuleList) else "tiny_vit"


def require_vit(encoder: nn.Module, method: str, why: str) -> None:
    """Refuse a method defined on SAM's plain ViT for another encoder, saying why it does not apply."""
    if encoder_kind(encoder) != "vit":
        raise SettingsError(f"peft {method!r} does not apply to the {type(encoder).__name__} image encoder: {why}")
