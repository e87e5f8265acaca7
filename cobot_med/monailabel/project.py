"""Every call the MONAI Label app makes into cobot-med, in one place.

The app (``cobot_med.monailabel``) speaks MONAI Label's language (requests, datastore, tasks); this
module speaks the project's: the dataset layouts, the volume chain, the box prompts of
``docs/inference.md``, the slice -> volume predictor, the adapter loader and the bundle training.
When those move, only this module changes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..adapter import AdapterError, read_adapter_config
from ..data.layouts import get_layout
from ..data.transforms import volume_transforms
from ..engine.amp import autocast
from ..engine.setup import SettingsError, check_model_settings, experiment_name
from ..inference import io as case_io
from ..inference.predict import SlicePredictor, model_images, predict_case
from ..inference.prompts import (BoxFile, CasePrompts, OrganPrompt, PromptError, mask_box, original_affine,
                                 oriented_affine)
from ..inference.runner import load_network, to_input_geometry
from ..sam.build import get_architecture

THRESHOLD = 0.5  # probability -> mask, as the batch inference does
BASE_SEED = 0  # a base without weights (the ``tiny`` test arch) is built from this seed in every process

__all__ = [
    "AdapterError", "SettingsError", "DatasetInfo", "dataset_info", "BadPrompt", "check_base", "adapter_model", "load_model",
    "load_volume", "Interaction", "segment", "to_file", "read_volume", "write_label", "train_round",
    "finished_run",
]


# --- dataset -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the app needs of a dataset layout: its label map and how its volumes are read."""

    name: str
    organs: dict[str, int]  # organ -> label id, the layout's order
    ct_window: tuple[float, float]
    modality: str

    def chain(self) -> Any:
        """The project's volume chain (load, checks, ``Orientationd("RAS")``, intensity window); built once."""
        return _volume_chain(self.name, tuple(self.organs.values()), self.ct_window, self.modality)


@functools.lru_cache(maxsize=None)
def _volume_chain(name: str, organ_ids: tuple[int, ...], window: tuple[float, float], modality: str) -> Any:
    return volume_transforms(list(organ_ids), list(window), modality, name)


def dataset_info(name: str) -> DatasetInfo:
    layout = get_layout(name)  # ValueError naming the known layouts
    return DatasetInfo(layout.name, dict(layout.organs), tuple(layout.ct_window), layout.modality)


# --- model -------------------------------------------------------------------------------------


def check_base(arch: str, image_size: int | None, sam_checkpoint: str | None, peft: str = "frozen") -> None:
    """The base SAM settings and the training method, checked before anything is loaded (``SettingsError``)."""
    check_model_settings(arch, image_size, peft, sam_checkpoint)


def adapter_model(path: str | Path) -> dict[str, Any]:
    """The model an adapter was trained as (arch, peft, image_size, ...); ``AdapterError`` if unusable."""
    return dict(read_adapter_config(path)["model"])


def load_model(arch: str, image_size: int | None, adapter: str | Path | None, sam_checkpoint: str | None,
               device: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network for inference (LoRA merged) and its description, as ``cobot-med infer`` loads it.

    A base without official weights (``tiny``) is randomly initialised; the fixed seed makes every
    process (server, training round, tests) build the same one.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASE_SEED)
        return load_network(adapter or None, sam_checkpoint or None, arch, image_size, device)


# --- one volume --------------------------------------------------------------------------------


def load_volume(path: str | Path, data: DatasetInfo) -> dict:
    """``{"image": oriented (1, X, Y, Z) MetaTensor in [0, 255], ...}`` through the dataset's volume chain."""
    return data.chain()({"image": str(path)})


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


