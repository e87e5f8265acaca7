"""What every promptable model's ``decode`` shares (SAM's, SAM 2's, the exported runtimes'): the prompt shapes
it takes and how its per-image results come back. Plain torch, so the exported-model runtime imports it alone."""

from __future__ import annotations

import torch


def check_prompts(batch: int, boxes: torch.Tensor | None, points: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Boxes (B, K, 4) and / or clicks (coordinates (B, K, P, 2), labels (B, K, P)) for ``batch`` images."""
    if boxes is None and points is None:
        raise ValueError("give boxes, points or both")
    if boxes is not None and (boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != batch):
        raise ValueError(f"boxes must be (B, K, 4) with B={batch}, got {tuple(boxes.shape)}")
    if points is not None:
        coords, labels = points
        if coords.dim() != 4 or coords.shape[-1] != 2 or labels.shape != coords.shape[:-1] or (
                coords.shape[0] != batch) or (boxes is not None and coords.shape[1] != boxes.shape[1]):
            raise ValueError(f"points must be coordinates (B, K, P, 2) and labels (B, K, P) with B={batch}, got "
                             f"{tuple(coords.shape)} and {tuple(labels.shape)}")


def pack_decoded(logits: list[torch.Tensor], ious: list[torch.Tensor], valid: torch.Tensor | None,
                 embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image results (K, 1, 4h, 4w) and (K,) -> (B, K, 4h, 4w) and (B, K); with ``valid``, packed in batch
    order as (N, 1, 4h, 4w) and (N,) (empty when no prompt was valid; ``embeddings`` (B, C, h, w) gives the size)."""
    if valid is not None:
        if not logits:
            side = embeddings.shape[-1] * 4
            return embeddings.new_zeros(0, 1, side, side), embeddings.new_zeros(0)
        return torch.cat(logits), torch.cat(ious)
    return torch.stack([m[:, 0] for m in logits]), torch.stack(ious)
