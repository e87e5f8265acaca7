"""SAM 2.1 / MedSAM2 from sam2's own classes: ``SAM2VideoPredictor`` composed from the sam2 package's yaml.

sam2's ``build_sam2_video_predictor`` composes a config (``configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml``)
with hydra, makes it a ``SAM2VideoPredictor`` (a ``SAM2Base`` subclass) and loads a checkpoint with
``weights_only=True`` but not strictly by our rules (a mismatch is a logged list and a bare RuntimeError). Here
the same builder is called with no checkpoint (random init) and the checkpoint is loaded by
:func:`cobot_med.sam.checkpoint.load_sam_checkpoint`: strict, one named error naming what the file holds.

What changes with the input size S (a multiple of 32): ``model.image_size`` and the memory attention's RoPE
grid ``feat_sizes`` = S/16 (MedSAM2's ``sam2.1_hiera_t512.yaml`` is the tiny yaml with exactly these two
changes, 512 and [32, 32]); no tensor of the checkpoint depends on S (Hiera interpolates its position
embedding at every call), so weights trained at 1024 load at any S.

The overrides of ``build_sam2_video_predictor(apply_postprocessing=True)`` are kept (the dynamic multimask
fallback of the decoder in eval, the video path's hole filling and click binarisation), so the model is the
one sam2's own predictors run.
"""

from __future__ import annotations

from pathlib import Path

from ..sam.build import check_image_size, get_architecture


def sam2_config(arch: str, image_size: int) -> tuple[str, list[str]]:
    """The sam2 yaml and the hydra overrides for ``arch`` at ``image_size``."""
    spec = get_architecture(arch)
    if spec.encoder != "hiera":
        raise ValueError(f"{arch} is not a SAM 2 architecture")
    check_image_size(spec, image_size)
    grid = image_size // 16
    overrides = [
        f"++model.image_size={image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{grid},{grid}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{grid},{grid}]",
    ]
    return spec.sam2_config, overrides


def build_sam2(arch: str, image_size: int | None = None, checkpoint: str | Path | None = None):
    """sam2's ``SAM2VideoPredictor`` for ``arch`` at ``image_size`` (the arch's default when None), in eval
    mode on the CPU; randomly initialised, or ``checkpoint`` (Meta's / MedSAM2's ``{"model": state_dict}``)
    loaded strictly with ``weights_only=True`` (:class:`~cobot_med.sam.checkpoint.CheckpointError` otherwise)."""
    from sam2.build_sam import build_sam2_video_predictor

    image_size = get_architecture(arch).default_image_size if image_size is None else int(image_size)
    config, overrides = sam2_config(arch, image_size)
    model = build_sam2_video_predictor(config, ckpt_path=None, device="cpu", mode="eval",
                                       hydra_overrides_extra=overrides)
    if checkpoint is not None:
        from ..sam.checkpoint import load_sam_checkpoint

        load_sam_checkpoint(model, checkpoint)
    return model
