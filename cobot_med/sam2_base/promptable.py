"""SAM 2 as the project's promptable module: ``(images, boxes) -> logits``, the image path of sam2's predictor.

:class:`PromptableSam2` holds sam2's ``SAM2VideoPredictor`` as ``.sam2`` (the same object as ``.sam``, which
the PEFT library, adapters and counts read), so a PEFT method injected into ``.sam2.image_encoder`` serves the
image path here (training, slice inference) and sam2's own video path (propagation) alike.

The image path is ``SAM2ImagePredictor``'s (sam2 1.1.0, ``set_image`` and ``_predict``), called part by part
so that it trains and decodes K boxes of an image against one embedding:

- ``encode``: normalise with the recipe's mean/std (ImageNet's, in [0, 1] units), ``forward_image`` (Hiera,
  FPN neck, the decoder's ``conv_s0`` / ``conv_s1`` on the two high-resolution levels),
  ``_prepare_backbone_features``, and ``no_mem_embed`` added to the lowest-resolution level
  (``directly_add_no_mem_embed``: a frame without memory). The memory attention and memory encoder do not
  run: a slice is a frame without memory.
- ``decode``: a box is two points labelled 2 and 3 (clicks follow them), through ``sam_prompt_encoder``
  (``boxes=None``, so a padding point is appended, as the predictor does) and ``sam_mask_decoder`` with the
  high-resolution features, ``multimask_output=False`` and ``repeat_image`` when K > 1. In eval mode the
  decoder falls back to the best of its three masks when the single one is unstable
  (``dynamic_multimask_via_stability``, the predictors' setting); in training mode it returns the single mask
  token's mask, as SAM 2's own training does. Object scores are not applied (the image predictor ignores them).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from ..sam.promptable import PromptableSam
from ..sam.recipes import InputRecipe, Sam2Recipe


class Sam2Features(NamedTuple):
    """What SAM 2's decoder reads of an image: the embedding (B, 256, S/16, S/16) with ``no_mem_embed`` added,
    and the two projected high-resolution levels (B, 32, S/4, S/4) and (B, 64, S/8, S/8)."""

    image_embed: torch.Tensor
    high_res: tuple[torch.Tensor, ...]

    @property
    def shape(self) -> torch.Size:
        return self.image_embed.shape


class PromptableSam2(PromptableSam):
    """SAM 2 as ``(images (B,3,S,S) in [0,1], boxes (B,K,4) XYXY in pixels) -> logits (B,K,S/4,S/4)``."""

    def __init__(self, sam2: torch.nn.Module, spec: Any = None, adapter_keys=(), base_sha256: str | None = None):
        super().__init__(sam2, spec=spec, adapter_keys=adapter_keys, base_sha256=base_sha256)
        recipe = self.recipe
        # the recipe's normalisation, outside sam2's state dict (checkpoints and adapters do not hold it)
        self.register_buffer("pixel_mean", torch.tensor(recipe.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(recipe.pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def sam2(self) -> torch.nn.Module:
        """sam2's ``SAM2VideoPredictor`` (the same module as ``sam``)."""
        return self.sam

    @property
    def image_size(self) -> int:
        return int(self.sam.image_size)

    @property
    def recipe(self) -> InputRecipe:
        if self.spec is not None and hasattr(self.spec, "input_recipe"):
            return self.spec.input_recipe()
        return Sam2Recipe(self.image_size)

    def encode(self, images: torch.Tensor) -> Sam2Features:
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images must be (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}"
            )
        model = self.sam
        x = (images - self.pixel_mean) / self.pixel_std
        _, feats, _, sizes = model._prepare_backbone_features(model.forward_image(x))
        if model.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + model.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(x.shape[0], -1, *size) for f, size in zip(feats, sizes)]
        return Sam2Features(maps[-1], tuple(maps[:-1]))

    def decode(
        self,
        embeddings: Sam2Features,
        boxes: torch.Tensor | None,
        valid: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`PromptableSam.decode` (same shapes, ``valid`` and ``points``), on :meth:`encode`'s features."""
        image_embed = embeddings.image_embed
        B = image_embed.shape[0]
        if boxes is None and points is None:
            raise ValueError("give boxes, points or both")
        if boxes is not None and (boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != B):
            raise ValueError(f"boxes must be (B, K, 4) with B={B}, got {tuple(boxes.shape)}")
        if points is not None:
            coords, labels = points
            if coords.dim() != 4 or coords.shape[-1] != 2 or labels.shape != coords.shape[:-1] or (
                    coords.shape[0] != B) or (boxes is not None and coords.shape[1] != boxes.shape[1]):
                raise ValueError(f"points must be coordinates (B, K, P, 2) and labels (B, K, P) with B={B}, got "
                                 f"{tuple(coords.shape)} and {tuple(labels.shape)}")
        model = self.sam
        image_pe = model.sam_prompt_encoder.get_dense_pe()
        logits, ious = [], []
        for b in range(B):
            keep = slice(None) if valid is None else valid[b]
            parts = []  # box corners (labels 2, 3) first, then clicks: SAM2ImagePredictor._predict's order
            if boxes is not None:
                corners = boxes[b][keep].to(image_embed.dtype).reshape(-1, 2, 2)
                parts.append((corners, torch.tensor([2, 3], device=corners.device).expand(len(corners), 2)))
            if points is not None:
                parts.append((points[0][b][keep].to(image_embed.dtype), points[1][b][keep]))
            coords = torch.cat([c for c, _ in parts], dim=1)
            labels = torch.cat([lab.to(torch.int32) for _, lab in parts], dim=1)
            if coords.shape[0] == 0:
                continue
            sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
            masks, iou, _, _ = model.sam_mask_decoder(
                image_embeddings=image_embed[b : b + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
                repeat_image=coords.shape[0] > 1,
                high_res_features=[level[b : b + 1] for level in embeddings.high_res],
            )
            logits.append(masks)
            ious.append(iou[:, 0])
        if valid is not None:
            if not logits:
                side = image_embed.shape[-1] * 4
                return image_embed.new_zeros(0, 1, side, side), image_embed.new_zeros(0)
            return torch.cat(logits), torch.cat(ious)
        return torch.stack([m[:, 0] for m in logits]), torch.stack(ious)

    @torch.no_grad()
    def predict_slice(self, image: np.ndarray | torch.Tensor, boxes: np.ndarray | torch.Tensor,
                      resize: Literal["square", "longest_side"] | None = None) -> torch.Tensor:
        """Mask logits (K,H,W) for one slice through the model's input recipe (the only way SAM 2 is fed)."""
        if resize is not None:
            raise ValueError(f"resize={resize!r} is segment-anything's preprocessing; SAM 2 takes its recipe's "
                             "(leave resize unset)")
        return super().predict_slice(image, boxes)
