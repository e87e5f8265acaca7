"""Adapter-only checkpoints in peft's shape, and the one way to load them.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. The tensors are the
method's own plus every trainable one (the mask decoder), keyed as in segment-anything's ``Sam``
state dict; the config holds the :class:`~cobot_med.model.ModelSpec`, the SHA-256 of the base
checkpoint and the SHA-256 of the weights file. Loading checks all three: the spec must name a
model that exists and that the tensors fit key for key, the base must be the checkpoint the adapter
was trained on, and the weights must be the bytes that were saved (a flipped byte is an error, not
a silently worse model). A model built without a base checkpoint (the random ``tiny`` test model)
saves its full weights instead.

:func:`load_adapter` rebuilds a model from a folder; :func:`load_adapter_weights` loads a folder
into a model that exists (the best adapter before the test split), and :func:`load_adapter_tensors`
loads tensors (a resume checkpoint's) -- the same key, shape and base checks for all three.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CobotMedError
from .files import atomic_path, user_mode, write_json
from .model import ModelSpec, build_model
from .sam import PromptableSam, file_sha256

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "cobot-med-adapter"
VERSION = 2  # 2: the weights file's SHA-256 is recorded and checked


class AdapterError(CobotMedError, ValueError):
    """An adapter checkpoint that cannot be used, with the file and the reason."""


def unwrap(model: torch.nn.Module) -> PromptableSam:
    """The PromptableSam inside DDP / torch.compile wrappers."""
    while not isinstance(model, PromptableSam):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a PromptableSam (possibly wrapped), got {type(model).__name__}")
        model = inner
    return model


def _merged(model: PromptableSam) -> bool:
    return any(getattr(m, "merged", False) for m in model.sam.modules())


def adapter_keys(model: PromptableSam) -> list[str]:
    """The state-dict keys an adapter of ``model`` holds: all of them without a base checkpoint."""
    return list(model.sam.state_dict()) if model.base_sha256 is None else list(model.adapter_keys)


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model = unwrap(model)
    if _merged(model):
        raise AdapterError("cannot save an adapter while LoRA weights are merged; unmerge first")
    state = model.sam.state_dict()
    return {k: state[k].detach().cpu().contiguous().clone() for k in adapter_keys(model)}


def save_adapter(model: torch.nn.Module, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the adapter folder atomically (the weights, then the config that vouches for them)."""
    model = unwrap(model)
    directory = Path(directory)
    tensors = adapter_state_dict(model)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        user_mode(tmp)
        weights_sha256 = file_sha256(tmp)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.spec.to_dict(),
        "base_checkpoint_sha256": model.base_sha256,
        "weights_sha256": weights_sha256,
        "full_weights": model.base_sha256 is None,
        "num_tensors": len(tensors),
        "num_parameters": int(sum(t.numel() for t in tensors.values())),
        **(extra or {}),
    }
    write_json(directory / CONFIG_NAME, config)
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
    """The config of an adapter folder, checked: its format, and a model spec that can be built."""
    config_path, _ = resolve_adapter(path)
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("model"), dict):
        raise AdapterError(f"{config_path}: not a cobot-med adapter config")
    config["spec"] = spec_of(config["model"], config_path)
    return config


def spec_of(model: Mapping[str, Any], source: Path | str) -> ModelSpec:
    """The :class:`ModelSpec` an adapter config records; AdapterError for unknown fields or values."""
    from .peft import METHODS
    from .sam.build import ARCHITECTURES

    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(model) - fields)
    if unknown:
        raise AdapterError(f"{source}: unknown model field(s) {unknown}; a cobot-med adapter has {sorted(fields)}")
    if model.get("arch") not in ARCHITECTURES:
        raise AdapterError(f"{source}: unknown arch {model.get('arch')!r}; known: {sorted(ARCHITECTURES)}")
    if model.get("peft") not in METHODS:
        raise AdapterError(f"{source}: unknown PEFT method {model.get('peft')!r}; known: {sorted(METHODS)}")
    try:
        METHODS[model["peft"]].make_config(dict(model.get("peft_options") or {}))
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{source}: the recorded peft_options do not fit the method {model['peft']} it names "
                           f"({err}); the config was edited or belongs to other weights") from None
    try:
        return ModelSpec(**model)
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{source}: the recorded model cannot be built ({err})") from None


