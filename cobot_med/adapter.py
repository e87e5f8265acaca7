"""Adapter-only checkpoints in peft's shape: a folder with ``adapter_config.json`` and
``adapter_model.safetensors``.

The tensors are the method's own plus every trainable one (the mask decoder), keyed as in
segment-anything's ``Sam`` state dict without DDP's ``module.`` prefix; the config holds
the :class:`~cobot_med.model.ModelSpec` and the SHA-256 of the base SAM checkpoint, so an
adapter loaded onto another base fails clearly. A model built without a base checkpoint
(the ``tiny`` demo model) saves its full weights instead.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import ModelSpec, build_model
from .peft.lora import LoraQkv
from .sam import PromptableSam, file_sha256

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "cobot-med-adapter"


class AdapterError(ValueError):
    """An adapter checkpoint that cannot be used, with the file and the reason."""


def unwrap(model: torch.nn.Module) -> PromptableSam:
    """The PromptableSam inside DDP / torch.compile wrappers."""
    while not isinstance(model, PromptableSam):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a PromptableSam (possibly wrapped), got {type(model).__name__}")
        model = inner
    return model


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model = unwrap(model)
    if any(m.merged for m in model.modules() if isinstance(m, LoraQkv)):
        raise AdapterError("cannot save an adapter while LoRA weights are merged; unmerge first")
    state = model.sam.state_dict()
    keys = list(state) if model.base_sha256 is None else model.adapter_keys
    return {k: state[k].detach().cpu().contiguous().clone() for k in keys}


def save_adapter(model: torch.nn.Module, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter folder atomically (temporary names, then rename); returns the folder."""
    model = unwrap(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model)
    config = {
        "format": FORMAT,
        "version": 1,
        "model": model.spec.to_dict(),
        "base_checkpoint_sha256": model.base_sha256,
        "full_weights": model.base_sha256 is None,
        "num_tensors": len(tensors),
        "num_parameters": int(sum(t.numel() for t in tensors.values())),
        **(extra or {}),
    }
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".safetensors.tmp", delete=False) as tmp:
        weights_tmp = Path(tmp.name)
    save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
    config_tmp = directory / f".{CONFIG_NAME}.tmp"
    config_tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(weights_tmp, directory / WEIGHTS_NAME)
    os.replace(config_tmp, directory / CONFIG_NAME)
    return directory


def resolve_adapter(path: str | Path) -> tuple[Path, Path]:
    """(config, weights) for an adapter folder or the safetensors file inside it."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else folder / WEIGHTS_NAME
    config = folder / CONFIG_NAME
    for needed in (config, weights):
        if not needed.is_file():
            raise AdapterError(f"{path}: not an adapter checkpoint ({needed.name} is missing)")
    return config, weights


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    config_path, _ = resolve_adapter(path)
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{config_path}: not valid JSON ({err})") from err
    if config.get("format") != FORMAT or "model" not in config:
        raise AdapterError(f"{config_path}: not a cobot-med adapter config")
    return config


def load_adapter(
    path: str | Path, sam_checkpoint: str | Path | None = None, map_location: str | torch.device = "cpu"
) -> PromptableSam:
    """Rebuild the model an adapter was trained as: base SAM (checked by SHA-256) + method + tensors."""
    config = read_adapter_config(path)
    _, weights = resolve_adapter(path)
    spec = ModelSpec(**config["model"])
    expected = config.get("base_checkpoint_sha256")
    if expected and not sam_checkpoint:
        raise AdapterError(
            f"{weights}: this adapter belongs to a {spec.arch} SAM checkpoint (sha256 {expected[:12]}...); "
            "pass that checkpoint (sam_checkpoint / --sam-checkpoint)"
        )
    if expected:
        actual = file_sha256(sam_checkpoint)
        if actual != expected:
            raise AdapterError(
                f"{weights}: trained on the SAM checkpoint with sha256 {expected[:12]}..., "
                f"but {sam_checkpoint} has sha256 {actual[:12]}...; load it onto the checkpoint it was trained on"
            )
    model = build_model(spec, sam_checkpoint if expected else None)
    try:
        tensors = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{weights}: unreadable safetensors file ({err})") from err
    tensors = {k.removeprefix("module.").removeprefix("sam."): v for k, v in tensors.items()}
    wanted = set(model.sam.state_dict()) if config.get("full_weights") else set(model.adapter_keys)
    missing, unexpected = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or unexpected:
        raise AdapterError(
            f"{weights}: keys do not match a {spec.arch}/{spec.peft} model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    try:
        model.sam.load_state_dict(tensors, strict=bool(config.get("full_weights")))
    except RuntimeError as err:
        raise AdapterError(f"{weights}: tensor shapes do not match the model ({err})") from err
    model.base_sha256 = expected
    return model.to(map_location)
