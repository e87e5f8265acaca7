"""Every call the MONAI Label app makes into cobot-med, in one place.

The app (``cobot_med.monailabel``) speaks MONAI Label's language (requests, datastore, tasks); this
module speaks the project's, through its single paths (docs/CONTRACTS.md): the run settings
(:func:`cobot_med.settings.load_settings`), the model ``cobot-med infer`` loads
(:func:`cobot_med.inference.load_network`), the run's volume chain for the model's input recipe
(:func:`cobot_med.data.chains.run_volume_chain`), the box prompts of ``docs/inference.md``
(:func:`cobot_med.predict.prompts.box_prompt`), the slice predictor and key-slice propagation
(:mod:`cobot_med.predict`), the label writer, the dataset's bundle for training and the MLflow rules
(:mod:`cobot_med.engine.tracking`). When those move, only this module changes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..adapter import AdapterError, read_adapter_config
from ..data.boxes import mask_boxes
from ..engine import tracking
from ..errors import SettingsError
from ..model import ModelSpec
from ..predict import THRESHOLD, CasePrompts, OrganPrompt, SlicePredictor, predict_volume, to_label_map
from ..predict.prompts import box_prompt, original_affine, oriented_affine
from ..predict.volume import MEMORY
from ..predict.writing import to_input_geometry, write_volume
from ..settings import RunSettings, load_settings

BASE_SEED = 0  # a base without weights (the ``tiny`` test arch) is built from this seed in every process

__all__ = [
    "AdapterError", "SettingsError", "RunSettings", "BASE_SEED", "base_settings", "with_settings",
    "check_model_files", "check_tracking", "adapter_spec", "load_model", "volume_chain", "load_volume",
    "Interaction", "BadPrompt", "segment", "to_file", "read_volume", "write_label", "train_round", "finished_run",
    "adapter_weights_sha256", "evaluate_adapter", "record_judging",
]


# --- settings ----------------------------------------------------------------------------------


def base_settings(dataset: str) -> RunSettings:
    """The bundles' settings of ``dataset`` (``adome``, ``segrap``, ``spleen``: a layer of ``bundles/``);
    :class:`SettingsError` naming the known ones when there is no such bundle."""
    return load_settings(dataset)


def with_settings(settings: RunSettings, **changes: Any) -> RunSettings:
    """``settings`` with ``changes``, checked again by :class:`RunSettings` (SettingsError naming the value)."""
    return dataclasses.replace(settings, **changes)


def check_model_files(settings: RunSettings) -> None:
    """The adapter and base checkpoint exist; an official arch without an adapter has its weights."""
    from ..engine.checks import check_model_files as check

    check(settings)


def check_tracking(settings: RunSettings) -> str:
    """The MLflow store of the app's runs, by the project's rule, asked once (SettingsError when unusable)."""
    uri = tracking.resolve_tracking_uri(settings.tracking_uri, settings.output_path)
    return tracking.check_tracking_uri(uri)


def adapter_spec(path: str | Path) -> ModelSpec:
    """The model an adapter was trained as (arch, peft, image_size, ...); ``AdapterError`` if unusable."""
    return read_adapter_config(path)["spec"]


def adapter_weights_sha256(path: str | Path) -> str | None:
    """The SHA-256 of an adapter's weights, as its config records it (what ``load_network`` checks and reports)."""
    return read_adapter_config(path).get("weights_sha256")


# --- model -------------------------------------------------------------------------------------


def load_model(settings: RunSettings, device: str | torch.device) -> tuple[torch.nn.Module, dict[str, Any], Any]:
    """The network for inference, its description, and the precision ``settings.amp`` resolves to on ``device``
    (a :class:`~cobot_med.engine.precision.Precision`), as ``cobot-med infer`` loads and runs it
    (:func:`cobot_med.inference.load_network`: the adapter's own model, or zero-shot on the base; LoRA merged).

    A base without official weights (``tiny``) is randomly initialised; the fixed seed makes every
    process (server, training round, tests) build the same one.
    """
    from ..inference import load_network

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASE_SEED)
        network, info = load_network(settings, device)
    precision = settings.speed_choices(device, training=False).precision
    return network, {**info, "precision": precision.name, "precision_reason": precision.reason}, precision


