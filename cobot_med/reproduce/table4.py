"""``cobot-med reproduce table4``: the paper's Table 4 as one resumable recipe.

1. Checks, per dataset: the folder in its layout (``cobot-med data fetch`` puts it there), the fixed split
   (written to ``OUT/<dataset>/datalist.json`` and given to every run, so every method and seed trains and tests
   on the same cases; a folder whose cases changed since is refused), the base model's weights, the tracking
   store, the output folder.
2. The plan: every (method, seed) run with its state in the tracking store (finished runs are skipped) and an
   estimate of the time left from throughput measured on this machine (:mod:`.estimate`). ``--dry_run`` stops
   here. On a CPU, a SAM ViT at 1024 px (the paper's setting) is refused with the estimate unless
   ``--allow_cpu``.
3. The runs: the Freeze row zero-shot (the ``evaluate`` run id, logged to MLflow under the contract's names), the
   trained methods through :func:`cobot_med.sweep.run_sweep` (one MLflow run per method and seed; an
   interrupted run resumes from its last epoch).
4. ``cobot-med compare`` over the datasets' experiments: the paper's figures beside ours (and, once the runs
   carry them, the prompt protocols' tables that compare prints).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import SettingsError
from ..files import absolute, write_json
from . import estimate as est
from .recipe import OURS, PAPER_SETTINGS, settings_in_force

ZERO_SHOT = "frozen"
LOGGED_BY_TAG = "cobot_med.logged_by"


@dataclasses.dataclass
class Options:
    datasets: list[str]
    seeds: list[int]
    methods: list[str]
    arch: str = "vit_b"
    image_size: int | None = None
    epochs: int = 25
    dataset_dir: str | None = None
    datalist: str | None = None
    sam_checkpoint: str | None = None
    output_dir: str = "outputs/reproduce"
    tracking_uri: str | None = None
    device: str = "auto"
    prompts: str | None = None
    dry_run: bool = False
    allow_cpu: bool = False
    remeasure: bool = False
    progress: bool = True
    overrides: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RunItem:
    dataset: str
    peft: str
    seed: int
    command: tuple[str, ...]
    finished: str | None = None  # the finished MLflow run that makes this one unnecessary
    seconds: float | None = None  # estimated model time
    stand_in: str = ""  # the method whose measured speed the estimate uses, when it is not this one's

    @property
    def zero_shot(self) -> bool:
        return self.peft == ZERO_SHOT

    def __str__(self) -> str:
        what = f"{self.peft} (zero-shot, no training)" if self.zero_shot else f"{self.peft} seed {self.seed}"
        return f"{self.dataset} {what}"


@dataclasses.dataclass
class DatasetPlan:
    dataset: str
    folder: Path
    datalist: Path
    split: dict | None = None
    left_out: list[str] = dataclasses.field(default_factory=list)
    write_datalist: bool = False
    counts: est.SliceCounts | None = None
    items: list[RunItem] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Plan:
    options: Options
    arch: str
    image_size: int
    device: Any
    output_dir: Path
    tracking_uri: str
    datasets: list[DatasetPlan]
    problems: list[str]
    common: dict[str, list[str]]  # per dataset: the bundle overrides every run gets
    throughputs: dict[tuple[str, str], est.Throughput] = dataclasses.field(default_factory=dict)

    @property
    def items(self) -> list[RunItem]:
        return [item for d in self.datasets for item in d.items]

    @property
    def left(self) -> list[RunItem]:
        return [item for item in self.items if not item.finished]

    def seconds_left(self) -> float | None:
        values = [item.seconds for item in self.left]
        return None if any(v is None for v in values) else float(sum(values))


def refuses_on_cpu(device: Any, arch: str, image_size: int) -> bool:
    """A SAM ViT (Meta's or MedSAM's weights) at 1024 px or more, on a CPU: the paper's setting, for a GPU."""
    from ..sam.build import get_architecture

    spec = get_architecture(arch)
    return getattr(device, "type", str(device)) == "cpu" and spec.encoder == "vit" and bool(spec.official_checkpoint) \
        and image_size >= 1024


