"""``cobot-med compare``: the papers' Table 4 from finished MLflow runs, with the paper beside it."""

from __future__ import annotations

import argparse
import sys

from ..files import absolute

HELP = "compare finished runs of an MLflow tracking store: test DSC per method and dataset, per organ, paper beside"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking_uri",
        default=None,
        help="MLflow tracking store: sqlite:///path/mlflow.db, postgresql://..., http://server:5000 "
        "(default: $MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    parser.add_argument(
        "--experiment",
        action="append",
        default=None,
        metavar="NAMES",
        help="experiment names or patterns, comma-separated or repeated (default: every experiment; "
        "training logs to cobot-med/<dataset>)",
    )
    parser.add_argument("--out", default="outputs/compare", help="folder for compare.md, *.csv and the pictures")
    parser.add_argument("--digits", type=int, default=1, help="decimals of the DSC figures (default: 1, as the paper)")
    parser.add_argument("--no_paper", action="store_true", help="leave out the paper's figures")
    parser.add_argument("--prompts", default="tight", metavar="PROTOCOL",
                        help="the prompt protocol of the main tables: tight (default; the papers' protocol, an "
                        "oracle), jitter:<px>, box3d:<mm>, key_slice, clicks:<n>; every protocol the runs scored is "
                        "shown beside tight in the tables by prompt protocol (docs/evaluation.md)")


def run(args: argparse.Namespace) -> int:
    from ..compare import format_markdown, load_runs, summarize, write_report
    from ..engine.checks import check_output_dir

    from ..predict.protocols import parse_protocol

    prompts = parse_protocol(args.prompts, "--prompts")  # a name that is no protocol: one line, before any work
    check_output_dir(absolute(args.out))
    runs = load_runs(args.tracking_uri, args.experiment)
    summary = summarize(runs, paper={} if args.no_paper else None, prompts=prompts)
    print(format_markdown(summary, args.digits), end="")
    paths = write_report(summary, args.out, args.digits)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    if summary.methods.empty:
        from ..engine.tracking import protocol_metric

        print(f"cobot-med compare: no finished run with a {protocol_metric('test_dsc', prompts)} metric to compare",
              file=sys.stderr)
        return 1
    return 0
