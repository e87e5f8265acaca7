"""Export a built model (a base, or an adapter's model) to ONNX, and to OpenVINO IR, with its manifest.

:func:`export_model` merges what merges (LoRA, LoRA+COBOT, SSF: ``merge_adapters``; the others, AdaptFormer(+COBOT),
Conv-LoRA, ..., are exported as they run, their branches in the graph), traces the two graphs of
:mod:`.graphs` with torch's ONNX exporter, converts them to OpenVINO IR when asked, checks the exported graphs
against the torch model on a test input (the largest difference is recorded), and writes the folder atomically:
everything goes into a hidden temporary folder beside the target, which is renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .graphs import EncoderGraph, PromptDecoderGraph, dense_routing
from .manifest import FORMAT, FORMATS, GRAPHS, MANIFEST, VERSION, ExportError, read_export, sha256
from .runtime import import_runtime, runtime_available

OPSET = 17
ENCODER_FILE, DECODER_FILE = "image_encoder.onnx", "mask_decoder.onnx"


def prepare_for_export(model: Any) -> int:
    """Eval mode, fp32 on the CPU, mergeable layers folded into their bases; returns how many merged. ViT
    encoders run segment-anything's own attention in the graph (its math, plain ops every runtime fuses)."""
    from ..peft import merge_adapters
    from ..sam.attention import set_attention

    model.eval().float().to("cpu")
    merged = merge_adapters(model)
    if hasattr(model.sam.image_encoder, "blocks"):
        set_attention(model.sam.image_encoder, "eager")
    return merged


def _export_onnx(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
                 dynamic: Mapping[str, Mapping[int, str]] | None = None) -> None:
    with warnings.catch_warnings(), torch.no_grad():  # the tracer's notes on Python branches over fixed shapes
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=outputs, dynamic_axes=dict(dynamic or {}), do_constant_folding=True)


def _tag_onnx(path: Path, identity: Mapping[str, Any]) -> None:
    """Put the identity into the ONNX file's own metadata (``metadata_props["cobot_med"]``)."""
    onnx = _onnx()
    model = onnx.load(str(path), load_external_data=False)
    entry = model.metadata_props.add()
    entry.key, entry.value = "cobot_med", json.dumps(identity, sort_keys=True)
    onnx.save(model, str(path))


def _onnx():
    try:
        import onnx
    except ImportError as err:
        from .manifest import RuntimeMissing

        raise RuntimeMissing(f"cobot-med export needs the onnx package ({err}); install it with "
                             "pip install 'cobot-med[infer]'") from None
    return onnx


