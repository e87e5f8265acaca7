"""Method sweeps: one training run (ending with its test evaluation) per PEFT method and seed.

Each (method, seed) pair is one subprocess::

    python -m monai.bundle run training --config_file LAYERS --peft M --seed S --tracking_uri URI [overrides]

which logs one MLflow run into the experiment ``cobot-med/<dataset>`` (docs/CONTRACTS.md) and tags it
``cobot_med.status=finished`` once its evaluation on the test split is done. Right before launching a
pair, the sweep asks the tracking store for such a finished run with the same dataset, method and seed
(and arch, input size and epochs, where they are known) and skips the pair when there is one: a sweep
interrupted or partly failed is resumed by running it again, and several machines sharing one tracking
server can run the same sweep. A pair whose subprocess fails is reported and the sweep goes on. The
MLflow rules (names, the finished tag, the store) are :mod:`cobot_med.engine.tracking`'s.
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

from .engine import tracking
from .errors import SettingsError
from .files import absolute
from .redact import redact
from .settings import AUTO_ARCH, resolve_arch

# Bundle settings that a finished run must share with the pair to count for it (params of the contract).
MATCHED_SETTINGS = ("arch", "image_size", "epochs")

Runner = Callable[[Sequence[str]], int]


def subprocess_runner(command: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Run one bundle command in the foreground (its output goes to ours); its exit status."""
    return subprocess.run(list(command), env=env, check=False).returncode


@dataclass(frozen=True)
class SweepJob:
    dataset: str
    peft: str
    seed: int
    command: tuple[str, ...]
    arch: str = ""

    def __str__(self) -> str:
        on = f" on {self.arch}" if self.arch else ""
        return f"{self.dataset}/{self.peft}{on} seed {self.seed}"


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
    """``"3"`` -> seeds 0, 1, 2; ``"0,2,5"`` -> those seeds; a list passes through. Each number goes through the
    settings' one number check (:func:`cobot_med.settings.as_number`), named ``--seeds``."""
    from .settings import as_number

    if isinstance(text, int):
        return list(range(as_number("--seeds", text, int, 1)))
    if not isinstance(text, str):
        return [as_number("--seeds", s, int, 0) for s in text]
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) == 1 and "," not in text:
        return list(range(as_number("--seeds (a count)", parts[0], int, 1)))
    seeds = [as_number("--seeds", p, int, 0) for p in parts]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SettingsError(f"--seeds: give a count or distinct seeds separated by commas, got {text!r}")
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
    if not methods:
        raise SettingsError(f"--peft names no method ({list(names)!r}); e.g. --peft lora,lora+cobot")
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


def bundle_settings(config_files: Sequence[str | Path]) -> dict[str, Any]:
    """The literal top-level settings of a run's config layers (JSON or YAML, later layers win); expressions
    (``$...``) and references (``@...``, ``%...``) are left out, as their values are only known when it runs."""
    merged: dict[str, Any] = {}
    for config_file in config_files:
        path = Path(config_file)
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if isinstance(data, dict):
            merged.update(data)
    return {
        key: value
        for key, value in merged.items()
        if isinstance(value, (str, int, float, bool)) and not (isinstance(value, str) and value[:1] in "$@%")
    }


def sweep_tracking_uri(tracking_uri: str | None, overrides: dict[str, str], settings: dict[str, Any],
                       output_dir: str | None = None) -> str:
    """The sweep's ``--tracking_uri``, else one among the bundle overrides after ``--``, else the bundle's own, else the project's rule
    (:func:`cobot_med.engine.tracking.resolve_tracking_uri`) for the sweep's output folder: one store for the
    whole sweep (each run's default would be a store in its own folder, which would scatter it)."""
    uri = tracking_uri or overrides.get("tracking_uri") or settings.get("tracking_uri")
    return tracking.resolve_tracking_uri(uri, output_dir)


def bundle_command(config_files: Sequence[str | Path], peft: str, seed: int, tracking_uri: str,
                   overrides: Sequence[str] = (), *, python: str = sys.executable, run_id: str = "training") -> list[str]:
    """The ``python -m monai.bundle run`` command line of one pair."""
    layers = repr([str(f) for f in config_files])  # a Python list literal, as monai.bundle's command line reads it
    return [python, "-m", "monai.bundle", "run", run_id, "--config_file", layers, "--peft", peft,
            "--seed", str(seed), "--tracking_uri", tracking_uri, *overrides]


