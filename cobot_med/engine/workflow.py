"""The steps of the bundles' run ids that are not an engine's own run: test the best adapter after training,
evaluate a saved adapter, record the resolved settings."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..adapter import AdapterError, load_adapter_weights, read_adapter_config, unwrap
from ..distributed import barrier, is_rank0
from ..files import absolute, write_json
from .network import for_inference


def test_best_adapter(network: torch.nn.Module, session: Any, settings: Any, evaluator: Any,
                      mlflow_handler: Any = None) -> dict[str, float] | None:
    """After training: load this run's best adapter (checked: its run key, spec, base and weights), put the
    network in its inference form (as ``cobot-med infer`` runs it) and score the test split, logged into the
    run. Skipped when the split has no test case."""
    barrier()  # the first process wrote adapter_best
    best = settings.output_path / "adapter_best"
    if (best / "adapter_config.json").is_file():
        config = read_adapter_config(best)
        if config.get("run_key") != session.run_key:
            raise AdapterError(f"{best} was written by another run (key {config.get('run_key')}), not by this one "
                               f"({session.run_key}); its score would not be this run's")
        load_adapter_weights(network, best)
    for_inference(network, settings.merge_adapters)
    if len(evaluator.data_loader.dataset) == 0:
        return None
    if mlflow_handler is not None:
        mlflow_handler.attach(evaluator)
    evaluator.run()
    metrics = scalar_metrics(evaluator)
    session.test_scores = (metrics, dict(getattr(evaluator.state, "protocol_scores", None) or {}))  # say_summary's
    return metrics


def evaluate_adapter(network: torch.nn.Module, settings: Any, evaluator: Any) -> dict[str, float]:
    """The ``evaluate`` run id: score a saved adapter (or, with ``peft=frozen`` and no adapter, the base model
    zero-shot) on the test split; print the table, write ``evaluation.json`` (naming the adapter, its weights'
    SHA-256, the base it ran on, its input size and recipe). An ``evaluation.json`` of another model (other
    weights, base, arch, input size or recipe) is not overwritten without ``overwrite``."""
    config = read_adapter_config(settings.adapter) if settings.adapter else {}
    if not config and hasattr(network, "exported"):  # an exported adapter's model (--exported_model)
        config = dict(network.exported.manifest.get("adapter") or {})
    model = network if hasattr(network, "exported") else unwrap(network)  # an exported model has spec and base too
    scored = {"path": str(absolute(settings.adapter)) if settings.adapter else None,
              "weights_sha256": config.get("weights_sha256"),
              "base_checkpoint_sha256": config.get("base_checkpoint_sha256", getattr(model, "base_sha256", None)),
              "arch": model.spec.arch, "peft": model.spec.peft, "image_size": int(model.spec.image_size),
              "recipe": model.spec.recipe}
    out = settings.output_path / "evaluation.json"
    if out.is_file() and not settings.overwrite:
        previous = json.loads(out.read_text()).get("adapter", {})
        current = json.loads(json.dumps(scored))  # as it reads back (tuples become lists)
        same = ("weights_sha256", "base_checkpoint_sha256", "arch", "image_size", "recipe")
        if any(previous.get(k) != current[k] for k in same):
            raise AdapterError(f"{out} holds the evaluation of another model ({previous.get('path') or 'a base model'}); "
                               "choose another output_dir or pass --overwrite true")
    for_inference(network, settings.merge_adapters)
    evaluator.run()
    metrics = scalar_metrics(evaluator)
    protocols = getattr(evaluator.state, "protocol_scores", None) or {}
    if is_rank0():
        write_json(out, {"adapter": scored, "metrics": metrics, **metrics, "prompts": list(protocols),
                         "propagator": settings.propagator, "protocols": protocols})
        model = f"{scored['path'] or 'the base model, zero-shot'} ({scored['peft']}, {scored['arch']} at " \
                f"{scored['image_size']} px)"
        print(run_summary("evaluate", model, scores_table(settings.organs, metrics, protocols),
                          output_rows(settings.output_path, "evaluate"), None), flush=True)
    return metrics


_started: dict[str, float] = {}  # run id -> when say_choices announced it (the summary's duration)


def say_choices(run_id: str, device: Any, speed: Any) -> None:
    """The run's first line: what it runs on and the choices that change its results and speed, with their
    reasons (:meth:`~cobot_med.engine.precision.SpeedChoices.said`); the first process only."""
    from ..distributed import rank

    _started[run_id] = time.monotonic()
    if rank() == 0:
        print(f"cobot-med {run_id} runs on: {speed.said(device)}", flush=True)


def say_summary(run_id: str, settings: Any, session: Any) -> None:
    """The end of a training (its last step, first process): what was trained, the test split's scores by prompt
    protocol, where the adapter, predictions and pictures went, and the MLflow run with the ``mlflow ui`` line."""
    from .tracking import split_protocol_metric

    best = settings.output_path / "adapter_best"
    config = read_adapter_config(best) if (best / "adapter_config.json").is_file() else {}
    epochs = f"{settings.epochs} epoch{'s' if settings.epochs != 1 else ''}"
    model = f"{settings.dataset}, {settings.peft} on {settings.arch} at {settings.image_size} px, {epochs}"
    for key, value in (config.get("metric") or {}).items():  # the metric the best adapter was kept by
        name, protocol = split_protocol_metric(key)
        model += f" (best epoch {config.get('epoch')} by {name} under {protocol} prompts: {value:.4f})"
    scores = getattr(session, "test_scores", None)
    table = (scores_table(settings.organs, *scores) if scores else
             "no test split scored (test_fraction 0 or no test case): the validation DSC is in MLflow")
    run = (getattr(session, "mlflow_run_id", None), session.tracking_uri)
    print(run_summary(run_id, model, table, output_rows(settings.output_path, run_id), run), flush=True)


def output_rows(output: Path, run_id: str) -> list[tuple[str, str]]:
    """Where a run's results are, those that exist: (what, where) rows of :func:`run_summary` (the demo's too)."""
    output = absolute(output)

    def there(*names: str) -> list[str]:
        return [str(output / n) for n in names if (output / n).exists()]

    rows = []
    if run_id == "training" and (output / "adapter_best").is_dir():
        rows.append(("adapter", str(output / "adapter_best")))
    predictions = []
    if (output / "val_predictions").is_dir():
        predictions.append(f"{output / 'val_predictions'} (validation)")
    if (output / "test_predictions").is_dir():
        predictions.append(f"{output / 'test_predictions'}/<protocol> (test: label maps, prompts, metrics)")
    if predictions:
        rows.append(("predictions", ", ".join(predictions)))
    pictures = there("overlays", "loss_curve.png", "robustness.png")
    if pictures:
        rows.append(("pictures", ", ".join(pictures)))
    records = there("evaluation.json" if run_id == "evaluate" else "resolved_settings.json")
    if records:
        rows.append(("record", records[0]))
    return rows


def run_summary(run_id: str, model: str, table: str, rows: list[tuple[str, str]],
                run: tuple[str | None, str] | None) -> str:
    """A finished run's summary, one shape for every run (training, evaluate, the demo): a heading naming the
    run and the model, the scores, then the paths and the MLflow run (``run`` = (run id, store); None for a run
    that records no MLflow run)."""
    took = time.monotonic() - _started[run_id] if run_id in _started else None
    heading = f"cobot-med {run_id} finished" + (f" in {_duration(took)}" if took is not None else "") + f": {model}"
    return "\n".join(["", heading, table, *where_lines(run_id, rows, run)])


def where_lines(run_id: str, rows: list[tuple[str, str]], run: tuple[str | None, str] | None) -> list[str]:
    """The summary's lines after the scores: the MLflow run (with the line that opens it) and the paths."""
    from ..redact import redact

    if run is None:
        lines = [f"  {'MLflow run:':<13} none ({run_id} records its scores in evaluation.json)"]
    elif run[0] is None:
        lines = [f"  {'MLflow run:':<13} not found in {redact(run[1])}"]
    else:
        shown = redact(run[1])
        lines = [f"  {'MLflow run:':<13} {run[0]} in {shown}  (mlflow ui --backend-store-uri {shown})"]
    return lines + [f"  {what + ':':<13} {where}" for what, where in rows]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s" if minutes else f"{secs} s"


