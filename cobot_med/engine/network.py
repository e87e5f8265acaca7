"""The network, its optimiser and its inference form, from a run's settings.

``build_network`` is the one place a run's model comes from: a fresh one of the settings' spec on the
base checkpoint, or, with ``adapter``, the adapter's own model (its arch, method and input size win,
so evaluation and inference need nothing repeated). The speed switches are part of the spec
(:func:`cobot_med.model.build_model` applies them); ``compile`` is the one switch outside it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

# the model code is imported where it is used: resolve_device serves the exported-model path, which runs without it


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: this process's GPU under torchrun, else the first GPU, else the CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def build_network(settings: Any, device: torch.device | str = "cpu", compile: bool = False) -> torch.nn.Module:
    """The PEFT-adapted PromptableSam of ``settings`` on ``device`` (see the module docstring); ``compile``:
    ``torch.compile`` its image encoder (the resolved ``compile`` setting). With ``backend`` onnxruntime / openvino /
    auto or an ``exported_model``, the exported model on its runtime where that is what runs
    (:func:`cobot_med.export.backend.load_backend`)."""
    if getattr(settings, "backend", "torch") != "torch" or getattr(settings, "exported_model", ""):
        from ..export.backend import load_backend

        loaded = load_backend(settings, device)
        if loaded is not None:
            return loaded[0]
    from ..adapter import load_adapter
    from ..model import build_model
    from ..sam.speed import compile_model

    checkpoint = settings.sam_checkpoint or None
    if settings.adapter:  # explicit speed settings and a CT window win over the adapter's record
        overrides = {k: v for k, v in settings.speed().items() if v is not None}
        if settings.recipe_overrides():
            overrides["recipe"] = settings.recipe_overrides()
        model = load_adapter(settings.adapter, checkpoint, overrides=overrides)
    else:
        model = build_model(settings.model_spec(), checkpoint)
    model = model.to(device)
    if compile:
        compile_model(model)
    return model


def make_optimizer(network: torch.nn.Module, settings: Any) -> torch.optim.Optimizer:
    """Adam with the authors' two groups (COBOT's C, R, heads at ``cobot_lr``; the rest at ``lr``)."""
    from ..peft import parameter_groups

    groups = parameter_groups(network, lr=settings.lr, cobot_lr=settings.cobot_lr, weight_decay=settings.weight_decay)
    if not groups:  # ``frozen``: nothing trains; a dummy group keeps the engine's optimiser step harmless
        groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.0}]
    return torch.optim.Adam(groups)


def for_inference(network: torch.nn.Module, merge: bool) -> torch.nn.Module:
    """The trained network as evaluation and inference run it: eval mode, LoRA branches folded into the frozen
    weights when ``merge`` (the same for the test split and ``cobot-med infer``, so both give the same numbers).
    An exported model (:class:`cobot_med.export.runtime.ExportedSam`) was merged when it was exported."""
    if hasattr(network, "exported"):
        return network.eval()
    from ..adapter import unwrap
    from ..peft import merge_adapters

    model = unwrap(network)
    model.eval()
    if merge:
        merge_adapters(model)
    return network