def test_inputs(model: Any, boxes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CT-like slice through the model's recipe and ``boxes`` box prompts (corners, labels 2 and 3)."""
    generator = torch.Generator().manual_seed(seed)
    S = int(model.image_size)
    size = (S + S // 4, S)  # not square: the recipe's padding or stretching is in the check
    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij"))
    body = ((grid ** 2).sum(0) < 0.8).float() * 120 + torch.rand(size, generator=generator) * 40
    organ = (((grid[0] - 0.2) ** 2 + (grid[1] + 0.1) ** 2) < 0.1).float() * 60
    images, geometry = model.recipe.prepare((body + organ)[None])
    centre = torch.rand(boxes, 2, generator=generator) * 0.5 + 0.25
    half = torch.rand(boxes, 2, generator=generator) * 0.2 + 0.05
    corners = torch.cat([centre - half, centre + half], dim=1) * torch.tensor([size[1], size[0]] * 2)
    model_boxes = model.recipe.boxes_to_model(corners[None], geometry)[0]
    return images, model_boxes.reshape(-1, 2, 2), torch.tensor([[2, 3]]).expand(boxes, 2).contiguous()


def check_graphs(model: Any, folder: Path, backend: str) -> dict[str, float]:
    """The exported graphs on ``backend`` (fp32) against the torch model on :func:`test_inputs`: the largest
    absolute difference of the embedding and of the low-res logits, and their scales."""
    from .manifest import read_export
    from .runtime import ExportedSam

    images, coords, labels = test_inputs(model, boxes=3, seed=1)  # not the trace's input
    model.eval()
    with torch.no_grad():
        embedding = model.encode(images)
        reference, _ = model.decode(embedding, coords.reshape(1, -1, 4))
    exported = ExportedSam(read_export(folder, verify=False), backend, "fp32")
    ours = exported.encode(images)
    logits, _ = exported.decode(ours, coords.reshape(1, -1, 4))
    return {"backend": backend, "embedding_max_abs_diff": float((ours - embedding).abs().max()),
            "embedding_max_abs": float(embedding.abs().max()),
            "logits_max_abs_diff": float((logits - reference).abs().max()),
            "logits_max_abs": float(reference.abs().max())}


def export_model(model: Any, output: str | Path, formats: Sequence[str] = ("onnx",), *,
                 label_map: Mapping[str, int] | None = None, dataset: str | None = None,
                 adapter: Mapping[str, Any] | None = None, overwrite: bool = False,
                 extra: Mapping[str, Any] | None = None, log: Any = None) -> Path:
    """Write ``model`` (a :class:`~cobot_med.sam.PromptableSam`) as an exported-model folder at ``output``.

    ``formats``: ``onnx`` always, ``openvino`` adds OpenVINO IR (converted from the ONNX graphs). ``label_map``
    and ``dataset``: the organs the export is for (None: any). ``adapter``: ``{"path", "weights_sha256"}`` of the
    adapter it holds. Returns the folder.
    """
    if hasattr(model, "sam2"):
        raise ExportError(f"{model.spec.arch if model.spec else 'SAM 2'}: exporting SAM 2 bases is not implemented (their "
                          "decoder also reads the encoder's high-resolution levels; docs/sam2.md); run them with torch")
    formats = list(dict.fromkeys(["onnx", *formats]))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ExportError(f"unknown export format {unknown[0]!r}; choose one of {list(FORMATS)}")
    if "openvino" in formats:
        import_runtime("openvino")
    _onnx()
    output = Path(output)
    if output.exists() and not overwrite:
        raise ExportError(f"{output} exists; choose another --output or pass --overwrite")
    if output.exists() and not (output / MANIFEST).is_file() and any(output.iterdir()):
        raise ExportError(f"{output} is a folder that does not hold an exported model; it is not replaced")
    say = log or (lambda _: None)
    merged = prepare_for_export(model)
    spec = model.spec
    S = int(model.image_size)
    identity = {
        "arch": spec.arch, "image_size": S, "peft": spec.peft, "recipe": model.recipe.to_dict(),
        "label_map": dict(label_map) if label_map is not None else None,
        "base_checkpoint_sha256": model.base_sha256,
        "adapter_weights_sha256": (adapter or {}).get("weights_sha256"),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".tmp-{uuid.uuid4().hex[:8]}-{output.name}"
    tmp.mkdir()
    try:
        started = time.perf_counter()
        images, coords, labels = test_inputs(model, boxes=2)
        with torch.no_grad():
            embedding = model.encode(images)
        say(f"exporting the image encoder ({spec.arch}, {S} px)")
        with dense_routing(model):
            _export_onnx(EncoderGraph(model), (images,), tmp / ENCODER_FILE, ["images"], ["embeddings"])
        say("exporting the prompt encoder and mask decoder")
        _export_onnx(PromptDecoderGraph(model), (embedding, coords, labels), tmp / DECODER_FILE,
                     ["embedding", "coords", "labels"], ["masks", "iou"],
                     {"coords": {0: "prompts", 1: "points"}, "labels": {0: "prompts", 1: "points"},
                      "masks": {0: "prompts"}, "iou": {0: "prompts"}})
        for name in (ENCODER_FILE, DECODER_FILE):
            _tag_onnx(tmp / name, identity)
        graphs: dict[str, dict[str, Any]] = {
            "image_encoder": {"onnx": {"file": ENCODER_FILE, "inputs": {"images": [1, 3, S, S]}}},
            "mask_decoder": {"onnx": {"file": DECODER_FILE,
                                      "inputs": {"embedding": list(embedding.shape), "coords": ["N", "P", 2],
                                                 "labels": ["N", "P"]}}},
        }
        if "openvino" in formats:
            ov = import_runtime("openvino")
            (tmp / "openvino").mkdir()
            for graph, name in zip(GRAPHS, (ENCODER_FILE, DECODER_FILE)):
                say(f"converting the {graph} to OpenVINO IR")
                converted = ov.convert_model(str(tmp / name))
                converted.set_rt_info(json.dumps(identity, sort_keys=True), ["cobot_med"])
                xml = Path("openvino") / name.replace(".onnx", ".xml")
                ov.save_model(converted, str(tmp / xml), compress_to_fp16=False)
                graphs[graph]["openvino"] = {"file": str(xml)}
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        manifest: dict[str, Any] = {
            "format": FORMAT, "version": VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "model": {"arch": spec.arch, "image_size": S, "peft": spec.peft, "peft_options": spec.peft_options,
                      "merged_layers": int(merged), "embedding": list(embedding.shape[1:])},
            "recipe": identity["recipe"], "label_map": identity["label_map"], "dataset": dataset,
            "base_checkpoint_sha256": model.base_sha256,
            "adapter": dict(adapter) if adapter else None,
            "precision": "fp32",
            "graphs": graphs,
            "files": {name: sha256(tmp / name) for name in files},
            "exporter": {"torch": torch.__version__, "opset": OPSET, "onnx": _onnx().__version__},
            **dict(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        backend = "onnxruntime" if runtime_available("onnxruntime") else ("openvino" if runtime_available("openvino")
                                                                          else None)
        if backend is not None:
            say(f"checking the graphs against the torch model on {backend}")
            manifest["checked"] = check_graphs(model, tmp, backend)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        manifest["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        read_export(tmp)  # what a run will check
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output

