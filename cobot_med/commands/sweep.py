"""``cobot-med sweep``: one training run (with its test evaluation) per PEFT method and seed."""

from __future__ import annotations

import argparse
import os

HELP = "train and evaluate every PEFT method over seeds, one MLflow run each; skips pairs already finished"

# Bundle settings the sweep takes as its own options (they decide which finished runs count) and hands
# on to the bundle unchanged; every other bundle override goes after "--".
PASSED_THROUGH = ("dataset_dir", "arch", "image_size", "epochs", "output_dir")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "example: cobot-med sweep --config bundles/adome.json --peft lora,lora+cobot --seeds 3 "
        "--dataset_dir data/adome --output_dir outputs/sweep -- --lr 1e-4"
    )
    parser.add_argument("--config", required=True, help="the dataset bundle, e.g. bundles/adome.json or adome")
    parser.add_argument("--peft", required=True, nargs="+", metavar="NAMES",
                        help="PEFT methods, comma- or space-separated, e.g. lora,lora+cobot")
    parser.add_argument("--seeds", default="1", help="a count N (seeds 0..N-1) or seeds separated by commas")
    parser.add_argument("--tracking_uri", default=None,
                        help="MLflow tracking store for the runs and the skip check (default: the bundle's "
                        "tracking_uri, else $MLFLOW_TRACKING_URI, else OUTPUT_DIR/mlflow.db)")
    for name in PASSED_THROUGH:
        parser.add_argument(f"--{name}", default=None, help=f"the bundle setting {name}, for every run")
    parser.add_argument("--run_id", default="training", help="the bundle's workflow to run (default: training)")
    parser.add_argument("--dry_run", action="store_true", help="say what would run and what is skipped; run nothing")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="after --: more bundle overrides, as on the monai.bundle command line")


def run(args: argparse.Namespace) -> int:
    from ..errors import SettingsError
    from ..peft import METHODS
    from ..sweep import parse_methods, parse_seeds, run_sweep

    methods = parse_methods(args.peft)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SettingsError(f"unknown PEFT method {', '.join(unknown)}; choose from {', '.join(sorted(METHODS))}")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as err:
        raise SettingsError(str(err)) from None
    overrides = []
    for name in PASSED_THROUGH:
        value = getattr(args, name)
        if value is not None:
            if name in ("dataset_dir", "output_dir"):  # relative to where the user is, whatever runs the pair
                value = os.path.abspath(value)
            overrides += [f"--{name}", str(value)]
    rest = list(args.overrides)
    overrides += rest[1:] if rest[:1] == ["--"] else rest
    result = run_sweep(args.config, methods, seeds, overrides, args.tracking_uri, run_id=args.run_id,
                       dry_run=args.dry_run, log=lambda line: print(line, flush=True))
    return 0 if result.ok else 1
