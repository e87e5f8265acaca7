"""The app's settings: MONAI Label's ``--conf KEY VALUE`` pairs, checked once when the server starts.

=================  ===========================  ==========================================================
key                default                      meaning
=================  ===========================  ==========================================================
``models``         ``lite_medsam``              served models, comma-separated; each name is a base SAM arch
``dataset``        ``adome``                    dataset layout: label names and ids, CT window
``adapter``        (none)                       a trained adapter folder to serve from the start (its arch
                                                must be one of ``models``)
``sam_checkpoint`` (none)                       the base's official weights (needed by ``vit_b/l/h``)
``image_size``     the arch's default           model input size for a base without adapter
``peft``           ``lora+cobot``               method of a new adapter (the first training round)
``epochs``         ``5``                        epochs per training round (``max_epochs`` per request)
``output_dir``     ``STUDIES/cobot_med``        training rounds, served adapters, MLflow store
``tracking_uri``   ``$MLFLOW_TRACKING_URI``     MLflow store; else ``sqlite:///OUTPUT_DIR/mlflow.db``
``propagation``    ``box3d``                    what an ROI becomes: ``box3d`` or ``key_slice``
``amp``            ``true``                     bf16 autocast in inference and training (as the bundles)
``batch_size``     ``8``                        slices per forward pass in inference
=================  ===========================  ==========================================================
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from . import project

PROPAGATIONS = ("box3d", "key_slice")
KEYS = ("models", "dataset", "adapter", "sam_checkpoint", "image_size", "peft", "epochs", "output_dir",
        "tracking_uri", "propagation", "amp", "batch_size")
# MONAI Label's own keys that may share the --conf dictionary
PASSED_THROUGH = ("server_mode", "preload", "skip_trainers", "skip_strategies", "skip_scoring")


class ConfError(ValueError):
    """A ``--conf`` value that cannot work, naming the key."""


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """One served model: its base, and the adapter it starts with (None: the base alone)."""

    name: str
    arch: str
    image_size: int | None
    adapter: str | None


@dataclasses.dataclass(frozen=True)
class AppSettings:
    models: tuple[ModelSettings, ...]
    dataset: project.DatasetInfo
    sam_checkpoint: str | None
    peft: str
    epochs: int
    output_dir: Path
    tracking_uri: str
    propagation: str
    amp: bool
    batch_size: int

    def model_dir(self, model: str) -> Path:
        """Where one model's training rounds and served-adapter record live."""
        return self.output_dir / model


def _flag(key: str, value: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfError(f"--conf {key}: expected true or false, got {value!r}")


def _positive_int(key: str, value: str) -> int:
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if number < 1:
        raise ConfError(f"--conf {key}: expected a positive whole number, got {value!r}")
    return number


def from_conf(conf: Mapping[str, Any], studies: str) -> AppSettings:
    """Parse and check every setting (bases, adapter, dataset) before the server serves anything."""
    unknown = sorted(set(conf) - set(KEYS) - set(PASSED_THROUGH))
    if unknown:
        raise ConfError(f"--conf {unknown[0]}: unknown key; the cobot-med app takes {', '.join(KEYS)}")

    def get(key: str, default: str = "") -> str:
        return str(conf.get(key, default) or default).strip()

    try:
        data = project.dataset_info(get("dataset", "adome"))
    except ValueError as err:
        raise ConfError(f"--conf dataset: {err}") from None
    sam_checkpoint = get("sam_checkpoint") or None
    image_size = _positive_int("image_size", get("image_size")) if get("image_size") else None
    names = [n.strip() for n in get("models", "lite_medsam").split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise ConfError(f"--conf models: expected distinct base names, got {get('models')!r}")

    adapter = get("adapter") or None
    adapter_arch = None
    if adapter:
        try:
            adapter_arch = project.adapter_model(adapter)["arch"]
        except project.AdapterError as err:
            raise ConfError(f"--conf adapter: {err}") from None
        if adapter_arch not in names:
            raise ConfError(f"--conf adapter: {adapter} was trained on {adapter_arch}, which is not among the "
                            f"served models {names}; add it to --conf models")
        adapter = str(Path(adapter).resolve())
    peft = get("peft", "lora+cobot")
    models = []
    for name in names:
        try:
            project.check_base(name, image_size, sam_checkpoint, peft)
        except project.SettingsError as err:
            raise ConfError(f"--conf models / peft / sam_checkpoint / image_size: {err}") from None
        models.append(ModelSettings(name, name, image_size, adapter if name == adapter_arch else None))

    propagation = get("propagation", "box3d")
    if propagation not in PROPAGATIONS:
        raise ConfError(f"--conf propagation: choose one of {list(PROPAGATIONS)}, got {propagation!r}")
    output_dir = Path(get("output_dir") or Path(studies) / "cobot_med").resolve()
    tracking = get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output_dir / 'mlflow.db'}"
    return AppSettings(
        models=tuple(models), dataset=data, sam_checkpoint=sam_checkpoint, peft=peft,
        epochs=_positive_int("epochs", get("epochs", "5")), output_dir=output_dir, tracking_uri=tracking,
        propagation=propagation, amp=_flag("amp", get("amp", "true")),
        batch_size=_positive_int("batch_size", get("batch_size", "8")),
    )
