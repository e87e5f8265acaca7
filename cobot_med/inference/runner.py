"""The batch job: every volume of a folder -> box prompts -> SAM slice by slice -> one label map per case
in the input's exact geometry, plus prompts, pictures, label descriptions and (with labels) metrics.

Per case: the volume chain of the bundle (load, checks, ``Orientationd("RAS")``, CT window) ->
prompts (labels, 3D boxes or key slices) -> :func:`~cobot_med.inference.predict.predict_case` ->
overlaps to the most probable organ (``merge_organs``) -> MONAI ``Invertd`` undoes the
reorientation -> MONAI ``NibabelWriter`` writes ``<case>_seg.nii.gz`` (uint8) with the input's
affine. A failing case is reported with its reason and the others go on; every file is written
under a temporary name and renamed when complete, the segmentation last, so a case whose
segmentation exists is finished and a rerun skips it (unless ``overwrite``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .. import flags
from . import io as case_io
from .io import Case, InputError
from .outputs import prompts_record, write_label_files, write_overlay
from .predict import SlicePredictor, predict_case
from .prompts import BoxFile, CasePrompts, PromptError, from_labels


# Bundle settings ids the ``inference`` run id reads (besides the dataset bundles' usual ones:
# layout, dataset, organs, volume_transforms, adapter, sam_checkpoint, arch, image_size, device,
# eval_batch_size, amp, output_dir), with their defaults.
BUNDLE_SETTINGS: dict[str, Any] = {
    "input_dir": "",  # folder of .nii / .nii.gz volumes and DICOM folders to segment
    "labels_dir": "",  # reference labels with the same names: prompts from them (or only metrics with boxes_file)
    "boxes_file": "",  # JSON of 3D boxes / key slices per case and organ (docs/inference.md)
    "infer_organs": "",  # organs to segment, comma-separated names of the label map; "" = all
    "overwrite": False,  # redo cases whose segmentation already exists
    "probability_maps": False,  # also write <case>_prob_<organ>.nii.gz (float32)
    "nsd_tolerance_mm": 2.0,  # tolerance of the normalised surface distance (mm)
    "merge_adapters": True,  # fold LoRA / LoRA+COBOT into the frozen weights
    # the speed switches (BENCHMARKS.md), for a bundle written before they existed: the model's own choice
    "attention": None,
    "skip_window_padding": None,
    "gradient_checkpointing": None,
    "compile": None,
    "speed": "%bundles/common.json::speed",
}
INIT_ID = "inference_initialize"  # not in the bundles: the training data check of ``initialize`` is not run
FINAL_ID = "inference_finalize"


class InferenceFailed(RuntimeError):
    """Raised by :func:`run_from_bundle` after the whole run when any case failed (non-zero exit status)."""

    def __init__(self, report: "InferenceReport") -> None:
        super().__init__(report.summary())
        self.report = report


class CaseFailed(ValueError):
    """One case cannot be processed; the message is the reason reported."""


@dataclasses.dataclass
class CaseOutcome:
    case_id: str
    image: str
    status: str  # "done", "skipped" or "failed"
    reason: str = ""
    seconds: float = 0.0
    slices_sent: int = 0


@dataclasses.dataclass
class InferenceReport:
    output_dir: Path
    cases: list[CaseOutcome]
    ignored: list[tuple[str, str]]
    model: dict[str, Any]
    seconds: float = 0.0

    def _with(self, status: str) -> list[CaseOutcome]:
        return [c for c in self.cases if c.status == status]

    @property
    def done(self) -> list[CaseOutcome]:
        return self._with("done")

    @property
    def skipped(self) -> list[CaseOutcome]:
        return self._with("skipped")

    @property
    def failed(self) -> list[CaseOutcome]:
        return self._with("failed")

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def summary(self) -> str:
        lines = [f"cobot-med infer: {len(self.done)} done, {len(self.skipped)} skipped (already done), "
                 f"{len(self.failed)} failed, of {len(self.cases)} cases in {self.seconds:.1f} s -> {self.output_dir}"]
        if self.failed:
            lines.append("failed:")
            lines += [f"  {c.case_id}: {c.reason}" for c in self.failed]
        if self.ignored:
            lines.append("not cases (left alone):")
            lines += [f"  {name}: {why}" for name, why in self.ignored]
        return "\n".join(lines)


# --- settings ----------------------------------------------------------------------------------


as_flag = functools.partial(flags.as_flag, error=InputError)  # a bad yes/no setting is the run's input error


def as_amp(value: Any) -> bool | str:
    """``amp``: true/false (bf16 when true) or a dtype name (bfloat16, float16)."""
    from ..engine.amp import DTYPES

    if isinstance(value, str) and value.strip().lower() in DTYPES:
        return value.strip().lower()
    return as_flag(value, "amp")


def select_organs(label_map: Mapping[str, int], names: str | Sequence[str] | None) -> dict[str, int]:
    """The organs to segment, in label-map order: all of them, or ``names`` (a list or 'liver,spleen')."""
    if names is None or (isinstance(names, str) and not names.strip()) or (not isinstance(names, str) and not names):
        return dict(label_map)
    if isinstance(names, str):
        names = [n for n in names.replace(" ", ",").split(",") if n]
    unknown = [n for n in names if n not in label_map]
    if unknown:
        raise InputError(f"unknown organs {unknown}; the label map has {list(label_map)}")
    return {organ: label_id for organ, label_id in label_map.items() if organ in set(names)}


def load_network(adapter: str | Path | None = None, sam_checkpoint: str | Path | None = None, arch: str = "vit_b",
                 image_size: int | None = None, device: torch.device | str = "cpu",
                 merge: bool = True, speed: Mapping[str, Any] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model for inference and a description of it.

    With ``adapter``: the adapter's own model (arch, method, input size from its config; ``arch`` and
    ``image_size`` are not used). Without: zero-shot SAM (method ``frozen``, the papers' "Freeze" row).
    LoRA and LoRA+COBOT branches are merged into the frozen weights (``cobot_med.peft.merge_adapters``)
    unless ``merge`` is false; ``speed``: the bundle's speed settings (attention kind, ...).
    """
    from ..engine.setup import build_network
    from ..peft import merge_adapters

    network = build_network(arch, image_size, "frozen", None, str(sam_checkpoint) if sam_checkpoint else None,
                            device, adapter=str(adapter) if adapter else None, speed=speed)
    network.eval()
    merged = merge_adapters(network) if merge else 0
    spec = network.spec
    info = {"adapter": str(adapter) if adapter else None, "zero_shot": not adapter, "arch": spec.arch,
            "peft": spec.peft, "image_size": int(spec.image_size), "merged_layers": int(merged),
            "attention": spec.attention,
            "sam_checkpoint": str(sam_checkpoint) if sam_checkpoint else None}
    return network, info


