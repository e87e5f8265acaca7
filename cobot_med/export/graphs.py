"""The two graphs of an exported model, as torch modules over a built :class:`~cobot_med.sam.PromptableSam`.

- :class:`EncoderGraph`: one slice as the input recipe gives it, (1, 3, S, S) -> the image embedding
  (1, C, h, w): the recipe's pixel mean/std (``PromptableSam.encode``) and the image encoder. One slice per
  call: TinyViT's ``PatchMerging`` reads the batch size as a Python int, which a trace fixes; a batch of slices
  is consecutive calls (on a CPU, LiteMedSAM runs one slice per call anyway, ``RunSettings.slice_batch``).
- :class:`PromptDecoderGraph`: the prompt encoder and the mask decoder on one image embedding, for any number N
  of prompts of P points each: ``coords`` (N, P, 2) XY in model pixels and ``labels`` (N, P) -> low-res logits
  (N, 1, 4h, 4w) and IoU predictions (N, 1). A box is its two corners with labels 2 and 3, clicks are labels 1
  (foreground) and 0 (background), -1 a padding point: the same sums segment-anything's ``PromptEncoder`` makes
  (``_embed_points`` and ``_embed_boxes`` add the same positional encoding and the same learned embeddings), so
  boxes alone, clicks alone and clicks with a box go through one graph.

A trace records one path through Python's control flow. Conv-LoRA's mixture of experts sends each window only
to its chosen expert (``if rows.numel()``), so a trace would keep the experts the trace input chose;
:func:`dense_routing` traces it computing every expert and keeping, per row, the chosen one's output (the same
values; the MoE's own convolutions are small, rank 3).

This module needs the training stack (it builds the torch model); the runtime (:mod:`.runtime`) does not.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
from torch import nn


def _dense_moe_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``ConvMoE.forward`` with every expert run on every row and the unchosen rows masked out: for top-1 the sum
    of the chosen expert's output (zeros elsewhere), else the log-sum-exp over the kept experts (-inf elsewhere)."""
    gates, _ = self.gates(x.mean(dim=(2, 3)))
    if self.top_k == 1:
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            keep = (gates[:, e] > 0).reshape(-1, 1, 1, 1)
            out = out + torch.where(keep, expert(x), torch.zeros_like(x))
        return out
    outputs = [torch.where((gates[:, e] > 0).reshape(-1, 1, 1, 1), expert(x), torch.full_like(x, float("-inf")))
               for e, expert in enumerate(self.experts)]
    return torch.stack(outputs).logsumexp(dim=0)


@contextlib.contextmanager
def dense_routing(model: nn.Module) -> Iterator[int]:
    """Within the block, every Conv-LoRA MoE of ``model`` routes densely (:func:`_dense_moe_forward`); yields how
    many MoEs it changed."""
    from ..peft.conv_lora import ConvMoE

    moes = [m for m in model.modules() if isinstance(m, ConvMoE)]
    for moe in moes:
        moe.forward = types.MethodType(_dense_moe_forward, moe)
    try:
        yield len(moes)
    finally:
        for moe in moes:
            del moe.forward


class EncoderGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.eval()  # torch's exporter puts the wrapper back in the mode it had: eval, as the model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images)


class PromptDecoderGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        sam = model.sam
        self.prompt_encoder, self.mask_decoder = sam.prompt_encoder, sam.mask_decoder
        self.register_buffer("image_pe", sam.prompt_encoder.get_dense_pe().detach().clone(), persistent=False)
        self.eval()

    def forward(self, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor):
        prompts = self.prompt_encoder
        encoding = prompts.pe_layer.forward_with_coords(coords + 0.5, prompts.input_image_size)  # (N, P, C)
        labels = labels.unsqueeze(-1)
        padding = labels == -1
        sparse = torch.where(padding, torch.zeros_like(encoding), encoding)
        sparse = sparse + padding.to(sparse.dtype) * prompts.not_a_point_embed.weight
        for kind, table in enumerate(prompts.point_embeddings):  # 0 background, 1 foreground, 2 / 3 box corners
            sparse = sparse + (labels == kind).to(sparse.dtype) * table.weight
        h, w = prompts.image_embedding_size
        dense = prompts.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(coords.shape[0], -1, h, w)
        masks, iou = self.mask_decoder(image_embeddings=embedding, image_pe=self.image_pe,
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=False)
        return masks, iou
