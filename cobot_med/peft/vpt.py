"""VPT-deep: learnable prompt tokens in front of the tokens of every block (Jia et al., ECCV 2022).

In deep VPT, block i sees ``[P_i, x]``: the prompts pass through the block with the image
tokens and their outputs are dropped before block i+1, which gets fresh prompts P_{i+1}.
Inside a pre-norm block the only way the prompts reach the image tokens is as keys and
values of attention (LayerNorm and the MLP act token by token), so the image-token
outputs of block i are exactly

    softmax(q_x [k_x, k_P]^T * scale + [bias_x, 0]) [v_x, v_P],   k_P, v_P from qkv(norm1(P_i))

which is what :class:`PromptedAttention` computes; the prompts' own queries and outputs
are never computed, since VPT discards them anyway.

SAM's blocks are not a plain token sequence, and this is the part VPT leaves open:
- SAM attends on a (B, H, W, C) grid, and windowed blocks (all but 2, 5, 8, 11 on ViT-B)
  cut it into 14 x 14 windows (after padding) before attention. The prompts of block i join
  *every* window (and the whole grid in global blocks) as the same extra keys/values, so
  each image token sees all of its block's prompts wherever it is;
- SAM's decomposed relative-position bias is defined between grid positions only; between
  an image token and a prompt the bias is 0 (prompts have no position);
- prompts live in the block's input space and go through the block's own ``norm1`` (and the
  frozen qkv), as in VPT; the prompts of a block are shared by all images of a batch.

Options: ``num_tokens`` (default 16, which puts VPT at exactly LoRA's budget on ViT-B,
147,456, as the Conv-LoRA paper's table has VPT and LoRA at the same count; the VPT paper
sweeps 1-200 per task) and ``dropout`` on the prompts (VPT's prompt dropout, default 0).
Init as in the VPT code: uniform(-v, v), v = sqrt(6 / (3 * patch² + C)) (0.0625 on ViT-B).

Why a layer around the attention rather than one around ``qkv``: the prompts change the set of
keys inside the attention, so :class:`PromptedAttention` replaces each block's ``attn`` and
computes attention itself from the original's ``qkv``, ``proj``, ``rel_pos_h`` and
``rel_pos_w`` (its ``base_layer``; the prompts are ``blocks.i.attn.prompts``), with
``scaled_dot_product_attention`` and the bias as an additive mask, as
:class:`~cobot_med.sam.attention.SdpaAttention` does, whichever ``attention`` kind the model
was built with. Inject after :func:`~cobot_med.sam.attention.set_attention` (``build_model``
does): the prompted attention is not one of its kinds, so it is left alone.

Prompts add keys and values, so the model does not equal SAM at step 0.
ViT-B, image encoder trainable: 12 blocks x 16 tokens x 768 = **147,456**.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import get_rel_pos
from torch import nn

from .blocks import require_vit
from .config import PeftConfig
from .layer import AdapterLayer, share


@dataclasses.dataclass
class VptConfig(PeftConfig):
    num_tokens: int = 16
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"vpt num_tokens must be >= 1, got {self.num_tokens}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"vpt dropout must be in [0, 1), got {self.dropout}")


def relative_position_bias(attn: nn.Module, q: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """SAM's decomposed relative-position bias (B, heads, HW, HW) for queries q (B, heads, HW, d)."""
    B, heads = q.shape[:2]
    Rh = get_rel_pos(H, H, attn.rel_pos_h).to(q.dtype)
    Rw = get_rel_pos(W, W, attn.rel_pos_w).to(q.dtype)
    r_q = q.reshape(B, heads, H, W, -1)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw)
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, heads, H * W, H * W)


class PromptedAttention(AdapterLayer):
    """segment-anything's ``Attention`` (``base_layer``) with the block's prompt tokens as extra keys and values."""

    def __init__(self, attn: nn.Module, norm: nn.Module, num_tokens: int, dropout: float, init_bound: float):
        super().__init__(attn)
        self.prompts = nn.Parameter(torch.empty(num_tokens, attn.qkv.in_features).uniform_(-init_bound, init_bound))
        self.prompt_dropout = nn.Dropout(dropout)
        share(self, "block_norm", norm)  # the block's norm1, used but not registered here (it stays blocks.i.norm1)

    def prompt_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (heads, T, head_dim) of the prompts: qkv(norm1(P))."""
        attn = self.base_layer
        prompts = self.block_norm(self.prompt_dropout(self.prompts))
        T = prompts.shape[0]
        _, k, v = attn.qkv(prompts).reshape(T, 3, attn.num_heads, -1).permute(1, 2, 0, 3).unbind(0)
        return k, v

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B*, h, w, C), the whole grid (global blocks) or its windows (windowed blocks)
        attn = self.base_layer
        B, H, W, _ = x.shape
        q, k, v = attn.qkv(x).reshape(B, H * W, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        pk, pv = self.prompt_keys_values()
        T = pk.shape[1]
        k = torch.cat([k, pk.to(k.dtype).expand(B, -1, -1, -1)], dim=2)
        v = torch.cat([v, pv.to(v.dtype).expand(B, -1, -1, -1)], dim=2)
        mask = None
        if attn.use_rel_pos:
            mask = F.pad(relative_position_bias(attn, q, H, W), (0, T)).to(q.dtype)  # 0 towards prompts
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        return attn.proj(out.permute(0, 2, 1, 3).reshape(B, H, W, -1))


def inject(sam: nn.Module, config: VptConfig) -> None:
    require_vit(sam.image_encoder, "vpt", {
        "tiny_vit": "prompt tokens have no place in TinyViT's attention: its bias table is indexed by the fixed window's token offsets and every block reshapes its tokens to the H x W grid for local_conv",
        "hiera": "Hiera's blocks run on a token grid cut into mask-unit windows, and the first block of each stage pools its queries and changes the width; VPT's prompt tokens of one width joining one token sequence have no place there that VPT's definition fixes, so it is not implemented there",
    })
    encoder = sam.image_encoder
    kh, kw = encoder.patch_embed.proj.kernel_size
    for block in encoder.blocks:
        dim = block.norm1.normalized_shape[0]
        bound = math.sqrt(6.0 / (3 * kh * kw + dim))
        block.attn = PromptedAttention(block.attn, block.norm1, config.num_tokens, config.dropout, bound)
