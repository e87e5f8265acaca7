"""The steps of the bundles' run ids that are not an engine's own run: test the best adapter after training,
evaluate a saved adapter, record the resolved settings."""

from __future__ import annotations

import json
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
    if is_rank0():
        print(scores_table(settings.organs, metrics, getattr(evaluator.state, "protocol_scores", None)))
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
        print(scores_table(settings.organs, metrics, protocols))
        write_json(out, {"adapter": scored, "metrics": metrics, **metrics, "prompts": list(protocols),
                         "protocols": protocols})
    return metrics


def say_choices(run_id: str, device: Any, speed: Any) -> None:
    """The run's first line: what it runs on and the choices that change its results and speed, with their
    reasons (:meth:`~cobot_med.engine.precision.SpeedChoices.said`); the first process only."""
    from ..distributed import rank

    if rank() == 0:
        print(f"cobot-med {run_id} runs on: {speed.said(device)}", flush=True)


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
        columns.append((parse_protocol(name).label, {**values, "mean": number(block["dsc"])}))
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
