"""The PEFT library: one module per method, one contract (:mod:`.tuner`) to inject, count,
group, save, load, merge, disable and unload them."""

from .cobot import CobotConfig
from .tuner import (
    METHODS,
    PeftMethod,
    apply_peft,
    auxiliary_loss,
    count_parameters,
    disable_adapters,
    get_method,
    merge_adapters,
    parameter_groups,
    unload,
    unmerge_adapters,
)

__all__ = [
    "CobotConfig",
    "METHODS",
    "PeftMethod",
    "apply_peft",
    "auxiliary_loss",
    "count_parameters",
    "disable_adapters",
    "get_method",
    "merge_adapters",
    "parameter_groups",
    "unload",
    "unmerge_adapters",
]
