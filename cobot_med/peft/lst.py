"""LST: ladder side-tuning, a thin side network fed by the frozen blocks (Sung et al., NeurIPS 2022).

The backbone runs unchanged. A side network of width d = C / ``reduction`` runs beside it;
with h_0 the input of the first block (patch + position embedding) and h_i the output of
block i, the side stream is

    s_0 = down_0(h_0)
    s_i = side_block_i( μ_i · down_i(h_i) + (1 - μ_i) · s_{i-1} ),   μ_i = sigmoid(α_i / T)

(the "ladder": one downsample Linear C -> d per rung, a learned gate per block, α_i = 0 and
T = 0.1 as in LST), and the encoder's last features become ``h_L + up(LN(s_L))`` before the
neck. Nothing in the backbone needs a gradient: its parameters are frozen and none of its
inputs requires grad, so autograd keeps no graph through it (LST's memory saving) while
the neck and decoder still see the sum.

Choices LST leaves open for SAM, or where we differ, written down:
- the side blocks are segment-anything ``Block``s of width d with the backbone's head count
  (head dim C/(heads·reduction)), MLP ratio, windowing (same window size, global attention in
  the same blocks) and decomposed relative-position bias, i.e. the backbone scaled down by
  ``reduction`` in every width, as LST's side network is for T5 (default reduction 8);
- LST initialises the side network by pruning the backbone's weights (Fisher information on
  task data); here the side blocks start from segment-anything's own random init
  (relative-position tables zero), which the paper reports as somewhat weaker;
- T5's side network feeds the head directly; SAM's neck and decoder expect the pretrained
  embedding, so the side output is *added* to the backbone's last features through a
  LayerNorm and a zero-initialised up-projection C <- d: the model equals SAM at step 0
  (the first step moves only the up-projection; the side network trains from the second);
- the side blocks compute attention the way the backbone's do (SDPA when the model was
  built with it, see :mod:`cobot_med.sam.attention`).

The side network lives in ``image_encoder.lst``; every block is replaced by a
:class:`LadderRung` (block 0's starts the side stream from its input, each one feeds its
output to the side network) and the neck by a :class:`LadderMerge` that adds the side output to
its input, so ``ImageEncoderViT.forward`` is not copied.

ViT-B (C = 768, d = 96, 12 heads of 8, window 14 / global 64): side block
2·96 + (96·288 + 288) + (96·96 + 96) + 2·96 + (96·384 + 384) + (384·96 + 96) = 111,840 plus
relative-position tables 2·27·8 = 432 (windowed) or 2·127·8 = 2,032 (global):
8 x 112,272 + 4 x 113,872 = 1,353,664; downsamples 13 x (768·96 + 96) = 959,712; gates 12;
final LayerNorm 192; up-projection 96·768 + 768 = 74,496; total **2,388,076**.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from segment_anything.modeling.image_encoder import Block
from torch import nn

from ..sam.attention import SdpaAttention, set_attention
from .blocks import require_vit
from .config import PeftConfig
from .layer import AdapterLayer, AdapterModule, share


@dataclasses.dataclass
class LstConfig(PeftConfig):
    reduction: int = 8  # side width = C / reduction (LST's r)
    gate_temperature: float = 0.1  # T in μ_i = sigmoid(α_i / T)

    def __post_init__(self) -> None:
        if self.reduction < 1:
            raise ValueError(f"lst reduction must be >= 1, got {self.reduction}")
        if self.gate_temperature <= 0:
            raise ValueError(f"lst gate_temperature must be > 0, got {self.gate_temperature}")


class LadderSideNetwork(AdapterModule, nn.Module):
    """The side blocks, ladder downsamples, gates and the up-projection back to the backbone."""

    def __init__(self, encoder: nn.Module, config: LstConfig) -> None:
        super().__init__()
        first = encoder.blocks[0]
        dim = first.norm1.normalized_shape[0]
        heads = first.attn.num_heads
        if dim % config.reduction or (dim // config.reduction) % heads:
            raise ValueError(
                f"lst reduction {config.reduction} must divide the width {dim} into a multiple of the {heads} heads"
            )
        side = dim // config.reduction
        grid = tuple(encoder.pos_embed.shape[1:3]) if encoder.pos_embed is not None else None
        if grid is None:
            patch = encoder.patch_embed.proj.kernel_size[0]
            grid = (encoder.img_size // patch, encoder.img_size // patch)
        self.temperature = config.gate_temperature
        self.downsamples = nn.ModuleList(nn.Linear(dim, side) for _ in range(len(encoder.blocks) + 1))
        self.gates = nn.Parameter(torch.zeros(len(encoder.blocks)))
        self.blocks = nn.ModuleList(
            Block(
                dim=side,
                num_heads=heads,
                mlp_ratio=blk.mlp.lin1.out_features / dim,
                qkv_bias=blk.attn.qkv.bias is not None,
                norm_layer=partial(nn.LayerNorm, eps=blk.norm1.eps),
                act_layer=type(blk.mlp.act),
                use_rel_pos=blk.attn.use_rel_pos,
                rel_pos_zero_init=True,
                window_size=blk.window_size,
                input_size=grid,
            )
            for blk in encoder.blocks
        )
        if isinstance(first.attn, SdpaAttention):
            set_attention(self, "sdpa")  # reads self.blocks
        self.norm = nn.LayerNorm(side, eps=first.norm1.eps)
        self.up = nn.Linear(side, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self._side: torch.Tensor | None = None
        self._step = 0

    def gate(self, index: int) -> torch.Tensor:
        return torch.sigmoid(self.gates[index] / self.temperature)

    def start(self, x: torch.Tensor) -> None:
        """s_0 from the first block's input."""
        self._side = self.downsamples[0](x)
        self._step = 0

    def rung(self, index: int, output: torch.Tensor) -> None:
        """s_i from block i's output and s_{i-1}."""
        if self._side is None or self._step != index:
            raise RuntimeError("lst: a block ran outside the image encoder's forward")
        mu = self.gate(index).to(output.dtype)
        x = mu * self.downsamples[index + 1](output) + (1 - mu) * self._side.to(output.dtype)
        self._side = self.blocks[index](x)
        self._step = index + 1

    def merge_into(self, x: torch.Tensor) -> torch.Tensor:
        """The neck's input (B, C, H, W) plus up(LN(s_L)); lets go of the side stream."""
        side, self._side = self._side, None
        if side is None or self._step != len(self.blocks):
            raise RuntimeError("lst: the neck ran before the side network saw every block")
        return x + self.up(self.norm(side)).permute(0, 3, 1, 2).to(x.dtype)


