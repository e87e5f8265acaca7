"""The papers' Table 4 from runs: the latest finished run per setting, averaged over seeds, the paper beside it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import pandas as pd

from .runs import DATASET_ORDER, FINISHED, METHOD_ORDER, ORGAN_METRIC_PREFIX, SUPERSEDED, paper_results

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


def dataset_label(dataset: str, paper: dict[str, Any]) -> str:
    name = paper.get("datasets", {}).get(dataset, {}).get("paper_name")
    return f"{dataset} ({name})" if name else dataset
