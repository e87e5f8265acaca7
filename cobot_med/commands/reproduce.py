"""``cobot-med reproduce table4``: the paper's Table 4 from fetched data, as one resumable recipe."""

from __future__ import annotations

import argparse

HELP = ("reproduce the paper's Table 4: check the data, train and test the paper's methods with its settings over "
        "seeds (resumable), compare with the paper's figures; --dry_run prints the plan and a time estimate")

DATASETS = ("adome", "spleen", "segrap")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import OneSpelling, both_spellings

    sub = parser.add_subparsers(dest="table", required=True, metavar="TABLE",
                                help="the paper's table to reproduce (table4)")
    table4 = sub.add_parser("table4", formatter_class=OneSpelling, help="Table 4: the PEFT methods' test DSC per dataset",
                            description=HELP)
    table4.epilog = ("example: cobot-med data fetch adome && cobot-med reproduce table4 --dataset adome --seeds 3 "
                     "--sam_checkpoint sam_vit_b_01ec64.pth (docs/reproduce.md)")
    _table4_arguments(table4)
    table4.set_defaults(_parser=table4)
    both_spellings(table4)


def _table4_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="adome", metavar="NAMES",
                        help="datasets, comma-separated: adome (AbdomenCT-1K, default), spleen, segrap")
    parser.add_argument("--seeds", default="3", help="a count N (seeds 0..N-1, default 3) or seeds separated by commas")
    parser.add_argument("--methods", default=None, nargs="+", metavar="NAMES",
                        help="PEFT methods, comma- or space-separated (default: the paper's six, frozen, decoder, "
                        "lora, lora+cobot, adaptformer, adaptformer+cobot)")
    parser.add_argument("--arch", default="vit_b", help="base model (default vit_b, the paper's)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="input size in pixels (default: the base's own, 1024 for vit_b as in the paper)")
    parser.add_argument("--epochs", type=int, default=25, help="training epochs (default 25, the paper's)")
    parser.add_argument("--sam_checkpoint", default=None, help="the base model's weights (vit_b: Meta's "
                        "sam_vit_b_01ec64.pth)")
    parser.add_argument("--dataset_dir", default=None,
                        help="the dataset folder (default: the bundle's, data/AbdomenCT-1K, data/Task09_Spleen, "
                        "data/SegRap2023, where `cobot-med data fetch` puts them); one dataset only")
    parser.add_argument("--datalist", default=None,
                        help="a datalist instead of the dataset's fixed split (one dataset only)")
    parser.add_argument("--output_dir", default="outputs/reproduce",
                        help="runs, the MLflow store and the comparison (default outputs/reproduce)")
    parser.add_argument("--tracking_uri", default=None,
                        help="MLflow tracking store (default: $MLFLOW_TRACKING_URI, else OUTPUT_DIR/mlflow.db)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--prompts", default=None, metavar="PROTOCOL",
                        help="the prompt protocol of compare's main table, passed to cobot-med compare: tight (the "
                        "paper's, an oracle), jitter:<px>, box3d:<mm>, key_slice, clicks:<n> (docs/evaluation.md)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the checks, the runs and a time estimate from throughput measured here; run nothing")
    parser.add_argument("--allow_cpu", action="store_true",
                        help="run a SAM ViT at 1024 px on a CPU anyway (refused by default: it takes weeks)")
    parser.add_argument("--remeasure", action="store_true", help="measure throughput and count slices again, not "
                        "from the cache")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="after --: more bundle overrides for every run (they are then not the paper's settings)")


def run(args: argparse.Namespace) -> int:
    from ..errors import SettingsError
    from ..peft import METHODS
    from ..reproduce.recipe import paper_methods
    from ..reproduce.table4 import Options, reproduce
    from ..sam.build import ARCHITECTURES
    from ..sweep import parse_methods, parse_seeds

    datasets = [d.strip() for d in args.dataset.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in DATASETS]
    if not datasets or unknown:
        raise SettingsError(f"--dataset {args.dataset}: choose from {', '.join(DATASETS)}")
    if len(datasets) > 1 and (args.dataset_dir or args.datalist):
        raise SettingsError("--dataset_dir and --datalist name one dataset's data: give one --dataset with them")
    methods = parse_methods(args.methods) if args.methods else paper_methods()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SettingsError(f"unknown PEFT method {', '.join(unknown)}; choose from {', '.join(sorted(METHODS))}")
    if args.arch not in ARCHITECTURES:
        raise SettingsError(f"--arch {args.arch}: choose from {', '.join(ARCHITECTURES)}")
    if args.epochs < 1:
        raise SettingsError(f"--epochs {args.epochs}: train at least one epoch")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as err:
        raise SettingsError(str(err)) from None
    rest = list(args.overrides)
    options = Options(datasets=datasets, seeds=seeds, methods=methods, arch=args.arch, image_size=args.image_size,
                      epochs=args.epochs, dataset_dir=args.dataset_dir, datalist=args.datalist,
                      sam_checkpoint=args.sam_checkpoint, output_dir=args.output_dir, tracking_uri=args.tracking_uri,
                      device=args.device, prompts=args.prompts, dry_run=args.dry_run, allow_cpu=args.allow_cpu,
                      remeasure=args.remeasure, overrides=rest[1:] if rest[:1] == ["--"] else rest)
    return reproduce(options, log=lambda line: print(line, flush=True))
