"""SAM-COBOT: cross-block orchestration of PEFT bottlenecks (Peng et al., CVPR 2024).

A *site* is one PEFT bottleneck (LoRA: q and v of every block; AdaptFormer: one per block).
With d the site's down-projection output (V values per token), site s computes

    d' = H_s( d * Λ[:, s] + γ_s * d ),    Λ = C @ R

C (V x S, ones) is the coefficient set shared by all sites, R (S x S, identity) the learnable
relation matrix across blocks (eq. 13), γ_s the per-site "Markov-chain" set (eq. 17) and H_s a
quaternion linear head (Hamilton product). Everything is linear in d, so LoRA+COBOT folds
into a dense ΔW (:meth:`CobotOrchestrator.site_matrix`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

from .config import PeftConfig

RELATIONS = ("learnable", "identity", "fixed")
HEADS = ("quaternion", "linear", "none")


@dataclasses.dataclass
class CobotConfig(PeftConfig):
    """COBOT's switches (the paper's Tables 1-3).

    coefficients: the dual coefficient sets C and γ (CoS); off means d' = H(d).
    relation: ``learnable`` R (RM on), ``identity`` (RM off: R frozen at I) or ``fixed``
        (frozen at random values, Table 2).
    head: ``quaternion`` hypercomplex layer (HL), ``linear`` (a plain V x V Linear, Table 3)
        or ``none`` (HL off).
    """

    coefficients: bool = True
    relation: Literal["learnable", "identity", "fixed"] = "learnable"
    head: Literal["quaternion", "linear", "none"] = "quaternion"
    seed: int = 0  # for the ``fixed`` relation matrix, so it is reproducible

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"cobot relation must be one of {RELATIONS}, got {self.relation!r}")
        if self.head not in HEADS:
            raise ValueError(f"cobot head must be one of {HEADS}, got {self.head!r}")
        if not self.coefficients and self.relation != "identity":
            raise ValueError(
                "the relation matrix acts on the coefficient sets: with coefficients=False set relation='identity'"
            )


class HypercomplexLinear(nn.Module):
    """Quaternion linear map R^V -> R^V without bias: W is the Hamilton product of r, i, j, k."""

    def __init__(self, features: int) -> None:
        super().__init__()
        if features % 4:
            raise ValueError(f"a quaternion layer needs a width divisible by 4, got {features}")
        n = features // 4
        self.r = nn.Parameter(torch.zeros(n, n))  # authors' init: r = 0, i, j, k ~ U(0, 1)
        self.i = nn.Parameter(torch.rand(n, n))
        self.j = nn.Parameter(torch.rand(n, n))
        self.k = nn.Parameter(torch.rand(n, n))

    @property
    def weight(self) -> torch.Tensor:
        """The assembled V x V matrix W, used as ``y = x @ W``."""
        r, i, j, k = self.r, self.i, self.j, self.k
        return torch.cat(
            [
                torch.cat([r, -i, -j, -k], dim=1),
                torch.cat([i, r, -k, j], dim=1),
                torch.cat([j, k, r, -i], dim=1),
                torch.cat([k, -j, i, r], dim=1),
            ],
            dim=0,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype)


class CobotOrchestrator(nn.Module):
    """The shared coefficient set and relation matrix, plus every site's γ and head."""

    def __init__(self, config: CobotConfig, width: int, num_sites: int) -> None:
        super().__init__()
        self.config = config
        self.width, self.num_sites = width, num_sites
        if config.coefficients:
            self.coefficients = nn.Parameter(torch.ones(width, num_sites))  # C
            self.site_coefficients = nn.Parameter(torch.ones(num_sites, width))  # γ_s, one row per site
            if config.relation == "learnable":
                self.relation = nn.Parameter(torch.eye(num_sites))
            elif config.relation == "fixed":
                generator = torch.Generator().manual_seed(config.seed)
                # random, frozen, scaled so a column sums to ~1 like the identity it replaces
                self.register_buffer("relation", torch.rand(num_sites, num_sites, generator=generator) * 2 / num_sites)
            else:
                self.register_buffer("relation", torch.eye(num_sites))
        if config.head == "quaternion":
            self.heads = nn.ModuleList(HypercomplexLinear(width) for _ in range(num_sites))
        elif config.head == "linear":
            self.heads = nn.ModuleList(_BiasFreeLinear(width) for _ in range(num_sites))

    def site_scale(self, site: int) -> torch.Tensor | None:
        """Λ[:, s] + γ_s: the per-channel factor of site s (None without coefficient sets)."""
        if not self.config.coefficients:
            return None
        return self.coefficients @ self.relation[:, site] + self.site_coefficients[site]

    def site_matrix(self, site: int) -> torch.Tensor:
        """The V x V matrix T with ``forward(d, s) == d @ T`` (for merging into a dense weight)."""
        eye = torch.eye(self.width, device=self._device())
        scale = self.site_scale(site)
        t = eye if scale is None else torch.diag(scale)
        if self.config.head != "none":
            t = t @ self.heads[site].weight
        return t

    def forward(self, d: torch.Tensor, site: int) -> torch.Tensor:
        scale = self.site_scale(site)
        if scale is not None:
            d = d * scale.to(d.dtype)
        if self.config.head != "none":
            d = self.heads[site](d)
        return d

    def _device(self) -> torch.device:
        return next(self.parameters(), torch.empty(0)).device


class _BiasFreeLinear(nn.Module):
    """A plain V x V map ``y = x @ W`` (Table 3's "Linear" in place of the hypercomplex layer)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(features, features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype)


class CobotSite:
    """A site's handle on the orchestrator, held by a PEFT layer without registering it twice."""

    def __init__(self, orchestrator: CobotOrchestrator, index: int) -> None:
        self.orchestrator, self.index = orchestrator, index

    def __call__(self, d: torch.Tensor) -> torch.Tensor:
        return self.orchestrator(d, self.index)

    def matrix(self) -> torch.Tensor:
        return self.orchestrator.site_matrix(self.index)


def attach_orchestrator(image_encoder: nn.Module, config: CobotConfig | dict, width: int, num_sites: int) -> list[CobotSite]:
    """Register the orchestrator as ``image_encoder.cobot`` and hand out one site per bottleneck."""
    if isinstance(config, dict):
        config = CobotConfig.from_dict(config)
    orchestrator = CobotOrchestrator(config, width, num_sites)
    image_encoder.cobot = orchestrator
    return [CobotSite(orchestrator, s) for s in range(num_sites)]


def is_cobot_parameter(name: str) -> bool:
    """C, R and the heads: the parameters the authors train at the higher learning rate."""
    return ".cobot.coefficients" in name or ".cobot.relation" in name or ".cobot.heads." in name