def _roi_prompt(image: Any, organ: str, organ_id: int, roi: Sequence[float], kind: str) -> OrganPrompt:
    """The ROI as a boxes-file entry (docs/inference.md, voxel space) through the project's own BoxFile."""
    with tempfile.TemporaryDirectory(prefix="cobot-med-roi-") as folder:
        path = Path(folder) / "boxes.json"
        path.write_text(json.dumps({"space": "voxel", "cases": {"request": {organ: {kind: [float(v) for v in roi]}}}}))
        try:
            prompts = BoxFile(path, {organ: organ_id}).for_case("request", image, {organ: organ_id})
        except PromptError as err:  # the message names the temporary file: say it about the ROI
            raise BadPrompt(f"the ROI {list(roi)} cannot be used: {str(err).rsplit(': ', 1)[-1]}") from None
    prompt = prompts.prompts[0]
    if not prompt.has_prompt:
        raise BadPrompt(f"the ROI {list(roi)} lies outside the image (voxel shape "
                            f"{list(image.meta['spatial_shape'])})")
    return prompt


def _click_slices(image: Any, interaction: Interaction) -> dict[int, list[tuple[int, int, int]]]:
    """Clicks in the oriented grid, by axial slice: ``{z: [(x, y, label 1|0)]}``, in the order given."""
    shape = tuple(int(n) for n in image.shape[-3:])
    by_slice: dict[int, list[tuple[int, int, int]]] = {}
    for label, points in ((1, interaction.foreground), (0, interaction.background)):
        for given, (x, y, z) in zip(points, _to_oriented(points, image)):
            if not (0 <= x < shape[0] and 0 <= y < shape[1] and 0 <= z < shape[2]):
                raise BadPrompt(f"the click {list(given)} lies outside the image (voxel shape "
                                    f"{list(image.meta['spatial_shape'])})")
            by_slice.setdefault(z, []).append((x, y, label))
    return by_slice


@torch.no_grad()
def _predict_clicked(network: Any, volume: torch.Tensor, z: int, clicks: list[tuple[int, int, int]],
                     box: list[float] | None, device: str, amp: bool | str) -> torch.Tensor:
    """Probabilities (X, Y) of one slice from its clicks (and its box, if any), resized as the predictor does."""
    X, Y, _ = volume.shape
    S = int(network.image_size)
    images = model_images(volume, [z], S).to(device)
    coords = torch.tensor([[[y * S / Y, x * S / X] for x, y, _ in clicks]], dtype=torch.float32)  # XY = (column, row)
    labels = torch.tensor([[label for _, _, label in clicks]])
    boxes = None if box is None else (torch.tensor([[box]]) * torch.tensor([S / Y, S / X, S / Y, S / X]))
    with autocast(device, amp):
        logits = network(images, None if boxes is None else boxes.to(device), output_size=(X, Y),
                         points=(coords[None].to(device), labels[None].to(device)))
    return logits.float().sigmoid()[0, 0].cpu()


