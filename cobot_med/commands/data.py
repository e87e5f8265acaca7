"""``cobot-med data fetch|check``: public datasets into the layouts the bundles read, and checks of a folder."""

from __future__ import annotations

import argparse
import sys

HELP = ("download a public dataset (spleen, adome) into the layout the bundles read, with its fixed split; "
        "check a dataset folder (segrap needs registration: `data fetch segrap` says how)")

DATASETS = ("spleen", "adome", "segrap")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import OneSpelling, both_spellings

    parser.epilog = ("examples: cobot-med data fetch spleen --dest data; cobot-med data check segrap "
                     "data/SegRap2023 --datalist data/SegRap2023/datalist.json")
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION",
                                help="fetch: download and check a dataset; check: check a folder already there")
    fetch = sub.add_parser("fetch", formatter_class=OneSpelling,
                           help="download, check and unpack a dataset, then write its fixed split",
                           description="Download a public dataset from its official release files (MSD Task09 Spleen: "
                           "MONAI's record; AbdomenCT-1K: the Zenodo files in cobot_med/resources/dataset_sources.json), "
                           "resuming partial downloads, checking each file's checksum, unpacking it into the layout "
                           "the bundles read, and writing DEST/<folder>/datalist.json with the fixed split "
                           "(docs/reproduce.md). segrap: prints the registration steps.")
    fetch.add_argument("dataset", choices=DATASETS, help="spleen (MSD Task09), adome (AbdomenCT-1K), segrap (SegRap2023)")
    fetch.add_argument("--dest", default="data", help="folder the dataset's own folder goes into (default: data, "
                       "as the bundles' dataset_dir defaults: data/Task09_Spleen, data/AbdomenCT-1K)")
    fetch.add_argument("--mirror", default=None, metavar="URL",
                       help="replace the source host (scheme and host; the path is kept), e.g. a site's internal "
                       "mirror (default: $COBOT_MED_DATA_MIRROR, else the official hosts)")
    fetch.add_argument("--keep_archives", action="store_true",
                       help="keep the downloaded archives in DEST/<folder>/.downloads (default: removed once unpacked)")
    fetch.add_argument("--accept_unverified", action="store_true",
                       help="take files whose checksum is not confirmed by the publisher even if they do not match "
                       "the third-party values recorded for them (their checksums are printed)")
    fetch.add_argument("--retries", type=int, default=5, help="resumptions of a cut connection per file (default 5)")
    fetch.set_defaults(_parser=fetch)
    check = sub.add_parser("check", formatter_class=OneSpelling,
                           help="check a dataset folder in its layout; optionally write its fixed split",
                           description="Scan a dataset folder in its layout (docs/data.md) and load every case "
                           "through the checks the bundles run (files, shape, affine, label values); with "
                           "--datalist, write the fixed split of its cases (docs/reproduce.md).")
    check.add_argument("dataset", choices=DATASETS, help="the layout: spleen, adome or segrap")
    check.add_argument("dir", metavar="DIR", help="the dataset folder")
    check.add_argument("--datalist", default=None, metavar="FILE",
                       help="write the fixed split of the folder's cases to FILE (only when every case passes)")
    check.add_argument("--quick", action="store_true", help="only look for the files; do not load the volumes")
    check.set_defaults(_parser=check)
    for nested in (fetch, check):
        both_spellings(nested)


def run(args: argparse.Namespace) -> int:
    return _fetch(args) if args.data_command == "fetch" else _check(args)


def _fetch(args: argparse.Namespace) -> int:
    from ..data.fetch import fetch_dataset, registration_text
    from ..data.sources import get_source
    from ..errors import SettingsError

    if args.retries < 0:
        raise SettingsError(f"--retries {args.retries}: give 0 or more")
    source = get_source(args.dataset)
    if source.registration and not source.files:
        print(f"{source.title} cannot be downloaded without registration ({source.homepage}). Steps:\n"
              + registration_text(source))
        print(f"cobot-med: nothing was downloaded: {source.title} needs the steps above", file=sys.stderr)
        return 1
    result = fetch_dataset(args.dataset, args.dest, mirror=args.mirror, keep_archives=args.keep_archives,
                           accept_unverified=args.accept_unverified, retries=args.retries,
                           log=lambda line: print(line, flush=True))
    if source.license_note:
        print(f"terms: {source.license_note}")
    print(f"done: {result.folder} (datalist {result.datalist}); train on it with "
          f"python -m monai.bundle run training --config_file bundles/{args.dataset}.json --datalist {result.datalist}, "
          f"or reproduce the paper's table with cobot-med reproduce table4 --dataset {args.dataset}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.fetch import FetchError, check_dataset, say_left_out, write_fixed_split
    from ..errors import SettingsError

    if args.datalist and Path(args.datalist).is_dir():
        raise SettingsError(f"--datalist {args.datalist} is a folder; give the datalist a file name")
    result = check_dataset(args.dataset, args.dir, full=not args.quick, log=lambda line: print(line, flush=True))
    say_left_out(result.left_out, print)
    for failure in result.failures:
        print(f"  {failure['case_id']}: {failure['error']}")
    if not result.cases:
        raise FetchError(f"{result.folder}: no usable cases in the {args.dataset} layout")
    what = "found (files only, --quick)" if args.quick else f"checked, {len(result.cases) - len(result.failures)} pass"
    print(f"{result.folder}: {len(result.cases)} cases {what}"
          + (f", {len(result.left_out)} left out for missing files" if result.left_out else ""))
    if result.failures:
        raise FetchError(f"{len(result.failures)} of {len(result.cases)} cases in {result.folder} fail the checks "
                         "(listed above); fix or remove them" + (" before writing a datalist" if args.datalist else ""))
    if args.datalist:
        write_fixed_split(args.dataset, result.folder, path=Path(args.datalist), say_missing=False, log=print)
    return 0