def check_base(config: Mapping[str, Any], source: Path | str, sam_checkpoint: str | Path | None = None,
               base_sha256: str | None = None) -> str | None:
    """The base checkpoint an adapter needs is the one given (by file, or by a loaded model's SHA-256)."""
    expected = config.get("base_checkpoint_sha256")
    if not expected:
        return None
    spec = config["spec"]
    if base_sha256 is None and sam_checkpoint:
        base_sha256 = file_sha256(sam_checkpoint)
    if base_sha256 is None:
        raise AdapterError(f"{source}: this adapter belongs to a {spec.arch} checkpoint (sha256 {expected[:12]}...); "
                           "pass that checkpoint (--sam_checkpoint)")
    if base_sha256 != expected:
        given = str(sam_checkpoint) if sam_checkpoint else "the model's base"
        raise AdapterError(f"{source}: trained on the checkpoint with sha256 {expected[:12]}..., but {given} has "
                           f"sha256 {base_sha256[:12]}...; load it onto the checkpoint it was trained on")
    return expected


def read_weights(path: str | Path, config: Mapping[str, Any] | None = None,
                 map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder, after checking the file is the one its config vouches for."""
    config = dict(config or read_adapter_config(path))
    _, weights = resolve_adapter(path)
    expected = config.get("weights_sha256")
    if expected and file_sha256(weights) != expected:
        raise AdapterError(f"{weights}: the file's SHA-256 differs from the one recorded in {CONFIG_NAME} when it "
                           "was saved: it is damaged or was changed; use a good copy of the adapter")
    try:
        tensors = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{weights}: unreadable safetensors file ({err})") from None
    return {k.removeprefix("module.").removeprefix("sam."): v for k, v in tensors.items()}


def load_adapter_tensors(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Load adapter ``tensors`` into ``model``: exactly the model's adapter keys, every shape equal."""
    model = unwrap(model)
    wanted = set(adapter_keys(model))
    missing, unexpected = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or unexpected:
        spec = model.spec
        raise AdapterError(
            f"{source}: keys do not match a {spec.arch}/{spec.peft} model (weights of another method or base than "
            f"the config names?): missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    device = next(model.parameters()).device
    try:
        model.sam.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=model.base_sha256 is None)
    except RuntimeError as err:
        raise AdapterError(f"{source}: tensor shapes do not match the model ({err})") from None


def load_adapter_weights(model: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Load the adapter folder ``path`` into ``model`` (built with the same spec on the same base); its config."""
    target = unwrap(model)
    config = read_adapter_config(path)
    spec = config["spec"]
    ours = target.spec
    differs = [name for name in ("arch", "peft", "image_size", "peft_options")
               if _canonical(getattr(spec, name)) != _canonical(getattr(ours, name))]
    if differs:
        raise AdapterError(f"{path}: the adapter is {spec.arch}/{spec.peft} at {spec.image_size} px, the network "
                           f"{ours.arch}/{ours.peft} at {ours.image_size} px (differs in {', '.join(differs)})")
    if bool(config.get("full_weights")) != (target.base_sha256 is None):
        raise AdapterError(f"{path}: the adapter and the network do not agree on a base checkpoint")
    check_base(config, path, base_sha256=target.base_sha256)
    load_adapter_tensors(target, read_weights(path, config), resolve_adapter(path)[1])
    return config


RUN_FIELDS = ("attention", "skip_window_padding", "gradient_checkpointing", "recipe")


def _canonical(value: Any) -> str:
    """A value as JSON records it (tuples become lists), for comparing a recorded spec with a live one."""
    return json.dumps(value, sort_keys=True, default=str)


def load_adapter(path: str | Path, sam_checkpoint: str | Path | None = None,
                 map_location: str | torch.device = "cpu", overrides: Mapping[str, Any] | None = None) -> PromptableSam:
    """Rebuild the model an adapter was trained as: base (checked by SHA-256) + method + its tensors.

    ``overrides``: how to run it instead of as recorded -- the speed switches (exact: same outputs) and the
    input recipe's CT window (``{"recipe": {"ct_window": [...]}}``, the user's choice).
    """
    from .sam.build import default_checkpoint

    config = read_adapter_config(path)
    sam_checkpoint = sam_checkpoint or default_checkpoint(config["spec"].arch)
    base = check_base(config, path, sam_checkpoint=sam_checkpoint)
    unknown = sorted(set(overrides or {}) - set(RUN_FIELDS))
    if unknown:
        raise AdapterError(f"{path}: only {list(RUN_FIELDS)} can be changed when loading, not {unknown}")
    changes = dict(overrides or {})
    if "recipe" in changes:
        changes["recipe"] = {**config["spec"].recipe, **changes["recipe"]}
    spec = dataclasses.replace(config["spec"], **changes)
    try:
        model = build_model(spec, sam_checkpoint, base=bool(base))  # no base: a full-weights adapter has every tensor
    except CobotMedError:
        raise
    except (TypeError, ValueError) as err:  # a spec the config records that the method or base refuses
        raise AdapterError(f"{path}: the model its config records cannot be built ({type(err).__name__}: {err})") from None
    load_adapter_tensors(model, read_weights(path, config), resolve_adapter(path)[1])
    return model.to(map_location)


def weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A SHA-256 of tensors by name (what made a prediction, for records that must name their model)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
