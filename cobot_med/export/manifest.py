"""An exported model's folder and what it vouches for: ``cobot_med_export.json``.

The manifest names the model (arch, input size, PEFT method, how many layers were merged), its input recipe,
the label map it was exported for (``null``: any, for a base exported without a dataset), the SHA-256 of the base
checkpoint and of the adapter weights, the precision of its graphs, and the SHA-256 of every file of every graph.
:func:`read_export` checks the files against it before a runtime reads them, so a truncated or altered file is an
:class:`ExportCorrupted`, not a runtime's stack trace; :func:`check_run` refuses a run that asks for another base,
adapter, recipe, input size or label map (:class:`ExportMismatch`).

Nothing here imports a model or a runtime: the exported-model path (docs/export.md) reads this without the
training stack.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from ..errors import CobotMedError, SettingsError

MANIFEST = "cobot_med_export.json"
FORMAT = "cobot-med-export"
VERSION = 1
GRAPHS = ("image_encoder", "mask_decoder")  # the encoder; the prompt encoder + mask decoder (any number of boxes)
FORMATS = ("onnx", "openvino")


class ExportError(CobotMedError):
    """An exported model that cannot be used as asked."""


class ExportMismatch(ExportError, SettingsError):
    """An exported model of another base, adapter, recipe, input size or label map than the run asks for."""


class ExportCorrupted(ExportError):
    """An exported model folder whose manifest or graph files are missing, altered or unreadable."""


class RuntimeMissing(ExportError):
    """The runtime package a backend needs (onnxruntime, openvino, onnx) is not installed."""


def sha256(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    """A checked exported-model folder (:func:`read_export`)."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def arch(self) -> str:
        return self.manifest["model"]["arch"]

    @property
    def image_size(self) -> int:
        return int(self.manifest["model"]["image_size"])

    @property
    def peft(self) -> str:
        return self.manifest["model"]["peft"]

    @property
    def recipe(self) -> dict[str, Any]:
        return dict(self.manifest["recipe"])

    @property
    def label_map(self) -> dict[str, int] | None:
        labels = self.manifest.get("label_map")
        return None if labels is None else {str(k): int(v) for k, v in labels.items()}

    @property
    def precision(self) -> str:
        """What the graphs hold: ``fp32``, or ``int8`` (a statically quantised encoder)."""
        return self.manifest.get("precision", "fp32")

    @property
    def formats(self) -> list[str]:
        return [f for f in FORMATS if all(f in self.manifest["graphs"][g] for g in GRAPHS)]

    def graph_file(self, graph: str, fmt: str) -> Path:
        try:
            return self.folder / self.manifest["graphs"][graph][fmt]["file"]
        except KeyError:
            raise ExportError(f"{self.folder}: the export has no {fmt} {graph} graph (it holds "
                              f"{', '.join(self.formats) or 'none'}); export it again with --format {fmt}") from None

    def identity(self) -> dict[str, Any]:
        """What decides a segmentation besides the image (the inference record's model identity)."""
        adapter = self.manifest.get("adapter") or {}
        model = self.manifest["model"]
        return {"arch": model["arch"], "peft": model["peft"], "image_size": int(model["image_size"]),
                "adapter_weights_sha256": adapter.get("weights_sha256"),
                "base_checkpoint_sha256": self.manifest.get("base_checkpoint_sha256"),
                "exported_precision": self.precision}