def compare_has(flag: str) -> bool:
    """Whether this version's ``cobot-med compare`` takes ``flag`` (the prompt protocols arrive with issue 23)."""
    import argparse

    from ..cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return flag in action.choices["compare"]._option_string_actions


# --- planning ---------------------------------------------------------------------------------------------


def make_plan(options: Options, log: Callable[[str], None] = print) -> Plan:
    """Checks and runs of the reproduction (nothing is run or written); problems are collected, not raised."""
    from ..bundle import config_files
    from ..engine import tracking
    from ..engine.checks import check_device, check_output_dir
    from ..engine.network import resolve_device
    from ..sam.build import check_image_size, get_architecture
    from ..sweep import bundle_command, parse_overrides, plan_sweep
    from .recipe import bundle_defaults

    check_device(options.device)
    if options.prompts and not compare_has("--prompts"):
        raise SettingsError("--prompts: this version's compare has no prompt protocols yet (they come with the honest-"
                            "evaluation issue); leave --prompts out")
    if options.prompts:  # a name that is no protocol: one line now, not after the runs
        from ..predict.protocols import parse_protocol

        parse_protocol(options.prompts, "--prompts")
    arch_spec = get_architecture(options.arch)
    size = int(options.image_size or arch_spec.default_image_size)
    try:
        check_image_size(arch_spec, size)
    except ValueError as err:
        raise SettingsError(str(err)) from None
    out = absolute(options.output_dir)
    check_output_dir(out)
    uri = tracking.check_tracking_uri(tracking.resolve_tracking_uri(options.tracking_uri, out))  # reads, never writes
    device = resolve_device(options.device)
    problems: list[str] = []
    if options.sam_checkpoint and not Path(options.sam_checkpoint).is_file():
        problems.append(f"sam_checkpoint {options.sam_checkpoint} does not exist")
    elif arch_spec.official_checkpoint and not arch_spec.packaged_checkpoint and not options.sam_checkpoint:
        problems.append(f"arch {options.arch} needs its weights: download {arch_spec.official_checkpoint} "
                        "(https://github.com/facebookresearch/segment-anything#model-checkpoints) and pass "
                        "--sam_checkpoint PATH")
    user = [t for t in options.overrides if t != "--"]
    clash = sorted(set(parse_overrides(user)) & {"datalist", "dataset_dir", "arch", "image_size", "epochs", "output_dir",
                                                 "peft", "seed", "tracking_uri", "sam_checkpoint", "device"})
    if clash:
        raise SettingsError(f"after --: {', '.join('--' + k for k in clash)} are reproduce's own flags; give them before --")
    plans, common = [], {}
    for dataset in options.datasets:
        defaults = bundle_defaults(dataset)
        folder = absolute(options.dataset_dir or defaults.get("dataset_dir") or f"data/{dataset}")
        plan = DatasetPlan(dataset=dataset, folder=folder, datalist=out / dataset / "datalist.json")
        _split(plan, options, problems)
        args = ["--dataset_dir", str(folder), "--datalist", str(plan.datalist), "--arch", options.arch,
                "--image_size", str(size), "--epochs", str(options.epochs)]
        if options.sam_checkpoint:
            args += ["--sam_checkpoint", str(absolute(options.sam_checkpoint))]
        if options.device != "auto":
            args += ["--device", options.device]
        args += user
        common[dataset] = args
        if ZERO_SHOT in options.methods:
            files = config_files(dataset)
            command = bundle_command(files, ZERO_SHOT, 0, uri, args + ["--output_dir", str(out / dataset / ZERO_SHOT)],
                                     run_id="evaluate")
            item = RunItem(dataset, ZERO_SHOT, 0, tuple(command))
            item.finished = tracking.find_finished_run(uri, dataset, ZERO_SHOT, 0, _zero_shot_match(options.arch, size))
            plan.items.append(item)
        trained = [m for m in options.methods if m != ZERO_SHOT]
        if trained:
            jobs, _, match = plan_sweep(dataset, trained, options.seeds, args + ["--output_dir", str(out / dataset)], uri)
            for job in jobs:
                item = RunItem(dataset, job.peft, job.seed, job.command)
                item.finished = tracking.find_finished_run(uri, dataset, job.peft, job.seed, match)
                plan.items.append(item)
        plans.append(plan)
    return Plan(options, options.arch, size, device, out, uri, plans, problems, common)


