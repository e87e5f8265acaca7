"""``cobot-med datalist``: a MONAI-style datalist of a dataset folder, split by case."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "scan a dataset folder in its layout and write a training/validation/test datalist (split by case)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", required=True, choices=["adome", "spleen", "segrap"],
                        help="dataset layout (folder trees in docs/data.md)")
    parser.add_argument("--data", required=True, help="dataset folder")
    parser.add_argument("--out", required=True, help="datalist JSON file to write")
    parser.add_argument("--val_fraction", type=float, default=0.2, help="fraction of cases for validation")
    parser.add_argument("--test_fraction", type=float, default=0.2, help="fraction of cases for the test split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case shuffle (same seed, same split)")


def run(args: argparse.Namespace) -> int:
    from ..data.datalist import scan_cases, split_cases, write_datalist
    from ..data.validation import DataError
    from ..errors import SettingsError

    if Path(args.out).is_dir():
        raise SettingsError(f"--out {args.out} is a folder; give the datalist a file name, e.g. {Path(args.out) / 'datalist.json'}")
    cases, problems = scan_cases(args.layout, args.data)
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    if not cases:
        raise DataError(f"{args.data}: no usable cases in the {args.layout} layout")
    try:
        datalist = split_cases(cases, args.val_fraction, args.test_fraction, args.seed)
    except ValueError as err:
        raise SettingsError(str(err)) from None
    path = write_datalist(datalist, args.out, layout=args.layout, seed=args.seed,
                          val_fraction=args.val_fraction, test_fraction=args.test_fraction)
    counts = ", ".join(f"{split} {len(items)}" for split, items in datalist.items())
    print(f"wrote {path}: {counts} cases")
    return 0