def read_export(folder: str | Path, verify: bool = True) -> ExportedModel:
    """The exported model in ``folder``, its manifest checked; with ``verify`` every graph file's SHA-256 too."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ExportError(f"exported model {folder} does not exist (a folder written by cobot-med export)")
    if not path.is_file():
        raise ExportCorrupted(f"{folder}: not an exported model ({MANIFEST} is missing; write one with "
                              "cobot-med export)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportCorrupted(f"{path}: unreadable ({err}); export the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportCorrupted(f"{path}: not a cobot-med export manifest")
    if manifest.get("version") != VERSION:
        raise ExportError(f"{path}: export format version {manifest.get('version')!r}; this cobot-med reads "
                          f"version {VERSION}: export the model again")
    try:
        for key in ("arch", "image_size", "peft"):
            manifest["model"][key]
        manifest["recipe"]["name"]
        files = dict(manifest["files"])
        for graph in GRAPHS:
            manifest["graphs"][graph]
    except (KeyError, TypeError):
        raise ExportCorrupted(f"{path}: incomplete manifest; export the model again") from None
    if verify:
        for name, digest in files.items():
            file = folder / name
            if not file.is_file():
                raise ExportCorrupted(f"{folder}: {name} is missing; export the model again")
            if sha256(file) != digest:
                raise ExportCorrupted(f"{file}: corrupted (its SHA-256 is not the one {MANIFEST} records); "
                                      "export the model again")
    return ExportedModel(folder, manifest)


def expected_recipe(exported: ExportedModel, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe a run with ``overrides`` (the settings' CT window) asks of this model: the export's own,
    with what the run changes."""
    from ..sam.recipes import make_recipe

    recorded = exported.recipe
    changed = {**recorded, **dict(overrides)}
    return make_recipe(recorded["name"], exported.image_size, changed).to_dict()


def check_run(exported: ExportedModel, settings: Any) -> None:
    """Refuse a run whose settings ask for another model than the export holds (:class:`ExportMismatch`), and
    settle ``arch`` / ``image_size`` from it. Compared: the arch and input size when given, the adapter's weights
    and the base checkpoint (by SHA-256) when given, the CT window of the recipe when given, and the label map
    (the dataset's organs) when the export records one."""
    where = f"the exported model {exported.folder}"
    if settings.arch not in ("auto", exported.arch):
        raise ExportMismatch(f"{where} is {exported.arch}, but the run asks for arch {settings.arch}; leave --arch "
                             "out or export that base")
    if settings.image_size not in (None, exported.image_size):
        raise ExportMismatch(f"{where} takes {exported.image_size} px, but the run asks for image_size "
                             f"{settings.image_size}; leave --image_size out")
    adapter = exported.manifest.get("adapter") or {}
    if settings.adapter:
        from ..adapter import read_adapter_config

        weights = read_adapter_config(settings.adapter).get("weights_sha256")
        if weights != adapter.get("weights_sha256"):
            made = f"adapter weights {adapter['weights_sha256'][:12]}..." if adapter else "a base with no adapter"
            raise ExportMismatch(f"{where} holds {made}, not the adapter {settings.adapter} "
                                 f"({str(weights)[:12]}...); export that adapter or leave --adapter out")
    base = exported.manifest.get("base_checkpoint_sha256")
    if settings.sam_checkpoint and not Path(settings.sam_checkpoint).is_file():
        raise SettingsError(f"sam_checkpoint {settings.sam_checkpoint} does not exist")
    if settings.sam_checkpoint and sha256(settings.sam_checkpoint) != base:
        raise ExportMismatch(f"{where} was exported from another base checkpoint than {settings.sam_checkpoint} "
                             f"(SHA-256 {str(base)[:12]}...); export from that checkpoint or leave --sam_checkpoint out")
    overrides = settings.recipe_overrides()
    if overrides:
        try:
            wanted = expected_recipe(exported, overrides)
        except ValueError as err:
            raise ExportMismatch(f"{where}: {err}") from None
        if wanted != exported.recipe:
            raise ExportMismatch(f"{where} was exported with the input recipe {json.dumps(exported.recipe)}, but the "
                                 f"run asks for ct_window {list(overrides['ct_window'])}; export it with that window "
                                 "or leave --ct_window out")
    labels = exported.label_map
    if labels is not None and labels != dict(settings.organs):
        raise ExportMismatch(f"{where} was exported for the label map {labels}, but the {settings.dataset} run has "
                             f"{dict(settings.organs)}; export it for this dataset (--config)")
    settings.arch, settings.image_size = exported.arch, exported.image_size
