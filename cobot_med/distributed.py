"""The processes of a torchrun launch: who we are, and the few collective steps the project needs.

Training gets its process group from ``bundles/multi_gpu.json``; ``cobot-med infer`` under torchrun starts
it here (:func:`start_from_environment`), with the backend that fits the device: NCCL on GPUs (one GPU per
``LOCAL_RANK``), gloo on CPUs.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (or another launcher that sets ``WORLD_SIZE``) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start_from_environment(device: torch.device) -> bool:
    """Join the launcher's process group if this process was launched as one of several; True when it did."""
    if initialized() or not launched():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return True


def barrier() -> None:
    if initialized():
        dist.barrier()


def gather(value: Any) -> list[Any]:
    """Every process's ``value``, in rank order (just ``[value]`` in one process)."""
    if not initialized():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def stop(started: bool) -> None:
    """Leave the process group this module started (one that a bundle started is the bundle's to end)."""
    if started and initialized():
        dist.destroy_process_group()
