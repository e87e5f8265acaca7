"""``cobot-med make-phantoms``: synthetic CT cases in a dataset's exact folder layout."""

from __future__ import annotations

import argparse

HELP = "write synthetic CT phantoms (real NIfTI, HU, anisotropic, flipped/oblique affines) in a dataset layout"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", required=True, choices=["adome", "spleen", "segrap"],
                        help="dataset layout to imitate (folder trees in docs/data.md)")
    parser.add_argument("--out", required=True, help="folder to write the cases into")
    parser.add_argument("--cases", type=int, default=5, help="number of cases")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same files")
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"),
                        help="voxel grid of a case (R-L, A-P, S-I), varied by up to 4 per case")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.phantoms import make_phantoms
    from ..errors import SettingsError

    if any(n < 8 for n in args.shape):
        raise SettingsError(f"--shape {' '.join(map(str, args.shape))}: every side needs at least 8 voxels")
    if args.cases < 1:
        raise SettingsError(f"--cases {args.cases}: make at least one case")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise SettingsError(f"--out {args.out} is a file, not a folder")

    out = make_phantoms(args.layout, args.out, cases=args.cases, seed=args.seed, shape=tuple(args.shape))
    print(f"wrote {args.cases} {args.layout} phantom cases to {out}")
    return 0
