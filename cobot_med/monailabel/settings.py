"""The app's settings: MONAI Label's ``--conf KEY VALUE`` pairs, checked once when the server starts.

===================  ===========================  ==========================================================
key                  default                      meaning
===================  ===========================  ==========================================================
``models``           ``lite_medsam``              served models, comma-separated; each name is a base SAM arch
``dataset``          ``adome``                    dataset layout: label names and ids, CT window
``adapter``          (none)                       a trained adapter folder to serve from the start (its arch
                                                  must be one of ``models``): version 0
``adapter_version``  (the record's)               serve this adapter version when the server starts (a
                                                  rollback): ``N`` for every model, or ``MODEL:N,...``
``sam_checkpoint``   (none)                       the base's official weights (needed by ``vit_b/l/h``)
``image_size``       the arch's default           model input size for a base without adapter
``peft``             ``lora+cobot``               method of a new adapter (the first training round)
``epochs``           ``5``                        epochs per training round (``max_epochs`` per request)
``output_dir``       ``STUDIES/cobot_med``        training rounds, adapter versions, MLflow store
``tracking_uri``     ``$MLFLOW_TRACKING_URI``     MLflow store; else ``sqlite:///OUTPUT_DIR/mlflow.db``
``propagation``      ``box3d``                    what an ROI becomes: ``box3d`` or ``key_slice``
``propagator``       ``boxes``                    how a key slice (``key_slice``, clicks alone) reaches the
                                                  rest of the volume, as the bundles' ``propagator``:
                                                  ``boxes`` or ``sam2_memory`` (SAM 2 bases, backend torch)
``amp``              ``auto``                     precision in inference and training, as the bundles' ``amp``
                                                  (``auto``: what the device runs fast; true/false, bf16, fp16)
``batch_size``       ``auto``                     slices per forward pass in inference (``eval_batch_size``;
                                                  ``auto``: 1 for LiteMedSAM on a CPU, else 8)
``backend``          ``torch``                    what runs the served model, as the bundles' ``backend``:
                                                  ``onnxruntime`` / ``openvino`` (each adapter exported on first
                                                  use into the cache) or ``auto`` (docs/export.md)
===================  ===========================  ==========================================================

Each served model is one :class:`cobot_med.settings.RunSettings` of the dataset's bundle (its defaults,
with the keys above), checked by the project's own checks: the same object ``cobot-med infer`` and the
bundles run, so the app's answers and training rounds are theirs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from . import project
from .project import RunSettings

PROPAGATIONS = ("box3d", "key_slice")
KEYS = ("models", "dataset", "adapter", "adapter_version", "sam_checkpoint", "image_size", "peft", "epochs", "output_dir",
        "tracking_uri", "propagation", "propagator", "amp", "batch_size", "backend")
# MONAI Label's own keys that may share the --conf dictionary
PASSED_THROUGH = ("server_mode", "preload", "skip_trainers", "skip_strategies", "skip_scoring")


class ConfError(ValueError):
    """A ``--conf`` value that cannot work, naming the key."""


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """One served model: its base, the adapter it starts with (None: the base alone), and its run settings."""

    name: str  # the base arch it serves
    adapter: str | None
    run: RunSettings = dataclasses.field(repr=False, compare=False)  # the bundle's settings of this model
    version: int | None = None  # the adapter version to serve from the start (--conf adapter_version)


@dataclasses.dataclass(frozen=True)
class AppSettings:
    models: tuple[ModelSettings, ...]
    dataset: str  # the dataset bundle (bundles/<dataset>.json)
    organs: dict[str, int]  # organ -> label id, the layout's order
    peft: str
    epochs: int
    output_dir: Path
    tracking_uri: str
    propagation: str

    def model_dir(self, model: str) -> Path:
        """Where one model's training rounds and served-adapter record live."""
        return self.output_dir / model


def _checked(key: str, settings: project.RunSettings, **changes: Any) -> project.RunSettings:
    """``settings`` with ``changes``, checked by RunSettings; a refusal names the ``--conf`` key."""
    try:
        return project.with_settings(settings, **changes)
    except project.SettingsError as err:
        raise ConfError(f"--conf {key}: {err}") from None


