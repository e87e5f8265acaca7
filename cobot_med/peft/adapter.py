"""Adapter: sequential bottleneck adapters after attention and after the MLP (Houlsby et al., ICML 2019).

Each block gets two adapters, ``f(h) = up(GELU(down(h))) * scale``, applied to the output of
its sub-layer (attention incl. its output projection; the MLP) *before* the residual
addition, so the sub-layer's output becomes ``h + f(h)`` (Houlsby et al., Fig. 2). In a
windowed block the attention output is still in windows when the adapter sees it; the
adapter is token-wise, so that is the same as applying it after the window merge.

Choices the paper leaves open or that differ for SAM, written down:
- bottleneck m = 8 (the smallest of Houlsby et al.'s sweep {8, 64, 256}); on ViT-B it lands
  next to AdaptFormer's budget (313,536 vs 322,752), so the sequential vs parallel
  comparison is at about equal size;
- GELU between the projections, as Houlsby et al.'s released code and SAM's own MLP;
- up-projection zero-initialised (weight and bias), so the model equals SAM at step 0;
  Houlsby et al.'s code draws both projections from a truncated normal with std 1e-3
  (near-identity);
  the down-projection keeps nn.Linear's default (Kaiming-uniform) init;
- Houlsby et al. also train the layer norms; SAM is pre-norm (its LayerNorms sit before the
  sub-layers, not after the adapter), so they stay frozen here.

segment-anything's ``Block.forward`` is left as it is: ``block.attn`` and ``block.mlp`` are
replaced by :class:`SequentialAdapter` layers that call them and add the adapter's output. The
two adapters stay registered as ``blocks.i.adapter.attn`` / ``.mlp`` (the checkpoint keys).
ViT-B, image encoder trainable: 24 x (768·8 + 8 + 8·768 + 768) = 24 x 13,064 = **313,536**.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .blocks import adaptable_blocks
from .config import PeftConfig
from .layer import AdapterLayer, AdapterModule, share


@dataclasses.dataclass
class AdapterConfig(PeftConfig):
    bottleneck: int = 8
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.bottleneck < 1:
            raise ValueError(f"adapter bottleneck must be >= 1, got {self.bottleneck}")


class BottleneckAdapter(nn.Module):
    """down -> GELU -> up (zero-init) -> * scale, added to the output of the module it follows."""

    def __init__(self, dim: int, bottleneck: int, scale: float = 1.0) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x))) * self.scale


class BlockAdapters(AdapterModule, nn.ModuleDict):
    """A block's two adapters, ``attn`` and ``mlp``, registered as ``block.adapter``."""


class SequentialAdapter(AdapterLayer):
    """A block's attention or MLP (``base_layer``) followed by its adapter: ``h + adapter(h)``."""

    def __init__(self, base: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__(base)
        share(self, "adapter", adapter)  # registered at block.adapter[site]

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        return h + self.adapter(h)


def inject(sam: nn.Module, config: AdapterConfig) -> None:
    for adaptable in adaptable_blocks(sam.image_encoder):
        block, dim = adaptable.block, adaptable.width
        block.adapter = BlockAdapters(
            {site: BottleneckAdapter(dim, config.bottleneck, config.scale) for site in ("attn", "mlp")}
        )
        block.attn = SequentialAdapter(block.attn, block.adapter["attn"])
        block.mlp = SequentialAdapter(block.mlp, block.adapter["mlp"])
