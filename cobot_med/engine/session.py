"""Which run a training is: a fresh one, or the resumption of the run whose checkpoint is in its folder.

A rerun must never report another run's model or score. So before anything is written:

- ``resume.pt`` records the run's *identity* (the settings that decide what it learns and keeps: data, the
  split's content -- every case id with the SHA-256 of its image and label files, so a dataset folder that
  changed cannot redraw the split under a resumed run --, the model as built (an adapter's own arch, method and
  options), base checkpoint, optimiser, jitter, the protocol the best adapter is chosen by, precision as
  resolved -- the autocast dtype, not ``auto``, which may resolve to another dtype on another machine --,
  tracking store, its credentials masked) and its key. A run resumes only when resuming is on and the identity
  matches; otherwise it stops and names what differs. ``epochs`` may grow (to train a killed run further), never
  shrink below the epochs ``resume.pt`` has done; a finished run is not reopened.
- A fresh run in a folder that holds another run's results (adapters, checkpoint, test predictions)
  stops, unless ``overwrite`` is on: then those results are deleted first. The MLflow store is never
  deleted; every fresh run gets a new key, so its MLflow run is a new one (MONAI's MLFlowHandler would
  otherwise continue any unfinished run of the same name).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import SettingsError, on_failure, set_interrupt_note
from ..files import absolute
from ..sam.checkpoint import unreadable_reason
from . import tracking
from .checks import RESULTS  # a training run's results (defined where the exported path's checks read them)

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "resume.pt"
REGENERATED = ("overlays", "val_predictions", "loss_curve.png", "loss_curve.json")
IDENTITY_KEYS = ("dataset", "layout", "dataset_dir", "datalist", "val_fraction", "test_fraction", "seed", "arch",
                 "image_size", "peft", "peft_options", "sam_checkpoint_sha256", "lr", "cobot_lr", "weight_decay",
                 "batch_size", "jitter", "min_area", "modality", "recipe", "amp", "tracking_uri", "split",
                 "select_prompts")
# what an identity recorded before a key existed means: the setting's default then
IDENTITY_DEFAULTS = {"select_prompts": "tight"}
LEGACY_AMP = ("auto", "true")  # identities of older checkpoints recorded the amp setting, not the dtype it ran


def identity(settings: Any, image_size: int, base_sha256: str | None, recipe: Any = None,
             precision: Any = None, split: Mapping[str, Any] | None = None, spec: Any = None) -> dict[str, Any]:
    """The settings that decide what a training run learns and where it reports (see the module docstring).

    ``amp`` is the dtype training autocasts to (``precision``, the run's resolved
    :class:`~cobot_med.engine.precision.Precision`; resolved here for the settings' device when not given).
    ``split`` is :func:`split_record` of the run's split; ``spec`` the built model's
    :class:`~cobot_med.model.ModelSpec` (its arch, method and options are what trains, whatever the settings
    said: an adapter's own)."""
    from ..redact import redact

    if precision is None:
        from .network import resolve_device
        from .precision import resolve_precision

        precision = resolve_precision(settings.amp, resolve_device(settings.device), training=True)
    model = spec if spec is not None else settings
    return {
        "dataset": settings.dataset, "layout": settings.layout,
        "dataset_dir": str(absolute(settings.dataset_dir)) if settings.dataset_dir and not settings.datalist else "",
        "datalist": str(absolute(settings.datalist)) if settings.datalist else "",
        "val_fraction": settings.val_fraction, "test_fraction": settings.test_fraction, "seed": settings.seed,
        "arch": model.arch, "image_size": int(image_size), "peft": model.peft,
        "peft_options": json.loads(json.dumps(model.peft_options, sort_keys=True, default=str)),
        "sam_checkpoint_sha256": base_sha256, "lr": settings.lr,
        "cobot_lr": settings.cobot_lr, "weight_decay": settings.weight_decay, "batch_size": settings.batch_size,
        "jitter": settings.jitter, "min_area": settings.min_area, "modality": settings.effective_modality,
        "recipe": recipe.to_dict() if recipe is not None else None, "amp": precision.name,
        "tracking_uri": redact(tracking.resolve_tracking_uri(settings.tracking_uri, settings.output_path)),
        "split": dict(split) if split is not None else None,
        "select_prompts": settings.select_prompts,
    }


def split_record(split: Mapping[str, Any], digests: Any = None) -> dict[str, list[list[Any]]]:
    """A split's content as the identity holds it: per split, ``[case_id, image SHA-256, label SHA-256]`` for
    every case in order (:class:`cobot_med.files.Digests`; per-organ label files hashed together)."""
    from ..files import Digests

    digests = digests or Digests()
    return {name: [[str(case.get("case_id")), digests.of(case.get("image")), digests.of(case.get("label"))]
                   for case in split.get(name) or []]
            for name in sorted(split)}


def epochs_done(state: Mapping[str, Any]) -> int:
    """The epochs a resume checkpoint has completed: recorded as ``epochs_done``, or (older checkpoints) the
    trainer's iteration count over its epoch length (ignite's ``state_dict`` holds no epoch)."""
    if "epochs_done" in state:
        return int(state["epochs_done"])
    trainer = state.get("trainer") or {}
    length = int(trainer.get("epoch_length") or 0)
    return int(trainer.get("iteration", 0)) // length if length > 0 else int(trainer.get("epoch", 0))


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
    # filled as the run goes, for its summary (engine.workflow.say_summary)
    test_scores: tuple[dict[str, float], dict[str, dict]] | None = None  # (metrics, protocol blocks)
    mlflow_run_id: str | None = None  # once finish() has found and closed the run

    @property
    def resuming(self) -> bool:
        return self.checkpoint is not None

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT_NAME

    @classmethod
    def start(cls, settings: Any, network: torch.nn.Module, precision: Any = None,
              split: Mapping[str, Any] | None = None) -> "TrainingSession":
        """Decide fresh or resume for ``settings`` with the built ``network``, the run's resolved ``precision``
        and its ``split`` (see :func:`identity`); clears or refuses as above, then writes ``datalist.json``.

        Under torchrun the first process decides (and deletes) and the others follow its decision."""
        from ..adapter import unwrap
        from ..distributed import rank as process_rank, world_size
        from ..files import DIGESTS_NAME, Digests

        model = unwrap(network)
        out = settings.output_path
        decision: tuple[str | None, bool, str | None] = (None, False, None)  # (run key, resuming, error)
        ident: dict[str, Any] = {}
        if process_rank() == 0:
            digests = Digests(out / DIGESTS_NAME)
            record = split_record(split, digests) if split is not None else None
            ident = identity(settings, model.spec.image_size, model.base_sha256, model.recipe, precision, record,
                             model.spec)
            try:
                run_key, resuming = _decide(settings, out, ident)
                decision = (run_key, resuming, None)
            except SettingsError as err:
                decision = (None, False, str(err))
            else:
                digests.save()
                if split is not None:
                    from ..data.dataset import record_split

                    record_split(settings, split)
        if world_size() > 1:
            import torch.distributed as dist

            shared = [(decision, ident)]
            dist.broadcast_object_list(shared, src=0)
            decision, ident = shared[0]
        run_key, resuming, error = decision
        if error:
            raise SettingsError(error)
        checkpoint = read_checkpoint(out / CHECKPOINT_NAME) if resuming else None
        name = tracking.run_name(settings.dataset, model.spec.peft, model.spec.arch, model.spec.image_size,
                                 settings.seed, run_key)
        uri = tracking.resolve_tracking_uri(settings.tracking_uri, out)
        session = cls(out, ident, run_key, uri, tracking.experiment_name(settings.dataset), name, checkpoint)
        if process_rank() == 0:
            on_failure(f"training:{name}", functools.partial(tracking.mark_failed, session.tracking_uri,
                                                             session.experiment, name))
            set_interrupt_note(f"start the same command again to resume the run from its last finished epoch "
                               f"({out / CHECKPOINT_NAME})")
        return session

    def finish(self, artifacts_dir: Path | None = None) -> None:
        """The run's test evaluation is done: tag it finished in MLflow and in its checkpoint."""
        on_failure(f"training:{self.run_name}", None)
        self.mlflow_run_id = tracking.mark_finished(self.tracking_uri, self.experiment, self.run_name,
                                                    artifacts_dir or self.output_dir)
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
            details = "; ".join(_difference(k, recorded.get(k), ident.get(k)) for k in differ)
            raise SettingsError(f"{path} belongs to a run with other settings ({details}). Resume it with its own "
                                "settings, choose another output_dir, or pass --overwrite true to replace it")
        if state.get("finished"):
            raise SettingsError(f"{out} holds a finished run (MLflow run {state.get('run_name')}); nothing to resume. "
                                "Choose another output_dir, or pass --overwrite true to train again there")
        done = epochs_done(state)
        if done > settings.epochs:
            raise SettingsError(f"{path} has trained {done} epochs already, more than epochs={settings.epochs}; "
                                f"pass --epochs {done} or more to resume it")
        return str(state["run_key"]), True
    from .checks import foreign_results

    others = foreign_results(out, "training")
    if others and not settings.overwrite:
        raise SettingsError(f"output_dir {out} holds {others}; choose another output_dir, or pass --overwrite true to "
                            "train beside them")
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


def _difference(key: str, there: Any, now: Any) -> str:
    """One identity key's difference, in a few words (a split: which cases, not two lists of digests)."""
    if key == "split" and there is None:
        return "split: not recorded there (a checkpoint of an older version), its content now"
    if key != "split" or not isinstance(there, dict) or not isinstance(now, dict):
        return f"{key}: {there!r} there, {now!r} now"
    changes = []
    for name in sorted(set(there) | set(now)):
        old = {row[0]: row[1:] for row in there.get(name) or []}
        new = {row[0]: row[1:] for row in now.get(name) or []}
        parts = [f"{label} {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}" for label, ids in (
            ("added", sorted(set(new) - set(old))), ("gone", sorted(set(old) - set(new))),
            ("files changed", sorted(c for c in set(old) & set(new) if old[c] != new[c]))) if ids]
        if parts:
            changes.append(f"{name}: {'; '.join(parts)}")
    return "split: the cases differ (" + " | ".join(changes or ["order"]) + ")"
