"""Fast attention for SAM's image encoder, same math as segment-anything's ``Attention``.

SAM's attention adds a decomposed relative-position bias (MViTv2) to the logits:
``logit_ij = s q_i.k_j + rel_h_i[row(j)] + rel_w_i[col(j)]`` with ``rel_h_i = q_i R_h`` and
``rel_w_i = q_i R_w``. Three ways to compute it are offered, all with the parameter names of
the original (``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``), so checkpoints and PEFT
injection see no difference:

- ``eager``: segment-anything's own ``Attention`` (N x N logits, bias and softmax in full).
- ``sdpa``: :class:`SdpaAttention`, the bias materialised as an N x N additive mask for
  ``scaled_dot_product_attention``. Fast for inference; in training the mask needs its own
  gradient, so SDPA falls back to its math kernel (no memory saved).
- ``onehot``: :class:`OneHotAttention`, no N x N bias at all. With
  ``q'_i = [s q_i, rel_h_i, rel_w_i]`` and ``k'_j = [k_j, onehot(row(j)), onehot(col(j))]``,
  ``q'_i . k'_j`` is exactly SAM's logit, so attention runs with ``scale=1`` and no mask. The
  head dim grows by H + W of the key grid. On CUDA and in fp32 the core is SDPA with no mask
  (flash / memory-efficient kernels, nothing N x N kept for backward); in bf16 on CPU, where
  SDPA's flash kernel is slower than oneDNN's matmuls, it is ``softmax(q' k'^T) v`` (one N x N
  map, not three). Measured in ``BENCHMARKS.md`` (``benchmarks/attention.py``): in bf16 on CPU
  the fastest kind at every grid, training and inference.
- ``auto`` (:data:`DEFAULT_KIND`, what ``ModelSpec`` builds): :class:`AutoAttention` picks, per
  call, the kind :data:`AUTO_RULES` names for the call's device type, dtype (bf16 under
  autocast) and mode (training when gradients are enabled). The rule is a small table, each row
  with the measurement behind it; :func:`resolve_attention` says what a setting resolves to
  (for logs and run records).

Every class also exposes ``attend(qkv)`` (the part between the ``qkv`` and ``proj``
projections), which :mod:`cobot_med.sam.speed` uses to skip the padded tokens of windowed
blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn

DEFAULT_KIND = "auto"  # per device, dtype and mode: AUTO_RULES (below)


def _split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, H, W, 3C) -> q, k, v each (B, heads, H*W, head_dim)."""
    B, H, W, _ = qkv.shape
    return qkv.reshape(B, H * W, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(out: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, heads, H*W, head_dim) -> (B, H, W, C)."""
    B = out.shape[0]
    return out.permute(0, 2, 1, 3).reshape(B, H, W, -1)


def _rel_pos_terms(
    attn: Attention, q: torch.Tensor, q_hw: tuple[int, int], k_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """rel_h (B, heads, qh*qw, kh) and rel_w (B, heads, qh*qw, kw) of SAM's decomposed bias.

    The queries are the top-left ``q_hw`` corner of the ``k_hw`` key grid (the whole grid, or
    the real tokens of a padded window), so their tables are the first rows of the grid's.
    """
    (qh, qw), (kh, kw) = q_hw, k_hw
    B, n, _, d = q.shape
    Rh = get_rel_pos(kh, kh, attn.rel_pos_h)[:qh].to(q.dtype)  # (qh, kh, d)
    Rw = get_rel_pos(kw, kw, attn.rel_pos_w)[:qw].to(q.dtype)
    r_q = q.reshape(B, n, qh, qw, d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh).reshape(B, n, qh * qw, kh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw).reshape(B, n, qh * qw, kw)
    return rel_h, rel_w


class SdpaAttention(Attention):
    """segment-anything's ``Attention`` computed with ``scaled_dot_product_attention`` and an N x N bias mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(self.qkv(x)))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention of the projected tokens ``qkv`` (B, H, W, 3C) -> (B, H, W, C), before ``proj``."""
        B, H, W, _ = qkv.shape
        q, k, v = _split_heads(qkv, self.num_heads)
        return _merge_heads(self.attend_heads(q, k, v, (H, W), (H, W)), H, W)

    def attend_heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_hw: tuple[int, int], k_hw: tuple[int, int]
    ) -> torch.Tensor:
        """q (B, heads, qh*qw, d) against k, v (B, heads, kh*kw, d) -> (B, heads, qh*qw, d).

        The queries sit in the top-left ``q_hw`` corner of the ``k_hw`` grid (``q_hw == k_hw``: all of it).
        """
        mask = None
        if self.use_rel_pos:
            rel_h, rel_w = _rel_pos_terms(self, q, q_hw, k_hw)
            B, n, Nq, _ = q.shape
            mask = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, n, Nq, k.shape[2])
            mask = mask.to(q.dtype)  # an fp32 mask beside bf16 q is misread by some kernels
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)