def _zero_shot_match(arch: str, image_size: int) -> dict[str, Any]:
    return {"arch": arch, "image_size": image_size, "epochs": 0}


def _split(plan: DatasetPlan, options: Options, problems: list[str]) -> None:
    """The dataset's fixed split (or the given datalist), checked against the one earlier runs used."""
    from ..data.datalist import FIXED_SPLIT, load_datalist, scan_cases, split_cases
    from ..data.validation import DataError

    if options.datalist:
        try:
            plan.split = load_datalist(options.datalist)
        except DataError as err:
            problems.append(str(err))
            return
        plan.datalist = absolute(options.datalist)
        return
    try:
        cases, plan.left_out = scan_cases(plan.dataset, plan.folder)
    except DataError as err:
        how = (f"cobot-med data fetch {plan.dataset}" if plan.dataset != "segrap" else
               "cobot-med data fetch segrap (registration steps), then cobot-med data check segrap DIR")
        problems.append(f"{err}: get the data with `{how}`, or pass --dataset_dir")
        return
    if not cases:
        problems.append(f"{plan.folder}: no usable cases in the {plan.dataset} layout")
        return
    plan.split = split_cases(cases, **FIXED_SPLIT)
    if plan.datalist.is_file():
        try:
            earlier = load_datalist(plan.datalist)
        except DataError as err:
            problems.append(str(err))
            return
        changed = [s for s in plan.split if [c["case_id"] for c in plan.split[s]] != [c["case_id"] for c in earlier.get(s, [])]]
        if changed:
            problems.append(f"{plan.datalist}: the runs in {plan.datalist.parent} used another split of "
                            f"{plan.folder} (its {', '.join(changed)} cases differ: the folder changed since); "
                            f"use another --output_dir, or --datalist {plan.datalist} to keep the old split")
    else:
        plan.write_datalist = True


# --- estimate ---------------------------------------------------------------------------------------------


def estimate(plan: Plan, *, each: bool = True, log: Callable[[str], None] = print) -> None:
    """Count the slices of each dataset and measure the throughput of its methods; fill ``item.seconds``.

    ``each``: measure every method; else only the first trained one (plus the zero-shot row), applied to the
    others (``item.stand_in`` says so)."""
    from ..data.layouts import get_layout
    from .recipe import bundle_defaults

    from ..sweep import parse_overrides

    options = plan.options
    overrides = parse_overrides(options.overrides)
    for dataset in plan.datasets:
        if dataset.split is None:
            continue
        min_area = float(overrides.get("min_area", bundle_defaults(dataset.dataset).get("min_area", 100)))
        dataset.counts = est.count_slices(dataset.split, get_layout(dataset.dataset).organ_ids, min_area,
                                          progress=options.progress, use_cache=not options.remeasure)
        methods = list(dict.fromkeys(item.peft for item in dataset.items))
        trained = [m for m in methods if m != ZERO_SHOT]
        measured = methods if each else [m for m in methods if m == ZERO_SHOT] + trained[:1]
        for method in measured:
            key = (dataset.dataset, method)
            if key not in plan.throughputs:
                try:
                    plan.throughputs[key] = est.measure_throughput(
                        dataset.dataset, plan.arch, plan.image_size, method, options.device, overrides=overrides,
                        slice_shape=dataset.counts.slice_shape, use_cache=not options.remeasure, log=log)
                except Exception as err:  # noqa: BLE001 - no estimate is better than no plan; the runs will say more
                    first = (str(err).strip().splitlines() or [""])[0]
                    log(f"could not measure {method} on {plan.arch} ({type(err).__name__}: {first}); no time estimate "
                        "for its runs")
        for item in dataset.items:
            source = item.peft if (dataset.dataset, item.peft) in plan.throughputs else (trained or [item.peft])[0]
            item.stand_in = "" if source == item.peft else source
            throughput = plan.throughputs.get((dataset.dataset, source))
            item.seconds = est.run_seconds(throughput, dataset.counts, options.epochs) if throughput else None


