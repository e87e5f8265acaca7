"""``cobot-med``: one entry point, one module per sub-command under ``cobot_med.commands``.

Each command module defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``; they are
imported only when chosen, so ``cobot-med params`` does not import MLflow. The project's errors end
here as one line, ``cobot-med: <message>``, and a non-zero exit; ``--debug`` (or ``COBOT_MED_DEBUG=1``)
shows the traceback instead.
"""

from __future__ import annotations

import argparse
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
    "sweep": "cobot_med.commands.sweep",
    "compare": "cobot_med.commands.compare",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cobot-med", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=f"show full tracebacks (also: {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, path in COMMANDS.items():
        module = importlib.import_module(path)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    return run_at_edge(lambda: args._run(args))


if __name__ == "__main__":
    sys.exit(main())
