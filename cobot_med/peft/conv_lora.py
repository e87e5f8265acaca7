"""Conv-LoRA: LoRA on the fused qkv with a mixture of convolutional experts in its bottleneck.

Zhong et al., ICLR 2024; computed as the official code, AutoGluon's ``ConvLoRALinear`` and
``MoEGate`` (multimodal/models/adaptation_layers.py at f34ebb4, lines 606-860):

- a = x A (rank r), laid out on its token grid (B, r, H, W); scale = alpha / r, the SAM
  semantic-segmentation preset's r = 3, alpha = 32;
- gate: logits = mean_HW(a) W_gate (+ softplus(mean_HW(a) W_noise) + 1e-2 times N(0, 1) noise in
  training); the gate of each kept expert is the softmax over the top-k logits only (1.0 for
  top-1), line 771;
- expert i (scale s_i = i + 1): bicubic up by s_i -> Conv3x3 (bias zero-initialised) -> GELU ->
  bicubic back to (H, W); no resizing for s_i = 1 (lines 662-667, 707-717);
- the experts' outputs are NOT multiplied by the gates (``multiply_by_gates=False``); AutoGluon's
  dispatcher combines them as log Σ exp(y_e) over the kept experts (lines 917-950), which for
  top-1 is y itself; we compute it with ``logsumexp`` (theirs exponentiates in float32 and so
  overflows above 88.7);
- out = base(x) + (a + moe(a)) B * scale, A Kaiming-uniform(a=√5), B zero: equals SAM at step 0;
- load-balancing loss: coef * (CV²(Σ_batch gates) + CV²(load)), load the smooth P(in top-k)
  under the noise in training, the count of samples per expert otherwise; coef 1e-2.
  It is kept on each layer after its forward; :func:`auxiliary_loss` sums it over the layers.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions.normal import Normal

from .blocks import adaptable_blocks
from .config import PeftConfig
from .layer import AdapterLayer


@dataclasses.dataclass
class ConvLoraConfig(PeftConfig):
    rank: int = 3
    alpha: float = 32.0  # AutoGluon's SAM preset: scale 32 / 3
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
    """Interpolate(GELU(Conv3x3(Interpolate(x, s))), 1/s), bicubic both ways: one feature scale."""

    def __init__(self, channels: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1:
            return F.gelu(self.conv(x))
        size = x.shape[-2:]
        y = F.interpolate(x, scale_factor=self.scale, mode="bicubic")
        return F.interpolate(F.gelu(self.conv(y)), size=size, mode="bicubic")


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
        keep = top_idx[:, : self.top_k]
        gates = torch.zeros_like(logits).scatter(1, keep, top_logits[:, : self.top_k].softmax(dim=-1))
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
        normal = Normal(clean.new_zeros(()), clean.new_ones(()))
        prob_in = normal.cdf((clean - threshold_in) / std)
        prob_out = normal.cdf((clean - threshold_out) / std)
        return torch.where(is_in, prob_in, prob_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates, load = self.gates(x.mean(dim=(2, 3)))
        self.aux_loss = self.aux_loss_weight * (_cv_squared(gates.sum(0)) + _cv_squared(load))
        if self.top_k == 1:  # log(exp(y)) of the one kept expert: y
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                rows = (gates[:, e] > 0).nonzero(as_tuple=True)[0]
                if rows.numel():
                    out = out.index_add(0, rows, expert(x[rows]))
            return out
        # log Σ exp over the kept experts (AutoGluon's combine); unkept experts contribute -inf
        outputs = torch.full((len(self.experts),) + tuple(x.shape), float("-inf"), dtype=x.dtype, device=x.device)
        for e, expert in enumerate(self.experts):
            rows = (gates[:, e] > 0).nonzero(as_tuple=True)[0]
            if rows.numel():
                outputs.index_put_((torch.full_like(rows, e), rows), expert(x[rows]))  # a fresh tensor: in place
        return outputs.logsumexp(dim=0)


class ConvLoraQkv(AdapterLayer):
    """A fused qkv Linear (``base_layer``) plus B(xA + MoE(xA)) on all of q, k and v.

    Not mergeable: the MoE's GELU and resizing do not fold into a dense weight."""
    base_key = "base"  # the key its base always had

    def __init__(self, base: nn.Linear, config: ConvLoraConfig) -> None:
        super().__init__(base)
        self.scale = config.alpha / config.rank
        self.lora_A = nn.Linear(base.in_features, config.rank, bias=False)
        self.lora_B = nn.Linear(config.rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.moe = ConvMoE(config.rank, config.num_experts, config.top_k, config.noisy_gating, config.aux_loss_weight)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        # SAM's attention calls qkv on (B, H, W, C) tokens: the grid is right there; TinyViT's on
        # (B, N, C) square windows, laid out as AutoGluon does for 3D input (H = W = sqrt(N))
        d = self.lora_A(x)
        grid_tokens = d if d.dim() == 4 else d.view(d.shape[0], *_square(d.shape[1]), d.shape[2])
        grid = grid_tokens.permute(0, 3, 1, 2)
        d = d + self.moe(grid).permute(0, 2, 3, 1).reshape(d.shape)
        return self.base_layer(x) + self.lora_B(d) * self.scale


def _square(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"conv_lora lays qkv's tokens on a square grid; {tokens} tokens are not a square")
    return side, side


def inject(sam: nn.Module, config: ConvLoraConfig) -> None:
    for adaptable in adaptable_blocks(sam.image_encoder):
        adaptable.attention.qkv = ConvLoraQkv(adaptable.attention.qkv, config)


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """The weighted load-balancing loss of the last forward, or None when the model has no MoE (a disabled layer's
    MoE did not run, so its loss from an earlier forward does not count)."""
    losses = [m.moe.aux_loss for m in model.modules()
              if isinstance(m, ConvLoraQkv) and not m.disabled and m.moe.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None