def from_conf(conf: Mapping[str, Any], studies: str) -> AppSettings:
    """Parse and check every setting (bases, adapter, dataset, store) before the server serves anything."""
    unknown = sorted(set(conf) - set(KEYS) - set(PASSED_THROUGH))
    if unknown:
        raise ConfError(f"--conf {unknown[0]}: unknown key; the cobot-med app takes {', '.join(KEYS)}")

    def get(key: str, default: str = "") -> str:
        return str(conf.get(key, default) or default).strip()

    try:
        base = project.base_settings(get("dataset", "adome"))
    except project.SettingsError as err:
        raise ConfError(f"--conf dataset: {err}") from None
    names = [n.strip() for n in get("models", "lite_medsam").split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise ConfError(f"--conf models: expected distinct base names, got {get('models')!r}")
    propagation = get("propagation", "box3d")
    if propagation not in PROPAGATIONS:
        raise ConfError(f"--conf propagation: choose one of {list(PROPAGATIONS)}, got {propagation!r}")
    output_dir = Path(get("output_dir") or Path(studies) / "cobot_med").resolve()
    base = _checked("peft", base, peft=get("peft", "lora+cobot"))
    base = _checked("amp", base, amp=get("amp", "auto"))
    base = _checked("batch_size", base, eval_batch_size=get("batch_size", "auto"))
    base = _checked("backend", base, backend=get("backend", "torch"))
    base = _checked("propagator", base, propagator=get("propagator", "boxes"))
    base = _checked("epochs", base, epochs=get("epochs", "5"))
    base = _checked("sam_checkpoint", base, sam_checkpoint=get("sam_checkpoint"))
    base = _checked("output_dir / tracking_uri", base, output_dir=str(output_dir), tracking_uri=get("tracking_uri"))
    try:
        tracking = project.check_tracking(base)
    except project.SettingsError as err:
        raise ConfError(f"--conf tracking_uri: {err}") from None
    base = project.with_settings(base, tracking_uri=tracking)  # the store resolved once, for every round

    adapter = get("adapter") or None
    adapter_arch = None
    if adapter:
        try:
            adapter_arch = project.adapter_spec(adapter).arch
        except project.AdapterError as err:
            raise ConfError(f"--conf adapter: {err}") from None
        if adapter_arch not in names:
            raise ConfError(f"--conf adapter: {adapter} was trained on {adapter_arch}, which is not among the "
                            f"served models {names}; add it to --conf models")
        adapter = str(Path(adapter).resolve())
    wanted = _versions(get("adapter_version"), names)
    models = []
    for name in names:
        start = adapter if name == adapter_arch else None
        run = _checked("models", base, arch=name)
        run = _checked("image_size", run, image_size=get("image_size") or None)
        run = _checked("adapter", run, adapter=start or "")
        try:
            run.check_propagator()  # sam2_memory: a SAM 2 base on torch
        except project.SettingsError as err:
            raise ConfError(f"--conf propagator: {err}") from None
        try:
            project.check_model_files(run)
        except project.SettingsError as err:
            raise ConfError(f"--conf models / sam_checkpoint / adapter: {err}") from None
        models.append(ModelSettings(name, start, run, wanted.get(name)))

    return AppSettings(
        models=tuple(models), dataset=base.dataset, organs=base.organs, peft=base.peft, epochs=base.epochs,
        output_dir=output_dir, tracking_uri=tracking, propagation=propagation,
    )


def _versions(text: str, names: list[str]) -> dict[str, int]:
    """``--conf adapter_version``: ``N`` (every served model) or ``MODEL:N,...`` -> {model: N}."""
    if not text:
        return {}
    wanted: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        model, _, number = part.rpartition(":")
        model = model.strip()
        if model and model not in names:
            raise ConfError(f"--conf adapter_version: {model!r} is not a served model ({', '.join(names)})")
        number = number.strip().lstrip("v")
        if not number.isdigit():
            raise ConfError(f"--conf adapter_version: expected a version number (0 is the starting adapter) or "
                            f"MODEL:N, got {part!r}")
        for name in [model] if model else names:
            wanted[name] = int(number)
    return wanted
