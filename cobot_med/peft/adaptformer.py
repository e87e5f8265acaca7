"""AdaptFormer: a parallel bottleneck branch beside every block's MLP (Chen et al., NeurIPS 2022).

As in the AdaptFormer code, the branch reads the block's residual stream (the MLP's input
*before* ``norm2``) through its own LayerNorm, and its output is added to the MLP's.
segment-anything's ``Block.forward`` is left as it is: a pre-hook on ``norm2`` computes the
branch and a hook on ``mlp`` adds it. With ``cobot`` set, each block's bottleneck is a
COBOT site (12 on ViT-B); the ReLU keeps it from folding into a dense weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .cobot import CobotConfig, CobotSite, attach_orchestrator
from .config import PeftConfig


@dataclasses.dataclass
class AdaptFormerConfig(PeftConfig):
    bottleneck: int = 16
    dropout: float = 0.1
    scale: float = 1.0
    cobot: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.bottleneck < 1:
            raise ValueError(f"adaptformer bottleneck must be >= 1, got {self.bottleneck}")
        if self.cobot is not None:
            CobotConfig.from_dict(self.cobot)
            if self.bottleneck % 4:
                raise ValueError(f"adaptformer+cobot needs a bottleneck divisible by 4, got {self.bottleneck}")


class AdaptFormerBranch(nn.Module):
    """LayerNorm -> down -> [COBOT] -> ReLU -> dropout -> up (zero-init) -> * scale."""

    def __init__(self, dim: int, bottleneck: int, dropout: float, scale: float, site: CobotSite | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        self.site = site
        self._pending: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.down(self.norm(x))
        if self.site is not None:
            d = self.site(d)
        return self.up(self.dropout(torch.relu(d))) * self.scale

    def attach(self, block: nn.Module) -> None:
        """Hook the branch into a segment-anything ``Block`` without touching its forward."""
        self._handles = (
            block.norm2.register_forward_pre_hook(self._before_norm2),
            block.mlp.register_forward_hook(self._after_mlp),
        )

    # bound methods (not closures), so deep copies of the model hook their own branch
    def _before_norm2(self, _module: nn.Module, args: tuple) -> None:
        self._pending = self(args[0])

    def _after_mlp(self, _module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        pending, self._pending = self._pending, None
        return output + pending


def inject(sam: nn.Module, config: AdaptFormerConfig) -> None:
    encoder = sam.image_encoder
    sites: list[CobotSite | None] = [None] * len(encoder.blocks)
    if config.cobot is not None:
        sites = attach_orchestrator(encoder, config.cobot, config.bottleneck, len(encoder.blocks))
    for block, site in zip(encoder.blocks, sites):
        dim = block.norm2.normalized_shape[0]
        block.adaptformer = AdaptFormerBranch(dim, config.bottleneck, config.dropout, config.scale, site)
        block.adaptformer.attach(block)
