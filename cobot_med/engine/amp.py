"""Mixed precision on any device: ``torch.autocast`` in the dtype the precision policy resolved.

Which dtype runs fast where is decided in :mod:`cobot_med.engine.precision` (``amp=auto``);
this module only applies it.
"""

from __future__ import annotations

import contextlib

import torch

from .precision import Precision, resolve_precision

__all__ = ["autocast"]


def autocast(device: torch.device | str, amp: Precision | bool | str | None = "auto"):
    """``torch.autocast`` for ``device`` (MONAI's engines only autocast on CUDA), or nothing for fp32.

    ``amp`` is a resolved :class:`~cobot_med.engine.precision.Precision` (what the run recorded),
    or any ``amp`` setting (``auto``, true/false, a dtype name), resolved here for ``device``.
    """
    precision = amp if isinstance(amp, Precision) else resolve_precision(amp, device)
    if precision.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=precision.dtype)