# --- saying the plan --------------------------------------------------------------------------------------


def describe(plan: Plan) -> list[str]:
    from ..compare.runs import paper_results
    from ..data.fetch import say_left_out
    from ..engine.tracking import experiment_name

    options = plan.options
    paper = paper_results()
    lines = [f"cobot-med reproduce table4: {paper.get('citation', 'the paper')} on "
             f"{', '.join(options.datasets)}; methods {', '.join(options.methods)}; seeds "
             f"{', '.join(str(s) for s in options.seeds)}"]
    dataset0 = options.datasets[0]
    lines.append("settings (the paper's as this project records them, README 'Training on real data'):")
    values = {"arch": plan.arch, "image_size": plan.image_size, "epochs": options.epochs}
    from ..sweep import parse_overrides

    for name, value, paper_value, same in settings_in_force(dataset0, values, parse_overrides(options.overrides)):
        note = "the paper's" if same else f"NOT the paper's ({paper_value})"
        lines.append(f"  {name:<11} {value!s:<9} {note}: {PAPER_SETTINGS[name][1]}")
    lines.append("this project's choices (not settings of the paper):")
    lines += [f"  - {text}" for text in OURS]
    lines.append(f"device: {plan.device}; tracking store: {plan.tracking_uri} (experiments "
                 f"{', '.join(experiment_name(d) for d in options.datasets)}); outputs under {plan.output_dir}")
    for dataset in plan.datasets:
        if dataset.split is not None:
            counts = ", ".join(f"{s} {len(v)}" for s, v in dataset.split.items())
            lines.append(f"{dataset.dataset}: {dataset.folder}: split {counts} (datalist {dataset.datalist}"
                         + (", to be written)" if dataset.write_datalist else ")"))
            say_left_out(dataset.left_out, lambda line, d=dataset: lines.append(f"  {line}"))
        else:
            lines.append(f"{dataset.dataset}: {dataset.folder}: no data yet")
    if plan.problems:
        lines.append("checks: NOT ready:")
        lines += [f"  - {p}" for p in plan.problems]
    else:
        lines.append("checks: ready (data, split, base weights, tracking store, output folder)")
    items = plan.items
    finished = [i for i in items if i.finished]
    lines.append(f"runs: {len(items)} ({len(finished)} finished already, skipped; {len(items) - len(finished)} to run)")
    for number, item in enumerate(items, 1):
        state = f"finished (run {item.finished}), skipped" if item.finished else "to run"
        time_ = f", estimated {est.hours(item.seconds)}" if item.seconds is not None and not item.finished else ""
        lines.append(f"  [{number}/{len(items)}] {item}: {state}{time_}")
    left = plan.left
    if left:
        lines.append(f"  e.g. {' '.join(_quoted(left[0].command))}")
    lines += _time_lines(plan)
    lines.append(f"then: cobot-med compare over {', '.join(experiment_name(d) for d in options.datasets)} -> "
                 f"{plan.output_dir / 'compare'} (the paper's figures beside ours"
                 + (f"; main table under the {options.prompts} protocol" if options.prompts else "") + ")")
    return lines


def _time_lines(plan: Plan) -> list[str]:
    left = plan.left
    if not left:
        return ["time: nothing left to run"]
    total = plan.seconds_left()
    if total is None:
        if any(d.split is None for d in plan.datasets):
            return ["time: no estimate until the data is there (it counts the slices of the split)"]
        return ["time: no estimate: a measurement failed (above)"]
    lines = [f"time: estimated {est.hours(total)} of model time for the {len(left)} run(s) left, on this machine "
             f"({plan.device}), from measured throughput:"]
    for (dataset, _), throughput in plan.throughputs.items():
        lines.append(f"  {dataset} {throughput.said()}")
    stand_ins = sorted({(i.peft, i.stand_in) for i in left if i.stand_in})
    if stand_ins:
        lines.append("  not measured, estimated at another method's speed: "
                     + ", ".join(f"{m} (as {s})" for m, s in stand_ins) + "; --dry_run measures each")
    for dataset in plan.datasets:
        if dataset.counts is not None:
            lines.append(f"  {dataset.dataset} slices: {dataset.counts.said()}")
    lines.append(f"  per run: {plan.options.epochs} epochs x (training slices x s/step + validation slices x s/slice) "
                 "+ test slices x s/slice; data loading, caching and writing predictions are not counted, so the "
                 "runs take longer")
    return lines


