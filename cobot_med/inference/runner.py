"""The batch job: every volume of a folder -> box prompts -> SAM slice by slice -> one label map per case
in the input's exact geometry, plus prompts, pictures, label descriptions and (with labels) metrics.

Per case: the run's volume chain (load, checks, ``Orientationd("RAS")``, CT window) -> prompts
(labels, 3D boxes or key slices) -> :func:`cobot_med.predict.predict_volume` -> the label map
(:func:`cobot_med.predict.to_label_map`) -> written in the input's geometry
(:func:`cobot_med.predict.writing.write_label_map`) -- the same predictor, label map and metric policy as
validation and test. A failing case is reported with its reason and the others go on; every file is
written atomically, the segmentation last.

A case's record (``<case>_prompts.json``) holds everything its outputs depend on: the model
(:func:`model_identity`), the SHA-256 of its input and label files, its prompts (the organs and the boxes
file's entries for it, or the labels), every setting that changes an output (precision, merged adapters,
NSD tolerance) and the outputs asked for; a case made with organs dropped (``drop_unusable_organs``) is
redone by a run that does not allow it. A rerun skips a case whose
record is this run's and whose outputs all exist, redoes one whose record differs and says why
(:meth:`CaseJob.status`); a folder holding another model's segmentations is refused before any work
unless ``overwrite`` (one run's results are never silently replaced by another's).

Under torchrun (``torchrun --nproc_per_node=N -m cobot_med infer ...``) every process plans the same split
of the cases still to do, balanced by voxels (:mod:`.sharding`), segments its share into the one output
folder, and the first process merges the outcomes, metrics and summary once all are done. A process that
dies loses only its case in flight: the same command, with any N, finishes the rest.
"""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .. import distributed
from ..files import DIGESTS_NAME, Digests, absolute, remove_stale_temporaries, write_json
from ..predict import BoxFile, CasePrompts, PromptError, SlicePredictor, from_labels, predict_volume, to_label_map
from ..predict.slices import recipe_of
from ..predict.writing import (label_map_in_input_geometry, segmentation_path, to_input_geometry, write_label_map,
                               write_volume)
from .cases import Case, attach_labels, find_cases
from .dicom_output import dicom_seg_path
from .outputs import prompts_record, write_label_files, write_metrics, write_overlay
from .report import CaseFailed, CaseOutcome, InferenceFailed, InferenceReport
from .sharding import shard



def case_files(output_dir: Path, case_id: str) -> dict[str, Path]:
    return {
        "seg": segmentation_path(output_dir, case_id),
        "prompts": output_dir / f"{case_id}_prompts.json",
        "overlay": output_dir / f"{case_id}_overlay.png",
        "metrics": output_dir / f"{case_id}_metrics.json",
        "dicom_seg": dicom_seg_path(output_dir, case_id),
    }


NO_SERIES_NOTE = "no DICOM-SEG: a NIfTI input has no DICOM series to reference (its segmentation is the NIfTI)"


def probability_path(output_dir: Path, case_id: str, organ: str) -> Path:
    return output_dir / f"{case_id}_prob_{organ}.nii.gz"


