"""Two pictures of a comparison: test DSC against trainable parameters, and DSC per organ."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from .summary import Summary, dataset_label

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


def plot_protocol_dsc(summary: Summary, path: str | Path) -> Path:
    """Test DSC per method under each prompt protocol the runs scored, one panel per dataset: the papers' tight
    boxes (an oracle, hatched) beside the realistic protocols, seed std as error bars."""
    from matplotlib.figure import Figure

    from ..predict.protocols import parse_protocol
    from .summary import protocol_sort_key

    table = summary.protocols
    datasets = [d for d in summary.datasets if (table["dataset"] == d).any()] or ["(no runs)"]
    methods = list(summary.methods["method"].drop_duplicates()) if len(summary.methods) else []
    methods += [m for m in table["method"].drop_duplicates() if m not in methods]
    names = sorted(table["protocol"].unique(), key=protocol_sort_key)
    fig = Figure(figsize=(max(5.0, 1.4 * max(1, len(methods)) + 3), 3.2 * len(datasets)), layout="constrained")
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    for ax, dataset in zip(axes, datasets):
        cells = table[table["dataset"] == dataset]
        shown = [m for m in methods if (cells["method"] == m).any()]
        width = min(0.3, 0.8 / max(1, len(names)))
        for i, name in enumerate(names):
            rows = cells[cells["protocol"] == name].set_index("method").reindex(shown)
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(shown))]
            ax.bar(xs, rows["mean"].fillna(0.0), width, yerr=rows["std"].fillna(0.0), capsize=2,
                   color=cmap(i % cmap.N), hatch="//" if i == 0 and name == "tight" else None,
                   label=parse_protocol(name).label)
        ax.set_xticks(range(len(shown)), shown, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("test DSC (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{dataset_label(dataset, summary.paper)}: by prompt protocol")
        ax.grid(True, axis="y", alpha=0.3)
        if names:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=120)
    return Path(path)


def _method_colours(methods: pd.DataFrame) -> dict[str, Any]:
    from matplotlib import colormaps

    names = list(methods["method"].drop_duplicates()) if len(methods) else []
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}
