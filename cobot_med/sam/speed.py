"""Speed switches for SAM's image encoder, each exact (same math) and each one can be turned off.

- :func:`set_window_padding` (default on in ``build_model``): windowed blocks pad the token
  grid to a multiple of the window (16 x 16 tokens at 256 px become 28 x 28). The padded
  tokens are zeros after ``norm1``, so their q/k/v are ``qkv(0)`` (the bias row for a Linear
  or LoRA): the blocks project only the real tokens, pad q/k/v with that row, attend in
  windows as SAM does (keys and values of every window, padded ones included), but only for
  the queries of real tokens, and project only the real tokens back. ~1/3 fewer encoder FLOPs
  at 256 px. Taken per forward only when it is provably the same computation (our attention
  classes, a token-wise ``qkv``, no hooks on the attention module); otherwise the block runs
  segment-anything's own forward.
- :func:`enable_gradient_checkpointing` (default off): blocks recompute their activations in
  backward (``torch.utils.checkpoint``, non-reentrant), ``"global"`` blocks only (their
  attention maps are the largest) or ``"all"``. Saves memory, costs about one forward.
- :func:`compile_model` (default off): ``torch.compile`` of the image encoder in place
  (state-dict keys unchanged).

bf16 autocast lives in :mod:`cobot_med.engine.amp`, the attention kinds in
:mod:`cobot_med.sam.attention`, merged LoRA weights in :func:`cobot_med.peft.merge_adapters`.
"""

from __future__ import annotations

from typing import Any

import torch
from segment_anything.modeling.image_encoder import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import SdpaAttention

CHECKPOINT_CHOICES = ("none", "global", "all")


def _token_wise(module: nn.Module) -> bool:
    """True when ``module`` maps every token on its own (so it can skip padded tokens): a Linear,
    or PEFT layers that say they are token-wise (LoRA, SSF) around one."""
    from ..peft.layer import is_token_wise  # late: the PEFT package imports this one's package

    return is_token_wise(module)


def _base_block(block: nn.Module) -> nn.Module:
    """The block itself, or the base block under PEFT layers (SAM-Adapter, LST) wrapped around it."""
    from ..peft.layer import base_of

    return base_of(block)