def volume_chain(settings: RunSettings, network: Any) -> Any:
    """The run's volume chain (load, checks, ``Orientationd("RAS")``, the CT window of the model's input recipe)."""
    from ..data.chains import run_volume_chain
    from ..predict.slices import recipe_of

    return run_volume_chain(settings, recipe_of(network))


def load_volume(path: str | Path, chain: Any) -> dict:
    """``{"image": oriented (1, X, Y, Z) MetaTensor in [0, 255], ...}`` through the volume chain."""
    return chain({"image": str(path)})


# --- one volume --------------------------------------------------------------------------------


@dataclasses.dataclass
class Interaction:
    """One request's prompts in the file's own voxel indices (what Slicer and OHIF send).

    ``roi``: two opposite corners ``[i0, j0, k0, i1, j1, k1]`` (inclusive) or None; ``foreground`` /
    ``background``: clicks ``[i, j, k]``.
    """

    roi: list[float] | None
    foreground: list[list[float]]
    background: list[list[float]]


class BadPrompt(ValueError):
    """A prompt that cannot be used, e.g. outside the volume (the message names it and the volume's shape)."""


def _to_oriented(points: Sequence[Sequence[float]], image: Any) -> list[tuple[int, int, int]]:
    """File voxel indices -> voxel indices of the oriented grid (the volume chain only permutes and flips)."""
    if not points:
        return []
    file_to_oriented = np.linalg.inv(oriented_affine(image)) @ original_affine(image)
    homogeneous = np.c_[np.asarray(points, dtype=np.float64), np.ones(len(points))]
    return [tuple(int(v) for v in np.rint(p[:3])) for p in homogeneous @ file_to_oriented.T]


def _shape_text(image: Any) -> str:
    return str([int(n) for n in image.meta.get("spatial_shape", image.shape[-3:])])


def _roi_prompt(image: Any, roi: Sequence[float], kind: str) -> OrganPrompt:
    """The ROI as a voxel-space box prompt (:func:`cobot_med.predict.prompts.box_prompt`, as a boxes file's entry)."""
    prompt = box_prompt(kind, [float(v) for v in roi], "voxel", image)
    if not prompt.has_prompt:
        raise BadPrompt(f"the ROI {list(roi)} lies outside the image (voxel shape {_shape_text(image)})")
    return prompt


def _click_slices(image: Any, interaction: Interaction) -> dict[int, list[tuple[int, int, int]]]:
    """Clicks in the oriented grid, by axial slice: ``{z: [(x, y, label 1|0)]}``, in the order given."""
    shape = tuple(int(n) for n in image.shape[-3:])
    by_slice: dict[int, list[tuple[int, int, int]]] = {}
    for label, points in ((1, interaction.foreground), (0, interaction.background)):
        for given, (x, y, z) in zip(points, _to_oriented(points, image)):
            if not (0 <= x < shape[0] and 0 <= y < shape[1] and 0 <= z < shape[2]):
                raise BadPrompt(f"the click {list(given)} lies outside the image (voxel shape {_shape_text(image)})")
            by_slice.setdefault(z, []).append((x, y, label))
    return by_slice


def _clicked(predictor: SlicePredictor, volume: torch.Tensor, z: int, clicks: list[tuple[int, int, int]],
             box: list[float] | None) -> torch.Tensor:
    """Probabilities (X, Y) of slice ``z`` from its clicks (row x, column y) and its box, if any."""
    points = [[float(y), float(x)] for x, y, _ in clicks]  # XY of the slice grid: x along Y (columns)
    return predictor.clicked(volume, z, points, [label for _, _, label in clicks], box)


