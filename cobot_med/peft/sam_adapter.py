"""SAM-Adapter: task-specific features injected into every block (Chen et al., 2023).

"SAM Fails to Segment Anything? SAM-Adapter" (Chen et al., ICCV 2023 workshops; code:
tianrun-chen/SAM-Adapter-PyTorch) uses the explicit-visual-prompting design of Liu et al.
(EVP, CVPR 2023). Two task-specific features, both at the patch grid and of reduced width
c = C / ``scale_factor``, are summed:

- the *handcrafted* feature: the high-frequency components of the (normalised) input image,
  ``|IFFT(FFT(x) ⊙ (1 - M))|`` with M a centred square of low frequencies covering
  ``freq_ratio`` of the spectrum, through its own patch embedding (Conv k=s=patch, 3 -> c);
- the *embedding* feature: SAM's frozen patch embedding (before the position embedding)
  through a Linear C -> c.

For every block i, ``p_i = up(GELU(W_i (F_hfc + F_pe)))``: a per-block Linear c -> c + GELU
(the "lightweight MLPs") and one Linear c -> C shared by all blocks; p_i is added to the
input of block i.

Choices written down: the defaults are the authors' (scale factor 32, frequency ratio 0.25,
every block tuned, truncated-normal(0.02) Linear weights with zero bias, the convolution
normal(0, sqrt(2 / fan_out))). That init does not make the model equal SAM at step 0;
``zero_init=True`` zeroes the shared up-projection so that it does (then only the
up-projection gets a gradient on the first step). The FFT runs in float32 (as under AMP it
must). The high-pass mask is defined on the unshifted spectrum (|k| < side/2 per axis, k the
integer frequency), the same mask as the authors' centred square after ``fftshift``.

segment-anything's modules are left as they are: ``patch_embed`` is replaced by a layer that
computes F_hfc + F_pe from its input (the normalised image) and output, and each block by a
layer that adds its p_i to the block's input. The parameters live in
``image_encoder.sam_adapter``; the last block's layer lets go of the features.

ViT-B (C = 768, c = 24, patch 16), image encoder trainable: handcrafted embedding
3·24·16·16 + 24 = 18,456; embedding Linear 768·24 + 24 = 18,456; 12 lightweight MLPs
12 x (24·24 + 24) = 7,200; shared up-projection 24·768 + 768 = 19,200; total **63,312**.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .blocks import require_vit
from .config import PeftConfig
from .layer import AdapterLayer, AdapterModule, share


@dataclasses.dataclass
class SamAdapterConfig(PeftConfig):
    scale_factor: int = 32  # c = C / scale_factor
    freq_ratio: float = 0.25  # fraction of the spectrum (low frequencies) removed by the high-pass
    zero_init: bool = False  # zero the shared up-projection: equals SAM at step 0

    def __post_init__(self) -> None:
        if self.scale_factor < 1:
            raise ValueError(f"sam_adapter scale_factor must be >= 1, got {self.scale_factor}")
        if not 0.0 <= self.freq_ratio < 1.0:
            raise ValueError(f"sam_adapter freq_ratio must be in [0, 1), got {self.freq_ratio}")


def high_pass(images: torch.Tensor, ratio: float) -> torch.Tensor:
    """|IFFT2(FFT2(x) with the centred low-frequency square of area ``ratio`` removed)|, per channel."""
    H, W = images.shape[-2:]
    half = int(math.sqrt(H * W * ratio) // 2)  # half side of the removed square, in frequency steps
    fy = torch.fft.fftfreq(H, 1.0 / H, device=images.device)  # integer frequencies 0..H/2-1, -H/2..-1
    fx = torch.fft.fftfreq(W, 1.0 / W, device=images.device)
    low_y = (fy >= -half) & (fy < half)
    low_x = (fx >= -half) & (fx < half)
    keep = ~(low_y[:, None] & low_x[None, :])
    spectrum = torch.fft.fft2(images.float()) * keep
    return torch.fft.ifft2(spectrum).real.abs().to(images.dtype)


class SamAdapterPrompts(AdapterModule, nn.Module):
    """The shared and per-block parts of SAM-Adapter, registered as ``image_encoder.sam_adapter``."""

    def __init__(self, encoder: nn.Module, config: SamAdapterConfig) -> None:
        super().__init__()
        dim = encoder.patch_embed.proj.out_channels
        if dim % config.scale_factor:
            raise ValueError(f"sam_adapter scale_factor {config.scale_factor} must divide the width {dim}")
        hidden = dim // config.scale_factor
        patch = encoder.patch_embed.proj.kernel_size
        self.freq_ratio = config.freq_ratio
        self.handcrafted = nn.Conv2d(3, hidden, kernel_size=patch, stride=patch)
        self.embedding = nn.Linear(dim, hidden)
        self.lightweight = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, hidden), nn.GELU()) for _ in range(len(encoder.blocks))
        )
        self.up = nn.Linear(hidden, dim)
        self._init_weights(zero_init=config.zero_init)
        self._features: torch.Tensor | None = None

    def _init_weights(self, zero_init: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        fan_out = self.handcrafted.kernel_size[0] * self.handcrafted.kernel_size[1] * self.handcrafted.out_channels
        nn.init.normal_(self.handcrafted.weight, 0.0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(self.handcrafted.bias)
        if zero_init:
            nn.init.zeros_(self.up.weight)

    def features(self, images: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """F_hfc + F_pe (B, h, w, c) from normalised images (B, 3, S, S) and patch embeddings (B, h, w, C)."""
        handcrafted = self.handcrafted(high_pass(images, self.freq_ratio)).permute(0, 2, 3, 1)
        return handcrafted + self.embedding(patches)

    def prompt(self, index: int, features: torch.Tensor) -> torch.Tensor:
        return self.up(self.lightweight[index](features))

    def keep_features(self, images: torch.Tensor, patches: torch.Tensor) -> None:
        self._features = self.features(images, patches)

    def add_prompt(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """x + p_index; the last block's call lets go of the features."""
        features = self._features
        if features is None:
            raise RuntimeError("sam_adapter: a block ran outside the image encoder's forward")
        if index == len(self.lightweight) - 1:
            self._features = None
        return x + self.prompt(index, features).to(x.dtype)