class FastBlock(Block):
    """segment-anything's ``Block`` with the padded-token skip and optional checkpointing.

    Same parameters, names and hooks (the class is switched in place); ``skip_padding`` and
    ``checkpointing`` are per-instance flags.
    """

    skip_padding: bool = False
    checkpointing: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skip_padding and self._can_skip_padding(x):
            return self._forward_unpadded(x)
        return Block.forward(self, x)

    def _can_skip_padding(self, x: torch.Tensor) -> bool:
        ws = self.window_size
        attn = self.attn
        return (
            ws > 0
            and (x.shape[1] % ws or x.shape[2] % ws)
            and isinstance(attn, SdpaAttention)
            and not (attn._forward_hooks or attn._forward_pre_hooks)
            and _token_wise(attn.qkv)
            and _token_wise(attn.proj)
        )

    def _forward_unpadded(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        B, H, W, C = x.shape
        attn, ws = self.attn, self.window_size
        nh, nw = -(-H // ws), -(-W // ws)
        qkv = attn.qkv(x)  # real tokens only
        pad = attn.qkv(x.new_zeros(1, 1, 1, C))  # what every padded (zero) token projects to
        if nw * ws > W:
            qkv = torch.cat([qkv, pad.expand(B, H, nw * ws - W, -1)], dim=2)
        if nh * ws > H:
            qkv = torch.cat([qkv, pad.expand(B, nh * ws - H, nw * ws, -1)], dim=1)
        heads = attn.num_heads
        windows = qkv.view(B, nh, ws, nw, ws, 3, heads, -1).permute(5, 0, 1, 3, 6, 2, 4, 7)
        # (3, B, nh, nw, heads, ws, ws, d): keys and values of every window, padded ones included;
        # queries only for the real tokens: windows fall in up to 4 groups by how many real rows/cols they hold
        rows = _groups(H, ws, nh)
        cols = _groups(W, ws, nw)
        out_rows = []
        for r0, r1, rh in rows:
            out_cols = []
            for c0, c1, cw in cols:
                g = windows[:, :, r0:r1, c0:c1]
                n = B * (r1 - r0) * (c1 - c0)
                q = g[0, ..., :rh, :cw, :].reshape(n, heads, rh * cw, -1)
                k = g[1].reshape(n, heads, ws * ws, -1)
                v = g[2].reshape(n, heads, ws * ws, -1)
                o = attn.attend_heads(q, k, v, (rh, cw), (ws, ws))  # (n, heads, rh*cw, d)
                o = o.reshape(B, r1 - r0, c1 - c0, heads, rh, cw, -1).permute(0, 1, 4, 2, 5, 3, 6)
                out_cols.append(o.reshape(B, (r1 - r0) * rh, (c1 - c0) * cw, C))
            out_rows.append(torch.cat(out_cols, dim=2) if len(out_cols) > 1 else out_cols[0])
        out = torch.cat(out_rows, dim=1) if len(out_rows) > 1 else out_rows[0]
        x = shortcut + attn.proj(out)  # output projection of the real tokens only
        return x + self.mlp(self.norm2(x))


def _groups(size: int, ws: int, count: int) -> list[tuple[int, int, int]]:
    """Windows along one axis as (first, last + 1, real tokens per window): the full ones, then the partial one."""
    last = size - (count - 1) * ws
    if last == ws:
        return [(0, count, ws)]
    return ([(0, count - 1, ws)] if count > 1 else []) + [(count - 1, count, last)]


def _fast_blocks(image_encoder: nn.Module) -> list[FastBlock]:
    blocks = []
    for block in map(_base_block, getattr(image_encoder, "blocks", ())):  # segment-anything's ViT blocks only
        if type(block) is Block:
            block.__class__ = FastBlock
        if isinstance(block, FastBlock):
            blocks.append(block)
    return blocks


def set_window_padding(image_encoder: nn.Module, skip: bool = True) -> int:
    """Skip (``skip=True``) or compute (False, as segment-anything) the padded tokens of windowed blocks.

    Returns the number of windowed blocks set. Exact: the same logits and gradients up to float rounding.
    """
    count = 0
    for block in _fast_blocks(image_encoder):
        if block.window_size > 0:
            block.skip_padding = bool(skip)
            count += 1
    return count


def enable_gradient_checkpointing(model: nn.Module, blocks: str | bool = "global") -> int:
    """Recompute the activations of encoder ``blocks`` in backward: ``"global"``, ``"all"`` or ``"none"``.

    ``model`` is a ``PromptableSam``, a segment-anything ``Sam`` or an image encoder. ``True``
    means ``"global"``, ``False`` ``"none"``. Returns the number of blocks checkpointed.
    """
    blocks = {True: "global", False: "none"}.get(blocks, blocks) if isinstance(blocks, bool) else blocks
    if blocks not in CHECKPOINT_CHOICES:
        raise ValueError(f"gradient checkpointing must be one of {CHECKPOINT_CHOICES}, got {blocks!r}")
    count = 0
    for block in _fast_blocks(_image_encoder(model)):
        on = blocks == "all" or (blocks == "global" and block.window_size == 0)
        block.checkpointing = on
        count += on
    return count


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """``torch.compile`` the image encoder in place (``nn.Module.compile``: state-dict keys unchanged).

    ``options`` go to ``torch.compile`` (default ``dynamic=False``: one graph per input shape).
    The encoder is where the time goes; the decoder's per-image loop stays eager. Returns ``model``.
    """
    options.setdefault("dynamic", False)
    _image_encoder(model).compile(**options)
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether the image encoder runs through ``torch.compile`` (``compile_model``)."""
    return getattr(_image_encoder(model), "_compiled_call_impl", None) is not None


def _image_encoder(model: nn.Module) -> nn.Module:
    if hasattr(model, "sam"):
        model = model.sam
    return getattr(model, "image_encoder", model)


def apply_speed_switches(model: nn.Module, skip_window_padding: bool = True, gradient_checkpointing: str | bool = "none") -> None:
    """The switches :func:`cobot_med.model.build_model` applies from a ``ModelSpec``."""
    encoder = _image_encoder(model)
    set_window_padding(encoder, skip_window_padding)
    enable_gradient_checkpointing(encoder, gradient_checkpointing)
