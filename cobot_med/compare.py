"""Compare finished training runs across methods, seeds and datasets, as the papers' Table 4 does.

Three steps, each callable on its own:

- :func:`load_runs` reads every run of the chosen experiments from any MLflow tracking store
  (a local SQLite file, a PostgreSQL database, an ``http://`` tracking server) into one
  :class:`pandas.DataFrame`, one row per run, with its ``state`` and, when it cannot enter the
  comparison, the ``reason``;
- :func:`summarize` keeps the finished runs (the latest one per dataset, method, arch, input size
  and seed), averages them over seeds and puts the paper's own figures beside them;
- :func:`write_report` writes the tables as Markdown and CSV and draws two pictures.

The run names it reads (params ``dataset``, ``peft``, ``image_encoder_trainable``, ...; metrics
``test_dsc``, ``test_dsc_<organ>``; tag ``cobot_med.status``) are the training contract of
``docs/CONTRACTS.md``, documented for users in ``docs/compare.md``: a run logged by any other tool
under those names joins the table.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

STATUS_TAG = "cobot_med.status"
EXPERIMENT_PREFIX = "cobot-med/"
ORGAN_METRIC_PREFIX = "test_dsc_"
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
    (fractions in [0, 1], as logged), ``start_time``/``end_time`` (ms since the epoch), ``state``
    (``finished``, ``failed``, ``unfinished``, ``not evaluated``, ``incomplete``) and ``reason``.
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
    organs = sorted(c for c in frame.columns if c.startswith(ORGAN_METRIC_PREFIX))
    return frame[columns[:-4] + organs + columns[-4:]].reset_index(drop=True)


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """``tracking_uri``, else MLflow's own default (``MLFLOW_TRACKING_URI``, else ``./mlflow.db``).

    A SQLite store must exist already: reading one that does not would silently create it empty.
    """
    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise FileNotFoundError(f"no MLflow tracking store at {uri} (file {path} does not exist)")
    return uri


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
        raise LookupError(f"no experiment named {', '.join(missing)} at {uri} (experiments there: {names})")
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
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
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
        row[name] = params.get(name)
    if not row["dataset"] and experiment.startswith(EXPERIMENT_PREFIX):
        row["dataset"] = experiment[len(EXPERIMENT_PREFIX):]  # the contract's experiment name
    for name in ("image_size", "seed", "epochs", "image_encoder_trainable"):
        row[name] = _number(row[name])
    row["peft_options"] = _canonical_options(row["peft_options"])
    for name, value in metrics.items():
        if name in ("test_dsc", "test_slice_dsc") or name.startswith(ORGAN_METRIC_PREFIX):
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
# Summarising


@dataclass
class Summary:
    """What :func:`summarize` computes; every DSC here is in percent.

    ``methods``: one row per method with ``method``, ``peft``, ``arch``, ``image_size``,
    ``params_k`` and ``paper_params_k`` (trainable image-encoder parameters, thousands), for each
    dataset ``<d>_mean``, ``<d>_std`` (sample std over seeds, NaN for one seed), ``<d>_n`` (seeds),
    ``<d>_paper_mean``, ``<d>_paper_std``; then ``avg`` and ``paper_avg`` (over the datasets of the
    table, only when every one has a value). ``organs``: long table ``dataset``, ``method``,
    ``organ``, ``mean``, ``std``, ``n``. ``runs``: the runs that entered; ``left_out``: the runs
    that did not, with ``reason``.
    """

    methods: pd.DataFrame
    organs: pd.DataFrame
    datasets: list[str]
    runs: pd.DataFrame
    left_out: pd.DataFrame
    paper: dict[str, Any] = field(default_factory=dict)

    def organ_names(self, dataset: str) -> list[str]:
        return sorted(self.organs.loc[self.organs["dataset"] == dataset, "organ"].unique())


def summarize(runs: pd.DataFrame, paper: dict[str, Any] | None = None) -> Summary:
    """Mean ± std over seeds per dataset and method, per organ too, with the paper's figures beside.

    ``paper``: figures in the shape of :func:`paper_results` (the default); ``{}`` for none.
    """
    paper = paper_results() if paper is None else paper
    runs = runs.copy()
    runs = _mark_superseded(runs)
    used = runs[runs["state"] == FINISHED].copy()
    left_out = runs[runs["state"] != FINISHED].copy()
    used["method"] = _method_labels(used)
    datasets = _ordered(used["dataset"].unique(), DATASET_ORDER)

    organ_columns = [c for c in used.columns if c.startswith(ORGAN_METRIC_PREFIX) and used[c].notna().any()]
    keys = ["method", "peft", "arch", "image_size"]
    rows, organ_rows = [], []
    for key, group in used.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, key))
        paper_method = paper.get("methods", {}).get(row["method"], {})
        row["params_k"] = _params_k(group["image_encoder_trainable"])
        row["paper_params_k"] = paper_method.get("params_k", math.nan)
        for dataset in datasets:
            values = group.loc[group["dataset"] == dataset, "test_dsc"].dropna() * 100.0
            row[f"{dataset}_mean"], row[f"{dataset}_std"], row[f"{dataset}_n"] = _mean_std(values)
            mean, std = paper_method.get("dsc", {}).get(dataset, (math.nan, math.nan))
            row[f"{dataset}_paper_mean"], row[f"{dataset}_paper_std"] = mean, std
            for column in organ_columns:
                organ_values = group.loc[group["dataset"] == dataset, column].dropna() * 100.0
                if len(organ_values):
                    organ = column[len(ORGAN_METRIC_PREFIX):]
                    organ_rows.append(dict(zip(("dataset", "method", "organ", "mean", "std", "n"),
                                               (dataset, row["method"], organ, *_mean_std(organ_values)))))
        row["avg"] = _average([row[f"{d}_mean"] for d in datasets])
        row["paper_avg"] = _average([row[f"{d}_paper_mean"] for d in datasets])
        rows.append(row)

    methods = pd.DataFrame(rows)
    if len(methods):
        order = {m: i for i, m in enumerate(METHOD_ORDER)}
        rank = methods["peft"].map(lambda m: order.get(m, len(order)))
        methods = (
            methods.assign(_rank=rank, _size=methods["image_size"].fillna(-1))
            .sort_values(["_rank", "peft", "method", "arch", "_size"], key=None, na_position="first")
            .drop(columns=["_rank", "_size"])
            .reset_index(drop=True)
        )
    organs = pd.DataFrame(organ_rows, columns=["dataset", "method", "organ", "mean", "std", "n"])
    return Summary(methods=methods, organs=organs, datasets=datasets, runs=used.reset_index(drop=True),
                   left_out=left_out.reset_index(drop=True), paper=paper)


def _mark_superseded(runs: pd.DataFrame) -> pd.DataFrame:
    """Of several finished runs of one (dataset, method, options, arch, size, seed), keep the latest."""
    finished = runs[runs["state"] == FINISHED]
    keys = ["dataset", "peft", "peft_options", "arch", "image_size", "seed"]
    latest = finished.sort_values("end_time").groupby(keys, dropna=False, sort=False).tail(1)
    for index, run in finished.drop(index=latest.index).iterrows():
        same = latest
        for key in keys:
            same = same[same[key].isna()] if pd.isna(run[key]) else same[same[key] == run[key]]
        runs.loc[index, "state"] = SUPERSEDED
        runs.loc[index, "reason"] = f"superseded by the later run {same['run_id'].iloc[0]}"
    return runs


def _method_labels(runs: pd.DataFrame) -> pd.Series:
    """``peft``, with the options appended where one method was run with several option sets."""
    labels = runs["peft"].astype(str).copy()
    for _, group in runs.groupby(["peft", "arch", "image_size"], dropna=False):
        if group["peft_options"].nunique(dropna=False) > 1:
            labels[group.index] = group["peft"] + " " + group["peft_options"]
    return labels


def _params_k(values: pd.Series) -> float:
    known = values.dropna()
    if known.empty:
        return math.nan
    return float(known.median()) / 1000.0


def _mean_std(values: pd.Series) -> tuple[float, float, int]:
    n = int(len(values))
    if n == 0:
        return math.nan, math.nan, 0
    return float(values.mean()), float(values.std(ddof=1)) if n > 1 else math.nan, n


def _average(values: Sequence[float]) -> float:
    if not values or any(pd.isna(v) for v in values):
        return math.nan
    return float(sum(values) / len(values))


def _ordered(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    values = [v for v in values if isinstance(v, str)]
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


# --------------------------------------------------------------------------------------------------
# Formatting and writing


def format_dsc(mean: float, std: float, digits: int = 1) -> str:
    """``88.0 ± 0.4``; ``88.0`` for one seed; ``—`` for none."""
    if pd.isna(mean):
        return "—"
    if pd.isna(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_params_k(value: float) -> str:
    """Thousands with one decimal, truncated as the paper prints them (147,456 -> ``147.4``)."""
    if pd.isna(value):
        return "—"
    return f"{math.floor(round(value * 10.0, 6)) / 10.0:.1f}"


def dataset_label(dataset: str, paper: dict[str, Any]) -> str:
    name = paper.get("datasets", {}).get(dataset, {}).get("paper_name")
    return f"{dataset} ({name})" if name else dataset


def format_markdown(summary: Summary, digits: int = 1) -> str:
    """The comparison as Markdown: the methods table, one per-organ table per dataset, the runs
    left out."""
    paper = summary.paper
    has_paper = bool(paper.get("methods"))
    lines = ["## Test DSC (%) per method: mean ± std over seeds", ""]
    header = ["method", "arch", "params (K)"] + (["paper (K)"] if has_paper else [])
    for dataset in summary.datasets:
        header.append(dataset_label(dataset, paper))
        if has_paper:
            header.append(f"{dataset} paper")
    header += ["avg"] + (["paper avg"] if has_paper else []) + ["seeds"]
    lines += [_md_row(header), _md_row(["---"] * 2 + ["---:"] * (len(header) - 2))]
    for _, row in summary.methods.iterrows():
        cells = [row["method"], _arch_label(row), format_params_k(row["params_k"])]
        if has_paper:
            cells.append(format_params_k(row["paper_params_k"]))
        for dataset in summary.datasets:
            cells.append(format_dsc(row[f"{dataset}_mean"], row[f"{dataset}_std"], digits))
            if has_paper:
                cells.append(format_dsc(row[f"{dataset}_paper_mean"], row[f"{dataset}_paper_std"], digits))
        cells.append(format_dsc(row["avg"], math.nan, digits))
        if has_paper:
            cells.append(format_dsc(row["paper_avg"], math.nan, digits))
        counts = sorted({int(row[f"{d}_n"]) for d in summary.datasets if row[f"{d}_n"]})
        cells.append(", ".join(str(n) for n in counts) or "0")
        lines.append(_md_row(cells))
    if has_paper:
        lines += ["", f"Paper: {paper.get('citation') or paper.get('source', '')}; \"paper avg\" is the mean of its "
                      "figures over the datasets of this table (its own Avg column covers 10 datasets)."]

    for dataset in summary.datasets:
        organs = summary.organ_names(dataset)
        if not organs:
            continue
        lines += ["", f"## {dataset_label(dataset, paper)}: test DSC (%) per organ", ""]
        lines += [_md_row(["method", *organs]), _md_row(["---"] + ["---:"] * len(organs))]
        table = summary.organs[summary.organs["dataset"] == dataset]
        for method in summary.methods["method"].drop_duplicates():
            cells = table[table["method"] == method].set_index("organ")
            if cells.empty:
                continue
            lines.append(_md_row([method] + [
                format_dsc(cells.at[o, "mean"], cells.at[o, "std"], digits) if o in cells.index else "—"
                for o in organs
            ]))

    if len(summary.left_out):
        lines += ["", "## Runs left out", ""]
        for _, run in summary.left_out.iterrows():
            lines.append(f"- {_describe_run(run)}: {run['reason']}")
    return "\n".join(lines) + "\n"


def _arch_label(row: pd.Series) -> str:
    arch = "—" if pd.isna(row["arch"]) else str(row["arch"])
    return arch if pd.isna(row["image_size"]) else f"{arch}@{int(row['image_size'])}"


def _describe_run(run: pd.Series) -> str:
    seed = "?" if pd.isna(run["seed"]) else int(run["seed"])
    name = f" {run['run_name']}" if run.get("run_name") else ""
    return f"run{name} ({run['run_id']}) {run['dataset'] or run['experiment']}/{run['peft']} seed {seed}"


def _md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def write_report(summary: Summary, out_dir: str | Path, digits: int = 1) -> dict[str, Path]:
    """Write ``compare.md``, ``methods.csv``, ``organs.csv``, ``runs.csv`` (the runs that entered and
    those left out, with ``state`` and ``reason``), ``dsc_vs_params.png`` and ``organ_dsc.png``
    under ``out_dir``; returns the paths by short name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / "compare.md",
        "methods_csv": out / "methods.csv",
        "organs_csv": out / "organs.csv",
        "runs_csv": out / "runs.csv",
        "dsc_vs_params": out / "dsc_vs_params.png",
        "organ_dsc": out / "organ_dsc.png",
    }
    paths["markdown"].write_text(format_markdown(summary, digits), encoding="utf-8")
    summary.methods.to_csv(paths["methods_csv"], index=False)
    summary.organs.to_csv(paths["organs_csv"], index=False)
    pd.concat([summary.runs.drop(columns=["method"], errors="ignore"), summary.left_out], ignore_index=True).to_csv(
        paths["runs_csv"], index=False
    )
    plot_dsc_vs_params(summary, paths["dsc_vs_params"])
    plot_organ_dsc(summary, paths["organ_dsc"])
    return paths