def segment(network: Any, data: dict, organ: str, organ_id: int, interaction: Interaction, propagation: str,
            device: str | torch.device, batch_size: int,
            amp: Any = False, propagator: str = "boxes") -> tuple[torch.Tensor, dict[str, Any]]:
    """One organ from an ROI and clicks -> oriented label (1, X, Y, Z) uint8 (``organ_id`` inside) and what was done.

    - ROI: a 3D box (``box3d``: every axial slice inside gets its footprint) or a key slice (``key_slice``:
      its middle slice, propagated both ways until the organ vanishes), as ``cobot-med infer --boxes``
      (:func:`cobot_med.predict.predict_volume`).
    - Clicks: every slice with clicks is predicted again from its clicks and its box (if the ROI prompts that
      slice; under ``sam2_memory``, the box of the memory's mask there), as SAM's prompt encoder takes them, and
      replaces that slice.
    - Clicks without an ROI: the slice of the first foreground click is predicted from its clicks; the box of
      that mask (:func:`cobot_med.data.boxes.mask_boxes`) becomes the key slice that propagates through the volume.
    - ``propagator``: how a key slice propagates, ``boxes`` or ``sam2_memory`` (SAM 2's video predictor), as
      ``cobot-med infer --propagator``; a 3D box prompts every slice itself and propagates nothing.
    """
    image = data["image"]
    volume = torch.as_tensor(image.as_tensor() if hasattr(image, "as_tensor") else image)[0].float()
    X, Y, Z = volume.shape
    clicked = _click_slices(image, interaction)
    predictor = SlicePredictor(network, device, batch_size, amp, propagator=propagator)
    if interaction.roi is not None:
        prompt = _roi_prompt(image, interaction.roi, propagation)
    else:
        key = _to_oriented(interaction.foreground[:1], image)[0][2]
        seed = _clicked(predictor, volume, key, clicked[key], None)
        box, found = mask_boxes(seed > THRESHOLD)
        prompt = OrganPrompt("clicks", key=(key, box.tolist())) if found else OrganPrompt("none", note="empty")
    prompts = CasePrompts({organ: organ_id}, [prompt], Z)
    if prompt.has_prompt:
        probs, used = predict_volume(predictor, volume, prompts)
    else:
        probs, used = torch.zeros(1, X, Y, Z), [{}]
    for z, clicks in sorted(clicked.items()):  # with the box the model used there (fixed or propagated), if any
        box = used[0].get(z)
        if box is None and propagator == MEMORY and prompt.has_prompt:  # SAM 2's memory sends no box: its mask's
            mask_box, found = mask_boxes(probs[0, :, :, z] > THRESHOLD)
            box = mask_box.tolist() if found else None
        probs[0, :, :, z] = _clicked(predictor, volume, z, clicks, box)
    label = to_label_map(probs, [int(organ_id)])
    record = {"prompt": prompt.kind, "propagator": propagator, "slices_prompted": sorted(set(used[0]) | set(clicked)),
              "clicked_slices": sorted(clicked), "extent": prompt.extent}
    return label, record


def to_file(label: torch.Tensor, data: dict, chain: Any) -> Any:
    """An oriented (1, X, Y, Z) label -> MetaTensor in the input file's own grid (MONAI ``Invertd`` of the chain)."""
    return to_input_geometry(label.float(), data["image"], chain, nearest=True)


# --- label files -------------------------------------------------------------------------------


def read_volume(path: str | Path) -> Any:
    """A volume file as a MetaTensor in its own storage order with its RAS affine (any format MONAI reads)."""
    from monai.transforms import LoadImage

    return LoadImage(image_only=True)(str(path))


def write_label(array: np.ndarray, reference: Any, path: str | Path) -> Path:
    """A uint8 label with ``reference``'s geometry (a MetaTensor in its file's grid) as NIfTI, atomically."""
    from monai.data import MetaTensor

    volume = MetaTensor(torch.as_tensor(np.asarray(array, dtype=np.uint8))[None], meta=dict(reference.meta))
    return write_volume(volume, path, np.uint8)


# --- training ----------------------------------------------------------------------------------


