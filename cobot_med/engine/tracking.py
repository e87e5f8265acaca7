"""Every MLflow rule of the project, in one place: where runs go, what they are called, when they count.

- Store: the ``tracking_uri`` setting, else ``$MLFLOW_TRACKING_URI``, else a SQLite file under the
  folder the work writes to (a run's ``output_dir``; a sweep's output folder), else MLflow's own
  ``./mlflow.db``. :func:`check_tracking_uri` asks the store once, quickly, before any work (MLflow's
  own client retries an unreachable server for minutes).
- Names (docs/CONTRACTS.md): one experiment per dataset, ``cobot-med/<dataset>``; a training run is
  ``<dataset>-<peft>-<arch>-<size>-seed<seed>-<key>``, the key new for each fresh run and kept by a
  resumed one (so a resume continues its own run and a fresh run never continues another's).
- Metrics under a prompt protocol (:mod:`cobot_med.predict.protocols`): :func:`protocol_metric`, one rule for
  every metric and protocol: the paper's name itself under ``tight`` (``test_dsc``, ``test_dsc_liver``: the
  papers' oracle protocol keeps its names), else the name, ``/`` and the protocol (``test_dsc/key_slice``,
  ``test_dsc_liver/jitter:25``, ``val_dsc/box3d:10``).
- Status: tag ``cobot_med.status = finished`` once the run's test evaluation is done; a crashed run is
  marked FAILED. :func:`find_finished_run` is what the sweep uses to skip done pairs, and what
  ``compare`` counts.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from ..files import absolute
from ..errors import SettingsError
from ..redact import redact

EXPERIMENT_PREFIX = "cobot-med/"
STATUS_TAG = "cobot_med.status"
FINISHED = "finished"
KIND_TAG = "cobot_med.kind"  # "training" (joins comparisons) or "evaluation" (an adapter scored again)
RESUMED_TAG_PREFIX = "cobot_med.resumed."  # a param a resume changed: its new value
# Resolved speed values that depend on the machine, not the run: never MLflow params (a resumed run logs its
# params again, and MLflow refuses to change one); resolved_settings.json records them.
MACHINE_PARAMS = ("torch_threads", "num_workers")
CHECK_TIMEOUT_S = 5.0


def resolve_tracking_uri(uri: str | None = None, output_dir: str | Path | None = None) -> str:
    """The tracking store of a piece of work (see the module docstring for the order)."""
    if uri:
        return str(uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = absolute(output_dir) if output_dir else Path.cwd()
    return f"sqlite:///{folder / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_tracking_uri(uri: str, must_exist: bool = False) -> str:
    """Ask the store once, within a few seconds; SettingsError naming it when it cannot be used.

    ``must_exist``: a SQLite store must be there already (reading one that is not would create it empty).
    """
    path = sqlite_path(uri)
    if path is not None:
        if path.exists():
            if not path.is_file():
                raise SettingsError(f"tracking_uri {redact(uri)}: {path} is a folder, not an MLflow SQLite store")
            with open(path, "rb") as handle:
                header = handle.read(16)
            if header and header != b"SQLite format 3\x00":
                raise SettingsError(f"tracking_uri {redact(uri)}: {path} is not a SQLite database (an MLflow store)")
        elif must_exist:
            raise SettingsError(f"no MLflow tracking store at {redact(uri)} (file {path} does not exist)")
        else:
            from .checks import check_output_dir

            try:
                check_output_dir(path.parent)
            except SettingsError as err:
                raise SettingsError(f"tracking_uri {redact(uri)}: cannot create the store ({err})") from None
        return uri
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=CHECK_TIMEOUT_S):
                pass
        except urllib.error.HTTPError:
            pass  # the server answered (some proxies have no /health): reachable
        except (urllib.error.URLError, socket.timeout, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise SettingsError(f"tracking_uri {redact(uri)}: no MLflow server answers ({reason}); start it or pass "
                                "another --tracking_uri") from None
        return uri
    if scheme.split("+")[0] in ("postgresql", "mysql", "mssql"):
        try:
            import sqlalchemy

            engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": int(CHECK_TIMEOUT_S)})
            with engine.connect():
                pass
            engine.dispose()
        except Exception as err:  # noqa: BLE001 - any driver error means the store cannot be used
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SettingsError(f"tracking_uri {redact(uri)}: cannot connect to the database ({first})") from None
        return uri
    if scheme in ("", "file"):
        raise SettingsError(f"tracking_uri {redact(uri)}: MLflow no longer supports plain folders as stores; use "
                            "sqlite:///PATH/mlflow.db, a database URI or an http:// tracking server")
    if scheme.split("+")[0] in ("databricks", "databricks-uc", "uc"):
        return uri  # a managed service: left to MLflow
    raise SettingsError(f"tracking_uri {redact(uri)}: not a tracking store MLflow knows (sqlite:///PATH/mlflow.db, "
                        "postgresql://..., http://server:5000)")


def experiment_name(dataset: str) -> str:
    return f"{EXPERIMENT_PREFIX}{dataset}"


def run_name(dataset: str, peft: str, arch: str, image_size: int, seed: int, key: str) -> str:
    return f"{dataset}-{peft}-{arch}-{image_size}-seed{seed}-{key}"


PROTOCOL_SEPARATOR = "/"


def protocol_metric(name: str, protocol: Any = "tight") -> str:
    """The MLflow name of metric ``name`` (``test_dsc``, ``test_dsc_<organ>``, ``val_dsc``) under a prompt
    protocol (a name or a :class:`~cobot_med.predict.protocols.Protocol`): ``name`` under ``tight``, else
    ``<name>/<protocol>`` with the protocol in its one spelling (``box3d:10.0`` -> ``test_dsc/box3d:10``)."""
    from ..predict.protocols import TIGHT, parse_protocol

    protocol = parse_protocol(protocol) if isinstance(protocol, str) else protocol
    return name if protocol.kind == TIGHT else f"{name}{PROTOCOL_SEPARATOR}{protocol.canonical}"


def split_protocol_metric(key: str) -> tuple[str, str]:
    """An MLflow metric name -> (the paper's name, the protocol): ``test_dsc/key_slice`` -> (``test_dsc``,
    ``key_slice``); a name without a protocol is ``tight``'s."""
    name, _, protocol = key.partition(PROTOCOL_SEPARATOR)
    return name, protocol or "tight"


