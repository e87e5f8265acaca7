"""Scores of an evaluated split under every prompt protocol (docs/evaluation.md).

The evaluator predicts each volume once with its own inferer (``tight``, the papers' oracle: ``test_dsc``);
this handler predicts the same volume under the other protocols with the same inferer, network and precision
(:meth:`cobot_med.engine.evaluation.VolumeSliceInferer.for_protocol`), scores every label map on the whole
volume by the one metric policy (:func:`cobot_med.metrics.case_scores`: DSC, NSD and HD95 per organ, so a false
positive on a slice without the organ counts), and writes the label maps, the prompts sent and the metrics of
each protocol into ``<output_dir>/<protocol>/`` (the names exactly as given). MLflow gets one metric per protocol
and organ under :func:`cobot_med.engine.tracking.protocol_metric`'s rule; the evaluator's state gets the blocks
of ``evaluation.json`` (``engine.state.protocol_scores``); ``curve_path`` gets the robustness curve (DSC against
the ``jitter`` protocols' px, ``tight`` at 0). The block and the prompts record of a protocol that propagates a key
slice (``key_slice``, ``clicks``) name the inferer's ``propagator`` (``boxes`` or ``sam2_memory``): the same
protocol scores differently under each.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from ignite.engine import Engine, Events

from ..predict.protocols import TIGHT, Protocol, parse_protocol
from ._distributed import is_rank0
from .segmentation_writer import _case_ids

PROTOCOLS_JSON = "protocols.json"


class ProtocolScores:
    """Attach to an evaluator whose inferer is a :class:`~cobot_med.engine.evaluation.VolumeSliceInferer`
    (``inferer``, for its organs, batch size, precision and seed).

    ``protocols``: names or :class:`~cobot_med.predict.protocols.Protocol` objects (``tight`` reuses the
    evaluator's own prediction); ``metric_name``: the split's DSC (``test_dsc``, ``val_dsc``); ``output_dir``:
    where each protocol's folder goes (None: nothing written, as validation); ``chain``: the volume chain, to
    write the label maps in their input's geometry; ``surface``: NSD and HD95 too (off: DSC only).
    """

    def __init__(self, inferer: Any, protocols: Sequence[Protocol | str], metric_name: str = "test_dsc",
                 output_dir: str | Path | None = None, chain: Any = None, nsd_tolerance_mm: float = 2.0,
                 surface: bool = True, curve_path: str | Path | None = None) -> None:
        self.protocols = [p if isinstance(p, Protocol) else parse_protocol(p) for p in protocols]
        self.organs = dict(inferer.organs)
        self.propagator = getattr(inferer, "propagator", "boxes")
        self.inferers = {p.name: inferer.for_protocol(p) for p in self.protocols if p.kind != TIGHT}
        self.metric_name, self.chain = metric_name, chain
        self.output_dir = Path(output_dir) if output_dir else None
        self.tolerance, self.surface = float(nsd_tolerance_mm), bool(surface)
        self.curve_path = Path(curve_path) if curve_path else None
        self.cases: dict[str, dict[str, dict]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.score)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.complete)

    def reset(self, _engine: Engine | None = None) -> None:
        self.cases = {p.name: {} for p in self.protocols}

    def propagator_of(self, protocol: Protocol) -> str | None:
        """What carried ``protocol``'s key slices through the volume (None: it prompts every slice it predicts)."""
        return self.propagator if protocol.propagates else None

    def folder(self, protocol: Protocol) -> Path | None:
        return None if self.output_dir is None else self.output_dir / protocol.name

    def score(self, engine: Engine) -> None:
        """Every case of the iteration under every protocol: predicted, scored, written."""
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        case_ids = [case for item in items for case in _case_ids(item)]
        for case_id, output in zip(case_ids, outputs):
            self.score_case(engine.network, case_id, output["image"], output["label"], output["pred"])

    def score_case(self, network: Any, case_id: str, image: Any, label: Any, pred: Any) -> dict[str, dict]:
        """One case's scores per protocol ({protocol: {organ: scores}}); ``image``, ``label`` and ``pred`` (the
        evaluator's ``tight`` label map) are the oriented (1, X, Y, Z) volumes."""
        from ..files import write_json
        from ..inference.outputs import prompts_record
        from ..metrics import case_scores, spacing_of
        from ..predict import from_labels
        from ..predict.writing import segmentation_path, write_label_map

        image = image.detach().cpu() if hasattr(image, "detach") else image
        reference = torch.as_tensor(label).detach().cpu().reshape(label.shape[-3:])
        spacing = spacing_of(image.affine)
        scored = {}
        for protocol in self.protocols:
            if protocol.kind == TIGHT:  # the evaluator's own prediction: the papers' protocol
                seg = torch.as_tensor(pred).detach().cpu().reshape(1, *pred.shape[-3:])
                prompts = from_labels(reference[None], self.organs)
                used = [dict(p.boxes) for p in prompts.prompts]
            else:
                seg, prompts, used = self.inferers[protocol.name].predict(image, network, reference, case_id)
            scores = case_scores(seg, reference, self.organs, spacing, self.tolerance, self.surface)
            self.cases.setdefault(protocol.name, {})[case_id] = scores
            scored[protocol.name] = scores
            folder = self.folder(protocol)
            if folder is not None:
                record = prompts_record(case_id, protocol.name, self.organs, prompts.prompts, used, image)
                write_json(folder / f"{case_id}_prompts.json", {**record, "protocol": protocol.describe(),
                                                                 "propagator": self.propagator_of(protocol)})
                write_label_map(seg, image, self.chain, segmentation_path(folder, case_id))
        return scored

    def complete(self, engine: Engine) -> dict[str, dict]:
        """Every process's cases merged; the means per protocol into the engine's metrics (MLflow) and
        ``engine.state.protocol_scores``; on the first process the files and the robustness curve."""
        from ..distributed import gather
        from ..engine.tracking import protocol_metric
        from ..files import write_json
        from ..inference.outputs import write_metrics
        from ..metrics import summarise

        merged: dict[str, dict[str, dict]] = {p.name: {} for p in self.protocols}
        for part in gather(self.cases):
            for name, cases in part.items():
                merged.setdefault(name, {}).update(cases)
        organs = list(self.organs)
        results: dict[str, dict] = {}
        for protocol in self.protocols:
            cases = {case: merged[protocol.name][case] for case in sorted(merged[protocol.name])}
            means = summarise(cases, organs)
            folder = self.folder(protocol)
            results[protocol.name] = {
                "protocol": protocol.canonical, "oracle": protocol.oracle, "description": protocol.describe(),
                "propagator": self.propagator_of(protocol),
                "dsc": means["all"]["dsc"], "nsd": means["all"]["nsd"], "hd95_mm": means["all"]["hd95_mm"],
                "cases_counted": means["all"]["cases"],
                "metric": protocol_metric(self.metric_name, protocol),
                "organs": {organ: means[organ] for organ in organs},
                "predictions": str(folder) if folder is not None else None,
                "cases": cases,
            }
            if protocol.kind != TIGHT:  # tight's are the evaluator's own (test_dsc, test_dsc_<organ>)
                engine.state.metrics[protocol_metric(self.metric_name, protocol)] = _number(means["all"]["dsc"])
                for organ in organs:
                    engine.state.metrics[protocol_metric(f"{self.metric_name}_{organ}", protocol)] = _number(
                        means[organ]["dsc"])
            if folder is not None and is_rank0():
                folder.mkdir(parents=True, exist_ok=True)
                write_metrics(folder, cases, self.organs, self.tolerance)
        engine.state.protocol_scores = results
        if is_rank0():
            if self.output_dir is not None:
                write_json(self.output_dir / PROTOCOLS_JSON, results)
            if self.curve_path is not None:
                plot_robustness(results, self.protocols, organs, self.curve_path)
        return results


def _number(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def robustness_points(results: Mapping[str, Mapping[str, Any]], protocols: Sequence[Protocol],
                      organs: Sequence[str]) -> dict[int, dict[str, float]]:
    """{px: {organ: DSC, ..., "mean": DSC}} of the ``jitter`` protocols, with ``tight`` at 0 px."""
    points: dict[int, dict[str, float]] = {}
    for protocol in protocols:
        if protocol.kind not in (TIGHT, "jitter"):
            continue
        px = 0 if protocol.kind == TIGHT else int(protocol.amount)
        if px in points and protocol.kind != TIGHT:
            continue  # jitter:0 is tight
        block = results[protocol.name]
        points[px] = {organ: _number(block["organs"][organ]["dsc"]) for organ in organs}
        points[px]["mean"] = _number(block["dsc"])
    return dict(sorted(points.items()))


def plot_robustness(results: Mapping[str, Mapping[str, Any]], protocols: Sequence[Protocol], organs: Sequence[str],
                    path: str | Path) -> Path | None:
    """The robustness curve: 3D DSC per organ (and the mean) against the box jitter in px, ``tight`` at 0; None
    (nothing drawn) without a ``jitter`` protocol."""
    points = robustness_points(results, protocols, organs)
    if len(points) < 2:
        return None
    from matplotlib.figure import Figure

    from .overlays import COLOURS

    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    ax = fig.subplots()
    xs = list(points)
    for k, organ in enumerate([*organs, "mean"]):
        ys = [points[x][organ] for x in xs]
        if all(math.isnan(y) for y in ys):
            continue
        style = dict(color="black", linewidth=2.2, linestyle="--") if organ == "mean" else dict(
            color=COLOURS[k % len(COLOURS)], linewidth=1.4)
        ax.plot(xs, ys, marker="o", label=organ, **style)
    ax.set_xticks(xs)
    ax.set_xlabel("box jitter (px at the volume's resolution; 0 = tight, the oracle)")
    ax.set_ylabel("3D DSC (whole volume)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside right upper")
    ax.set_title("Robustness to the box's error (test split)", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from ..files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(str(tmp), dpi=110, format="png")
    return path
