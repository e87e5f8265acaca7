"""Checks of what a run needs from the machine: device, model files, data, folders. Each raises
:class:`~cobot_med.errors.SettingsError` with what to do, before any data is read or any weight loaded.

Called once, by :meth:`cobot_med.settings.RunSettings.check`, for the run id about to run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SettingsError

# what a training run leaves that another run must not silently replace (engine.session); here, so that the
# exported-model path's checks read it without importing the training session
RESULTS = ("adapter_best", "adapter_latest", "resume.pt", "test_predictions", "evaluation.json")

if TYPE_CHECKING:
    from ..settings import RunSettings

SAM_DOWNLOADS = "https://github.com/facebookresearch/segment-anything#model-checkpoints"
MEDSAM_DOWNLOADS = "https://github.com/bowang-lab/MedSAM#model-checkpoints"


def check_device(device: str) -> None:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` (or another torch device) that this machine has."""
    import torch

    if device == "auto":
        return
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise SettingsError(f"device {device!r} is not a torch device ({err}); use auto, cpu, cuda or cuda:N") from None
    if wanted.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(f"device {device!r}: this machine has no CUDA GPU that torch can use "
                                "(torch.cuda.is_available() is False); use device=auto or cpu")
        if wanted.index is not None and wanted.index >= torch.cuda.device_count():
            raise SettingsError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) here")
    elif wanted.type not in ("cpu", "mps", "xpu"):
        raise SettingsError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")


def check_model_files(settings: "RunSettings") -> None:
    """The adapter and base checkpoint exist; an official arch without an adapter needs its checkpoint."""
    from ..sam.build import get_architecture

    if settings.adapter and not Path(settings.adapter).exists():
        raise SettingsError(f"adapter {settings.adapter} does not exist (an adapter_best/ folder or its "
                            "adapter_model.safetensors)")
    if settings.sam_checkpoint:
        if not Path(settings.sam_checkpoint).is_file():
            raise SettingsError(f"sam_checkpoint {settings.sam_checkpoint} does not exist; official files: "
                                f"{SAM_DOWNLOADS}")
        return
    arch = get_architecture(settings.arch)
    if arch.official_checkpoint and not arch.packaged_checkpoint and not settings.adapter:
        owner, where = ("MedSAM's", MEDSAM_DOWNLOADS) if arch.recipe == "medsam" else ("Meta's", SAM_DOWNLOADS)
        raise SettingsError(
            f"sam_checkpoint is empty, but arch {settings.arch} needs {owner} weights: download "
            f"{arch.official_checkpoint} ({where}) and pass --sam_checkpoint PATH, or pass --arch lite_medsam for "
            "the LiteMedSAM base that ships with the install")


def check_data(settings: "RunSettings") -> None:
    """A datalist file, or a dataset folder in the layout's tree."""
    spec = settings.layout_spec
    if settings.datalist:
        if not Path(settings.datalist).is_file():
            raise SettingsError(f"datalist {settings.datalist} does not exist (write one with `cobot-med datalist`)")
        return
    if not settings.dataset_dir or not Path(settings.dataset_dir).is_dir():
        raise SettingsError(
            f"dataset_dir {settings.dataset_dir!r} does not exist. The {settings.layout} bundle expects the "
            f"{spec.title} layout:\n{spec.tree}\nGet the data from {spec.source}, or try it on phantoms: "
            f"`cobot-med make-phantoms --layout {settings.layout} --out phantoms/{settings.layout}` then "
            f"--dataset_dir phantoms/{settings.layout}")


def check_output_dir(path: Path) -> None:
    """The output folder is a folder (or can be made) and this user can write into it."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise SettingsError(f"output_dir {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SettingsError(f"output_dir {path}: {existing} is not writable by this user")


def check_inference(settings: "RunSettings") -> None:
    """An input folder, a prompt source, and an output folder outside the inputs."""
    if not settings.input_dir:
        raise SettingsError("input_dir is empty: pass --input_dir DIR (a folder of .nii/.nii.gz files or DICOM "
                            "folders)")
    if not Path(settings.input_dir).is_dir():
        raise SettingsError(f"input folder {settings.input_dir} does not exist or is not a folder")
    if not settings.labels_dir and not settings.boxes_file:
        raise SettingsError("no prompt source: give a labels folder (--labels DIR) or a boxes file (--boxes FILE)")
    if settings.labels_dir and not Path(settings.labels_dir).is_dir():
        raise SettingsError(f"labels folder {settings.labels_dir} does not exist or is not a folder")
    if settings.boxes_file and not Path(settings.boxes_file).is_file():
        raise SettingsError(f"boxes file {settings.boxes_file} does not exist")
    if settings.dicom_seg:  # the dicom extra, before any work
        from ..dicom_seg import require_highdicom

        require_highdicom()
    if settings.boxes_file:  # anything ambiguous in it stops the run here, before the output folder is made
        from ..predict import BoxFile

        BoxFile(settings.boxes_file, settings.organs)
    output = settings.output_path.resolve()
    for folder in (settings.input_dir, settings.labels_dir):
        if folder:
            source = Path(folder).resolve()
            if output == source or source in output.parents:
                raise SettingsError(f"the output folder {output} is inside the input folder {source}; choose an "
                                    "output folder elsewhere (inputs are never written)")
    check_output_dir(settings.output_path)
    others = foreign_results(settings.output_path, "inference")
    if others and not settings.overwrite:
        raise SettingsError(f"output folder {settings.output_path} holds {others}; segmentations written there would "
                            "mix with another run's results: choose another output folder, or pass --overwrite to "
                            "write beside them")


def foreign_results(folder: Path, writer: str) -> str:
    """What ``folder`` holds of another kind of run than ``writer`` (``training`` / ``evaluate`` or ``inference``),
    in a few words ('' when nothing): a training run's results (its adapters, checkpoint, test predictions),
    or ``cobot-med infer``'s segmentations. One folder, one kind of writer (``overwrite`` lets a run write
    beside them; nothing is deleted)."""

    if not folder.is_dir():
        return ""
    if writer == "inference":
        present = [name for name in RESULTS if (folder / name).exists()]
        return f"a training run's results ({', '.join(present)})" if present else ""
    segmentations = sorted(p.name for p in folder.glob("*_seg.nii.gz"))
    if not segmentations:
        return ""
    shown = ", ".join(segmentations[:3]) + (" ..." if len(segmentations) > 3 else "")
    return f"cobot-med infer's segmentations ({len(segmentations)}: {shown})"