def _quoted(command) -> list[str]:
    import shlex

    return [shlex.quote(part) for part in command]


# --- running ----------------------------------------------------------------------------------------------


def reproduce(options: Options, log: Callable[[str], None] = print,
              runner: Callable[..., int] | None = None) -> int:
    """The whole recipe (see the module docstring); the exit status."""
    plan = make_plan(options, log)
    if plan.problems and not options.dry_run:
        for line in describe(plan):
            log(line)
        raise SettingsError("reproduce cannot start: " + "; ".join(plan.problems))
    cpu_refusal = bool(plan.left) and refuses_on_cpu(plan.device, plan.arch, plan.image_size) and not options.allow_cpu
    if plan.left and any(d.split is not None for d in plan.datasets):
        estimate(plan, each=options.dry_run or not cpu_refusal, log=log)
    for line in describe(plan):
        log(line)
    if cpu_refusal:
        total = plan.seconds_left()
        measured = sorted({method for (_, method), t in plan.throughputs.items() if t.train_s_per_step is not None})
        said = (f"an estimated {est.hours(total)} on this CPU (from measured {', '.join(measured)} steps, above)"
                if total is not None else "days on this CPU")
        message = (f"the paper's setting ({plan.arch} at {plan.image_size} px, {options.epochs} epochs, "
                   f"{len(plan.left)} runs) would take {said}: run it on a GPU, try the recipe on this CPU with "
                   "--arch lite_medsam (the LiteMedSAM base ships with the install), or pass --allow_cpu to run it here")
        if options.dry_run:
            log(f"note: without --dry_run, reproduce refuses to run this here: {message}")
        else:
            raise SettingsError(message)
    if options.dry_run:
        log("dry run: nothing was run or written" + (" (not ready: see the checks above)" if plan.problems else ""))
        return 1 if plan.problems else 0
    return execute(plan, log, runner)


def execute(plan: Plan, log: Callable[[str], None] = print, runner: Callable[..., int] | None = None) -> int:
    from ..data.datalist import FIXED_SPLIT, write_datalist
    from ..engine import tracking
    from ..sweep import run_sweep, subprocess_runner

    options, out = plan.options, plan.output_dir
    out.mkdir(parents=True, exist_ok=True)
    if plan.tracking_uri.startswith("sqlite:"):
        tracking.check_tracking_uri(plan.tracking_uri)
    env = {**os.environ, "MLFLOW_TRACKING_URI": plan.tracking_uri}
    runner = runner or functools.partial(subprocess_runner, env=env)
    for dataset in plan.datasets:
        if dataset.write_datalist:
            write_datalist(dataset.split, dataset.datalist, layout=dataset.dataset, source=str(dataset.folder),
                           **FIXED_SPLIT)
    write_json(out / "plan.json", _record(plan))
    failed: list[str] = []
    started = time.monotonic()
    for dataset in plan.datasets:
        for item in dataset.items:
            if item.zero_shot and not item.finished:
                log(f"{item}: running {' '.join(_quoted(item.command))}")
                status = runner(item.command)
                if status != 0:
                    failed.append(f"{item} (exit status {status})")
                    log(f"{item}: FAILED (exit status {status}); going on")
                    continue
                run_id = log_zero_shot(plan, dataset, item)
                log(f"{item}: done, MLflow run {run_id}")
        trained = [m for m in options.methods if m != ZERO_SHOT]
        if trained:
            result = run_sweep(dataset.dataset, trained, options.seeds,
                               plan.common[dataset.dataset] + ["--output_dir", str(out / dataset.dataset)],
                               plan.tracking_uri, runner=runner, log=log)
            failed += [f"{job} ({reason})" for job, reason in result.failed]
    log(f"reproduce: runs done in {est.hours(time.monotonic() - started)} (measured wall time)"
        + (f"; {len(failed)} failed: " + "; ".join(failed) if failed else ""))
    status = run_compare(plan, log)
    return 1 if failed else status


