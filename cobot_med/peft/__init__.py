"""The PEFT library: one module per method, one contract (:mod:`.tuner`) to inject, count,
group, save, load and merge them."""

from .cobot import CobotConfig
from .tuner import (
    METHODS,
    PeftMethod,
    apply_peft,
    auxiliary_loss,
    count_parameters,
    get_method,
    merge_adapters,
    parameter_groups,
    unmerge_adapters,
)

__all__ = [
    "CobotConfig",
    "METHODS",
    "PeftMethod",
    "apply_peft",
    "auxiliary_loss",
    "count_parameters",
    "get_method",
    "merge_adapters",
    "parameter_groups",
    "unmerge_adapters",
]