SERVER_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")  # stores with their own artifact root


def artifact_location(uri: str, output_dir: str | Path) -> str | None:
    """Where a new experiment's artifacts go: beside the run's outputs (``OUTPUT/mlartifacts``) for a store that
    has no artifact root of its own -- a SQLite file or a database (PostgreSQL, MySQL, ...), for which MLflow
    would otherwise write ``./mlruns`` in whatever folder the run was started from --, and the server's own
    artifact store for a tracking server. MLflow fixes the place per experiment: runs of an experiment that
    another output folder created store theirs there (docs/compare.md)."""
    if uri.split(":", 1)[0].lower() in SERVER_SCHEMES:
        return None
    return str(absolute(output_dir) / "mlartifacts")


def client(uri: str):
    import mlflow

    from ..redact import mask_logs

    mask_logs()  # MLflow's own log handler exists now: it masks credentials too
    return mlflow.MlflowClient(tracking_uri=uri)


def find_run(uri: str, experiment: str, name: str):
    """The latest run called ``name`` in ``experiment`` (None when there is none or no store yet)."""
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        return None
    store = client(uri)
    exp = store.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = store.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = {_quote(name)}",
                             order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def mark_finished(uri: str, experiment: str, name: str, output_dir: str | Path | None = None,
                  artifacts: tuple[str, ...] = ("adapter_best", "test_predictions", "overlays",
                                                "robustness.png")) -> str | None:
    """Tag the training run finished (its test evaluation is done), log the final folders and the robustness
    curve under their own names (once each: MONAI's handler logs only the loss curve and
    resolved_settings.json), close it. Returns the MLflow run id (None when there is no such run)."""
    run = find_run(uri, experiment, name)
    if run is None:
        return None
    store = client(uri)
    for sub in artifacts if output_dir else ():
        path = Path(output_dir) / sub
        if path.is_dir():
            store.log_artifacts(run.info.run_id, str(path), artifact_path=sub)
        elif path.is_file():
            store.log_artifact(run.info.run_id, str(path))
    store.set_tag(run.info.run_id, STATUS_TAG, FINISHED)
    store.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def mark_failed(uri: str, experiment: str, name: str) -> None:
    """End a run that is still RUNNING as FAILED (a crash must not leave it open)."""
    run = find_run(uri, experiment, name)
    if run is not None and run.info.status == "RUNNING":
        client(uri).set_terminated(run.info.run_id, "FAILED")


