"""Mixed precision on any device: what ``amp`` resolves to, and the autocast context for it."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Precision:
    """The resolved ``amp`` setting: ``dtype`` None means fp32; ``reason`` says why."""

    setting: str
    dtype: str | None
    reason: str

    @property
    def autocast(self) -> bool | str:
        """What :func:`autocast` takes: False (fp32) or a dtype name."""
        return self.dtype or False

    def record(self) -> dict[str, Any]:
        """For MLflow params and inference summaries."""
        return {"amp": self.setting, "precision": self.dtype or "float32", "precision_reason": self.reason}


def resolve_precision(setting: str | bool | None, device: torch.device | str) -> Precision:
    """``amp`` -> the precision a run uses on ``device`` (an explicit setting always wins)."""
    text = "auto" if setting in (None, "") else str(setting).strip().lower()
    if text in ("false", "0", "no", "off"):
        return Precision(text, None, "amp is off")
    if text in DTYPES:
        return Precision(text, "bfloat16" if DTYPES[text] is torch.bfloat16 else "float16", "set explicitly")
    return Precision(text, "bfloat16", "bf16 autocast (amp=%s)" % text)


def autocast(device: torch.device | str, amp: bool | str = True):
    """``torch.autocast`` for ``device`` (MONAI's engines only autocast on CUDA).

    ``amp`` is False (fp32), True (bf16) or a dtype name.
    """
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp is True else DTYPES[str(amp)]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
