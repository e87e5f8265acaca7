"""SAM-COBOT: cross-block orchestration of PEFT bottlenecks (Peng et al., CVPR 2024).

A *site* is one PEFT bottleneck (LoRA: q and v of every block; AdaptFormer: one per block).
With d the site's down-projection output (V values per token), site s computes what the
authors' ``Adapter_relation`` and ``_LoRA_qkv_relation_add`` compute (SAM-COBOT
medical/train.py 319 and remote/model/model_proxy_SAM_box.py 265-266):

    d' = H_s( d * Λ[:, s] + γ_s * d ),    Λ = C @ R

C (V x S, ones) is the coefficient set shared by all sites, R (S x S, identity) the learnable
relation matrix across blocks (eq. 13), γ_s the per-site "Markov-chain" set (eq. 17) and H_s a
quaternion linear head in the authors' Hamilton-matrix convention (quaternion_ops.py 410-414).
Everything is linear in d, so LoRA+COBOT folds into a dense ΔW (:meth:`CobotOrchestrator.site_matrix`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from .config import PeftConfig
from .layer import AdapterModule

RELATIONS = ("learnable", "identity", "fixed")
HEADS = ("quaternion", "linear", "none")


@dataclasses.dataclass
class CobotConfig(PeftConfig):
    """COBOT's switches (the paper's Tables 1-3), each named for the term it keeps or drops.

    γ_s * d is kept by every switch, as in the authors' ablation lines (train.py 321, 323, 326).

    cross_block_coefficients: the term d * (C @ R)[:, s]; False drops it and builds neither C
        nor R (CoS off: d' = H_s(γ_s * d)).
    relation: R is ``learnable`` (RM on), ``identity`` (RM off: frozen at I) or ``fixed``
        (frozen at random values, Table 2).
    head: H_s is the ``quaternion`` hypercomplex layer (HL), a plain V x V ``linear`` map
        (Table 3) or ``none`` (HL off: d' = d * Λ[:, s] + γ_s * d).
    """

    cross_block_coefficients: bool = True
    relation: Literal["learnable", "identity", "fixed"] = "learnable"
    head: Literal["quaternion", "linear", "none"] = "quaternion"
    seed: int = 0  # for the ``fixed`` relation matrix, so it is reproducible

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"cobot relation must be one of {RELATIONS}, got {self.relation!r}")
        if self.head not in HEADS:
            raise ValueError(f"cobot head must be one of {HEADS}, got {self.head!r}")
        if not self.cross_block_coefficients and self.relation != "identity":
            raise ValueError(
                "the relation matrix R only acts on the cross-block coefficients C: "
                "with cross_block_coefficients=False set relation='identity' (neither is built)"
            )


class HypercomplexLinear(nn.Module):
    """Quaternion linear map R^V -> R^V without bias, ``y = x @ W`` with the authors' W.

    W is assembled from four (V/4 x V/4) blocks r, i, j, k as the authors'
    ``QuaternionLinearFunction`` does: column block 0 is cat([r, -i, -j, -k]) down the rows,
    so ``y`` is the Hamilton product (r + i i + j j + k k) ⊗ x. The parameter names are the
    authors' (``r_weight`` ...), so one of their ``QuaternionLinear`` state dicts loads as is.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        if features % 4:
            raise ValueError(f"a quaternion layer needs a width divisible by 4, got {features}")
        n = features // 4
        self.r_weight = nn.Parameter(torch.zeros(n, n))  # authors' init: r = 0, i, j, k ~ U(0, 1)
        self.i_weight = nn.Parameter(torch.rand(n, n))
        self.j_weight = nn.Parameter(torch.rand(n, n))
        self.k_weight = nn.Parameter(torch.rand(n, n))

    def as_matrix(self) -> torch.Tensor:
        """The assembled V x V matrix W, used as ``y = x @ W``."""
        r, i, j, k = self.r_weight, self.i_weight, self.j_weight, self.k_weight
        return torch.cat(
            [
                torch.cat([r, i, j, k], dim=1),
                torch.cat([-i, r, k, -j], dim=1),
                torch.cat([-j, -k, r, i], dim=1),
                torch.cat([-k, j, -i, r], dim=1),
            ],
            dim=0,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.as_matrix().to(x.dtype)


class LinearHead(nn.Linear):
    """A plain V x V map without bias (Table 3's "Linear"): ``nn.Linear``, as the authors' ``FacT_d1``."""

    def __init__(self, features: int) -> None:
        super().__init__(features, features, bias=False)

    def as_matrix(self) -> torch.Tensor:
        return self.weight.t()


class CobotOrchestrator(AdapterModule, nn.Module):
    """The shared coefficient set and relation matrix, plus every site's γ and head (``image_encoder.cobot``)."""

    def __init__(self, config: CobotConfig, width: int, num_sites: int) -> None:
        super().__init__()
        self.config = config
        self.width, self.num_sites = width, num_sites
        self.site_coefficients = nn.Parameter(torch.ones(num_sites, width))  # γ_s, one row per site
        if config.cross_block_coefficients:
            self.coefficients = nn.Parameter(torch.ones(width, num_sites))  # C
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
            self.heads = nn.ModuleList(LinearHead(width) for _ in range(num_sites))

    def cross_block_column(self, site: int) -> torch.Tensor | None:
        """Λ[:, s] = (C @ R)[:, s], or None when the cross-block term is switched off."""
        if not self.config.cross_block_coefficients:
            return None
        return self.coefficients @ self.relation[:, site]

    def site_matrix(self, site: int) -> torch.Tensor:
        """The V x V matrix T with ``forward(d, s) == d @ T`` (for merging into a dense weight)."""
        scale = self.site_coefficients[site]
        column = self.cross_block_column(site)
        if column is not None:
            scale = column + scale
        t = torch.diag(scale)
        if self.config.head != "none":
            t = t @ self.heads[site].as_matrix()
        return t

    def forward(self, d: torch.Tensor, site: int) -> torch.Tensor:
        gamma_term = self.site_coefficients[site].to(d.dtype) * d
        column = self.cross_block_column(site)
        d = gamma_term if column is None else d * column.to(d.dtype) + gamma_term
        if self.config.head != "none":
            d = self.heads[site](d)
        return d


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
