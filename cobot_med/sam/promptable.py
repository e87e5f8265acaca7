"""One image-encoder pass per image, any number of box prompts decoded on it.

segment-anything's ``Sam.forward`` is ``@torch.no_grad()`` and takes one dict per image;
``PromptableSam`` calls the three parts directly so it trains, and decodes the K boxes of
an image (one per organ) against a single image embedding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from .recipes import InputRecipe, SamRecipe


class PromptableSam(nn.Module):
    """SAM as ``(images (B,3,S,S) in [0,255], boxes (B,K,4) XYXY in pixels) -> logits (B,K,h,w)``."""

    def __init__(
        self,
        sam: Sam,
        spec: Any = None,
        adapter_keys: Sequence[str] = (),
        base_sha256: str | None = None,
    ) -> None:
        super().__init__()
        self.sam = sam
        self.spec = spec  # cobot_med.model.ModelSpec when built by build_model
        self.adapter_keys = list(adapter_keys)  # state-dict keys (of ``sam``) an adapter checkpoint holds
        self.base_sha256 = base_sha256  # SHA-256 of the official checkpoint loaded, None without one
        self._versions = self._adapter_versions()

    def _adapter_versions(self) -> dict[str, int]:
        """The in-place version counter of each adapter tensor now. Optimiser steps, ``load_state_dict`` and
        merges bump it; after :meth:`unload` the base tensors among them (the decoder, BitFit's biases,
        ``full``'s weights: trained where they are) are checked against these."""
        state = self.sam.state_dict(keep_vars=True)
        return {k: state[k]._version for k in self.adapter_keys}

    def unload(self, merge: bool = False) -> "PromptableSam":
        """Take the PEFT method out (:func:`cobot_med.peft.unload`): the model becomes ``frozen`` SAM.

        ``spec`` and ``adapter_keys`` follow, so saving, tracking and the run identity describe the model
        as it now is. What the method changed in place stays (merged layers with ``merge=True``, a trained
        decoder or bias): then the weights are no longer the official base's, ``base_sha256`` becomes None,
        and an adapter saved from here holds every tensor.
        """
        from ..peft import apply_peft, unload
        from ..peft.layer import adapter_layers

        merged = merge and any(layer.mergeable for _, layer in adapter_layers(self.sam))
        unload(self.sam, merge=merge)
        state = self.sam.state_dict(keep_vars=True)
        changed = [k for k, version in self._versions.items() if k in state and state[k]._version != version]
        if merged or changed:
            self.base_sha256 = None
        self._set_method("frozen", *apply_peft(self.sam, "frozen"))
        return self

    def set_peft(self, method: str, options: Mapping[str, Any] | None = None) -> "PromptableSam":
        """Swap the PEFT method in place: :meth:`unload`, then inject ``method`` with ``options``.

        The result equals a model built with that method on the weights left by the unload, and
        ``spec`` / ``adapter_keys`` say so (an adapter of the old method cannot be saved under the new one).
        """
        from ..peft import apply_peft

        self.unload()
        self._set_method(method, *apply_peft(self.sam, method, options))
        return self

    def _set_method(self, method: str, config: Any, adapter_keys: Sequence[str]) -> None:
        from .speed import apply_speed_switches

        self.adapter_keys = list(adapter_keys)
        if self.spec is not None:
            self.spec = dataclasses.replace(self.spec, peft=method, peft_options=config.to_dict())
            apply_speed_switches(self.sam, self.spec.skip_window_padding, self.spec.gradient_checkpointing)
        self._versions = self._adapter_versions()

    @property
    def image_size(self) -> int:
        return self.sam.image_encoder.img_size

    def train(self, mode: bool = True) -> "PromptableSam":
        """As ``nn.Module.train``, but batch norms whose weights are frozen stay in eval mode: a frozen
        encoder with batch norms (LiteMedSAM's TinyViT) would otherwise drift its running statistics
        towards the fine-tuning batches, changing the "frozen" base under the adapter."""
        from ..peft.tuner import trains_statistics

        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not trains_statistics(module):
                    module.eval()
        return self

    @property
    def recipe(self) -> InputRecipe:
        """The base model's input recipe in force (the spec's; SAM's when built without a spec)."""
        if self.spec is not None and hasattr(self.spec, "input_recipe"):
            return self.spec.input_recipe()
        return SamRecipe(self.image_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise with the ``Sam``'s pixel mean/std and run the image encoder: (B,3,S,S) -> (B,C,h,w).

        The mean/std are the recipe's: SAM's ImageNet statistics on [0, 255] inputs, or none (mean 0,
        std 1) for MedSAM and LiteMedSAM, whose recipes give inputs in [0, 1]. h = w = S/16 for ViTs,
        64 for LiteMedSAM's TinyViT.
        """
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images must be (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}"
            )
        x = (images - self.sam.pixel_mean) / self.sam.pixel_std
        return self.sam.image_encoder(x)

    def decode(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor | None,
        valid: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode K prompts per image against its embedding.

        embeddings (B,C,h,w), boxes (B,K,4) -> low-res logits (B,K,4h,4w) and IoU predictions (B,K).
        With ``valid`` (B,K) bool, only those prompts are decoded and the results come packed
        in batch order: logits (N,1,4h,4w), IoU (N,), N = valid.sum().
        ``points`` adds clicks to each prompt, as segment-anything's ``SamPredictor`` takes them:
        coordinates (B,K,P,2) XY in the model's pixels and labels (B,K,P), 1 foreground, 0 background,
        -1 no point (SAM's own padding token, for prompts with fewer than P clicks). ``boxes`` may be
        None when ``points`` is given (clicks only).
        """
        if boxes is None and points is None:
            raise ValueError("give boxes, points or both")
        if boxes is not None and (boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != embeddings.shape[0]):
            raise ValueError(f"boxes must be (B, K, 4) with B={embeddings.shape[0]}, got {tuple(boxes.shape)}")
        if points is not None:
            coords, labels = points
            if coords.dim() != 4 or coords.shape[-1] != 2 or labels.shape != coords.shape[:-1] or (
                    coords.shape[0] != embeddings.shape[0]) or (boxes is not None and coords.shape[1] != boxes.shape[1]):
                raise ValueError(f"points must be coordinates (B, K, P, 2) and labels (B, K, P) with B="
                                 f"{embeddings.shape[0]}, got {tuple(coords.shape)} and {tuple(labels.shape)}")
        image_pe = self.sam.prompt_encoder.get_dense_pe()
        logits, ious = [], []
        for b in range(embeddings.shape[0]):  # MaskDecoder repeats its image embedding per prompt: decode per image
            keep = slice(None) if valid is None else valid[b]
            image_boxes = None if boxes is None else boxes[b][keep].to(embeddings.dtype)
            image_points = None if points is None else (points[0][b][keep].to(embeddings.dtype), points[1][b][keep])
            if (image_boxes if image_boxes is not None else image_points[0]).shape[0] == 0:
                continue
            sparse, dense = self.sam.prompt_encoder(points=image_points, boxes=image_boxes, masks=None)
            masks, iou = self.sam.mask_decoder(
                image_embeddings=embeddings[b : b + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            logits.append(masks)
            ious.append(iou[:, 0])
        if valid is not None:
            if not logits:
                side = embeddings.shape[-1] * 4
                return embeddings.new_zeros(0, 1, side, side), embeddings.new_zeros(0)
            return torch.cat(logits), torch.cat(ious)
        return torch.stack([m[:, 0] for m in logits]), torch.stack(ious)

    def forward(
        self,
        images: torch.Tensor,
        boxes: torch.Tensor | None,
        valid: torch.Tensor | None = None,
        output_size: int | tuple[int, int] | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Mask logits (B,K,h,w), or (N,1,h,w) for the ``valid`` prompts only; low-res (S/4) unless
        ``output_size`` asks for a bilinear upsampling. ``points``: clicks, as in :meth:`decode`."""
        logits, _ = self.decode(self.encode(images), boxes, valid, points)
        if output_size is not None and logits.shape[0]:
            logits = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
        return logits

    @torch.no_grad()
    def predict_slice(
        self,
        image: np.ndarray | torch.Tensor,
        boxes: np.ndarray | torch.Tensor,
        resize: Literal["square", "longest_side"] | None = None,
    ) -> torch.Tensor:
        """Mask logits (K,H,W) for one slice at its own resolution.

        ``image`` is (H,W) or (H,W,3) with intensities already in [0, 255] (windowed); ``boxes`` (K,4)
        XYXY in the slice's own pixel grid. By default the model's input recipe does the pre- and
        post-processing (:mod:`cobot_med.sam.recipes`); a recipe reads one CT channel, so an (H,W,3) image
        is taken by its first channel there. For SAM weights, ``square`` is a plain
        bilinear resize to S x S, ``longest_side`` segment-anything's own preprocessing (as
        ``SamPredictor``: resize the longest side, pad, crop back).
        """
        device = next(self.sam.parameters()).device
        image = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
        if image.dim() == 2:
            image = image[..., None].expand(*image.shape, 3)
        if image.dim() != 3 or image.shape[-1] != 3:
            raise ValueError(f"a slice must be (H, W) or (H, W, 3), got {tuple(image.shape)}")
        H, W = image.shape[:2]
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        S = self.image_size
        if resize is None:
            recipe = self.recipe
            x, geometry = recipe.prepare(image[..., 0][None].float())
            logits = self(x.to(device), recipe.boxes_to_model(boxes, geometry)[None].to(device))
            return recipe.logits_to_slices(logits, geometry)[0]
        if resize == "longest_side":
            transform = ResizeLongestSide(S)
            resized = transform.apply_image(image.cpu().numpy().astype(np.uint8))
            x = torch.as_tensor(resized, device=device).permute(2, 0, 1)[None].float()
            input_size = tuple(x.shape[-2:])
            x = self.sam.preprocess(x)
            embeddings = self.sam.image_encoder(x)
            model_boxes = transform.apply_boxes_torch(boxes, (H, W)).to(device)
            low_res, _ = self.decode(embeddings, model_boxes[None])
            return self.sam.postprocess_masks(low_res, input_size, (H, W))[0]
        if resize != "square":
            raise ValueError(f"resize must be 'square' or 'longest_side', got {resize!r}")
        x = image.permute(2, 0, 1)[None].float().to(device)
        x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False)
        scale = torch.tensor([S / W, S / H, S / W, S / H])
        logits = self(x, (boxes * scale)[None].to(device), output_size=(S, S))
        return F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)[0]

