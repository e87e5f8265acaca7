"""Which run a training is: a fresh one, or the resumption of the run whose checkpoint is in its folder.

A rerun must never report another run's model or score. So before anything is written:

- ``resume.pt`` records the run's *identity* (the settings that decide what it learns and keeps: data, split,
  model, base checkpoint, optimiser, jitter, the protocol the best adapter is chosen by, precision as resolved -- the autocast dtype, not ``auto``,
  which may resolve to another dtype on another machine -- tracking store) and its key. A run resumes only
  when resuming is on and the identity matches; otherwise it stops and names the settings that differ.
  ``epochs`` may grow (to train a killed run further); a finished run is not reopened.
- A fresh run in a folder that holds another run's results (adapters, checkpoint, test predictions)
  stops, unless ``overwrite`` is on: then those results are deleted first. The MLflow store is never
  deleted; every fresh run gets a new key, so its MLflow run is a new one (MONAI's MLFlowHandler would
  otherwise continue any unfinished run of the same name).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from ..errors import SettingsError, on_failure
from ..files import absolute
from . import tracking

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "resume.pt"
RESULTS = ("adapter_best", "adapter_latest", CHECKPOINT_NAME, "test_predictions", "evaluation.json")
REGENERATED = ("overlays", "val_predictions", "loss_curve.png", "loss_curve.json")
IDENTITY_KEYS = ("dataset", "layout", "dataset_dir", "datalist", "val_fraction", "test_fraction", "seed", "arch",
                 "image_size", "peft", "peft_options", "sam_checkpoint_sha256", "lr", "cobot_lr", "weight_decay",
                 "batch_size", "jitter", "min_area", "modality", "recipe", "amp", "tracking_uri", "select_prompts")
# what an identity recorded before a key existed means: the setting's default then
IDENTITY_DEFAULTS = {"select_prompts": "tight"}
LEGACY_AMP = ("auto", "true")  # identities of older checkpoints recorded the amp setting, not the dtype it ran


def identity(settings: Any, image_size: int, base_sha256: str | None, recipe: Any = None,
             precision: Any = None) -> dict[str, Any]:
    """The settings that decide what a training run learns and where it reports (see the module docstring).

    ``amp`` is the dtype training autocasts to (``precision``, the run's resolved
    :class:`~cobot_med.engine.precision.Precision`; resolved here for the settings' device when not given)."""
    if precision is None:
        from .network import resolve_device
        from .precision import resolve_precision

        precision = resolve_precision(settings.amp, resolve_device(settings.device), training=True)
    return {
        "dataset": settings.dataset, "layout": settings.layout,
        "dataset_dir": str(absolute(settings.dataset_dir)) if settings.dataset_dir and not settings.datalist else "",
        "datalist": str(absolute(settings.datalist)) if settings.datalist else "",
        "val_fraction": settings.val_fraction, "test_fraction": settings.test_fraction, "seed": settings.seed,
        "arch": settings.arch, "image_size": int(image_size), "peft": settings.peft,
        "peft_options": settings.peft_options, "sam_checkpoint_sha256": base_sha256, "lr": settings.lr,
        "cobot_lr": settings.cobot_lr, "weight_decay": settings.weight_decay, "batch_size": settings.batch_size,
        "jitter": settings.jitter, "min_area": settings.min_area, "modality": settings.effective_modality,
        "recipe": recipe.to_dict() if recipe is not None else None, "amp": precision.name,
        "tracking_uri": tracking.resolve_tracking_uri(settings.tracking_uri, settings.output_path),
        "select_prompts": settings.select_prompts,
    }


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A resume checkpoint, or SettingsError naming the file and what to do."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, empty, not a zip, unsafe pickle: all unusable
        raise SettingsError(f"{path}: not a readable resume checkpoint ({unreadable_reason(path, err)}); delete it "
                            "to start afresh, or pass --overwrite true to replace this folder's run") from None
    needed = ("identity", "run_key", "trainer", "optimizer", "adapter")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise SettingsError(f"{path}: not a cobot-med resume checkpoint (it lacks {[k for k in needed if k not in (state if isinstance(state, dict) else {})]}); "
                            "delete it to start afresh, or pass --overwrite true")
    return state


def unreadable_reason(path: Path, err: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in a few words (never advice to load it unsafely)."""
    import pickle

    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in str(err):
        return "it holds Python objects other than tensors; not loaded, as that could run code"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"truncated or not a PyTorch file: {type(err).__name__}: {first}"[:300]


@dataclasses.dataclass
class TrainingSession:
    """The run a training is: its key, MLflow names, and the checkpoint to resume from (if any)."""

    output_dir: Path
    identity: dict[str, Any]
    run_key: str
    tracking_uri: str
    experiment: str
    run_name: str
    checkpoint: dict[str, Any] | None = None  # the resume state, when resuming

    @property
    def resuming(self) -> bool:
        return self.checkpoint is not None

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT_NAME

    @classmethod
    def start(cls, settings: Any, network: torch.nn.Module, precision: Any = None) -> "TrainingSession":
        """Decide fresh or resume for ``settings`` with the built ``network`` and the run's resolved
        ``precision`` (see :func:`identity`); clears or refuses as above.

        Under torchrun the first process decides (and deletes) and the others follow its decision."""
        from ..adapter import unwrap
        from ..distributed import rank as process_rank, world_size

        model = unwrap(network)
        out = settings.output_path
        ident = identity(settings, model.spec.image_size, model.base_sha256, model.recipe, precision)
        decision: tuple[str | None, bool, str | None] = (None, False, None)  # (run key, resuming, error)
        if process_rank() == 0:
            try:
                run_key, resuming = _decide(settings, out, ident)
                decision = (run_key, resuming, None)
            except SettingsError as err:
                decision = (None, False, str(err))
        if world_size() > 1:
            import torch.distributed as dist

            shared = [decision]
            dist.broadcast_object_list(shared, src=0)
            decision = shared[0]
        run_key, resuming, error = decision
        if error:
            raise SettingsError(error)
        checkpoint = read_checkpoint(out / CHECKPOINT_NAME) if resuming else None
        name = tracking.run_name(settings.dataset, model.spec.peft, model.spec.arch, model.spec.image_size,
                                 settings.seed, run_key)
        session = cls(out, ident, run_key, ident["tracking_uri"], tracking.experiment_name(settings.dataset), name,
                      checkpoint)
        if process_rank() == 0:
            on_failure(f"training:{name}", functools.partial(tracking.mark_failed, session.tracking_uri,
                                                             session.experiment, name))
        return session

    def finish(self, artifacts_dir: Path | None = None) -> None:
        """The run's test evaluation is done: tag it finished in MLflow and in its checkpoint."""
        on_failure(f"training:{self.run_name}", None)
        tracking.mark_finished(self.tracking_uri, self.experiment, self.run_name, artifacts_dir or self.output_dir)
        path = self.checkpoint_path
        if path.is_file():
            state = read_checkpoint(path)
            state["finished"] = True
            from ..files import atomic_path

            with atomic_path(path) as tmp:
                torch.save(state, tmp)


def _decide(settings: Any, out: Path, ident: dict[str, Any]) -> tuple[str, bool]:
    """(run key, resuming) for a training in ``out``; deletes another run's results when told to overwrite."""
    path = out / CHECKPOINT_NAME
    if path.is_file() and settings.resume and not settings.overwrite:
        state = read_checkpoint(path)
        if state["identity"].get("amp") in LEGACY_AMP:  # recorded as the setting, before the dtype was
            ident = {**ident, "amp": settings.amp}
        recorded = {**IDENTITY_DEFAULTS, **state["identity"]}
        differ = [k for k in IDENTITY_KEYS if recorded.get(k) != ident.get(k)]
        if differ:
            details = "; ".join(f"{k}: {recorded.get(k)!r} there, {ident.get(k)!r} now" for k in differ)
            raise SettingsError(f"{path} belongs to a run with other settings ({details}). Resume it with its own "
                                "settings, choose another output_dir, or pass --overwrite true to replace it")
        if state.get("finished"):
            raise SettingsError(f"{out} holds a finished run (MLflow run {state.get('run_name')}); nothing to resume. "
                                "Choose another output_dir, or pass --overwrite true to train again there")
        done = int(state["trainer"].get("epoch", 0))
        if done > settings.epochs:
            raise SettingsError(f"{path} has trained {done} epochs already, more than epochs={settings.epochs}; "
                                f"pass --epochs {done} or more to resume it")
        return str(state["run_key"]), True
    present = [name for name in RESULTS if (out / name).exists()]
    if present and not settings.overwrite:
        why = "resume is off" if path.is_file() else "they are not this run's"
        raise SettingsError(f"output_dir {out} holds another run's results ({', '.join(present)}) and {why}; choose "
                            "another output_dir, or pass --overwrite true to delete them and start afresh there")
    for name in present + [n for n in REGENERATED if (out / n).exists()]:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    if present:
        logger.warning("overwrite: deleted %s in %s", ", ".join(present), out)
    return uuid.uuid4().hex[:8], False
