"""LoRA on the q and v slices of every block's fused qkv projection (Hu et al., ICLR 2022).

Each target slice t of qkv(x) gets ``scale * B_t(site_t(A_t x))`` (SAM-COBOT's ``_LoRA_qkv``,
medical/train.py 371-379; with ``cobot`` set, ``_LoRA_qkv_relation_add``: every bottleneck is a
COBOT site, 24 on ViT-B, and the branch still folds into one dense ΔW).

Init: the authors' by default, A and B both Xavier-normal (train.py 179-190, applied at 478-481 and 533-536),
so the adapted model does NOT equal SAM at step 0. ``init="zero_b"`` is Hu et al.'s (A
Kaiming-uniform, B = 0): the model starts equal to its base, which merging, zero-shot and
frozen-equality checks rely on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from torch import nn

from .blocks import QKV_TARGETS, adaptable_blocks
from .cobot import CobotConfig, CobotSite, attach_orchestrator
from .config import PeftConfig
from .layer import AdapterLayer

INITS = ("xavier_normal", "zero_b")


@dataclasses.dataclass
class LoraConfig(PeftConfig):
    rank: int = 4
    alpha: float = 4.0  # scale = alpha / rank = 1, as in the papers
    targets: tuple[str, ...] = ("q", "v")
    dropout: float = 0.0
    cobot: dict[str, Any] | None = None  # COBOT options; None = plain LoRA
    init: Literal["xavier_normal", "zero_b"] = "xavier_normal"  # authors' | starts equal to the base

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.init not in INITS:
            raise ValueError(f"lora init must be one of {INITS}, got {self.init!r}")
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        bad = [t for t in self.targets if t not in QKV_TARGETS] or ([] if self.targets else ["(none)"])
        if bad:
            raise ValueError(f"lora targets must be among {QKV_TARGETS}, got {list(self.targets)}")
        if self.cobot is not None:
            CobotConfig.from_dict(self.cobot)  # validate early
            if self.rank % 4:
                raise ValueError(f"lora+cobot needs a rank divisible by 4 (quaternion head), got {self.rank}")


class LoraQkv(AdapterLayer):
    """A fused qkv Linear (``base_layer``) plus low-rank updates on some of its q/k/v output slices."""

    mergeable = True
    token_wise = True
    base_key = "base"  # the key its base always had

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        scale: float,
        columns: dict[str, torch.Tensor],
        dropout: float = 0.0,
        sites: dict[str, CobotSite] | None = None,
        init: str = "xavier_normal",
    ) -> None:
        """``columns[t]``: the qkv output indices of each target t (:meth:`AdaptableBlock.qkv_columns`)."""
        super().__init__(base)
        self.scale = scale
        self.targets = tuple(columns)
        for t, cols in columns.items():  # not saved: the layout is the encoder's, rebuilt with it
            self.register_buffer(f"columns_{t}", cols, persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ModuleDict({t: nn.Linear(base.in_features, rank, bias=False) for t in self.targets})
        self.lora_B = nn.ModuleDict(
            {t: nn.Linear(rank, len(self.columns(t)), bias=False) for t in self.targets}
        )
        for t in self.targets:
            if init == "xavier_normal":
                nn.init.xavier_normal_(self.lora_A[t].weight)
                nn.init.xavier_normal_(self.lora_B[t].weight)
            else:
                nn.init.kaiming_uniform_(self.lora_A[t].weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B[t].weight)
        self.sites = sites or {}

    def columns(self, target: str) -> torch.Tensor:
        return getattr(self, f"columns_{target}")

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        x = self.dropout(x)
        for t in self.targets:
            d = self.lora_A[t](x)
            if t in self.sites:
                d = self.sites[t](d)
            # in place: the base Linear keeps its inputs, not its output, for backward
            out.index_add_(out.dim() - 1, self.columns(t), self.lora_B[t](d) * self.scale)
        return out

    def delta_weight(self, target: str) -> torch.Tensor:
        """ΔW (dim x in) of one slice: scale * B T^T A, T the COBOT site matrix (identity without COBOT)."""
        a, b = self.lora_A[target].weight, self.lora_B[target].weight
        if target in self.sites:
            a = self.sites[target].matrix().t() @ a
        return (b @ a) * self.scale

    def fold(self, direction: int) -> None:
        """W ± ΔW on each target's output rows."""
        weight = self.base_layer.weight
        for t in self.targets:
            weight.index_add_(0, self.columns(t), direction * self.delta_weight(t).to(weight.dtype))


def inject(sam: nn.Module, config: LoraConfig) -> None:
    encoder = sam.image_encoder
    blocks = adaptable_blocks(encoder)
    sites: list[CobotSite] = []
    if config.cobot is not None:  # one site per (block, target), q then v of each block, blocks in order
        sites = attach_orchestrator(encoder, config.cobot, config.rank, len(blocks) * len(config.targets))
    site_iter = iter(sites)
    for adaptable in blocks:
        block_sites = {t: next(site_iter) for t in config.targets} if sites else None
        attn = adaptable.attention
        attn.qkv = LoraQkv(  # the block's fused qkv Linear, replaced by the layer that holds it
            attn.qkv,
            rank=config.rank,
            scale=config.alpha / config.rank,
            columns={t: adaptable.qkv_columns(t) for t in config.targets},
            dropout=config.dropout,
            sites=block_sites,
            init=config.init,
        )