_ONEHOT_CACHE: dict[tuple, torch.Tensor] = {}


def _onehot_keys(H: int, W: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H*W, H+W): row j is [onehot(row(j)), onehot(col(j))] for the row-major key grid."""
    key = (H, W, dtype, device)
    table = _ONEHOT_CACHE.get(key)
    if table is None:
        rows = torch.eye(H, dtype=dtype, device=device).repeat_interleave(W, dim=0)
        cols = torch.eye(W, dtype=dtype, device=device).repeat(H, 1)
        table = torch.cat([rows, cols], dim=1)
        if len(_ONEHOT_CACHE) > 64:
            _ONEHOT_CACHE.clear()
        _ONEHOT_CACHE[key] = table
    return table


class OneHotAttention(SdpaAttention):
    """SAM's attention with the rel-pos bias folded into augmented queries and keys (no N x N bias).

    ``core`` picks how ``softmax(q' k'^T) v`` is computed: ``"sdpa"`` (no mask, ``scale=1``;
    nothing N x N is kept for backward), ``"matmul"`` (two batched matmuls and a softmax) or
    ``"auto"`` (``sdpa`` on CUDA and for fp32, ``matmul`` for bf16/fp16 on CPU; see the module docstring).
    """

    core: str = "auto"

    def attend_heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_hw: tuple[int, int], k_hw: tuple[int, int]
    ) -> torch.Tensor:
        if not self.use_rel_pos:
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        B, n, _, d = q.shape
        kh, kw = k_hw
        rel_h, rel_w = _rel_pos_terms(self, q, q_hw, k_hw)
        q_aug = torch.cat([q * self.scale, rel_h, rel_w], dim=-1)
        onehot = _onehot_keys(kh, kw, k.dtype, k.device).expand(B, n, kh * kw, kh + kw)
        k_aug = torch.cat([k, onehot], dim=-1)
        core = self.core
        if core == "auto":  # measured on CPU (BENCHMARKS.md): the matmul core wins in bf16, SDPA's in fp32
            core = "sdpa" if q.device.type == "cuda" or q.dtype == torch.float32 else "matmul"
        if core == "sdpa":
            # the fused kernels want one head dim for q, k and v: pad v with zeros, drop them after
            return F.scaled_dot_product_attention(q_aug, k_aug, F.pad(v, (0, kh + kw)), scale=1.0)[..., :d]
        if core == "matmul":
            return torch.softmax(q_aug @ k_aug.transpose(-2, -1), dim=-1) @ v
        raise ValueError(f"unknown onehot attention core {core!r}; choose 'auto', 'sdpa' or 'matmul'")


# (device type, dtype, "train" | "infer") -> (kind, the measurement behind it): what ``auto`` runs.
# Measured with benchmarks/attention.py (one layer) and train_step.py / inference.py (whole model,
# --attention KIND); the CPU figures are BENCHMARKS.md's. Kinds here must be SDPA-family ones
# (sdpa, onehot), which the padded-token skip of cobot_med.sam.speed can use.
_BF16_CPU = "BENCHMARKS.md, AVX-512 BF16 CPU: onehot (matmul core) fastest at every grid in bf16"
_GPU = ("not measured on a GPU in this project: onehot's SDPA core runs the fused kernels with no mask and "
        "keeps nothing N x N for backward (PERFORMANCE.md: 2.1 against 5.5 GiB saved per 1024-px image)")
AUTO_RULES: dict[tuple[str, str, str], tuple[str, str]] = {
    ("cpu", "bf16", "train"): ("onehot", _BF16_CPU + "; train_step --ablations 13.4x the reference, sdpa 10.9x"),
    ("cpu", "bf16", "infer"): ("onehot", _BF16_CPU + "; inference --ablations 9.7x the reference, sdpa 7.3x"),
    ("cpu", "fp32", "train"): ("onehot", "BENCHMARKS.md, AVX-512 CPU: in fp32 training sdpa is not faster (global "
                                          "1024 px) and keeps its N x N mask for backward; onehot is 4.8x the "
                                          "reference in fp32 on an AVX2 EPYC (issue 16)"),
    ("cpu", "fp32", "infer"): ("sdpa", "BENCHMARKS.md, AVX-512 CPU: in fp32 inference sdpa is fastest (global 1024 px: "
                                       "870 ms against 1265 onehot, 1617 eager); rough ViT-B 256-px encoder runs on a "
                                       "loaded host agree (sdpa 0.8-0.9x onehot's time, AVX2 emulated too)"),
    ("cuda", "bf16", "train"): ("onehot", _GPU),
    ("cuda", "bf16", "infer"): ("onehot", _GPU),
    ("cuda", "fp16", "train"): ("onehot", _GPU),
    ("cuda", "fp16", "infer"): ("onehot", _GPU),
    ("cuda", "fp32", "train"): ("onehot", _GPU),
    ("cuda", "fp32", "infer"): ("onehot", _GPU),
}
_FALLBACK = ("onehot", "no measured rule for this device and dtype; onehot keeps nothing N x N")
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def auto_kind(device_type: str, dtype: torch.dtype | str, training: bool) -> tuple[str, str]:
    """The kind :data:`AUTO_RULES` names for a call, and the measurement behind it."""
    name = _DTYPE_NAMES.get(dtype, str(dtype)) if isinstance(dtype, torch.dtype) else str(dtype)
    return AUTO_RULES.get((device_type, name, "train" if training else "infer"), _FALLBACK)


class AutoAttention(OneHotAttention):
    """``auto``: each call runs the kind :func:`auto_kind` picks for its q's device and dtype and the
    grad mode (training when gradients are enabled). Same parameters as every kind."""

    def attend_heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_hw: tuple[int, int], k_hw: tuple[int, int]
    ) -> torch.Tensor:
        kind, _ = auto_kind(q.device.type, q.dtype, torch.is_grad_enabled())
        return KINDS[kind].attend_heads(self, q, k, v, q_hw, k_hw)


KINDS: dict[str, type[Attention]] = {
    "eager": Attention, "sdpa": SdpaAttention, "onehot": OneHotAttention, "auto": AutoAttention
}


def resolve_attention(
    setting: str, device: torch.device | str, dtype: torch.dtype | str, training: bool = False
) -> tuple[str, str]:
    """The kind ``setting`` runs on ``device`` in ``dtype`` (the autocast dtype; fp32 without), and why.

    ``auto`` looks :data:`AUTO_RULES` up; an explicit kind is itself.
    """
    if setting not in KINDS:
        raise ValueError(f"unknown attention kind {setting!r}; choose one of {sorted(KINDS)}")
    if setting != "auto":
        return setting, f"attention={setting} (explicit)"
    kind, why = auto_kind(torch.device(device).type, dtype, training)
    return kind, f"{kind}: {why}"


def set_attention(image_encoder: nn.Module, kind: str = DEFAULT_KIND) -> int:
    """Switch every attention block of ``image_encoder`` to ``kind`` (``auto``, ``onehot``, ``sdpa`` or ``eager``).

    Returns the number of blocks switched. The module's class changes in place: parameters,
    buffers, submodules and hooks stay what they were. Attention modules that are not
    segment-anything's ``Attention`` (e.g. VPT's prompted attention) are left alone.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; choose one of {sorted(KINDS)}")
    count = 0
    for block in getattr(image_encoder, "blocks", ()):  # none in LiteMedSAM's TinyViT
        attn = block.attn
        if isinstance(attn, Attention) and type(attn) in KINDS.values() and type(attn) is not KINDS[kind]:
            attn.__class__ = KINDS[kind]
            count += 1
    return count


def attention_kind(image_encoder: nn.Module) -> str | None:
    """The kind of the encoder's attention blocks (None when they are mixed or none is ours)."""
    blocks = getattr(image_encoder, "blocks", ())
    kinds = {next((k for k, c in KINDS.items() if type(b.attn) is c), None) for b in blocks}
    return kinds.pop() if len(kinds) == 1 else None