def case_files(output_dir: Path, case_id: str) -> dict[str, Path]:
    return {
        "seg": output_dir / f"{case_id}{case_io.SEG_SUFFIX}",
        "prompts": output_dir / f"{case_id}_prompts.json",
        "overlay": output_dir / f"{case_id}_overlay.png",
        "metrics": output_dir / f"{case_id}_metrics.json",
    }


def probability_path(output_dir: Path, case_id: str, organ: str) -> Path:
    return output_dir / f"{case_id}_prob_{organ}.nii.gz"


def to_input_geometry(tensor: torch.Tensor, image: Any, chain: Any, nearest: bool) -> Any:
    """An oriented (C, X, Y, Z) tensor -> MetaTensor in the input file's grid (MONAI ``Invertd`` of the chain)."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    item = MetaTensor(torch.as_tensor(tensor), meta=dict(image.meta), applied_operations=list(image.applied_operations))
    inverted = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=nearest)(
        {"image": image, "pred": item})
    return inverted["pred"]


# --- the job -----------------------------------------------------------------------------------


class _Job:
    def __init__(self, *, output_dir: Path, organs: dict[str, int], chain: Any, predictor: SlicePredictor,
                 labels: bool, boxes: BoxFile | None, probability_maps: bool, overlays: bool,
                 tolerance_mm: float, progress: bool) -> None:
        self.output_dir, self.organs, self.chain, self.predictor = output_dir, organs, chain, predictor
        self.labels, self.boxes = labels, boxes
        self.probability_maps, self.overlays, self.tolerance_mm, self.progress = (
            probability_maps, overlays, tolerance_mm, progress)
        self.scores: dict[str, dict] = {}

    def load(self, case: Case) -> dict:
        from ..data.validation import DataError

        item = {"image": str(case.image)}
        if case.label is not None:
            item["label"] = str(case.label)
        try:
            return self.chain(item)
        except DataError as err:
            raise CaseFailed(str(err)) from err
        except Exception as err:  # noqa: BLE001 - anything the readers raise is this case's reason
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            reason = f"{case.image}: unreadable, truncated or corrupt ({type(cause).__name__}: {cause})"
            raise CaseFailed(reason) from err

    def prompts(self, case: Case, data: dict) -> tuple[str, CasePrompts]:
        if self.boxes is not None:
            return "boxes", self.boxes.for_case(case.case_id, data["image"], self.organs, case.image.name)
        return "labels", from_labels(data["label"], self.organs)

    def run_case(self, case: Case, loading: Future | None = None) -> int:
        """Predict and write one case; returns the number of slice images sent to the model.

        ``loading``: the case's ``load`` already under way in a background thread (see ``prefetch``)."""
        from tqdm.auto import tqdm

        from ..engine.evaluation import merge_organs
        from .metrics import case_scores, spacing_of

        files = case_files(self.output_dir, case.case_id)
        data = loading.result() if loading is not None else self.load(case)
        image, label = data["image"], data.get("label")
        source, prompts = self.prompts(case, data)
        if not prompts.has_prompt:
            reasons = "; ".join(f"{o}: {p.note}" for o, p in zip(self.organs, prompts.prompts) if p.note)
            raise CaseFailed(f"no prompt for any organ ({reasons or 'nothing to prompt'})")
        volume = torch.as_tensor(image.as_tensor() if hasattr(image, "as_tensor") else image)[0]
        fixed_slices = int(prompts.fixed()[1].any(dim=1).sum())
        with tqdm(total=fixed_slices + len(prompts.keys()), desc=f"{case.case_id} slices", unit="slice",
                  leave=False, disable=not self.progress) as bar:
            def advance(n: int) -> None:
                if bar.n + n > (bar.total or 0):
                    bar.total = bar.n + n
                bar.update(n)

            self.predictor.on_slices = advance
            sent_before = self.predictor.images_sent
            probs, used = predict_case(self.predictor, volume, prompts)
            self.predictor.on_slices = None
        seg = merge_organs(probs, list(self.organs.values()))  # (1, X, Y, Z) uint8, overlaps to the most probable

        case_io.write_json(files["prompts"], prompts_record(case.case_id, source, self.organs, prompts.prompts, used,
                                                            image))
        label_map = None if label is None else torch.as_tensor(label)[0].numpy()
        if self.overlays:
            write_overlay(files["overlay"], volume.numpy(), seg[0].numpy(), label_map, self.organs, case.case_id)
        if self.probability_maps:
            inverted = to_input_geometry(probs, image, self.chain, nearest=False)
            for k, organ in enumerate(self.organs):
                from monai.data import MetaTensor

                channel = MetaTensor(inverted[k : k + 1].as_tensor(), meta=dict(inverted.meta))
                case_io.write_volume(channel, probability_path(self.output_dir, case.case_id, organ), np.float32)
        if label is not None:
            scores = case_scores(seg[0], torch.as_tensor(label)[0], self.organs, spacing_of(image.affine),
                                 self.tolerance_mm)
            case_io.write_json(files["metrics"], {"case_id": case.case_id, "nsd_tolerance_mm": self.tolerance_mm,
                                                  "organs": scores})
            self.scores[case.case_id] = scores
        case_io.write_volume(to_input_geometry(seg.float(), image, self.chain, nearest=True), files["seg"], np.uint8)
        return self.predictor.images_sent - sent_before


