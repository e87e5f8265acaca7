"""``cobot-med``: one entry point, one module per sub-command under ``cobot_med.commands``.

Each command module defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; they are
imported only when chosen, so ``cobot-med params`` does not import MLflow. Every long flag takes both
spellings, ``--sam_checkpoint`` and ``--sam-checkpoint`` (:func:`both_spellings`); help shows the
underscore form, the one the bundles' settings use. The project's errors end here as one line,
``cobot-med: <message>``, and a non-zero exit; ``--debug`` (or ``COBOT_MED_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys

from .errors import DEBUG_ENV, run_at_edge

COMMANDS = {
    "params": "cobot_med.commands.params",
    "datalist": "cobot_med.commands.datalist",
    "make-phantoms": "cobot_med.commands.make_phantoms",
    "demo": "cobot_med.commands.demo",
    "infer": "cobot_med.commands.infer",
    "export": "cobot_med.commands.export",
    "sweep": "cobot_med.commands.sweep",
    "compare": "cobot_med.commands.compare",
    "data": "cobot_med.commands.data",
    "reproduce": "cobot_med.commands.reproduce",
}


class OneSpelling(argparse.HelpFormatter):
    """Help that shows each flag once, in its underscore spelling (the other is accepted, not listed)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        hidden = getattr(action, "other_spellings", ())
        if hidden:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if s not in hidden]
        return super()._format_action_invocation(action)


def both_spellings(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let every long flag of ``parser`` be typed with ``_`` or ``-`` between its words: the underscore form
    comes first (usage, help), the other is registered beside it."""
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs:
            continue
        shown = ["--" + s[2:].replace("-", "_") for s in longs]
        others = ["--" + s[2:].replace("_", "-") for s in longs]
        shorts = [s for s in action.option_strings if not s.startswith("--")]
        extra = [s for s in others if s not in shown and s not in parser._option_string_actions]
        action.option_strings = shorts + list(dict.fromkeys(shown)) + extra
        action.other_spellings = tuple(extra)
        for spelling in action.option_strings:
            parser._option_string_actions[spelling] = action
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cobot-med", formatter_class=OneSpelling,
        description="Fine-tune the Segment Anything Model on medical volumes with parameter-efficient methods "
        "(SAM-COBOT on LoRA and AdaptFormer, Conv-LoRA and the baselines), segment CT/MR folders with box "
        "prompts, and compare runs. Training runs through the MONAI bundles: python -m monai.bundle run "
        "training --config_file bundles/adome.json --dataset_dir DIR (README).",
        epilog="cobot-med COMMAND --help says more about each command. Flags take _ or - between words.")
    parser.add_argument("--debug", action="store_true", help=f"show full tracebacks (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, path in COMMANDS.items():
        module = importlib.import_module(path)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP, formatter_class=OneSpelling)
        module.add_arguments(command)
        both_spellings(command)
        command.set_defaults(_run=module.run, _parser=command)
    return both_spellings(parser)


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # said by the sub-command's own parser: its usage, not the top level's
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    return run_at_edge(lambda: args._run(args))


if __name__ == "__main__":
    sys.exit(main())
