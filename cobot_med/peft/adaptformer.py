"""AdaptFormer: a parallel bottleneck branch beside every block's MLP (Chen et al., NeurIPS 2022).

The branch is LayerNorm -> down -> [COBOT site] -> ReLU -> dropout -> up -> * scale, and its
output is added to the MLP's. Where it reads from, ``branch_input``:

- ``"mlp_input"`` (default, the SAM-COBOT authors' placement that Table 4 comes from): each
  block's ``mlp`` is replaced by a module returning ``mlp(x) + branch(x)`` (medical/train.py
  566 and 592, the ``Adapter`` forward at 239-259), so the branch reads what the block hands its MLP,
  ``norm2(h)``.
- ``"residual_stream"`` (the AdaptFormer paper's own code): the branch reads the residual stream
  h before ``norm2``; in SAM ``norm2`` is replaced too, by a layer that hands h to the replaced
  ``mlp`` (TinyViT's MLP holds its own norm, so its input is h already).

Init as the authors' (train.py 307-311): down Kaiming-uniform(a=√5) with zero bias, up weight
and bias zero, so the model equals SAM at step 0. With ``cobot`` set, each block's bottleneck is
a COBOT site (12 on ViT-B); the ReLU keeps it from folding into a dense weight.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from torch import nn

from .blocks import adaptable_blocks
from .cobot import CobotConfig, CobotSite, attach_orchestrator
from .config import PeftConfig
from .layer import AdapterLayer, AdapterModule, share

BRANCH_INPUTS = ("mlp_input", "residual_stream")


@dataclasses.dataclass
class AdaptFormerConfig(PeftConfig):
    bottleneck: int = 16
    dropout: float = 0.1
    scale: float = 1.0
    cobot: dict[str, Any] | None = None
    branch_input: Literal["mlp_input", "residual_stream"] = "mlp_input"

    def __post_init__(self) -> None:
        if self.bottleneck < 1:
            raise ValueError(f"adaptformer bottleneck must be >= 1, got {self.bottleneck}")
        if self.branch_input not in BRANCH_INPUTS:
            raise ValueError(f"adaptformer branch_input must be one of {BRANCH_INPUTS}, got {self.branch_input!r}")
        if self.cobot is not None:
            CobotConfig.from_dict(self.cobot)
            if self.bottleneck % 4:
                raise ValueError(f"adaptformer+cobot needs a bottleneck divisible by 4, got {self.bottleneck}")


class AdaptFormerBranch(AdapterModule, nn.Module):
    """LayerNorm -> down -> [COBOT] -> ReLU -> dropout -> up -> * scale; registered on its block as
    ``adaptformer`` (the keys AdaptFormer adapters have always had: ``blocks.i.adaptformer.*``)."""

    def __init__(self, dim: int, bottleneck: int, dropout: float, scale: float, site: CobotSite | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        self.site = site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.down(self.norm(x))
        if self.site is not None:
            d = self.site(d)
        return self.up(self.dropout(torch.relu(d))) * self.scale


class AdaptFormerMlp(AdapterLayer):
    """A block's MLP (``base_layer``) with the branch beside it: ``mlp(x) + branch(source)``.

    ``source`` is the MLP's normalised input: x itself in SAM (the block applied ``norm2``),
    ``mlp.norm(x)`` in TinyViT (``normalise_with_mlp_norm``, its Mlp starts with a LayerNorm).
    For ``residual_stream`` it is the un-normalised h: in TinyViT x itself, in SAM the input of
    the block's ``norm2``, which a :class:`ResidualStreamTap` put in place of ``norm2`` hands over
    before the MLP runs.
    """
    def __init__(self, mlp: nn.Module, branch: AdaptFormerBranch, normalise_with_mlp_norm: bool = False) -> None:
        super().__init__(mlp)
        share(self, "adaptformer", branch)  # registered on the block
        self.normalise_with_mlp_norm = normalise_with_mlp_norm
        self.reads_residual_stream = False
        self._residual: torch.Tensor | None = None

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        source = self.base_layer.norm(x) if self.normalise_with_mlp_norm else x
        if self.reads_residual_stream:
            source, self._residual = self._residual, None
            if source is None:
                raise RuntimeError("AdaptFormer reads the residual stream: the block's norm2 did not run before its mlp")
        return self.base_layer(x) + self.adaptformer(source)


class ResidualStreamTap(AdapterLayer):
    """A block's ``norm2`` (``base_layer``) that hands its input h to the block's :class:`AdaptFormerMlp`."""

    def __init__(self, norm: nn.Module, mlp: AdaptFormerMlp) -> None:
        super().__init__(norm)
        share(self, "reader", mlp)
        mlp.reads_residual_stream = True

    def adapted_forward(self, h: torch.Tensor) -> torch.Tensor:
        self.reader._residual = h
        return self.base_layer(h)


def inject(sam: nn.Module, config: AdaptFormerConfig) -> None:
    encoder = sam.image_encoder
    blocks = adaptable_blocks(encoder)
    sites: list[CobotSite | None] = [None] * len(blocks)
    if config.cobot is not None:
        sites = attach_orchestrator(encoder, config.cobot, config.bottleneck, len(blocks))
    residual = config.branch_input == "residual_stream"
    for adaptable, site in zip(blocks, sites):
        block = adaptable.block
        block.adaptformer = branch = AdaptFormerBranch(adaptable.width, config.bottleneck, config.dropout,
                                                       config.scale, site)
        block.mlp = AdaptFormerMlp(block.mlp, branch, normalise_with_mlp_norm=adaptable.mlp_norm_inside and not residual)
        if residual and not adaptable.mlp_norm_inside:
            block.norm2 = ResidualStreamTap(block.norm2, block.mlp)