def run_inference(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    layout: str = "adome",
    organs: str | Sequence[str] | None = None,
    label_map: Mapping[str, int] | None = None,
    volume_transforms: Any = None,
    network: torch.nn.Module | None = None,
    adapter: str | Path | None = None,
    sam_checkpoint: str | Path | None = None,
    arch: str = "vit_b",
    image_size: int | None = None,
    labels_dir: str | Path | None = None,
    boxes_file: str | Path | None = None,
    overwrite: bool = False,
    device: str | torch.device = "auto",
    batch_size: int = 8,
    amp: bool | str = True,
    merge_adapters: bool | str = True,
    speed: Mapping[str, Any] | None = None,
    prefetch: bool | str = "auto",
    probability_maps: bool = False,
    overlays: bool = True,
    nsd_tolerance_mm: float = 2.0,
    modality: str | None = None,
    ct_window: Sequence[float] | None = None,
    dataset: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> InferenceReport:
    """Segment every volume of ``input_dir`` into ``output_dir``; see docs/inference.md.

    ``organs`` selects organs of ``label_map`` (the layout's label map by default) by name.
    ``volume_transforms`` is the bundle's volume chain; without it the layout's chain is built
    (``cobot_med.data.transforms.volume_transforms``, with ``modality`` / ``ct_window`` overriding the
    layout's). ``network`` (anything with PromptableSam's call signature and an ``image_size``)
    replaces the model that ``adapter`` / zero-shot SAM would give; ``merge_adapters`` folds LoRA into
    the frozen weights, ``speed`` holds the bundle's speed settings (BENCHMARKS.md), ``prefetch`` reads
    the next case in a background thread while the current one is predicted (``"auto"``: on a GPU only;
    on a 2-core CPU the reading thread competed with the model for the cores and made runs slower). Prompts come from ``boxes_file``
    if given, else from ``labels_dir``; with both, the labels are the reference for metrics and
    overlays only. Returns the report; its ``exit_code`` is 1 when any case failed.
    """
    from tqdm.auto import tqdm

    from ..data.layouts import get_layout
    from ..engine.setup import resolve_device

    started = time.perf_counter()
    overwrite, overlays = as_flag(overwrite, "overwrite"), as_flag(overlays, "overlays")
    probability_maps = as_flag(probability_maps, "probability_maps")
    amp = as_amp(amp)
    spec = get_layout(layout)
    label_map = dict(label_map or spec.organs)
    selected = select_organs(label_map, organs)
    if not labels_dir and not boxes_file:
        raise InputError("no prompt source: give a labels folder (--labels DIR) or a boxes file (--boxes FILE)")
    out = Path(output_dir)
    case_io.check_folders(input_dir, out, labels_dir)
    cases, ignored = case_io.find_cases(input_dir)
    if not cases:
        raise InputError(f"{input_dir}: no .nii / .nii.gz files or DICOM folders to segment")
    if labels_dir:
        case_io.attach_labels([c for c in cases if not c.error], labels_dir)
    boxes = BoxFile(boxes_file, label_map) if boxes_file else None
    if volume_transforms is None:
        from ..data.transforms import volume_transforms as build_chain

        volume_transforms = build_chain(list(label_map.values()), list(ct_window or spec.ct_window),
                                        modality or spec.modality, layout)
    device = resolve_device(device)
    if network is None:
        network, model_info = load_network(adapter, sam_checkpoint, arch, image_size, device,
                                           merge=as_flag(merge_adapters, "merge_adapters"), speed=speed)
        log(f"model: {model_info['arch']}/{model_info['peft']} at {model_info['image_size']} px"
            f"{' (zero-shot SAM)' if model_info['zero_shot'] else ', adapter ' + str(adapter)}"
            f", {model_info['merged_layers']} LoRA layers merged")
    else:
        model_info = {"adapter": None, "zero_shot": False, "arch": "custom", "peft": type(network).__name__,
                      "image_size": int(network.image_size), "merged_layers": 0}
        if hasattr(network, "eval"):
            network.eval()

    out.mkdir(parents=True, exist_ok=True)
    case_io.remove_stale_temporaries(out)
    write_label_files(out, selected, dataset or layout)
    job = _Job(output_dir=out, organs=selected, chain=volume_transforms,
               predictor=SlicePredictor(network, device, batch_size, amp), labels=bool(labels_dir), boxes=boxes,
               probability_maps=probability_maps, overlays=overlays, tolerance_mm=float(nsd_tolerance_mm),
               progress=progress)
    def finished(case: Case) -> bool:
        files = case_files(out, case.case_id)
        return not overwrite and files["seg"].is_file() and (not labels_dir or files["metrics"].is_file())

    to_run = [case for case in cases if not case.error and not finished(case)]
    position = {case.case_id: i for i, case in enumerate(to_run)}
    prefetch = device.type == "cuda" if str(prefetch) == "auto" else as_flag(prefetch, "prefetch")
    outcomes: list[CaseOutcome] = []
    # the next case is read while this one is predicted (at most two volumes in memory)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cobot-med-read") as loader:
        loading: dict[str, Future] = {}

        def start_loading(index: int) -> None:
            if prefetch and index < len(to_run):
                loading[to_run[index].case_id] = loader.submit(job.load, to_run[index])

        start_loading(0)
        for case in tqdm(cases, desc="cases", unit="case", disable=not progress):
            outcome = CaseOutcome(case.case_id, str(case.image), "done")
            tic = time.perf_counter()
            if case.error:
                outcome.status, outcome.reason = "failed", case.error
            elif finished(case):
                outcome.status = "skipped"
                if labels_dir:
                    kept = json.loads(case_files(out, case.case_id)["metrics"].read_text())["organs"]
                    job.scores[case.case_id] = {o: kept[o] for o in selected if o in kept}
            else:
                start_loading(position.get(case.case_id, len(to_run)) + 1)
                try:
                    outcome.slices_sent = job.run_case(case, loading.pop(case.case_id, None))
                except (CaseFailed, PromptError) as err:
                    outcome.status, outcome.reason = "failed", str(err)
                except Exception as err:  # noqa: BLE001 - one case's failure never stops the others
                    outcome.status, outcome.reason = "failed", f"{type(err).__name__}: {err}"
            outcome.seconds = round(time.perf_counter() - tic, 3)
            outcomes.append(outcome)

    if labels_dir:
        from .metrics import write_metrics

        write_metrics(out, job.scores, selected, nsd_tolerance_mm)
    report = InferenceReport(out, outcomes, ignored, model_info, time.perf_counter() - started)
    case_io.write_json(out / "summary.json", {
        "input_dir": str(Path(input_dir).resolve()),
        "output_dir": str(out.resolve()),
        "dataset": dataset or layout,
        "organs": selected,
        "prompt_source": "boxes" if boxes_file else "labels",
        "labels_dir": str(labels_dir) if labels_dir else None,
        "boxes_file": str(boxes_file) if boxes_file else None,
        "model": model_info,
        "settings": {"batch_size": int(batch_size), "amp": amp, "device": str(device),
                     "nsd_tolerance_mm": float(nsd_tolerance_mm), "probability_maps": bool(probability_maps)},
        "cases": [dataclasses.asdict(c) for c in outcomes],
        "ignored": [{"name": n, "reason": r} for n, r in ignored],
        "seconds": round(report.seconds, 3),
    })
    log(report.summary())
    return report


def run_from_bundle(input_dir: str, output_dir: str, layout: str, label_map: Mapping[str, int],
                    volume_transforms: Any, organs: str | Sequence[str] | None = "", adapter: str | None = "",
                    sam_checkpoint: str | None = "", arch: str = "vit_b", image_size: int | None = None,
                    labels_dir: str | None = "", boxes_file: str | None = "", overwrite: bool = False,
                    device: str | torch.device = "auto", batch_size: int = 8, amp: bool | str = True,
                    probability_maps: bool = False, nsd_tolerance_mm: float = 2.0,
                    dataset: str = "", merge_adapters: bool | str = True,
                    speed: Mapping[str, Any] | None = None) -> InferenceReport:
    """The bundles' ``inference`` run id: :func:`run_inference` with the bundle's settings; raises
    :class:`InferenceFailed` at the end when any case failed (so the process exits non-zero)."""
    if not input_dir:
        raise InputError("input_dir is empty: pass --input_dir DIR (a folder of .nii/.nii.gz files or DICOM folders)")
    report = run_inference(
        input_dir, output_dir, layout=layout, organs=organs or None, label_map=label_map,
        volume_transforms=volume_transforms, adapter=adapter or None, sam_checkpoint=sam_checkpoint or None,
        arch=arch, image_size=image_size, labels_dir=labels_dir or None, boxes_file=boxes_file or None,
        overwrite=overwrite, device=device, batch_size=int(batch_size), amp=amp,
        merge_adapters=merge_adapters, speed=speed, probability_maps=probability_maps, nsd_tolerance_mm=float(nsd_tolerance_mm), dataset=dataset or layout)
    if report.failed:
        raise InferenceFailed(report)
    return report
