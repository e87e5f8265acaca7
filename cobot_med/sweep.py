"""Method sweeps: one training run (ending with its test evaluation) per PEFT method and seed.

Each (method, seed) pair is one subprocess::

    python -m monai.bundle run training --config_file CONFIG --peft M --seed S --tracking_uri URI [overrides]

which logs one MLflow run into the experiment ``cobot-med/<dataset>`` (docs/CONTRACTS.md) and tags it
``cobot_med.status=finished`` once its evaluation on the test split is done. Right before launching a
pair, the sweep asks the tracking store for such a finished run with the same dataset, method and seed
(and arch, input size and epochs, where they are known) and skips the pair when there is one: a sweep
interrupted or partly failed is resumed by running it again, and several machines sharing one tracking
server can run the same sweep. A pair whose subprocess fails is reported and the sweep goes on.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

STATUS_TAG = "cobot_med.status"
EXPERIMENT_PREFIX = "cobot-med/"
# Bundle settings that a finished run must share with the pair to count for it (params of the contract).
MATCHED_SETTINGS = ("arch", "image_size", "epochs")

Runner = Callable[[Sequence[str]], int]


def subprocess_runner(command: Sequence[str], cwd: str | Path | None = None,
                      env: dict[str, str] | None = None) -> int:
    """Run one bundle command in the foreground (its output goes to ours); its exit status."""
    return subprocess.run(list(command), cwd=cwd, env=env, check=False).returncode


@dataclass(frozen=True)
class SweepJob:
    dataset: str
    peft: str
    seed: int
    command: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.dataset}/{self.peft} seed {self.seed}"


@dataclass
class SweepResult:
    """The pairs of a sweep by outcome; ``skipped`` and ``failed`` carry a reason each."""

    ran: list[SweepJob] = field(default_factory=list)
    skipped: list[tuple[SweepJob, str]] = field(default_factory=list)
    failed: list[tuple[SweepJob, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def parse_seeds(text: str | int | Iterable[int]) -> list[int]:
    """``"3"`` -> seeds 0, 1, 2; ``"0,2,5"`` -> those seeds; a list passes through."""
    if isinstance(text, int):
        return list(range(text))
    if not isinstance(text, str):
        return [int(s) for s in text]
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) == 1 and "," not in text:
        count = int(parts[0])
        if count < 1:
            raise ValueError(f"--seeds needs at least one seed, got {text!r}")
        return list(range(count))
    seeds = [int(p) for p in parts]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: give a count or distinct seeds separated by commas, got {text!r}")
    return seeds


def parse_methods(names: str | Iterable[str]) -> list[str]:
    """``["lora,adaptformer", "lora+cobot"]`` -> the three names, in order, without repeats."""
    if isinstance(names, str):
        names = [names]
    methods: list[str] = []
    for name in names:
        for part in name.split(","):
            if part.strip() and part.strip() not in methods:
                methods.append(part.strip())
    return methods


def parse_overrides(tokens: Sequence[str]) -> dict[str, str]:
    """``["--arch", "tiny", "--epochs=2", "--amp"]`` -> ``{"arch": "tiny", "epochs": "2", "amp": "True"}``."""
    values: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--") and len(token) > 2:
            key, eq, value = token[2:].partition("=")
            if not eq:
                if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                    value, i = tokens[i + 1], i + 1
                else:
                    value = "True"
            values[key.replace("-", "_")] = value
        i += 1
    return values


def bundle_settings(config_file: str | Path) -> dict[str, Any]:
    """The literal top-level settings of a bundle config (JSON or YAML); expressions (``$...``) and
    references (``@...``, ``%...``) are left out, as their values are only known when it runs."""
    path = Path(config_file)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        return {}
    return {
        key: value
        for key, value in data.items()
        if isinstance(value, (str, int, float, bool)) and not (isinstance(value, str) and value[:1] in "$@%")
    }


def resolve_tracking_uri(tracking_uri: str | None, overrides: dict[str, str], settings: dict[str, Any],
                         output_dir: str | None = None) -> str:
    """``--tracking-uri``, else the ``--tracking_uri`` override, else the bundle's own, else
    ``$MLFLOW_TRACKING_URI``, else one SQLite store for the whole sweep, ``OUTPUT_DIR/mlflow.db`` (the
    bundle's default is a store in each run's output folder, which would scatter a sweep), else
    MLflow's default ``./mlflow.db``."""
    import mlflow

    uri = tracking_uri or overrides.get("tracking_uri") or settings.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return str(uri)
    if output_dir:
        return f"sqlite:///{Path(output_dir).absolute() / 'mlflow.db'}"
    return mlflow.get_tracking_uri()