def close_active_run() -> None:
    """Leave no MLflow run of this process open (MONAI's MLFlowHandler keeps them open across engines)."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.end_run()


def find_finished_run(uri: str, dataset: str, peft: str, seed: int, match: Mapping[str, Any] | None = None) -> str | None:
    """The id of a finished training run of (dataset, peft, seed) whose params equal ``match``, or None.

    Finished: MLflow status FINISHED and tag ``cobot_med.status=finished`` (its test evaluation done).
    """
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        return None  # no store yet; do not create one just to look
    store = client(uri)
    experiment = store.get_experiment_by_name(experiment_name(dataset))
    if experiment is None:
        return None
    clauses = [f"params.{key} = {_quote(value)}" for key, value in (("dataset", dataset), ("peft", peft), ("seed", seed))]
    clauses += [f"tags.`{STATUS_TAG}` = '{FINISHED}'", "attributes.status = 'FINISHED'"]
    runs = store.search_runs([experiment.experiment_id], filter_string=" and ".join(clauses),
                             order_by=["attributes.end_time DESC"])
    wanted = {k: str(v) for k, v in (match or {}).items() if v is not None}
    # matched in Python: a param that grew on resume (epochs) is read from its tag (run_param)
    return next((run.info.run_id for run in runs if all(run_param(run, k) == v for k, v in wanted.items())), None)


def run_param(run: Any, key: str) -> str | None:
    """A run's param as it ended: the value a resume changed it to (tag ``cobot_med.resumed.<key>``), else the
    param."""
    return run.data.tags.get(RESUMED_TAG_PREFIX + key, run.data.params.get(key))


def params_for_run(params: Mapping[str, Any], session: Any) -> dict[str, Any]:
    """``params`` as a training run may log them. A resumed run logs its params again and MLflow refuses to
    change one: params it logged before are left out, and one that changed (``epochs`` grown to train a
    killed run further) is recorded in the tag ``cobot_med.resumed.<key>``, which :func:`run_param` reads."""
    run = find_run(session.tracking_uri, session.experiment, session.run_name)
    if run is None or run.info.status == "FINISHED":  # MONAI's handler starts a new run then
        return redact(dict(params))
    logged = run.data.params
    store = client(session.tracking_uri)
    for key, value in params.items():
        if key in logged and logged[key] != str(value):
            store.set_tag(run.info.run_id, RESUMED_TAG_PREFIX + key, str(value))
    return {k: redact(v) for k, v in params.items() if k not in logged}


def ensure_experiment(uri: str, dataset: str) -> str:
    """Create ``cobot-med/<dataset>`` if it is missing (with the store's own artifact root); its id."""
    store = client(uri)
    experiment = store.get_experiment_by_name(experiment_name(dataset))
    return experiment.experiment_id if experiment else store.create_experiment(experiment_name(dataset))


def is_machine_param(name: str) -> bool:
    """A resolved speed value that depends on the machine (thread counts, loader workers, every ``*_reason``)."""
    return name in MACHINE_PARAMS or name.endswith("_reason")


def run_params(network: Any, settings: Any, speed: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The MLflow params of a training run (docs/CONTRACTS.md): settings, method options as the model
    runs them, speed switches as applied, what ``speed`` (the resolved speed choices' ``describe()``) says of
    the precision, attention and compile, trainable counts. Where ``speed`` and the model disagree
    (``attention``, ``compile``), the model's own values win: they are what runs. Thread counts, loader
    workers and the reasons (:func:`is_machine_param`) are left to ``resolved_settings.json``: MLflow refuses
    to change a param, and a run resumed on another machine logs its params again."""
    from ..adapter import unwrap
    from ..data.chains import ct_window_in_force
    from ..peft import count_parameters
    from ..sam.speed import is_compiled

    model = unwrap(network)
    spec = model.spec
    counts = count_parameters(model.sam)
    params: dict[str, Any] = {k: v for k, v in (speed or {}).items() if not is_machine_param(k)}
    params.update({
        "dataset": settings.dataset, "peft": spec.peft, "arch": spec.arch, "image_size": spec.image_size,
        "seed": settings.seed, "epochs": settings.epochs, "lr": settings.lr, "cobot_lr": settings.cobot_lr,
        "jitter": settings.jitter, "batch_size": settings.batch_size,
        "prompts": json.dumps(list(settings.prompts)), "select_prompts": settings.select_prompts,
        "propagator": settings.propagator,
        "ct_window": json.dumps(ct_window_in_force(settings, model.recipe)),
        "recipe": json.dumps(spec.recipe, sort_keys=True),
        "peft_options": json.dumps(spec.peft_options, sort_keys=True),
        "attention": spec.attention, "skip_window_padding": spec.skip_window_padding,
        "gradient_checkpointing": spec.gradient_checkpointing, "compile": is_compiled(model),
    })
    params.update({k: counts[k] for k in ("image_encoder_trainable", "mask_decoder_trainable", "total_trainable")})
    return params


def _quote(value: Any) -> str:
    text = str(value)
    return f'"{text}"' if "'" in text else f"'{text}'"
