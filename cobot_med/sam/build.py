"""Build SAM from segment-anything's own classes at any input size.

segment-anything's ``_build_sam`` hard-codes 1024 px and loads checkpoints without
``weights_only``; here the same classes are assembled for any input size (a multiple of
the patch size) and checkpoint loading lives in :mod:`cobot_med.sam.checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamArchitecture:
    """The hyper-parameters that distinguish one SAM variant from another."""

    name: str
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    patch_size: int = 16
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    default_image_size: int = 1024
    official_checkpoint: str | None = None


ARCHITECTURES: dict[str, SamArchitecture] = {
    "vit_b": SamArchitecture("vit_b", 768, 12, 12, (2, 5, 8, 11), official_checkpoint="sam_vit_b_01ec64.pth"),
    "vit_l": SamArchitecture("vit_l", 1024, 24, 16, (5, 11, 17, 23), official_checkpoint="sam_vit_l_0b3195.pth"),
    "vit_h": SamArchitecture("vit_h", 1280, 32, 16, (7, 15, 23, 31), official_checkpoint="sam_vit_h_4b8939.pth"),
    # Same classes, a fraction of the size: for tests and the CPU demo (no official weights).
    "tiny": SamArchitecture(
        "tiny",
        encoder_embed_dim=64,
        encoder_depth=4,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(1, 3),
        window_size=7,
        prompt_embed_dim=64,
        decoder_mlp_dim=128,
        decoder_num_heads=8,
        iou_head_hidden_dim=64,
        default_image_size=128,
    ),
}


def get_architecture(arch: str) -> SamArchitecture:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown SAM architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}") from None


def check_image_size(arch: SamArchitecture, image_size: int) -> None:
    """Reject an input size the encoder cannot take (must tile into whole patches)."""
    if not isinstance(image_size, int) or image_size < arch.patch_size * 4 or image_size % arch.patch_size:
        raise ValueError(
            f"image_size {image_size!r} is not usable for {arch.name}: it must be a multiple of the "
            f"patch size {arch.patch_size} and at least {arch.patch_size * 4} (e.g. 256, 512, 1024)"
        )


def build_sam(arch: str = "vit_b", image_size: int | None = None) -> Sam:
    """A randomly initialised ``segment_anything.modeling.Sam`` for ``arch`` at ``image_size``.

    The prompt encoder's embedding grid and input size follow ``image_size``; the absolute
    position embedding and the global blocks' relative position tables are sized for it.
    """
    spec = get_architecture(arch)
    image_size = spec.default_image_size if image_size is None else int(image_size)
    check_image_size(spec, image_size)
    grid = image_size // spec.patch_size
    image_encoder = ImageEncoderViT(
        img_size=image_size,
        patch_size=spec.patch_size,
        embed_dim=spec.encoder_embed_dim,
        depth=spec.encoder_depth,
        num_heads=spec.encoder_num_heads,
        mlp_ratio=4,
        out_chans=spec.prompt_embed_dim,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        global_attn_indexes=spec.encoder_global_attn_indexes,
        window_size=spec.window_size,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=spec.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=2,
            embedding_dim=spec.prompt_embed_dim,
            mlp_dim=spec.decoder_mlp_dim,
            num_heads=spec.decoder_num_heads,
        ),
        transformer_dim=spec.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=spec.iou_head_hidden_dim,
    )
    sam = Sam(
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    sam.eval()
    return sam