class LadderRung(AdapterLayer):
    """Encoder block ``index`` (``base_layer``), its output fed to the side network (block 0 also its input)."""

    def __init__(self, block: nn.Module, side: LadderSideNetwork, index: int) -> None:
        super().__init__(block)
        share(self, "side", side)
        self.index = index

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index == 0:
            self.side.start(x)
        out = self.base_layer(x)
        self.side.rung(self.index, out)
        return out


class LadderMerge(AdapterLayer):
    """The encoder's neck (``base_layer``), reading the backbone's last features plus the side output."""

    def __init__(self, neck: nn.Module, side: LadderSideNetwork) -> None:
        super().__init__(neck)
        share(self, "side", side)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(self.side.merge_into(x))


def inject(sam: nn.Module, config: LstConfig) -> None:
    require_vit(sam.image_encoder, "lst", {
        "tiny_vit": "the ladder side network reads every block's output at one width and resolution; TinyViT's stages change both",
        "hiera": "the ladder side network reads every block's output at one width and resolution; Hiera's stages change both",
    })
    encoder = sam.image_encoder
    side = encoder.lst = LadderSideNetwork(encoder, config)
    for index, block in enumerate(encoder.blocks):
        encoder.blocks[index] = LadderRung(block, side, index)
    encoder.neck = LadderMerge(encoder.neck, side)
