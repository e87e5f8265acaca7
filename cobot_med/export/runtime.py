"""An exported model on ONNX Runtime or OpenVINO, behind PromptableSam's call signature.

:class:`ExportedSam` is what :class:`cobot_med.predict.SlicePredictor` runs when ``backend`` is ``onnxruntime`` or
``openvino``: ``network(images (B,3,S,S), boxes (B,K,4), valid=(B,K), output_size=None, points=None) -> logits``,
with ``image_size`` and the export's input ``recipe``, so prompts, the recipe, stitching, the label map, metrics and
outputs are the torch path's own code. It imports neither the model code nor the training stack (docs/export.md):
numpy, torch (tensors in and out, the recipe's resizing) and the runtime.

Precision (:func:`runtime_precision`): ONNX Runtime's CPU provider runs the fp32 graphs in fp32; OpenVINO runs the
image encoder in bf16 where ``amp`` resolves to bf16 (``auto``: the CPU runs bf16 fast, the same rule as the torch
path's, :func:`cobot_med.engine.precision.resolve_precision`), else in fp32 (its default on such CPUs is bf16, so fp32
is asked for explicitly). The prompt decoder runs in fp32 everywhere (for LiteMedSAM on a 2-core AVX-512 CPU
about 0.19 s per call with 4 boxes; OpenVINO's bf16 hint on it gave no measurable gain per volume: BENCHMARKS.md).
An export whose encoder was quantised (``cobot-med export --int8``) runs its int8 graph on either runtime.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..sam.decoding import check_prompts, pack_decoded
from .manifest import ExportCorrupted, ExportedModel, RuntimeMissing

RUNTIMES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}  # backend -> the package it needs
INSTALL = "pip install 'cobot-med[infer]'"


def import_runtime(backend: str) -> Any:
    """The runtime package of ``backend``; :class:`RuntimeMissing` naming the install when it is absent."""
    package = RUNTIMES[backend]
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise RuntimeMissing(f"backend {backend} needs the {package} package, which is not installed ({err}); "
                             f"install it with {INSTALL}") from None


def runtime_available(backend: str) -> bool:
    return importlib.util.find_spec(RUNTIMES[backend]) is not None


@dataclasses.dataclass(frozen=True)
class ExportedSpec:
    """What an exported model is, in the fields the run records read from a PromptableSam's ``spec``."""

    arch: str
    peft: str
    image_size: int
    recipe: dict[str, Any]
    attention: str = "exported"


def runtime_precision(backend: str, amp: Any, exported: ExportedModel) -> tuple[str, str]:
    """The encoder's precision on ``backend`` for the ``amp`` setting, and why."""
    if exported.precision == "int8":
        return "int8", "int8: the exported encoder is statically quantised (cobot-med export --int8, explicit)"
    if backend == "onnxruntime":
        return "fp32", "fp32: ONNX Runtime's CPU provider runs the graphs in fp32"
    from ..engine.precision import resolve_precision

    resolved = resolve_precision(amp, "cpu", training=False)
    if resolved.name == "bf16":
        return "bf16", f"bf16 (OpenVINO's inference precision hint): {resolved.reason}"
    return "fp32", f"fp32 (OpenVINO's inference precision hint): {resolved.reason}"


class _Graph:
    """One compiled graph: ``run(*arrays) -> list of arrays`` (copies: the runtimes reuse their buffers)."""

    def __init__(self, backend: str, path: Any, precision: str, threads: int | None) -> None:
        runtime = import_runtime(backend)
        self.backend = backend
        try:
            if backend == "onnxruntime":
                options = runtime.SessionOptions()
                if threads:
                    options.intra_op_num_threads = int(threads)
                    options.inter_op_num_threads = 1
                options.log_severity_level = 3
                self.session = runtime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                self.inputs = [i.name for i in self.session.get_inputs()]
            else:
                core = runtime.Core()
                config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                          "PERFORMANCE_HINT": "LATENCY"}
                if threads:
                    config["INFERENCE_NUM_THREADS"] = int(threads)
                compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
                self.request = compiled.create_infer_request()
                self.outputs = len(compiled.outputs)
        except Exception as err:  # noqa: BLE001 - a graph a runtime cannot read is a broken export
            raise ExportCorrupted(f"{path}: {backend} cannot load it ({type(err).__name__}: "
                                  f"{str(err).strip().splitlines()[0] if str(err).strip() else err}); export the model "
                                  "again") from None

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        if self.backend == "onnxruntime":
            return self.session.run(None, dict(zip(self.inputs, arrays)))
        self.request.infer(list(arrays))
        return [np.array(self.request.get_output_tensor(i).data, copy=True) for i in range(self.outputs)]