def load_network(settings: Any, device: torch.device | str, compile: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model for inference and what it is: the adapter's own model, or zero-shot SAM (``frozen``, the
    papers' "Freeze" row) of the settings' arch; LoRA folded into the frozen weights when ``merge_adapters``.
    With ``backend`` onnxruntime / openvino / auto, or an ``exported_model``, the exported model on its runtime
    where that is what runs (:func:`cobot_med.export.backend.load_backend`; same call signature)."""
    import dataclasses as dc

    if settings.backend != "torch" or settings.exported_model:
        from ..export.backend import load_backend

        loaded = load_backend(settings, device)
        if loaded is not None:
            return loaded
    from ..adapter import read_adapter_config
    from ..engine.network import build_network, for_inference
    from ..peft import merge_adapters

    zero_shot = not settings.adapter
    run_settings = dc.replace(settings, peft="frozen", peft_options={}) if zero_shot else settings
    network = build_network(run_settings, device, compile=compile)
    for_inference(network, merge=False)
    merged = merge_adapters(network) if settings.merge_adapters else 0
    spec = network.spec
    config = None if zero_shot else read_adapter_config(settings.adapter)
    info = {
        "adapter": None if zero_shot else str(absolute(settings.adapter)),
        "adapter_weights_sha256": None if zero_shot else config.get("weights_sha256"),
        "zero_shot": zero_shot, "arch": spec.arch, "peft": spec.peft, "image_size": int(spec.image_size),
        "base_checkpoint_sha256": network.base_sha256, "merged_layers": int(merged), "attention": spec.attention,
        "sam_checkpoint": settings.sam_checkpoint or None,
        "backend": "torch", "backend_reason": getattr(settings, "backend_reason", None) or "torch (explicit)",
    }
    return network, info


def model_identity(info: Mapping[str, Any], settings: Any, recipe: Any) -> dict[str, Any]:
    """What decides a case's segmentation besides its image: the model, its input recipe, the CT window."""
    from ..data.chains import ct_window_in_force

    keys = ("arch", "peft", "image_size", "adapter_weights_sha256", "base_checkpoint_sha256")
    return {**{k: info.get(k) for k in keys}, "recipe": recipe.to_dict(),
            "ct_window": ct_window_in_force(settings, recipe), "modality": settings.effective_modality}


RECORD_VERSION = 2  # 2: inputs' digests, settings and outputs in the record


class CaseJob:
    """Everything one case needs: the chain, the predictor, the prompt source, what to write."""

    def __init__(self, settings: Any, organs: dict[str, int], chain: Any, predictor: SlicePredictor,
                 boxes: BoxFile | None, identity: dict[str, Any], progress: bool, digests: Any = None,
                 run_settings: Mapping[str, Any] | None = None) -> None:
        from ..files import Digests

        self.settings, self.organs, self.chain, self.predictor = settings, organs, chain, predictor
        self.out = settings.output_path
        self.boxes, self.identity, self.progress = boxes, identity, progress
        self.source = {"kind": "boxes" if boxes is not None else "labels",
                       "file": str(absolute(settings.boxes_file)) if boxes is not None else None,
                       "organs": dict(organs)}
        self.digests = digests if digests is not None else Digests()
        self.run_settings = dict(run_settings or {})  # the speed choices that change outputs (precision, merge)
        self.scores: dict[str, dict] = {}
        self.dropped: dict[str, dict[str, str]] = {}  # case -> organs left out (drop_unusable_organs), why

    def outputs(self, case: Case) -> dict[str, Path]:
        """The files this run writes for ``case`` (the segmentation last)."""
        files = case_files(self.out, case.case_id)
        wanted = {name: files[name] for name in ("prompts", "overlay")}
        if case.label is not None:
            wanted["metrics"] = files["metrics"]
        if self.settings.probability_maps:
            wanted.update({f"prob_{organ}": probability_path(self.out, case.case_id, organ) for organ in self.organs})
        if self.settings.dicom_seg and case.kind == "dicom":
            wanted["dicom_seg"] = files["dicom_seg"]
        wanted["seg"] = files["seg"]
        return wanted

    def record(self, case: Case) -> dict[str, Any]:
        """What ``case``'s outputs depend on besides the model (see the module docstring)."""
        entries = None
        if self.boxes is not None:
            found = self.boxes.entries_for(case.case_id, case.image.name) or {}
            entries = {organ: dataclasses.asdict(found[organ]) for organ in self.organs if organ in found}
        settings = dict(self.run_settings)
        if case.label is not None:
            settings["nsd_tolerance_mm"] = float(self.settings.nsd_tolerance_mm)
        return {
            "version": RECORD_VERSION,
            "input": {"path": str(absolute(case.image)), "sha256": self.digests.of(case.image)},
            "label": None if case.label is None else {"path": str(absolute(case.label)),
                                                      "sha256": self.digests.of(case.label)},
            "prompts": {**self.source, "entries": entries},
            "settings": settings,
            "outputs": sorted(self.outputs(case)),
        }

    def load(self, case: Case) -> dict:
        from ..data.validation import DataError
        from ..errors import find_in_chain

        item = {"image": str(case.image)}
        if case.label is not None:
            item["label"] = str(case.label)
        try:
            return self.chain(item)
        except Exception as err:  # noqa: BLE001 - anything the readers raise is this case's reason
            named = find_in_chain(err, DataError)
            if named is not None:
                raise CaseFailed(str(named)) from err
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise CaseFailed(f"{case.image}: unreadable, truncated or corrupt ({type(cause).__name__}: {cause})") from err

    def status(self, case: Case) -> tuple[str, str]:
        """``("new", "")``: nothing there yet; ``("done", "")``: made by this run's model from the same record,
        every output present (skipped); ``("redo", why)``: its record differs, or an output is missing;
        ``("foreign", what made it)``: another model's segmentation (refused unless ``overwrite``)."""
        files = case_files(self.out, case.case_id)
        if not files["seg"].is_file():
            return "new", ""
        try:
            saved = json.loads(files["prompts"].read_text())
        except (OSError, ValueError):
            return ("redo", "its record is missing or unreadable") if self.settings.overwrite else (
                "foreign", "a segmentation without a readable record")
        if saved.get("model") != self.identity:
            return ("redo", "it was made by another model") if self.settings.overwrite else (
                "foreign", describe_model(saved.get("model")))
        if self.settings.overwrite:
            return "redo", "--overwrite"
        why = record_changes(saved.get("record"), self.record(case))
        if why:
            return "redo", why
        missing = [path.name for path in self.outputs(case).values() if not path.is_file()]
        if missing:
            return "redo", f"{', '.join(missing)} missing"
        if case.label is not None:
            try:
                scores = json.loads(files["metrics"].read_text())["organs"]
                self.scores[case.case_id] = {o: scores[o] for o in self.organs if o in scores}
            except (OSError, ValueError, KeyError, TypeError):
                return "redo", "its metrics file is unreadable"
        organs = saved.get("organs") if isinstance(saved.get("organs"), dict) else {}
        dropped = {organ: entry.get("note", "") for organ, entry in organs.items()
                   if isinstance(entry, dict) and entry.get("source") == "none" and "given" in entry}
        if dropped and not self.settings.drop_unusable_organs:
            return "redo", f"it was made without {', '.join(dropped)} (--drop_unusable_organs), which this run does not allow"
        if dropped:
            self.dropped[case.case_id] = dropped  # the summary names them again, as the run that made it did
        return "done", ""

    def prompts(self, case: Case, data: dict) -> CasePrompts:
        if self.boxes is not None:
            return self.boxes.for_case(case.case_id, data["image"], self.organs, case.image.name)
        return from_labels(data["label"], self.organs)

    def run(self, case: Case, loading: Future | None = None) -> int:
        """Predict and write one case; returns the number of slice images sent to the model."""
        from tqdm.auto import tqdm

        from ..metrics import case_scores, spacing_of

        files = case_files(self.out, case.case_id)
        data = loading.result() if loading is not None else self.load(case)
        image, label = data["image"], data.get("label")
        prompts = self.prompts(case, data)
        unusable = prompts.unusable()
        if unusable and not self.settings.drop_unusable_organs:
            reasons = "; ".join(f"{organ}: {why}" for organ, why in unusable.items())
            raise CaseFailed(f"unusable prompt for {', '.join(unusable)} ({reasons}); correct the boxes file, or "
                             "pass --drop_unusable_organs to segment the other organs")
        self.dropped[case.case_id] = unusable
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
            probs, used = predict_volume(self.predictor, volume, prompts)
            self.predictor.on_slices = None
        seg = to_label_map(probs, list(self.organs.values()))

        wanted = self.outputs(case)
        for stale in stale_outputs(self.out, case.case_id, set(wanted.values())):
            stale.unlink()  # the case is made again: maps and scores not asked for now would not be of this run
        record = prompts_record(case.case_id, self.source["kind"], self.organs, prompts.prompts, used, image)
        write_json(files["prompts"], {**record, "model": self.identity, "prompt_source": self.source,
                                      "record": self.record(case)})
        label_map = None if label is None else torch.as_tensor(label)[0].numpy()
        write_overlay(files["overlay"], volume.numpy(), seg[0].numpy(), label_map, self.organs, case.case_id)
        if self.settings.probability_maps:
            from monai.data import MetaTensor

            inverted = to_input_geometry(probs, image, self.chain, nearest=False)
            for k, organ in enumerate(self.organs):
                channel = MetaTensor(inverted[k : k + 1].as_tensor(), meta=dict(inverted.meta))
                write_volume(channel, probability_path(self.out, case.case_id, organ), np.float32)
        if label is not None:
            tolerance = self.settings.nsd_tolerance_mm
            scores = case_scores(seg[0], torch.as_tensor(label)[0], self.organs, spacing_of(image.affine), tolerance)
            write_json(files["metrics"], {"case_id": case.case_id, "nsd_tolerance_mm": tolerance, "organs": scores})
            self.scores[case.case_id] = scores
        inverted = label_map_in_input_geometry(seg, image, self.chain)
        if "dicom_seg" in wanted:
            self.write_dicom_seg(case, inverted, files["dicom_seg"])
        write_label_map(seg, image, self.chain, files["seg"], inverted=inverted)
        return self.predictor.images_sent - sent_before

    def write_dicom_seg(self, case: Case, inverted: Any, path: Path) -> None:
        """The case's DICOM-SEG on its own series (:mod:`.dicom_output`); one that cannot be written fails the
        case (before its NIfTI, so a rerun redoes it)."""
        from ..dicom_seg import DicomSegError
        from .dicom_output import write_case_seg

        try:
            write_case_seg(inverted, case.image, self.organs, path, self.identity)
        except DicomSegError as err:
            raise CaseFailed(f"{case.image}: no DICOM-SEG ({err}); run without --dicom_seg for the NIfTI alone") from err


def stale_outputs(output_dir: Path, case_id: str, wanted: set[Path]) -> list[Path]:
    """Outputs of ``case_id`` in ``output_dir`` that this run does not write (probability maps, metrics, the
    DICOM-SEG)."""
    files = case_files(output_dir, case_id)
    candidates = [files["metrics"], files["dicom_seg"], *output_dir.glob(f"{case_id}_prob_*.nii.gz")]
    return [path for path in candidates if path.is_file() and path not in wanted]


def describe_model(identity: Mapping[str, Any] | None) -> str:
    """A model identity in a few words, for messages."""
    if not isinstance(identity, Mapping):
        return "an unknown model"
    weights = identity.get("adapter_weights_sha256")
    return (f"{identity.get('arch')}/{identity.get('peft')} at {identity.get('image_size')} px"
            + (f", adapter weights {str(weights)[:12]}..." if weights else ", zero-shot"))


def record_changes(before: Mapping[str, Any] | None, now: Mapping[str, Any]) -> str:
    """Why a case must be redone: what differs between its saved record and this run's ('' when nothing)."""
    if not isinstance(before, Mapping) or before.get("version") != now["version"]:
        return "its record is from an older version"
    reasons = []
    if (before.get("input") or {}).get("sha256") != now["input"]["sha256"]:
        reasons.append("its input file changed")
    old_label, new_label = before.get("label"), now["label"]  # a label matters to a run that scores with it
    if new_label is not None and old_label is None:
        reasons.append("reference labels were given")
    elif new_label is not None and old_label.get("sha256") != new_label["sha256"]:
        reasons.append("its reference label changed")
    if before.get("prompts") != now["prompts"]:
        old_prompts = before.get("prompts") or {}
        if old_prompts.get("organs") != now["prompts"]["organs"]:
            reasons.append("other organs were asked for")
        if old_prompts.get("kind") != now["prompts"]["kind"] or old_prompts.get("entries") != now["prompts"]["entries"]:
            reasons.append("its prompts changed")
        elif old_prompts.get("file") != now["prompts"]["file"]:
            reasons.append("another boxes file was given")
    old_settings, new_settings = before.get("settings") or {}, now["settings"]
    for key in sorted(set(new_settings)):  # a setting of an output this run does not ask for (NSD) does not count
        if old_settings.get(key) != new_settings.get(key):
            reasons.append(f"{key} {old_settings.get(key)} -> {new_settings.get(key)}")
    added = sorted(set(now["outputs"]) - set(before.get("outputs") or []))
    if added:  # outputs asked for that the case lacks; fewer than it has are still its own (kept)
        reasons.append("other outputs were asked for (" + ", ".join(f"+{o}" for o in added) + ")")
    return "; ".join(reasons)


def select_organs(label_map: Mapping[str, int], names: str) -> dict[str, int]:
    """The organs to segment, in label-map order: all of them, or those named (``'liver,spleen'``)."""
    wanted = [n for n in names.replace(" ", ",").split(",") if n] if names else []
    return {organ: i for organ, i in label_map.items() if not wanted or organ in wanted}


def run_inference(settings: Any, speed: Any = None, network: torch.nn.Module | None = None,
                  progress: bool = True, log: Callable[[str], None] = print,
                  prefetch: bool | None = None) -> InferenceReport:
    """Segment every volume of ``settings.input_dir`` into ``settings.output_dir``; see docs/inference.md.

    ``settings`` is a checked :class:`cobot_med.settings.RunSettings` (its ``check("inference")`` has run);
    ``speed`` its resolved speed choices (``settings.speed_choices(device, training=False)``: precision,
    attention, compile, threads; resolved here when not given); ``network``
    (anything with PromptableSam's call signature and an ``image_size``) replaces the model the settings
    name. ``prefetch`` reads the next case in a background thread while one is predicted (None: on GPUs
    only; on a 2-core CPU the reading thread competed with the model and made runs slower). Returns the
    report; its ``exit_code`` is 1 when any case failed.
    """
    from ..engine.network import resolve_device

    device = resolve_device(settings.device)
    joined = distributed.start_from_environment(device)
    try:
        return _run(settings, device, speed, network, progress, log, prefetch)
    finally:
        distributed.stop(joined)


def _run(settings: Any, device: torch.device, speed: Any, network: torch.nn.Module | None, progress: bool,
         log: Callable[[str], None], prefetch: bool | None) -> InferenceReport:
    from tqdm.auto import tqdm

    from ..data.chains import run_volume_chain

    started = time.perf_counter()
    rank, processes = distributed.rank(), distributed.world_size()
    first = rank == 0
    if not first:
        log = _silent
    speed = (speed or settings.speed_choices(device, training=False)).apply_threads()
    organs = select_organs(settings.organs, settings.infer_organs)
    out = settings.output_path
    cases, ignored = find_cases(settings.input_dir)
    if not cases:
        from .cases import InputError

        raise InputError(f"{settings.input_dir}: no .nii / .nii.gz files or DICOM folders to segment")
    if settings.labels_dir:
        attach_labels([c for c in cases if not c.error], settings.labels_dir)
    boxes = BoxFile(settings.boxes_file, settings.organs) if settings.boxes_file else None
    if network is None:
        network, model_info = load_network(settings, device, compile=speed.compile)
        if model_info.get("backend", "torch") == "torch":
            speed = speed.for_model(network)  # the attention the model runs: an adapter's own, unless given
            log(f"model: {model_info['arch']}/{model_info['peft']} at {model_info['image_size']} px"
                f"{' (zero-shot)' if model_info['zero_shot'] else ', adapter ' + str(settings.adapter)}"
                f", {model_info['merged_layers']} LoRA layers merged")
            log(f"runs on: {speed.said(device)}")
    else:
        model_info = {"adapter": None, "zero_shot": False, "arch": "custom", "peft": type(network).__name__,
                      "image_size": int(network.image_size), "merged_layers": 0}
        speed = speed.for_model(network)  # a PromptableSam's own attention; a stand-in's choices unchanged
        if hasattr(network, "eval"):
            network.eval()
    recipe = recipe_of(network)
    identity = model_identity(model_info, settings, recipe)

    chain = run_volume_chain(settings, recipe)
    exported = model_info.get("backend", "torch") != "torch"  # its arch is the settings' (check_run settled it)
    slice_batch = settings.slice_batch(device, None if exported else network)
    predictor = SlicePredictor(network, device, slice_batch, speed.precision)
    digests = Digests(out / DIGESTS_NAME)
    merged = bool(model_info.get("merged_layers"))
    job = CaseJob(settings, organs, chain, predictor, boxes, identity, progress, digests,
                  {"precision": speed.precision.name, "merged_adapters": merged})
    status = {c.case_id: job.status(c) for c in cases if not c.error}
    foreign = {case_id: what for case_id, (state, what) in status.items() if state == "foreign"}
    if foreign:
        from .cases import InputError

        names = ", ".join(sorted(foreign)[:5]) + (" ..." if len(foreign) > 5 else "")
        makers = "; ".join(sorted(set(foreign.values()))[:3])
        raise InputError(f"output folder {out} holds segmentations another model made ({len(foreign)} case(s): "
                         f"{names}; made by {makers}), and this run is {describe_model(identity)}: choose another "
                         "output folder, or pass --overwrite to replace them")
    if first:
        from ..errors import set_interrupt_note
        from ..lock import acquire

        acquire(out, "inference")  # held since settings.check; a caller that skipped it takes it here
        set_interrupt_note(f"the finished cases in {out} are kept; the same command segments the rest")
        remove_stale_temporaries(out)
        write_label_files(out, organs, settings.dataset)
        digests.save()
    distributed.barrier()  # every process has seen the same finished cases before any writes a new one
    pending = [c for c in cases if not c.error and status[c.case_id][0] != "done"]
    for case in pending:
        if status[case.case_id][0] == "redo":
            log(f"{case.case_id}: redone, {status[case.case_id][1]}")
    to_run = shard(pending, processes)[rank] if processes > 1 else pending
    mine = {case.case_id for case in to_run}
    if processes > 1:
        log(f"{len(pending)} case(s) to segment over {processes} processes, balanced by voxels")
    position = {case.case_id: i for i, case in enumerate(to_run)}
    prefetch = device.type == "cuda" if prefetch is None else prefetch
    outcomes: list[CaseOutcome] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cobot-med-read") as loader:
        loading: dict[str, Future] = {}

        def start_loading(index: int) -> None:
            if prefetch and index < len(to_run):
                loading[to_run[index].case_id] = loader.submit(job.load, to_run[index])

        start_loading(0)
        desc = "cases" if processes == 1 else f"cases, process {rank}/{processes}"
        listed = cases if first else to_run  # the first process also reports the listing's failures and skips
        for case in tqdm(listed, desc=desc, unit="case", disable=not progress, position=rank):
            outcome = CaseOutcome(case.case_id, str(case.image), "done")
            tic = time.perf_counter()
            if case.error:
                outcome.status, outcome.reason = "failed", case.error
            elif status[case.case_id][0] == "done":
                outcome.status, outcome.dropped = "skipped", job.dropped.get(case.case_id, {})
            elif case.case_id not in mine:
                continue  # another process's
            else:
                start_loading(position[case.case_id] + 1)
                try:
                    outcome.slices_sent = job.run(case, loading.pop(case.case_id, None))
                    outcome.dropped = job.dropped.get(case.case_id, {})
                except (CaseFailed, PromptError) as err:
                    outcome.status, outcome.reason = "failed", str(err)
                except Exception as err:  # noqa: BLE001 - one case's failure never stops the others
                    outcome.status, outcome.reason = "failed", f"{type(err).__name__}: {err}"
            if settings.dicom_seg and case.kind != "dicom" and outcome.status != "failed":
                outcome.note = NO_SERIES_NOTE
            outcome.seconds = round(time.perf_counter() - tic, 3)
            outcomes.append(outcome)

    parts = distributed.gather((outcomes, job.scores))  # every process's outcomes, once all are done
    outcomes = _in_listing_order(cases, [o for part, _ in parts for o in part])
    scores = {case: value for _, part in parts for case, value in part.items()}
    report = InferenceReport(out, outcomes, ignored, model_info, time.perf_counter() - started)
    if not first:
        return report
    if settings.labels_dir:
        write_metrics(out, scores, organs, settings.nsd_tolerance_mm)
    write_json(out / "summary.json", {
        "input_dir": str(Path(settings.input_dir).resolve()),
        "output_dir": str(out.resolve()),
        "dataset": settings.dataset,
        "organs": organs,
        "prompt_source": job.source["kind"],
        "labels_dir": settings.labels_dir or None,
        "boxes_file": settings.boxes_file or None,
        "model": model_info,
        "model_identity": identity,
        "processes": processes,
        "settings": {"batch_size": slice_batch, "eval_batch_size": settings.eval_batch_size, "device": str(device), **speed.describe(),
                     "nsd_tolerance_mm": settings.nsd_tolerance_mm, "probability_maps": settings.probability_maps,
                     "dicom_seg": settings.dicom_seg},
        "cases": [dataclasses.asdict(c) for c in outcomes],
        "dropped_organs": report.dropped,
        "ignored": [{"name": n, "reason": r} for n, r in ignored],
        "seconds": round(report.seconds, 3),
    })
    log(report.summary())
    return report


def _silent(_: str) -> None:
    """The log of every process but the first (one summary per job, not one per process)."""


def _in_listing_order(cases: list[Case], outcomes: list[CaseOutcome]) -> list[CaseOutcome]:
    rank_of = {case.case_id: i for i, case in enumerate(cases)}
    return sorted(outcomes, key=lambda o: (rank_of.get(o.case_id, len(cases)), o.image))


def run_from_settings(settings: Any, speed: Any = None) -> InferenceReport:
    """The bundles' ``inference`` run id: :func:`run_inference`; raises :class:`InferenceFailed` at the end
    when any case failed (so the process exits non-zero)."""
    report = run_inference(settings, speed)
    if report.failed:
        raise InferenceFailed(report)
    return report