def plan_sweep(config: str | Path | Sequence[str | Path], methods: Iterable[str], seeds: Iterable[int],
               overrides: Sequence[str] = (), tracking_uri: str | None = None, *, python: str = sys.executable,
               run_id: str = "training") -> tuple[list[SweepJob], str, dict[str, Any]]:
    """The jobs of a sweep (seeds outer, so that every method has seed 0 before any has seed 1), the
    tracking URI they log to, and the settings a finished run must share to count.

    ``config``: a dataset bundle (a name or a file) or config layers, resolved as ``cobot-med infer`` and
    :func:`cobot_med.bundle.run_bundle` do. ``overrides``: bundle overrides as on the ``monai.bundle``
    command line. Each pair writes under ``O/<method>/seed<S>`` of the output folder O (``--output_dir O``,
    the bundle's literal ``output_dir``, else ``outputs/sweep/<dataset>``), so that pairs neither
    overwrite nor resume each other's checkpoints.
    """
    from .bundle import config_files

    files = config_files(config)
    settings = bundle_settings(files)
    values = parse_overrides(overrides)
    dataset = values.get("dataset") or settings.get("dataset") or files[-1].stem
    output_dir = str(absolute(values.get("output_dir") or settings.get("output_dir") or f"outputs/sweep/{dataset}"))
    uri = sweep_tracking_uri(tracking_uri, values, settings, output_dir)
    match = {key: values.get(key, settings.get(key)) for key in MATCHED_SETTINGS}
    # arch=auto as the run will settle it (an adapter's base is not known here: sweeps train from a base)
    match["arch"] = resolve_arch(str(match.get("arch") or AUTO_ARCH), run_id,
                                 str(values.get("sam_checkpoint") or settings.get("sam_checkpoint") or ""))
    passed = _without(overrides, {"tracking_uri", "output_dir", "peft", "seed"})
    jobs = []
    for seed in seeds:
        for peft in methods:
            extra = list(passed) + ["--output_dir", str(Path(output_dir) / peft / f"seed{seed}")]
            command = bundle_command(files, peft, seed, uri, extra, python=python, run_id=run_id)
            jobs.append(SweepJob(dataset=str(dataset), peft=peft, seed=int(seed), command=tuple(command),
                                 arch=str(match.get("arch") or "")))
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


def run_sweep(config: str | Path | Sequence[str | Path], methods: Iterable[str], seeds: Iterable[int],
              overrides: Sequence[str] = (),
              tracking_uri: str | None = None, *, runner: Runner | None = None, python: str = sys.executable,
              run_id: str = "training", dry_run: bool = False, log: Callable[[str], None] = print) -> SweepResult:
    """Run every (method, seed) pair not already finished in the tracking store, one after another.

    ``runner(command) -> exit status`` runs one pair (default: :func:`subprocess_runner`); a non-zero
    status or an exception marks the pair failed and the sweep goes on. ``dry_run`` only says what
    would run.
    """
    jobs, uri, match = plan_sweep(config, list(methods), list(seeds), overrides, tracking_uri, python=python,
                                  run_id=run_id)
    if runner is None:
        # MONAI's MLFlowHandler prefers $MLFLOW_TRACKING_URI to its tracking_uri argument: make both
        # name the store this sweep checks.
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        runner = functools.partial(subprocess_runner, env=env)
    known = ", ".join(f"{k}={v}" for k, v in match.items() if v is not None) or "no other settings"
    if not dry_run:
        tracking.check_tracking_uri(uri)
    log(f"sweep: {len(jobs)} runs into {tracking.experiment_name(jobs[0].dataset) if jobs else '?'} at {redact(uri)} "
        f"(a finished run counts when it matches dataset, method, seed and {known})")
    if jobs and not dry_run and uri.startswith(("http://", "https://")):
        # Created here, the experiment keeps the server's artifact root; created by a training run,
        # it would get that run's local output folder (MONAI's MLFlowHandler passes one).
        tracking.ensure_experiment(uri, jobs[0].dataset)
    result = SweepResult()
    for number, job in enumerate(jobs, 1):
        prefix = f"[{number}/{len(jobs)}] {job}"
        finished = tracking.find_finished_run(uri, job.dataset, job.peft, job.seed, match)
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


def _shell(command: Sequence[str]) -> str:
    import shlex

    return " ".join(shlex.quote(part) for part in command)