def _graph_path(exported: ExportedModel, graph: str, backend: str):
    """ONNX for ONNX Runtime; OpenVINO's IR where the export has it, else the ONNX file (OpenVINO reads both)."""
    if backend == "openvino" and "openvino" in exported.formats:
        return exported.graph_file(graph, "openvino")
    return exported.graph_file(graph, "onnx")


class ExportedSam(nn.Module):
    """An exported model run by ``backend`` (``onnxruntime`` or ``openvino``) with PromptableSam's call signature."""

    def __init__(self, exported: ExportedModel, backend: str, precision: str = "fp32", threads: int | None = None,
                 ) -> None:
        super().__init__()
        from ..sam.recipes import make_recipe

        self.exported, self.backend, self.precision = exported, backend, precision
        self.encoder = _Graph(backend, _graph_path(exported, "image_encoder", backend), precision, threads)
        self.decoder = _Graph(backend, _graph_path(exported, "mask_decoder", backend), "fp32", threads)
        self._recipe = make_recipe(exported.recipe["name"], exported.image_size, exported.recipe)
        self.spec = ExportedSpec(exported.arch, exported.peft, exported.image_size, self._recipe.to_dict())
        self.base_sha256 = exported.manifest.get("base_checkpoint_sha256")

    @property
    def image_size(self) -> int:
        return self.exported.image_size

    @property
    def recipe(self):
        return self._recipe

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) as the recipe gives them -> image embeddings (B, C, h, w), one slice per graph call."""
        S = self.image_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (S, S):
            raise ValueError(f"images must be (B, 3, {S}, {S}), got {tuple(images.shape)}")
        arrays = images.detach().float().cpu().numpy()
        return torch.from_numpy(np.concatenate([self.encoder.run(arrays[b:b + 1])[0] for b in range(len(arrays))]))

    def _decode_one(self, embedding: np.ndarray, coords: np.ndarray, labels: np.ndarray):
        masks, iou = self.decoder.run(embedding, coords.astype(np.float32), labels.astype(np.int64))
        return torch.from_numpy(masks), torch.from_numpy(iou)[:, 0]

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor | None, valid: torch.Tensor | None = None,
               points: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`cobot_med.sam.PromptableSam.decode`: (B,K,4h,4w) logits and (B,K) IoU, or packed (N,1,4h,4w)
        and (N,) for the ``valid`` prompts; ``points`` (coordinates (B,K,P,2), labels (B,K,P)) add clicks."""
        B = embeddings.shape[0]
        check_prompts(B, boxes, points)
        logits, ious = [], []
        arrays = embeddings.detach().float().cpu().numpy()
        for b in range(B):
            keep = slice(None) if valid is None else valid[b].cpu()
            parts, kinds = [], []
            if points is not None:
                parts.append(points[0][b][keep].detach().float().cpu())
                kinds.append(points[1][b][keep].detach().cpu().long())
            if boxes is not None:
                corners = boxes[b][keep].detach().float().cpu().reshape(-1, 2, 2)
                parts.append(corners)
                kinds.append(torch.tensor([2, 3]).expand(corners.shape[0], 2))
            elif parts:  # clicks alone: segment-anything pads them with one "not a point"
                n = parts[0].shape[0]
                parts.append(torch.zeros(n, 1, 2))
                kinds.append(torch.full((n, 1), -1, dtype=torch.long))
            coords, labels = torch.cat(parts, dim=1), torch.cat(kinds, dim=1)
            if coords.shape[0] == 0:
                continue
            masks, iou = self._decode_one(arrays[b:b + 1], coords.numpy(), labels.numpy())
            logits.append(masks)
            ious.append(iou)
        return pack_decoded(logits, ious, valid, embeddings)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None, valid: torch.Tensor | None = None,
                output_size: int | tuple[int, int] | None = None,
                points: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):  # the runtime has its own precision; torch's autocast is not it
            logits, _ = self.decode(self.encode(images), boxes, valid, points)
            if output_size is not None and logits.shape[0]:
                logits = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
        return logits.to(images.device)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "exported_model": str(self.exported.folder), "precision": self.precision}