def train_round(settings: RunSettings, datalist: str | Path, output_dir: str | Path, *, peft: str,
                adapter: str | None, epochs: int, device: str,
                optimiser: Mapping[str, float] | None = None) -> None:
    """Fine-tune an adapter on ``datalist`` with the dataset's bundle (``training`` run id), tracked in MLflow
    by the project's rules (experiment ``cobot-med/<dataset>``, the run named by the training session).

    Starting from ``adapter`` (its own arch, input size and method win) when given, else from the served
    model's base (``settings``' arch and input size) with ``peft``. ``optimiser``: ``lr`` / ``cobot_lr``
    overrides (the bundle's defaults otherwise).
    """
    from ..bundle import run_bundle

    overrides = dict(datalist=str(datalist), dataset_dir="", output_dir=str(output_dir), arch=settings.arch,
                     image_size=None if adapter else settings.image_size,  # an adapter's own size, never another
                     peft=peft, adapter=str(adapter or ""),
                     sam_checkpoint=settings.sam_checkpoint, epochs=int(epochs),
                     tracking_uri=check_tracking(settings), resume=False, device=device, amp=settings.amp,
                     num_workers=0, seed=BASE_SEED)
    overrides.update({k: float(v) for k, v in (optimiser or {}).items()})
    run_bundle(settings.dataset, "training", **overrides)


def finished_run(round_dir: str | Path, tracking_uri: str) -> dict[str, Any]:
    """The MLflow run a round's training made (named by the session, recorded in its ``resolved_settings.json``):
    run name and id, status, experiment and its last metrics; {} when there is none."""
    try:
        resolved = json.loads((Path(round_dir) / "resolved_settings.json").read_text())
    except (OSError, ValueError):
        return {}
    name, dataset = resolved.get("run_name"), resolved.get("settings", {}).get("dataset")
    experiment = tracking.experiment_name(dataset)
    run = tracking.find_run(tracking_uri, experiment, name) if name and dataset else None
    if run is None:
        return {}
    return {"run_name": name, "run_key": resolved.get("run_key"), "run_id": run.info.run_id,
            "status": run.info.status, "experiment": experiment,
            "metrics": {k: float(v) for k, v in run.data.metrics.items()}}


def evaluate_adapter(settings: RunSettings, datalist: str | Path, output_dir: str | Path, *, adapter: str | None,
                     protocol: str, device: str) -> dict[str, Any]:
    """Score ``adapter`` (None: the base zero-shot) on ``datalist``'s test split with the dataset's bundle
    (``evaluate`` run id: the predictor, prompts and DSC of every test score, :mod:`cobot_med.engine.evaluation`)
    under ``protocol``; ``{"dsc": mean over the counted (case, organ) pairs or None, "organs": {...}, "cases":
    counted, "evaluation": evaluation.json}``."""
    import math

    from ..bundle import run_bundle

    overrides = dict(datalist=str(datalist), dataset_dir="", output_dir=str(output_dir), arch=settings.arch,
                     image_size=None if adapter else settings.image_size,
                     peft=settings.peft if adapter else "frozen", adapter=str(adapter or ""),
                     sam_checkpoint=settings.sam_checkpoint, prompts=protocol, tracking_uri=check_tracking(settings),
                     device=device, amp=settings.amp, num_workers=0, seed=BASE_SEED)
    run_bundle(settings.dataset, "evaluate", **overrides)
    path = Path(output_dir) / "evaluation.json"
    block = (json.loads(path.read_text()).get("protocols") or {}).get(protocol)
    if block is None:
        raise RuntimeError(f"{path} holds no {protocol} scores: no held-out case was scored")

    def number(value: Any) -> float | None:
        return None if value is None or not math.isfinite(float(value)) else float(value)

    return {"dsc": number(block["dsc"]), "cases": block.get("cases_counted"),
            "organs": {organ: number(scores.get("dsc")) for organ, scores in block["organs"].items()},
            "evaluation": str(path)}


def record_judging(tracking_uri: str, run_id: str, metrics: Mapping[str, float | None],
                   tags: Mapping[str, Any]) -> None:
    """Add a round's judging to its MLflow run (metrics that are numbers, tags as text)."""
    store = tracking.client(tracking_uri)
    for key, value in metrics.items():
        if value is not None:
            store.log_metric(run_id, key, float(value))
    for key, value in tags.items():
        store.set_tag(run_id, key, str(value))