def scores_table(organs: Any, metrics: dict[str, float], protocols: dict[str, dict] | None = None) -> str:
    """The test split's 3D DSC per organ, one column per prompt protocol (``tight (oracle)`` first), the mean,
    and the authors' pooled slice DSC under ``tight``."""
    from ..predict.protocols import parse_protocol

    nan = float("nan")

    def number(value: Any) -> float:
        return nan if value is None else float(value)

    columns: list[tuple[str, dict[str, float]]] = []
    for name, block in (protocols or {}).items():
        values = {organ: number(block["organs"][organ]["dsc"]) for organ in organs}
        label = parse_protocol(name).label
        if block.get("propagator") not in (None, "boxes"):  # key slices carried by SAM 2's memory: say so
            label += f" ({block['propagator']})"
        columns.append((label, {**values, "mean": number(block["dsc"])}))
    if not columns:  # no protocol blocks: the evaluator's own (tight) metrics
        columns = [("tight (oracle)", {**{o: metrics.get(f"test_dsc_{o}", nan) for o in organs},
                                       "mean": metrics.get("test_dsc", nan)})]
    width = max(9, *(len(label) for label, _ in columns))
    lines = ["3D DSC on the test split (whole volume) by prompt protocol; tight is the papers' protocol, an oracle "
             "(docs/evaluation.md)",
             f"{'organ':<16}" + "".join(f" {label:>{width}}" for label, _ in columns)]
    for organ in [*organs, "mean"]:
        lines.append(f"{organ:<16}" + "".join(f" {values[organ]:>{width}.4f}" for _, values in columns))
    lines.append(f"{'pooled slice DSC (tight)':<24} {metrics.get('test_slice_dsc', nan):.4f}")
    return "\n".join(lines)


def scalar_metrics(engine: Any) -> dict[str, float]:
    return {k: float(v) for k, v in engine.state.metrics.items()
            if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)}


def write_resolved_settings(settings: Any, session: Any, speed: Any = None) -> str:
    """``resolved_settings.json``: every setting as this run used it, with its key, and ``speed``'s choices
    (the resolved speed choices, or their ``describe()``) with their reasons, thread counts and loader
    workers, which depend on the machine and are not MLflow params (an MLflow artifact, rewritten by a
    resumed run)."""
    path = settings.output_path / "resolved_settings.json"
    record = {"run_key": session.run_key, "run_name": session.run_name, "identity": session.identity,
              "settings": settings.to_dict()}
    if speed is not None:
        record["speed"] = speed.describe() if hasattr(speed, "describe") else dict(speed)
    write_json(path, record)
    return str(path)
