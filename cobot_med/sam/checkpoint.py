"""Load Meta's official SAM checkpoints (and SAM 2's, MedSAM2's: ``{"model": state_dict}``) strictly, at any input size.

Official files are plain state dicts, so ``torch.load(..., weights_only=True)`` reads
them. The only shapes allowed to differ from the model are the absolute position
embedding and the global blocks' relative position tables, which depend on the input
size; they are resized the way SAMed and MedSAM-lite do (bicubic / linear).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from ..errors import CobotMedError
from ..files import file_sha256  # noqa: F401 - re-exported (cobot_med.sam.file_sha256)

_RESIZABLE = re.compile(r"^image_encoder\.(pos_embed|blocks\.\d+\.attn\.rel_pos_[hw])$")
_WRAPPER_KEYS = ("model", "state_dict", "module")


class CheckpointError(CobotMedError, ValueError):
    """A checkpoint file that cannot be loaded onto the model, with the reason."""


def unreadable_reason(path: Path, err: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in a few words (never advice to load it unsafely)."""
    import pickle

    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err):
        return "it holds Python objects other than tensors; not loaded, as that could run code"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"truncated or not a PyTorch file: {type(err).__name__}: {first}"[:300]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a tensor state dict with ``weights_only=True``; unwrap ``{"model": ...}`` and ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: SAM checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights-only errors all mean "not loadable"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({unreadable_reason(path, err)})") from err
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a SAM checkpoint (expected a state dict of tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def describe_architecture(state: Mapping[str, torch.Tensor]) -> str:
    """A short guess of which SAM variant a state dict holds, for error messages."""
    from .build import ARCHITECTURES

    hiera = state.get("image_encoder.trunk.patch_embed.proj.weight")
    if hiera is not None:  # SAM 2: Hiera trunk; SAM 2.1 Hiera-T and MedSAM2 share a shape
        depth = len({k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")})
        names = [spec.name for spec in ARCHITECTURES.values() if spec.encoder == "hiera"
                 and spec.encoder_embed_dim == hiera.shape[0] and spec.encoder_depth == depth]
        what = " or ".join(names) if names else "an unknown SAM 2 variant"
        return f"{what} (Hiera, width {hiera.shape[0]}, {depth} blocks)"
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        if "image_encoder.layers.1.blocks.0.attn.qkv.weight" in state:
            return "a TinyViT encoder (LiteMedSAM)"
        return "no SAM image encoder"
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    for spec in ARCHITECTURES.values():
        if spec.encoder == "vit" and spec.encoder_embed_dim == weight.shape[0] and spec.encoder_depth == depth:
            return f"{spec.name} (width {weight.shape[0]}, {depth} blocks)"
    return f"an unknown SAM variant (width {weight.shape[0]}, {depth} blocks)"


def resize_position_tensor(key: str, value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Resize a position embedding or a relative position table to ``shape``."""
    if key.endswith("pos_embed"):  # (1, G, G, C)
        grid = value.permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=tuple(shape[1:3]), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).to(value.dtype)
    table = value.float().t().unsqueeze(0)  # (1, C, L)
    table = F.interpolate(table, size=shape[0], mode="linear", align_corners=False)
    return table.squeeze(0).t().to(value.dtype)


def adapt_state_dict(
    state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Check ``state`` against the model's keys and shapes; resize the size-dependent tensors.

    Raises :class:`CheckpointError` naming the disagreeing keys and shapes.
    """
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    mismatched = []
    adapted = {}
    for key, target in model_state.items():
        if key not in state:
            continue
        value = state[key]
        if value.shape == target.shape:
            adapted[key] = value
        elif _RESIZABLE.match(key) and value.dim() == target.dim() and value.shape[-1] == target.shape[-1]:
            adapted[key] = resize_position_tensor(key, value, target.shape)
        else:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
    if missing or unexpected or mismatched:
        parts = [f"{source}: does not match the model (checkpoint holds {describe_architecture(state)})"]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError("; ".join(parts))
    return adapted


def load_sam_checkpoint(sam: Sam, path: str | Path) -> str:
    """Load an official SAM checkpoint strictly into ``sam`` (a ``Sam``, or SAM 2's ``SAM2Base``); returns the
    file's SHA-256."""
    state = read_state_dict(path)
    adapted = adapt_state_dict(state, sam.state_dict(), str(path))
    sam.load_state_dict(adapted, strict=True)
    return file_sha256(path)