def segment(network: Any, data: dict, organ: str, organ_id: int, interaction: Interaction, propagation: str,
            device: str, batch_size: int = 8, amp: bool | str = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """One organ from an ROI and clicks -> oriented label (1, X, Y, Z) uint8 (``organ_id`` inside) and what was done.

    - ROI: a 3D box (``box3d``: every axial slice inside gets its footprint) or a key slice (``key_slice``:
      its middle slice, propagated both ways until the organ vanishes), as ``cobot-med infer --boxes``.
    - Clicks: every slice with clicks is predicted again from its clicks and its box (if the ROI prompts that
      slice), as SAM's prompt encoder takes them, and replaces that slice.
    - Clicks without an ROI: the slice of the first foreground click is predicted from its clicks; the box of
      that mask becomes the key slice that propagates through the volume.
    """
    image = data["image"]
    volume = torch.as_tensor(image.as_tensor() if hasattr(image, "as_tensor") else image)[0].float()
    X, Y, Z = volume.shape
    clicked = _click_slices(image, interaction)
    predictor = SlicePredictor(network, device, batch_size, amp)
    if interaction.roi is not None:
        prompt = _roi_prompt(image, organ, organ_id, interaction.roi, propagation)
    else:
        key = _to_oriented(interaction.foreground[:1], image)[0][2]
        seed = _predict_clicked(network, volume, key, clicked[key], None, device, amp)
        box = mask_box(seed > THRESHOLD)
        prompt = OrganPrompt("clicks", key=(key, box)) if box is not None else OrganPrompt("none", note="empty")
    prompts = CasePrompts({organ: organ_id}, [prompt], Z)
    if prompt.has_prompt:
        probs, used = predict_case(predictor, volume, prompts, THRESHOLD)
    else:
        probs, used = torch.zeros(1, X, Y, Z), [{}]
    for z, clicks in sorted(clicked.items()):  # with the box the model used there (fixed or propagated), if any
        probs[0, :, :, z] = _predict_clicked(network, volume, z, clicks, used[0].get(z), device, amp)
    label = ((probs[0] > THRESHOLD).to(torch.uint8) * int(organ_id))[None]
    record = {"prompt": prompt.kind, "slices_prompted": sorted(set(used[0]) | set(clicked)),
              "clicked_slices": sorted(clicked), "extent": prompt.extent}
    return label, record


def to_file(label: torch.Tensor, data: dict, data_spec: DatasetInfo) -> Any:
    """An oriented (1, X, Y, Z) label -> MetaTensor in the input file's own grid (MONAI ``Invertd``)."""
    return to_input_geometry(label.float(), data["image"], data_spec.chain(), nearest=True)


# --- label files -------------------------------------------------------------------------------


def read_volume(path: str | Path) -> Any:
    """A volume file as a MetaTensor in its own storage order with its RAS affine (any format MONAI reads)."""
    from monai.transforms import LoadImage

    return LoadImage(image_only=True)(str(path))


def write_label(array: np.ndarray, reference: Any, path: str | Path) -> Path:
    """A uint8 label with ``reference``'s geometry (a MetaTensor from :func:`read_volume`) as NIfTI."""
    from monai.data import MetaTensor

    volume = MetaTensor(torch.as_tensor(np.asarray(array, dtype=np.uint8))[None], meta=dict(reference.meta))
    return case_io.write_volume(volume, path, np.uint8)


# --- training ----------------------------------------------------------------------------------


def train_round(datalist: str | Path, output_dir: str | Path, data_spec: DatasetInfo, *, arch: str,
                image_size: int | None, peft: str, adapter: str | None, sam_checkpoint: str | None,
                epochs: int, tracking_uri: str, run_name: str, device: str, amp: bool = True,
                optimiser: Mapping[str, float] | None = None) -> None:
    """Fine-tune an adapter on ``datalist`` with the dataset's bundle (``training`` run id), tracked in MLflow.

    Starting from ``adapter`` (its own arch, input size and method win) when given, else from the base with
    ``peft`` at ``image_size`` (the arch's default when None: the bundles' own default is ViT-B's 1024).
    ``optimiser``: ``lr`` / ``cobot_lr`` overrides (the bundle's defaults otherwise).
    """
    from ..bundle import run_bundle

    if adapter:
        spec = adapter_model(adapter)
        arch, image_size, peft = spec["arch"], spec["image_size"], spec["peft"]
    image_size = int(image_size or get_architecture(arch).default_image_size)
    settings = dict(datalist=str(datalist), dataset_dir="", output_dir=str(output_dir), arch=arch,
                    image_size=image_size, peft=peft, adapter=str(adapter or ""), sam_checkpoint=str(sam_checkpoint or ""),
                    epochs=int(epochs), tracking_uri=tracking_uri, mlflow_run_name=run_name, resume=False,
                    device=device, amp=bool(amp), num_workers=0, seed=BASE_SEED)
    settings.update({k: float(v) for k, v in (optimiser or {}).items()})
    run_bundle(data_spec.name, "training", **settings)


def finished_run(tracking_uri: str, data_spec: DatasetInfo, run_name: str) -> dict[str, Any]:
    """The newest MLflow run called ``run_name`` in the dataset's experiment: id, status and its last metrics."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name(data_spec.name))
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return {}
    run = runs[0]
    return {"run_id": run.info.run_id, "status": run.info.status, "experiment": experiment_name(data_spec.name),
            "metrics": {k: float(v) for k, v in run.data.metrics.items()}}