def _record(plan: Plan) -> dict[str, Any]:
    return {
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "options": {k: v for k, v in dataclasses.asdict(plan.options).items() if k != "progress"},
        "arch": plan.arch, "image_size": plan.image_size, "device": str(plan.device),
        "tracking_uri": plan.tracking_uri,
        "paper_settings": {k: v[0] for k, v in PAPER_SETTINGS.items()},
        "datasets": {d.dataset: {"folder": str(d.folder), "datalist": str(d.datalist),
                                 "split": {s: len(v) for s, v in (d.split or {}).items()}} for d in plan.datasets},
        "runs": [{"dataset": i.dataset, "peft": i.peft, "seed": i.seed, "finished_before": i.finished,
                  "estimated_seconds": i.seconds, "estimated_as": i.stand_in or i.peft, "command": list(i.command)}
                 for i in plan.items],
        "estimated_seconds_left": plan.seconds_left(),
        "throughput": [dataclasses.asdict(t) for t in plan.throughputs.values()],
    }


def log_zero_shot(plan: Plan, dataset: DatasetPlan, item: RunItem) -> str:
    """Log the zero-shot evaluation (``evaluation.json`` of the ``evaluate`` run id) as an MLflow run under the
    contract's names (docs/compare.md): it joins the table as the Freeze row."""
    from mlflow.entities import Metric, Param

    from ..engine import tracking

    folder = plan.output_dir / dataset.dataset / ZERO_SHOT
    path = folder / "evaluation.json"
    evaluation = json.loads(path.read_text())
    scored = evaluation.get("adapter", {})
    metrics = {k: float(v) for k, v in evaluation.get("metrics", {}).items()
               if k.startswith("test_") and isinstance(v, (int, float))}
    if "test_dsc" not in metrics:
        raise SettingsError(f"{path}: no test_dsc in the zero-shot evaluation; nothing to log")
    params = {"dataset": dataset.dataset, "peft": ZERO_SHOT, "arch": scored.get("arch", plan.arch),
              "image_size": scored.get("image_size", plan.image_size), "seed": 0, "epochs": 0, "peft_options": "{}",
              "image_encoder_trainable": 0, "mask_decoder_trainable": 0, "total_trainable": 0,
              "datalist": str(dataset.datalist), "base_checkpoint_sha256": scored.get("base_checkpoint_sha256") or ""}
    uri = plan.tracking_uri
    store = tracking.client(uri)
    experiment = store.get_experiment_by_name(tracking.experiment_name(dataset.dataset))
    if experiment is None:
        location = tracking.artifact_location(uri, plan.output_dir)
        experiment_id = store.create_experiment(tracking.experiment_name(dataset.dataset), artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    name = tracking.run_name(dataset.dataset, ZERO_SHOT, str(params["arch"]), int(params["image_size"]), 0, "zero-shot")
    run = store.create_run(experiment_id, run_name=name, tags={
        LOGGED_BY_TAG: "cobot-med reproduce: the evaluate run id, zero-shot (peft frozen, nothing trained)"})
    now = int(time.time() * 1000)
    store.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                    params=[Param(k, str(v)) for k, v in params.items()])
    store.log_artifact(run.info.run_id, str(path))
    store.set_tag(run.info.run_id, tracking.STATUS_TAG, tracking.FINISHED)
    store.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def run_compare(plan: Plan, log: Callable[[str], None] = print) -> int:
    """``cobot-med compare`` over the reproduced datasets, into ``OUT/compare``."""
    from ..cli import build_parser
    from ..engine.tracking import experiment_name

    argv = ["compare", "--tracking_uri", plan.tracking_uri,
            "--experiment", ",".join(experiment_name(d) for d in plan.options.datasets),
            "--out", str(plan.output_dir / "compare")]
    if plan.options.prompts:
        argv += ["--prompts", plan.options.prompts]
    log(f"\ncobot-med {' '.join(_quoted(argv))}")
    sys.stdout.flush()
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)
