"""SSF: a learnable scale and shift after each operation (Lian et al., NeurIPS 2022).

``y = γ ⊙ op(x) + β`` over the channel dimension, after every operation of every block of
the frozen encoder, where the official SSF code for ViT puts it: after ``norm1``, the fused
``attn.qkv`` (3C channels), ``attn.proj``, ``norm2``, ``mlp.lin1`` (4C) and ``mlp.lin2``;
also after the patch embedding, as SSF does, and (our reading of SSF's "after the final
norm" for SAM, which has a neck instead) after each of the neck's four operations
(``conv 1x1``, ``LayerNorm2d``, ``conv 3x3``, ``LayerNorm2d``), switchable with ``neck``.

segment-anything's modules are left as they are: each operation is replaced by a
:class:`ScaleShiftLayer` that calls it and scales and shifts its output; the pair is the
layer's ``ssf`` (``blocks.0.attn.qkv.ssf.scale``, the keys SSF adapters have always had).

Init: identity (γ = 1, β = 0), so the model equals SAM at step 0; the official code draws
γ ~ N(1, 0.02) and β ~ N(0, 0.02), available as ``init_std=0.02``.

Merging (the paper's re-parameterisation): being linear and per-channel, a trained SSF folds
into the operation before it, W' = γ ⊙ W (per output channel), b' = γ ⊙ b + β, for the Linears,
the patch embedding's convolution and the LayerNorms. The neck's two convolutions have no bias to
take β (and a LayerNorm over channels follows, which a per-channel shift does not commute with),
so their layers stay unmerged and keep running; with ``neck=False`` every layer merges.

ViT-B, image encoder trainable: per block 2 x (768 + 2304 + 768 + 768 + 3072 + 768) = 16,896,
x 12 = 202,752; patch embedding 2 x 768 = 1,536; neck 4 x 2 x 256 = 2,048; total **206,336**
(204,288 with ``neck=False``).
"""

from __future__ import annotations

import dataclasses

import torch
from segment_anything.modeling.image_encoder import PatchEmbed
from torch import nn

from .blocks import require_vit
from .config import PeftConfig
from .layer import AdapterLayer, wrap

_BLOCK_OPS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.lin1", "mlp.lin2")


@dataclasses.dataclass
class SsfConfig(PeftConfig):
    init_std: float = 0.0  # 0: exact identity; the official code uses 0.02
    patch_embed: bool = True  # after the patch embedding, as SSF does for ViT
    neck: bool = True  # after each of the neck's four operations

    def __post_init__(self) -> None:
        if self.init_std < 0:
            raise ValueError(f"ssf init_std must be >= 0, got {self.init_std}")


class ScaleShift(nn.Module):
    """γ ⊙ x + β over one channel dimension (-1 for (..., C) tokens, 1 for (B, C, H, W) maps)."""

    def __init__(self, channels: int, channel_dim: int = -1, init_std: float = 0.0) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))
        if init_std > 0:
            nn.init.normal_(self.scale, mean=1.0, std=init_std)
            nn.init.normal_(self.shift, mean=0.0, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return x * self.scale.view(shape).to(x.dtype) + self.shift.view(shape).to(x.dtype)


class ScaleShiftLayer(AdapterLayer):
    """An operation (``base_layer``) followed by its :class:`ScaleShift` ``ssf``; token-wise as its base."""

    token_wise = True

    def __init__(self, base: nn.Module, ssf: ScaleShift) -> None:
        super().__init__(base)
        self.ssf = ssf

    def adapted_forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.ssf(self.base_layer(*args))

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The base's (weight, bias) over the channels SSF scales, None where it has no bias to take β."""
        base = self.base_layer.proj if isinstance(self.base_layer, PatchEmbed) else self.base_layer
        weight, bias = getattr(base, "weight", None), getattr(base, "bias", None)
        if isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor):
            return weight, bias
        return None

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return self._affine() is not None

    def check_merge(self) -> None:
        """SSF's two refusals: no bias to take β, or a zero γ (unmerge could not divide by it)."""
        if not self.mergeable:
            raise TypeError(f"SSF after a {type(self.base_layer).__name__} without a bias cannot merge: there is "
                            "no bias to take its shift")
        if not bool((self.ssf.scale != 0).all()):
            raise ValueError("SSF with a zero scale cannot merge: the base could not be recovered by unmerge()")

    def fold(self, direction: int) -> None:
        """W' = γ W, b' = γ b + β (direction +1), or back (-1); in float64, rounded once."""
        weight, bias = self._affine()
        scale, shift = self.ssf.scale.double(), self.ssf.shift.double()
        per_row = scale.view(-1, *[1] * (weight.dim() - 1))
        if direction > 0:
            weight.copy_(weight.double() * per_row)
            bias.copy_(bias.double() * scale + shift)
        else:
            weight.copy_(weight.double() / per_row)
            bias.copy_((bias.double() - shift) / scale)


def _channels(module: nn.Module) -> int:
    for attr in ("out_features", "out_channels"):
        if hasattr(module, attr):
            return getattr(module, attr)
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0]
    return module.weight.shape[0]  # segment-anything's LayerNorm2d


def inject(sam: nn.Module, config: SsfConfig) -> None:
    require_vit(sam.image_encoder, "ssf", {
        "tiny_vit": "SSF's sites are a plain ViT's operations (patch embedding, norm1, qkv, proj, norm2, the two MLP Linears, the neck); TinyViT adds BatchNorm convolutions (stage 1, every block's local_conv, patch merging) that SSF's definition does not place, so it is not implemented there",
        "hiera": "SSF's sites are a plain ViT's operations and its neck; Hiera adds pooled-query stage changes with their shortcut projections and an FPN neck of four levels that SSF's definition does not place, so it is not implemented there",
    })
    encoder = sam.image_encoder
    sites: list[tuple[str, int, int]] = []  # (path in the encoder, channels, channel dim of its output)
    if config.patch_embed:
        sites.append(("patch_embed", encoder.patch_embed.proj.out_channels, -1))  # (B, H, W, C)
    for b, block in enumerate(encoder.blocks):
        sites.extend((f"blocks.{b}.{path}", _channels(block.get_submodule(path)), -1) for path in _BLOCK_OPS)
    if config.neck:
        sites.extend((f"neck.{i}", _channels(module), 1) for i, module in enumerate(encoder.neck))  # (B, C, H, W)
    for path, channels, channel_dim in sites:
        ssf = ScaleShift(channels, channel_dim, config.init_std)
        wrap(encoder, path, lambda base, ssf=ssf: ScaleShiftLayer(base, ssf))
