"""int8, only when asked (``cobot-med export --int8 --calibration DIR --labels DIR``): the image encoder statically
quantised by ONNX Runtime (``quantize_static``, QDQ format, int8 weights per output channel, uint8 activations with
scales from MinMax calibration), calibrated on the run's own slices, and its accuracy against the fp32 export
measured on the same volumes before it is written.

- Calibration: every other slice that holds an organ of the label map, of the volumes in ``--calibration`` (read by
  the run's own volume chain, through the model's input recipe), at most ``slices`` of them.
- Accuracy: each volume segmented through :class:`cobot_med.predict.SlicePredictor` twice, by the fp32 export and by
  the int8 one (ONNX Runtime both), prompts from ``--labels`` (tight boxes per slice); the label maps' Dice agreement
  per organ, the Dice of each against the reference labels, and the encoder embeddings' relative L2 difference are
  recorded in the manifest (``int8``) and printed.

The prompt decoder stays fp32 (milliseconds per box). OpenVINO runs the quantised ONNX graph as int8 too.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .manifest import GRAPHS, MANIFEST, ExportError, read_export, sha256


def calibration_cases(settings: Any, recipe: Any) -> list[dict[str, Any]]:
    """The run's volumes with their labels, through the run's volume chain: ``{"case", "volume" (X,Y,Z),
    "label" (X,Y,Z)}``."""
    from ..data.chains import run_volume_chain
    from ..inference.cases import attach_labels, find_cases

    cases, _ = find_cases(settings.input_dir)
    cases = [c for c in cases if not c.error]
    if not cases:
        raise ExportError(f"--calibration {settings.input_dir}: no volumes to calibrate on")
    attach_labels(cases, settings.labels_dir)
    chain = run_volume_chain(settings, recipe)
    out = []
    for case in cases:
        if case.label is None:
            raise ExportError(f"--labels {settings.labels_dir}: no label for {case.case_id} (int8 accuracy is measured "
                              "against fp32 with each organ's boxes from the labels)")
        data = chain({"image": str(case.image), "label": str(case.label)})
        out.append({"case": case.case_id, "volume": torch.as_tensor(data["image"])[0].float(),
                    "label": torch.as_tensor(data["label"])[0].long()})
    return out


def calibration_images(cases: list[dict[str, Any]], recipe: Any, organ_ids: list[int], slices: int) -> list[np.ndarray]:
    """Every other slice holding an organ, as the encoder's (1, 3, S, S) inputs, at most ``slices``."""
    chosen = []
    for case in cases:
        holds = torch.isin(case["label"], torch.tensor(organ_ids)).any(dim=(0, 1)).nonzero().flatten().tolist()
        chosen += [(case, z) for z in holds[::2]]
    if len(chosen) > slices:
        keep = np.linspace(0, len(chosen) - 1, slices).round().astype(int)
        chosen = [chosen[i] for i in keep]
    images = []
    for case, z in chosen:
        image, _ = recipe.prepare(case["volume"][..., z][None])
        images.append(image.numpy().astype(np.float32))
    return images


