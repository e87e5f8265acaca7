"""The comparison as Markdown and CSV files (and the pictures of :mod:`.plots`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..predict.protocols import TIGHT, parse_protocol
from .plots import plot_dsc_vs_params, plot_organ_dsc, plot_protocol_dsc
from .summary import Summary, dataset_label, protocol_sort_key

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


def format_markdown(summary: Summary, digits: int = 1) -> str:
    """The comparison as Markdown: the methods table, one per-organ table per dataset, the runs
    left out."""
    paper = summary.paper
    has_paper = bool(paper.get("methods"))
    prompts = parse_protocol(summary.prompts)
    lines = [f"## Test DSC (%) per method: mean ± std over seeds, prompts {prompts.label}", ""]
    if prompts.kind == TIGHT:
        lines += ["Prompts: tight, the papers' protocol: a box from the reference label on every slice that holds the "
                  "organ, an oracle (docs/evaluation.md). The tables by prompt protocol below put it beside the "
                  "realistic ones.", ""]
    else:
        lines += [f"Prompts: {prompts.name}, {prompts.describe()}. The paper's figures are under tight boxes (an "
                  "oracle), so they are not beside these; the tables by prompt protocol below show both.", ""]
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

    lines += _protocol_tables(summary, digits)

    for dataset in summary.datasets:
        organs = summary.organ_names(dataset)
        if not organs:
            continue
        lines += ["", f"## {dataset_label(dataset, paper)}: test DSC (%) per organ, prompts {prompts.label}", ""]
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


def _protocol_tables(summary: Summary, digits: int) -> list[str]:
    """Per dataset: one row per method, the papers' protocol (tight, an oracle) beside every realistic one the
    runs scored, and the paper's own figure (tight boxes)."""
    lines: list[str] = []
    table = summary.protocols
    for dataset in summary.datasets:
        cells = table[table["dataset"] == dataset]
        names = sorted(cells["protocol"].unique(), key=protocol_sort_key)
        if not names:
            continue
        labels = [parse_protocol(name).label for name in names]
        has_paper = bool(summary.paper_methods)
        lines += ["", f"## {dataset_label(dataset, summary.paper)}: test DSC (%) by prompt protocol", ""]
        header = ["method", *labels] + (["paper (tight)"] if has_paper else [])
        lines += [_md_row(header), _md_row(["---"] + ["---:"] * (len(header) - 1))]
        for method in cells["method"].drop_duplicates():
            row = cells[cells["method"] == method].set_index("protocol")
            values = [format_dsc(row.at[n, "mean"], row.at[n, "std"], digits) if n in row.index else "—" for n in names]
            if has_paper:
                mean, std = summary.paper_methods.get(method, {}).get("dsc", {}).get(dataset, (math.nan, math.nan))
                values.append(format_dsc(mean, std, digits))
            lines.append(_md_row([method, *values]))
    if lines:
        lines += ["", "tight: a box from the reference label on every slice that holds the organ (the papers' protocol, "
                      "an oracle); jitter:<px>: the same slices, boxes widened by 0-px; box3d:<mm>: one 3D box per "
                      "organ; key_slice: one box on the largest slice, propagated (docs/evaluation.md)."]
    return lines


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
    """Write ``compare.md``, ``methods.csv``, ``organs.csv``, ``protocols.csv``, ``runs.csv`` (the runs that
    entered and those left out, with ``state`` and ``reason``), ``dsc_vs_params.png``, ``organ_dsc.png`` and
    ``protocol_dsc.png`` under ``out_dir``; returns the paths by short name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / "compare.md",
        "methods_csv": out / "methods.csv",
        "organs_csv": out / "organs.csv",
        "protocols_csv": out / "protocols.csv",
        "runs_csv": out / "runs.csv",
        "dsc_vs_params": out / "dsc_vs_params.png",
        "organ_dsc": out / "organ_dsc.png",
        "protocol_dsc": out / "protocol_dsc.png",
    }
    paths["markdown"].write_text(format_markdown(summary, digits), encoding="utf-8")
    summary.methods.to_csv(paths["methods_csv"], index=False)
    summary.organs.to_csv(paths["organs_csv"], index=False)
    summary.protocols.to_csv(paths["protocols_csv"], index=False)
    pd.concat([summary.runs.drop(columns=["method"], errors="ignore"), summary.left_out], ignore_index=True).to_csv(
        paths["runs_csv"], index=False
    )
    plot_dsc_vs_params(summary, paths["dsc_vs_params"])
    plot_organ_dsc(summary, paths["organ_dsc"])
    plot_protocol_dsc(summary, paths["protocol_dsc"])
    return paths
