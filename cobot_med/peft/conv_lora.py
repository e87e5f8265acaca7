"""Conv-LoRA: LoRA on the fused qkv with a mixture of convolutional experts in its bottleneck.

Zhong et al., ICLR 2024. The rank-r bottleneck tokens x A are laid out on their 2D grid
(B, r, H, W); expert i is Interpolate(Conv3x3(Interpolate(x, s_i)), 1/s_i) with scale
s_i = i + 1; a noisy top-k gate on the globally pooled bottleneck picks the experts per
sample; the expert output is added to the bottleneck before the up-projection B (zero-init,
so the model equals SAM at step 0). The load-balancing loss (CV² of importance and load,
Shazeer et al. 2017), times its weight, is kept on each layer after its forward;
:func:`auxiliary_loss` sums it.

Choices the papers leave open, written down: gates are the softmax over all experts' logits
kept at the top-k (Switch-Transformer style), so the task loss also trains the gate;
gate and noise weights start at zero, as in Shazeer et al.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions.normal import Normal

from .config import PeftConfig


@dataclasses.dataclass
class ConvLoraConfig(PeftConfig):
    rank: int = 3
    alpha: float = 3.0
    num_experts: int = 8
    top_k: int = 1
    noisy_gating: bool = True
    aux_loss_weight: float = 0.01

    def __post_init__(self) -> None:
        if self.rank < 1 or self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"conv_lora needs rank >= 1 and 1 <= top_k <= num_experts, got rank={self.rank}, "
                f"top_k={self.top_k}, num_experts={self.num_experts}"
            )


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation; zero for a single expert."""
    if x.numel() <= 1:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


class ScaleExpert(nn.Module):
    """Interpolate(Conv3x3(Interpolate(x, s)), 1/s): a 3x3 convolution at one feature scale."""

    def __init__(self, channels: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1:
            return self.conv(x)
        size = x.shape[-2:]
        y = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return F.interpolate(self.conv(y), size=size, mode="bilinear", align_corners=False)


class ConvMoE(nn.Module):
    """Noisy top-k gating over :class:`ScaleExpert`\\ s; keeps the load-balancing loss of its last call."""

    def __init__(self, channels: int, num_experts: int, top_k: int, noisy_gating: bool, aux_loss_weight: float):
        super().__init__()
        self.top_k, self.noisy_gating, self.aux_loss_weight = top_k, noisy_gating, aux_loss_weight
        self.experts = nn.ModuleList(ScaleExpert(channels, s + 1) for s in range(num_experts))
        self.w_gate = nn.Parameter(torch.zeros(channels, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(channels, num_experts))
        self.aux_loss: torch.Tensor | None = None

    def gates(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, E) sparse gates and (E,) load for pooled features (B, C)."""
        clean = pooled @ self.w_gate.to(pooled.dtype)
        num_experts = clean.shape[-1]
        if self.noisy_gating and self.training:
            std = F.softplus(pooled @ self.w_noise.to(pooled.dtype)) + 1e-2
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        k_plus = min(self.top_k + 1, num_experts)
        top_logits, top_idx = logits.topk(k_plus, dim=-1)
        probs = logits.softmax(dim=-1)
        keep = top_idx[:, : self.top_k]
        gates = torch.zeros_like(probs).scatter(1, keep, probs.gather(1, keep))
        if self.noisy_gating and self.training and self.top_k < num_experts:
            load = self._prob_in_top_k(clean, logits, std, top_logits).sum(0)
        else:
            load = (gates > 0).sum(0).to(gates.dtype)
        return gates, load

    def _prob_in_top_k(self, clean, noisy, std, top_logits) -> torch.Tensor:
        """Smooth estimate of P(expert in top-k) under the gate noise (Shazeer et al., 2017)."""
        threshold_in = top_logits[:, self.top_k : self.top_k + 1]
        threshold_out = top_logits[:, self.top_k - 1 : self.top_k]
        is_in = noisy > threshold_in
        normal = Normal(torch.zeros((), device=clean.device), torch.ones((), device=clean.device))
        prob_in = normal.cdf(((clean - threshold_in) / std).float())
        prob_out = normal.cdf(((clean - threshold_out) / std).float())
        return torch.where(is_in, prob_in, prob_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates, load = self.gates(x.mean(dim=(2, 3)))
        self.aux_loss = self.aux_loss_weight * (_cv_squared(gates.sum(0)) + _cv_squared(load))
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = (gates[:, e] > 0).nonzero(as_tuple=True)[0]
            if rows.numel():
                y = expert(x[rows]) * gates[rows, e].to(x.dtype)[:, None, None, None]
                out = out.index_add(0, rows, y)
        return out


class ConvLoraQkv(nn.Module):
    """A fused qkv Linear plus B(xA + MoE(xA)) on all of q, k and v."""

    def __init__(self, base: nn.Linear, config: ConvLoraConfig) -> None:
        super().__init__()
        self.base = base
        self.scale = config.alpha / config.rank
        self.lora_A = nn.Linear(base.in_features, config.rank, bias=False)
        self.lora_B = nn.Linear(config.rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.moe = ConvMoE(config.rank, config.num_experts, config.top_k, config.noisy_gating, config.aux_loss_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SAM's attention calls qkv on (B, H, W, C) tokens: the grid is right there
        d = self.lora_A(x)
        grid = d.permute(0, 3, 1, 2)
        d = d + self.moe(grid).permute(0, 2, 3, 1)
        return self.base(x) + self.lora_B(d) * self.scale


def inject(sam: nn.Module, config: ConvLoraConfig) -> None:
    for block in sam.image_encoder.blocks:
        block.attn.qkv = ConvLoraQkv(block.attn.qkv, config)


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """The weighted load-balancing loss of the last forward, or None when the model has no MoE."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, ConvMoE) and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None