class PatchFeatures(AdapterLayer):
    """The encoder's ``patch_embed`` (``base_layer``); keeps F_hfc + F_pe of its input image for the blocks."""

    def __init__(self, patch_embed: nn.Module, prompts: SamAdapterPrompts) -> None:
        super().__init__(patch_embed)
        share(self, "prompts", prompts)

    def adapted_forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.base_layer(images)
        self.prompts.keep_features(images, patches)
        return patches


class PromptedBlock(AdapterLayer):
    """Encoder block ``index`` (``base_layer``) with p_index added to its input."""

    def __init__(self, block: nn.Module, prompts: SamAdapterPrompts, index: int) -> None:
        super().__init__(block)
        share(self, "prompts", prompts)
        self.index = index

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(self.prompts.add_prompt(self.index, x))


def inject(sam: nn.Module, config: SamAdapterConfig) -> None:
    require_vit(sam.image_encoder, "sam_adapter", {
        "tiny_vit": "SAM-Adapter feeds patch-embedding and high-frequency features of one width into every block of a single-resolution ViT; TinyViT's stages change width (128, 160, 320) and resolution",
        "hiera": "SAM-Adapter feeds patch-embedding and high-frequency features of one width into every block of a single-resolution ViT; Hiera's stages change width (T: 96, 192, 384, 768) and resolution",
    })
    encoder = sam.image_encoder
    prompts = encoder.sam_adapter = SamAdapterPrompts(encoder, config)
    encoder.patch_embed = PatchFeatures(encoder.patch_embed, prompts)
    for index, block in enumerate(encoder.blocks):
        encoder.blocks[index] = PromptedBlock(block, prompts, index)