def find_finished_run(tracking_uri: str, dataset: str, peft: str, seed: int, match: dict[str, Any] | None = None) -> str | None:
    """The id of a finished run of (dataset, peft, seed) with the params of ``match``, or None.

    Finished: MLflow status FINISHED and tag ``cobot_med.status=finished`` (its test evaluation done).
    """
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        return None  # no store yet; do not create one just to look
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT_PREFIX + dataset)
    if experiment is None:
        return None
    wanted = {"dataset": dataset, "peft": peft, "seed": seed, **{k: v for k, v in (match or {}).items() if v is not None}}
    clauses = [f"params.{key} = {_quote(value)}" for key, value in wanted.items()]
    clauses += [f"tags.`{STATUS_TAG}` = 'finished'", "attributes.status = 'FINISHED'"]
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=" and ".join(clauses), max_results=1, order_by=["attributes.end_time DESC"]
    )
    return runs[0].info.run_id if runs else None


def ensure_experiment(tracking_uri: str, dataset: str) -> str:
    """Create ``cobot-med/<dataset>`` in the store if it is missing (with the store's own artifact
    root: on a tracking server, its proxied artifact folder); its id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT_PREFIX + dataset)
    return experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT_PREFIX + dataset)


def _quote(value: Any) -> str:
    text = str(value)
    return f'"{text}"' if "'" in text else f"'{text}'"


def bundle_command(config_file: str | Path, peft: str, seed: int, tracking_uri: str, overrides: Sequence[str] = (),
                   *, python: str = sys.executable, run_id: str = "training") -> list[str]:
    """The ``python -m monai.bundle run`` command line of one pair."""
    return [python, "-m", "monai.bundle", "run", run_id, "--config_file", str(config_file), "--peft", peft,
            "--seed", str(seed), "--tracking_uri", tracking_uri, *overrides]


def plan_sweep(config_file: str | Path, methods: Iterable[str], seeds: Iterable[int], overrides: Sequence[str] = (),
               tracking_uri: str | None = None, *, python: str = sys.executable, run_id: str = "training",
               workdir: str | Path | None = None) -> tuple[list[SweepJob], str, dict[str, Any]]:
    """The jobs of a sweep (seeds outer, so that every method has seed 0 before any has seed 1), the
    tracking URI they log to, and the settings a finished run must share to count.

    ``overrides``: bundle overrides as on the ``monai.bundle`` command line. With an output folder O
    (``--output_dir O``, or the bundle's literal ``output_dir``) each pair writes under
    ``O/<method>/seed<S>``, so that pairs neither overwrite nor resume each other's checkpoints. The
    bundle's ``metadata.json`` and ``logging.conf`` beside the config are passed unless overridden.
    ``workdir``: where the commands will run (relative output folders are taken from there).
    """
    settings = bundle_settings(config_file)
    values = parse_overrides(overrides)
    dataset = values.get("dataset") or settings.get("dataset") or Path(config_file).stem
    output_dir = values.get("output_dir") or settings.get("output_dir")  # None: an expression of the bundle's
    if output_dir:  # relative to where the bundle runs
        output_dir = str((Path(workdir or ".") / output_dir).absolute())
    uri = resolve_tracking_uri(tracking_uri, values, settings, output_dir)
    match = {key: values.get(key, settings.get(key)) for key in MATCHED_SETTINGS}
    passed = _without(overrides, {"tracking_uri", "output_dir", "peft", "seed"})
    folder = Path(config_file).parent
    for key, name in (("meta_file", "metadata.json"), ("logging_file", "logging.conf")):
        if key not in values and (folder / name).is_file():  # as cobot_med.bundle.run_bundle passes them
            passed += [f"--{key}", str(folder / name)]
    jobs = []
    for seed in seeds:
        for peft in methods:
            extra = list(passed)
            if output_dir:
                extra += ["--output_dir", str(Path(output_dir) / peft / f"seed{seed}")]
            command = bundle_command(config_file, peft, seed, uri, extra, python=python, run_id=run_id)
            jobs.append(SweepJob(dataset=str(dataset), peft=peft, seed=int(seed), command=tuple(command)))
    return jobs, uri, match


def _without(tokens: Sequence[str], keys: set[str]) -> list[str]:
    """The override tokens less those setting ``keys`` (``--key value`` or ``--key=value``)."""
    kept: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        key, eq, _ = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        if token == "--":  # the CLI's separator, never a bundle argument (fire stops reading at it)
            pass
        elif key.replace("-", "_") in keys:
            if not eq and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                i += 1
        else:
            kept.append(token)
        i += 1
    return kept


def run_sweep(config_file: str | Path, methods: Iterable[str], seeds: Iterable[int], overrides: Sequence[str] = (),
              tracking_uri: str | None = None, *, runner: Runner | None = None, python: str = sys.executable,
              run_id: str = "training", dry_run: bool = False, log: Callable[[str], None] = print) -> SweepResult:
    """Run every (method, seed) pair not already finished in the tracking store, one after another.

    ``runner(command) -> exit status`` runs one pair (default: :func:`subprocess_runner`); a non-zero
    status or an exception marks the pair failed and the sweep goes on. ``dry_run`` only says what
    would run.
    """
    config_file = Path(config_file).absolute()
    workdir = _bundle_root(config_file)
    jobs, uri, match = plan_sweep(config_file, list(methods), list(seeds), overrides, tracking_uri,
                                  python=python, run_id=run_id, workdir=workdir)
    if runner is None:
        # MONAI's MLFlowHandler prefers $MLFLOW_TRACKING_URI to its tracking_uri argument: make both
        # name the store this sweep checks.
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        runner = functools.partial(subprocess_runner, cwd=workdir, env=env)
    known = ", ".join(f"{k}={v}" for k, v in match.items() if v is not None) or "no other settings"
    log(f"sweep: {len(jobs)} runs into {EXPERIMENT_PREFIX}{jobs[0].dataset if jobs else '?'} at {uri} "
        f"(a finished run counts when it matches dataset, method, seed and {known})")
    if jobs and not dry_run and uri.startswith(("http://", "https://")):
        # Created here, the experiment keeps the server's artifact root; created by a training run,
        # it would get that run's local output folder (MONAI's MLFlowHandler passes one).
        ensure_experiment(uri, jobs[0].dataset)
    result = SweepResult()
    for number, job in enumerate(jobs, 1):
        prefix = f"[{number}/{len(jobs)}] {job}"
        finished = find_finished_run(uri, job.dataset, job.peft, job.seed, match)
        if finished:
            result.skipped.append((job, f"finished run {finished}"))
            log(f"{prefix}: skipped, finished run {finished}")
            continue
        if dry_run:
            log(f"{prefix}: would run: {_shell(job.command)}")
            continue
        log(f"{prefix}: running: {_shell(job.command)}")
        try:
            status = runner(job.command)
        except Exception as err:  # a runner that cannot start the command: report, go on
            status, reason = None, f"{type(err).__name__}: {err}"
        else:
            reason = f"exit status {status}"
        if status == 0:
            result.ran.append(job)
            log(f"{prefix}: done")
        else:
            result.failed.append((job, reason))
            log(f"{prefix}: FAILED ({reason}); going on")
    log(f"sweep: {len(result.ran)} ran, {len(result.skipped)} skipped, {len(result.failed)} failed"
        + "".join(f"\n  failed: {job} ({reason})" for job, reason in result.failed))
    return result


def _bundle_root(config_file: Path) -> Path | None:
    """Where the bundle commands run: the repository root when the config lives in its ``bundles/``
    (the configs' ``%bundles/common.json::ID`` macros are relative to the working directory)."""
    for root in (config_file.parent.parent, Path.cwd()):
        if (root / "bundles" / "common.json").is_file():
            return root
    return None


def _shell(command: Sequence[str]) -> str:
    import shlex

    return " ".join(shlex.quote(part) for part in command)
