"""Mixed precision on any device: bf16 autocast on CPU, bf16 (or fp16) on GPU."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def autocast(device: torch.device | str, amp: bool | str = True):
    """``torch.autocast`` for ``device`` (MONAI's engines only autocast on CUDA).

    ``amp`` is False (fp32), True (bf16) or a dtype name.
    """
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp is True else DTYPES[str(amp)]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
