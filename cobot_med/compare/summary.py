"""The papers' Table 4 from runs: the latest finished run per setting, averaged over seeds, the paper beside it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import pandas as pd

from ..engine.tracking import protocol_metric, split_protocol_metric
from ..predict.protocols import TIGHT, Protocol, parse_protocol
from .runs import (DATASET_ORDER, FINISHED, METHOD_ORDER, NOT_EVALUATED, ORGAN_METRIC_PREFIX, SUPERSEDED, TEST_DSC,
                   is_protocol_metric, paper_results)

PROTOCOL_ORDER = ("tight", "jitter", "box3d", "key_slice", "clicks")

@dataclass
class Summary:
    """What :func:`summarize` computes; every DSC here is in percent.

    ``methods``: one row per method with ``method``, ``peft``, ``arch``, ``image_size``,
    ``params_k`` and ``paper_params_k`` (trainable image-encoder parameters, thousands), for each
    dataset ``<d>_mean``, ``<d>_std`` (sample std over seeds, NaN for one seed), ``<d>_n`` (seeds),
    ``<d>_paper_mean``, ``<d>_paper_std``; then ``avg`` and ``paper_avg`` (over the datasets of the
    table, only when every one has a value). ``organs``: long table ``dataset``, ``method``,
    ``organ``, ``mean``, ``std``, ``n``. ``runs``: the runs that entered; ``left_out``: the runs
    that did not, with ``reason``. ``prompts``: the protocol of those tables (``tight``, the papers' oracle
    protocol, unless chosen; the paper's figures are beside ours only then). ``protocols``: long table
    ``dataset``, ``method``, ``protocol``, ``mean``, ``std``, ``n`` of every protocol the finished runs
    scored, ``tight`` first (the papers' protocol beside the realistic ones).
    """

    methods: pd.DataFrame
    organs: pd.DataFrame
    datasets: list[str]
    runs: pd.DataFrame
    left_out: pd.DataFrame
    paper: dict[str, Any] = field(default_factory=dict)
    prompts: str = TIGHT
    protocols: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        columns=["dataset", "method", "protocol", "mean", "std", "n"]))
    paper_methods: dict[str, Any] = field(default_factory=dict)  # the paper's figures (tight), whatever the prompts

    def organ_names(self, dataset: str) -> list[str]:
        return sorted(self.organs.loc[self.organs["dataset"] == dataset, "organ"].unique())


def summarize(runs: pd.DataFrame, paper: dict[str, Any] | None = None, prompts: str | Protocol = TIGHT) -> Summary:
    """Mean ± std over seeds per dataset and method, per organ too, with the paper's figures beside.

    ``paper``: figures in the shape of :func:`paper_results` (the default); ``{}`` for none. ``prompts``: the
    prompt protocol whose test DSC the tables hold (``tight``, the papers' oracle protocol, by default; another
    one reads ``test_dsc/<protocol>``, leaves out the runs that did not score it, and leaves out the paper's
    figures, which are under tight boxes). Every protocol the runs scored goes into ``protocols``.
    """
    paper = paper_results() if paper is None else paper
    protocol = parse_protocol(prompts, "prompts") if isinstance(prompts, str) else prompts
    dsc_column = protocol_metric(TEST_DSC, protocol)
    runs = runs.copy()
    runs = _mark_superseded(runs)
    finished = runs[runs["state"] == FINISHED].copy()
    finished["method"] = _method_labels(finished)
    protocols = _protocol_table(finished)
    if dsc_column not in runs:
        runs[dsc_column] = math.nan
    missing = (runs["state"] == FINISHED) & runs[dsc_column].isna()
    runs.loc[missing, "state"] = NOT_EVALUATED
    runs.loc[missing, "reason"] = f"no {dsc_column} metric (the run did not score the {protocol.canonical} prompts)"
    used = runs[runs["state"] == FINISHED].copy()
    left_out = runs[runs["state"] != FINISHED].copy()
    used["method"] = _method_labels(used)
    datasets = _ordered(used["dataset"].unique(), DATASET_ORDER)
    paper_methods = paper.get("methods", {})
    if protocol.kind != TIGHT:  # the paper's figures are under tight boxes: not beside another protocol's
        paper = {k: v for k, v in paper.items() if k != "methods"}

    organ_columns = [c for c in used.columns if split_protocol_metric(c)[0].startswith(ORGAN_METRIC_PREFIX)
                     and split_protocol_metric(c)[1] == protocol.canonical and used[c].notna().any()]
    keys = ["method", "peft", "arch", "image_size"]
    rows, organ_rows = [], []
    for key, group in used.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, key))
        paper_method = paper.get("methods", {}).get(row["method"], {})
        row["params_k"] = _params_k(group["image_encoder_trainable"])
        row["paper_params_k"] = paper_method.get("params_k", math.nan)
        for dataset in datasets:
            values = group.loc[group["dataset"] == dataset, dsc_column].dropna() * 100.0
            row[f"{dataset}_mean"], row[f"{dataset}_std"], row[f"{dataset}_n"] = _mean_std(values)
            mean, std = paper_method.get("dsc", {}).get(dataset, (math.nan, math.nan))
            row[f"{dataset}_paper_mean"], row[f"{dataset}_paper_std"] = mean, std
            for column in organ_columns:
                organ_values = group.loc[group["dataset"] == dataset, column].dropna() * 100.0
                if len(organ_values):
                    organ = split_protocol_metric(column)[0][len(ORGAN_METRIC_PREFIX):]
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
    protocols = protocols[protocols["dataset"].isin(datasets)] if datasets else protocols
    return Summary(methods=methods, organs=organs, datasets=datasets, runs=used.reset_index(drop=True),
                   left_out=left_out.reset_index(drop=True), paper=paper, prompts=protocol.canonical,
                   protocols=protocols.reset_index(drop=True), paper_methods=paper_methods)


def protocol_sort_key(name: str) -> tuple:
    """``tight`` first, then ``jitter`` by px, ``box3d`` by mm, ``key_slice``, ``clicks``; others after."""
    protocol = parse_protocol(name)
    order = PROTOCOL_ORDER.index(protocol.kind) if protocol.kind in PROTOCOL_ORDER else len(PROTOCOL_ORDER)
    return order, float(protocol.amount or 0), name


def _protocol_table(finished: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds of every protocol's test DSC (%), per dataset and method."""
    columns = {TIGHT: TEST_DSC}
    for column in finished.columns:
        name, protocol = split_protocol_metric(column)
        if name == TEST_DSC and is_protocol_metric(column) and finished[column].notna().any():
            try:
                columns[parse_protocol(protocol).canonical] = column
            except ValueError:  # a metric name of another tool's that only looks like ours
                continue
    rows = []
    for (dataset, method), group in finished.groupby(["dataset", "method"], sort=False):
        for name in sorted(columns, key=protocol_sort_key):
            values = group[columns[name]].dropna() * 100.0
            if len(values):
                rows.append(dict(zip(("dataset", "method", "protocol", "mean", "std", "n"),
                                     (dataset, method, name, *_mean_std(values)))))
    return pd.DataFrame(rows, columns=["dataset", "method", "protocol", "mean", "std", "n"])


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


def dataset_label(dataset: str, paper: dict[str, Any]) -> str:
    name = paper.get("datasets", {}).get(dataset, {}).get("paper_name")
    return f"{dataset} ({name})" if name else dataset
