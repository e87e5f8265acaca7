"""BitFit: only the bias terms of the image encoder train (Ben Zaken et al., ACL 2022).

Nothing is added: every ``bias`` of the image encoder is unfrozen (:func:`trainable` names them,
the tuner sets ``requires_grad``). They are the base's own tensors, so there is nothing to
unload or disable: a trained BitFit model is its base with other biases. In segment-anything's
ViT those are the patch embedding's convolution, per block ``norm1``, ``attn.qkv``,
``attn.proj``, ``norm2``, ``mlp.lin1`` and ``mlp.lin2``, and the two ``LayerNorm2d`` of the
neck (its convolutions have no bias). BitFit's paper trains the LayerNorm biases too
(``norm_bias=True``); ``norm_bias=False`` keeps the Linear/Conv biases only. The relative
position tables (``rel_pos_h``/``rel_pos_w``) are embeddings, not bias terms: they stay frozen.

ViT-B (width 768, MLP 3072, 12 blocks, neck 256 channels), image encoder trainable:
patch embedding 768 + 12 x (768 + 2304 + 768 + 768 + 3072 + 768 = 8,448) + neck 2 x 256
= 768 + 101,376 + 512 = **102,656**; with ``norm_bias=False``: 768 + 12 x 6,912 = 83,712.
The model equals SAM at step 0 (nothing changes until the optimiser moves a bias).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from torch import nn

from .config import PeftConfig

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)  # BatchNorm: TinyViT's Conv2d_BN


@dataclasses.dataclass
class BitFitConfig(PeftConfig):
    norm_bias: bool = True  # also the LayerNorm biases, as in the BitFit paper

    def __post_init__(self) -> None:
        if not isinstance(self.norm_bias, bool):
            raise ValueError(f"bitfit norm_bias must be true or false, got {self.norm_bias!r}")


def _is_norm(module: nn.Module) -> bool:
    # segment-anything's LayerNorm2d (the neck) is its own class with weight and bias
    return isinstance(module, _NORMS) or type(module).__name__ == "LayerNorm2d"


def trainable(sam: nn.Module, config: BitFitConfig) -> Iterator[nn.Parameter]:
    """The encoder's biases (not the norms' with ``norm_bias=False``); the tuner unfreezes them."""
    for module in sam.image_encoder.modules():
        bias = getattr(module, "bias", None)
        if not isinstance(bias, nn.Parameter):
            continue
        if _is_norm(module) and not config.norm_bias:
            continue
        yield bias