def _quantize(source: Path, target: Path, images: list[np.ndarray]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"images": image} for image in images])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    prepared = target.with_name(target.stem + ".pre.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    prepared.unlink()


def measure(fp32_folder: Path, int8_folder: Path, cases: list[dict[str, Any]], organs: dict[str, int],
            log: Callable[[str], None]) -> dict[str, Any]:
    """Label maps of the int8 export against the fp32 export (and both against the labels) on ``cases``."""
    from ..metrics import dice
    from ..predict import SlicePredictor, from_labels, predict_volume, to_label_map
    from .runtime import ExportedSam

    nets = {"fp32": ExportedSam(read_export(fp32_folder), "onnxruntime"),
            "int8": ExportedSam(read_export(int8_folder), "onnxruntime")}
    organ_ids = list(organs.values())
    agreement: dict[str, list[float]] = {o: [] for o in organs}
    against_labels: dict[str, dict[str, list[float]]] = {p: {o: [] for o in organs} for p in nets}
    embedding_error = []
    for case in cases:
        prompts = from_labels(case["label"][None], organs)
        maps = {}
        for name, net in nets.items():
            probs, _ = predict_volume(SlicePredictor(net, "cpu", 1, False), case["volume"], prompts)
            maps[name] = to_label_map(probs, organ_ids)[0]
        for organ, i in organs.items():
            score = float(dice(maps["int8"] == i, maps["fp32"] == i))
            if not np.isnan(score):
                agreement[organ].append(score)
            for name in nets:
                score = float(dice(maps[name] == i, case["label"] == i))
                if not np.isnan(score):
                    against_labels[name][organ].append(score)
        z = int(torch.isin(case["label"], torch.tensor(organ_ids)).any(dim=(0, 1)).nonzero().flatten()[0])
        image, _ = nets["fp32"].recipe.prepare(case["volume"][..., z][None])
        a, b = nets["int8"].encode(image), nets["fp32"].encode(image)
        embedding_error.append(float((a - b).norm() / b.norm()))
        log(f"int8 check: {case['case']} done")

    def mean(values: list[float]) -> float | None:
        return round(float(np.mean(values)), 4) if values else None

    per_organ = {o: mean(v) for o, v in agreement.items()}
    return {"label_dice_int8_vs_fp32": {**per_organ, "mean": mean([v for v in per_organ.values() if v is not None])},
            "dice_vs_labels": {name: {**{o: mean(v) for o, v in scores.items()},
                                      "mean": mean([mean(v) for v in scores.values() if v])}
                               for name, scores in against_labels.items()},
            "embedding_relative_l2": round(float(np.mean(embedding_error)), 5), "cases": len(cases)}


def quantize_export(fp32_folder: Path, output: Path, settings: Any, slices: int = 64,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write ``output``: ``fp32_folder``'s export with its image encoder quantised to int8 (see the module); returns
    the manifest's ``int8`` record."""
    from ..files import absolute
    from .runtime import import_runtime

    import_runtime("onnxruntime")
    fp32 = read_export(fp32_folder)
    organs = dict(settings.organs)
    from ..sam.recipes import make_recipe

    recipe = make_recipe(fp32.recipe["name"], fp32.image_size, fp32.recipe)
    started = time.perf_counter()
    cases = calibration_cases(settings, recipe)
    images = calibration_images(cases, recipe, list(organs.values()), slices)
    if not images:
        raise ExportError(f"--calibration {settings.input_dir}: no slice holds an organ of the label map")
    log(f"int8: calibrating the image encoder on {len(images)} slices of {len(cases)} volume(s)")
    tmp = output.parent / f".tmp-int8-{output.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(fp32_folder, tmp)
    try:
        encoder = fp32.graph_file("image_encoder", "onnx").name
        _quantize(fp32_folder / encoder, tmp / encoder, images)
        manifest = dict(fp32.manifest)
        manifest["graphs"] = {g: {"onnx": manifest["graphs"][g]["onnx"]} for g in GRAPHS}  # IR: from the ONNX
        shutil.rmtree(tmp / "openvino", ignore_errors=True)
        manifest["precision"] = "int8"
        manifest["files"] = {name: sha256(tmp / name) for name in sorted(
            str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        log("int8: measuring the label maps against the fp32 export")
        accuracy = measure(fp32_folder, tmp, cases, organs, log)
        record = {"method": "onnxruntime quantize_static, QDQ, int8 weights per channel, uint8 activations, MinMax",
                  "calibration": {"input_dir": str(absolute(settings.input_dir)), "slices": len(images),
                                  "volumes": len(cases), "labels_dir": str(absolute(settings.labels_dir))},
                  "accuracy": accuracy, "seconds": round(time.perf_counter() - started, 1)}
        manifest["int8"] = record
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        read_export(tmp)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