def plot_dsc_vs_params(summary: Summary, path: str | Path) -> Path:
    """Test DSC against trainable image-encoder parameters, one panel per dataset: ours filled with
    seed std as error bars, the paper's hollow, same colour per method."""
    from matplotlib.figure import Figure

    datasets = summary.datasets or ["(no runs)"]
    fig = Figure(figsize=(4.2 * len(datasets), 3.8), layout="constrained")
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    colours = _method_colours(summary.methods)
    params = pd.concat([summary.methods.get("params_k", pd.Series(dtype=float)),
                        summary.methods.get("paper_params_k", pd.Series(dtype=float))]).dropna()
    positive = params[params > 0]
    wide_range = bool(len(positive)) and positive.max() > 100 * max(1.0, positive.min())
    handles: dict[str, None] = {}  # the methods drawn, in order
    for ax, dataset in zip(axes, datasets):
        for _, row in summary.methods.iterrows():
            colour = colours[row["method"]]
            mean = row.get(f"{dataset}_mean", math.nan)
            if not pd.isna(mean) and not pd.isna(row["params_k"]):
                std = row[f"{dataset}_std"]
                ax.errorbar(row["params_k"], mean, yerr=None if pd.isna(std) else std, fmt="o", color=colour,
                            capsize=3)
                handles.setdefault(row["method"], None)
                ax.annotate(row["method"], (row["params_k"], mean), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=colour)
            paper_mean = row.get(f"{dataset}_paper_mean", math.nan)
            if not pd.isna(paper_mean) and not pd.isna(row["paper_params_k"]):
                ax.plot(row["paper_params_k"], paper_mean, "o", mfc="none", color=colour)
                handles.setdefault(row["method"], None)
        if wide_range:  # e.g. ``full`` (~90M) beside the PEFT methods (~100K): log scale, 0 kept
            ax.set_xscale("symlog", linthresh=10.0)
        ax.margins(x=0.1)
        ax.set_xlabel("trainable image-encoder parameters (K)")
        ax.set_ylabel("test DSC (%)")
        ax.set_title(dataset_label(dataset, summary.paper))
        ax.grid(True, alpha=0.3)
    if handles:
        from matplotlib.lines import Line2D

        proxies = [Line2D([], [], marker="o", linestyle="none", color=colours[m]) for m in handles]
        fig.legend(proxies, list(handles), loc="outside right upper", fontsize=7,
                   title="filled: ours\nhollow: paper", title_fontsize=7)
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_organ_dsc(summary: Summary, path: str | Path) -> Path:
    """Per-organ test DSC bars, one panel per dataset, one bar per method, seed std as error bars."""
    from matplotlib.figure import Figure

    datasets = [d for d in summary.datasets if summary.organ_names(d)] or ["(no per-organ metrics)"]
    fig = Figure(figsize=(max(5.0, 1.6 * max(len(summary.organ_names(d)) for d in datasets) + 3), 3.2 * len(datasets)),
                 layout="constrained")
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    colours = _method_colours(summary.methods)
    all_methods = list(summary.methods["method"].drop_duplicates()) if len(summary.methods) else []
    for ax, dataset in zip(axes, datasets):
        organs = summary.organ_names(dataset)
        table = summary.organs[summary.organs["dataset"] == dataset]
        methods = [m for m in all_methods if (table["method"] == m).any()]
        width = min(0.3, 0.8 / max(1, len(methods)))
        for i, method in enumerate(methods):
            cells = table[table["method"] == method].set_index("organ").reindex(organs)
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(organs))]
            ax.bar(xs, cells["mean"].fillna(0.0), width, yerr=cells["std"].fillna(0.0), capsize=2,
                   color=colours[method], label=method)
        ax.set_xticks(range(len(organs)), organs, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("test DSC (%)")
        ax.set_ylim(0, 100)
        ax.set_title(dataset_label(dataset, summary.paper))
        ax.grid(True, axis="y", alpha=0.3)
        if methods:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=120)
    return Path(path)


def _method_colours(methods: pd.DataFrame) -> dict[str, Any]:
    from matplotlib import colormaps

    names = list(methods["method"].drop_duplicates()) if len(methods) else []
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}
