"""Finished training runs from any MLflow tracking store, one row per run, with its state in the comparison."""

from __future__ import annotations

import fnmatch
import json
import math
from importlib import resources
from typing import Any, Iterable

import pandas as pd

from ..engine import tracking
from ..engine.tracking import EXPERIMENT_PREFIX, STATUS_TAG
from ..errors import SettingsError

ORGAN_METRIC_PREFIX = "test_dsc_"
TEST_DSC = "test_dsc"
# Params of the contract that the comparison reads (strings in MLflow; converted below).
PARAMS = ("dataset", "peft", "arch", "image_size", "seed", "epochs", "peft_options", "image_encoder_trainable")
# Known names first, in the papers' order; anything else follows alphabetically.
METHOD_ORDER = ("frozen", "decoder", "lora", "lora+cobot", "adaptformer", "adaptformer+cobot", "conv_lora", "full")
DATASET_ORDER = ("adome", "spleen", "segrap")
# States of a run (column ``state`` of :func:`load_runs`).
FINISHED, FAILED, UNFINISHED, NOT_EVALUATED, INCOMPLETE, SUPERSEDED = (
    "finished", "failed", "unfinished", "not evaluated", "incomplete", "superseded",
)


def paper_results() -> dict[str, Any]:
    """The paper's Table 4 figures (DSC %, ViT-B), as shipped in ``cobot_med/resources``."""
    text = resources.files("cobot_med").joinpath("resources/paper_results.json").read_text(encoding="utf-8")
    return json.loads(text)


# --------------------------------------------------------------------------------------------------
# Loading


def load_runs(tracking_uri: str | None = None, experiments: Iterable[str] | str | None = None) -> pd.DataFrame:
    """Every run that names a PEFT method in the chosen experiments, one row per run.

    ``experiments``: experiment names or shell-style patterns (``"cobot-med/*"``), a list or a
    comma-separated string; ``None`` reads every active experiment. Runs without a ``peft`` param
    are not method runs and are left out silently.

    Columns: ``experiment``, ``run_id``, ``run_name``, ``mlflow_status``, ``status_tag``, the
    params of :data:`PARAMS` (``image_size``, ``seed``, ``epochs`` and ``image_encoder_trainable``
    as numbers), ``test_dsc``, ``test_slice_dsc``, one ``test_dsc_<organ>`` column per organ seen
    (fractions in [0, 1], as logged), the same under the other prompt protocols the runs scored
    (``test_dsc/<protocol>``, ``test_dsc_<organ>/<protocol>``: :func:`cobot_med.engine.tracking.protocol_metric`),
    ``start_time``/``end_time`` (ms since the epoch), ``state`` (``finished``, ``failed``, ``unfinished``,
    ``not evaluated``, ``incomplete``; judged by ``test_dsc``, the papers' tight protocol) and ``reason``.
    """
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    chosen = _select_experiments(client.search_experiments(view_type=ViewType.ACTIVE_ONLY), experiments, uri)
    rows = []
    for experiment in chosen:
        for run in _all_runs(client, experiment.experiment_id):
            if "peft" in run.data.params:
                rows.append(_run_row(experiment.name, run))
    columns = ["experiment", "run_id", "run_name", "mlflow_status", "status_tag", *PARAMS,
               "test_dsc", "test_slice_dsc", "start_time", "end_time", "state", "reason"]
    frame = pd.DataFrame(rows)
    for column in columns:
        if column not in frame:
            frame[column] = pd.Series(dtype=object)
    organs = sorted(c for c in frame.columns if c.startswith(ORGAN_METRIC_PREFIX) and not is_protocol_metric(c))
    protocols = sorted(c for c in frame.columns if c.startswith(TEST_DSC) and is_protocol_metric(c))
    return frame[columns[:-4] + organs + protocols + columns[-4:]].reset_index(drop=True)


def is_protocol_metric(name: str) -> bool:
    """``test_dsc/key_slice``, ``test_dsc_liver/box3d:10``: a metric under a protocol other than tight."""
    return tracking.split_protocol_metric(name)[1] != "tight"


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The store to read: the project's rule (:func:`cobot_med.engine.tracking.resolve_tracking_uri`, from the
    working folder), checked once; a SQLite store must exist already (reading one would create it empty)."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    return tracking.check_tracking_uri(uri, must_exist=True)


def _select_experiments(all_experiments: list, wanted: Iterable[str] | str | None, uri: str) -> list:
    if wanted is None:
        return list(all_experiments)
    patterns = _split_names(wanted)
    chosen, missing = [], []
    for pattern in patterns:
        hits = [e for e in all_experiments if fnmatch.fnmatchcase(e.name, pattern)]
        if not hits and not any(ch in pattern for ch in "*?["):
            missing.append(pattern)
        chosen += [e for e in hits if e not in chosen]
    if missing:
        names = ", ".join(sorted(e.name for e in all_experiments)) or "none"
        raise SettingsError(f"no experiment named {', '.join(missing)} at {uri} (experiments there: {names})")
    return chosen


def _split_names(names: Iterable[str] | str) -> list[str]:
    if isinstance(names, str):
        names = [names]
    return [part.strip() for name in names for part in name.split(",") if part.strip()]


def _all_runs(client, experiment_id: str) -> Iterable:
    from mlflow.entities import ViewType

    token = None
    while True:
        page = client.search_runs(
            [experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        yield from page
        token = page.token
        if not token:
            return


def _run_row(experiment: str, run) -> dict[str, Any]:
    metrics, tags = run.data.metrics, run.data.tags
    row: dict[str, Any] = {
        "experiment": experiment,
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "mlflow_status": run.info.status,
        "status_tag": tags.get(STATUS_TAG),
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
    }
    for name in PARAMS:
        row[name] = tracking.run_param(run, name)
    if not row["dataset"] and experiment.startswith(EXPERIMENT_PREFIX):
        row["dataset"] = experiment[len(EXPERIMENT_PREFIX):]  # the contract's experiment name
    for name in ("image_size", "seed", "epochs", "image_encoder_trainable"):
        row[name] = _number(row[name])
    row["peft_options"] = _canonical_options(row["peft_options"])
    for name, value in metrics.items():
        if name in ("test_dsc", "test_slice_dsc") or name.startswith(ORGAN_METRIC_PREFIX) or (
                name.startswith(TEST_DSC) and is_protocol_metric(name)):
            row[name] = float(value)
    row["state"], row["reason"] = _state(row)
    return row


def _state(row: dict[str, Any]) -> tuple[str, str]:
    status = row["mlflow_status"]
    if status in ("FAILED", "KILLED"):
        return FAILED, f"run {status.lower()}"
    if status == "RUNNING":
        return UNFINISHED, "run not closed (still running, or its process died)"
    if status != "FINISHED":
        return UNFINISHED, f"run {status.lower()}"
    if row["status_tag"] not in (None, FINISHED):
        return UNFINISHED, f"tag {STATUS_TAG}={row['status_tag']}"
    if row.get("test_dsc") is None or (isinstance(row["test_dsc"], float) and math.isnan(row["test_dsc"])):
        return NOT_EVALUATED, "no test_dsc metric"
    if not row["dataset"]:
        return INCOMPLETE, "no dataset param"
    return FINISHED, ""


def _number(value: Any) -> float | int | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else number


def _canonical_options(value: Any) -> str:
    """``peft_options`` as compact sorted JSON, so that equal options compare equal."""
    if value in (None, "", "None", "null"):
        return "{}"
    try:
        return json.dumps(json.loads(value), sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return str(value)


# --------------------------------------------------------------------------------------------------
