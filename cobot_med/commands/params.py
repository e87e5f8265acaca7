"""``cobot-med params``: trainable parameter counts of a method on an architecture."""

from __future__ import annotations

import argparse
import json

HELP = "build SAM with a PEFT method (random init) and print its trainable parameter counts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..peft import METHODS
    from ..sam import ARCHITECTURES

    parser.add_argument("--arch", default="vit_b", choices=sorted(ARCHITECTURES),
                        help="the base model (default: vit_b, the papers' base; its weights are not needed to count)")
    parser.add_argument("--peft", default="lora+cobot", choices=sorted(METHODS),
                        help="the PEFT method whose trainable parameters to count (default: lora+cobot)")
    parser.add_argument("--image_size", type=int, default=None, help="model input size (default: the arch's)")
    parser.add_argument("--options", default="{}", help="method options as JSON, e.g. '{\"rank\": 8}'")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from ..model import ModelSpec, build_model
    from ..peft import count_parameters

    from ..errors import SettingsError
    from ..peft import METHODS

    try:
        options = json.loads(args.options)
        METHODS[args.peft].make_config(options)
        spec = ModelSpec(arch=args.arch, image_size=args.image_size, peft=args.peft, peft_options=options)
    except (ValueError, TypeError) as err:
        raise SettingsError(f"--options {args.options}: {err}") from None
    model = build_model(spec)
    counts = count_parameters(model.sam)
    if args.json:
        print(json.dumps({"arch": args.arch, "peft": args.peft, "image_size": spec.image_size, **counts}))
        return 0
    print(f"{args.arch} / {args.peft} at {spec.image_size}px")
    for key, value in counts.items():
        print(f"  {key:<26} {value:>12,}")
    return 0
