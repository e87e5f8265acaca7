"""``cobot-med``: one entry point, one module per sub-command under ``cobot_med.commands``.

Each command module defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
they are imported only when chosen, so ``cobot-med params`` does not import MLflow.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "params": "cobot_med.commands.params",
    "datalist": "cobot_med.commands.datalist",
    "make-phantoms": "cobot_med.commands.make_phantoms",
    "demo": "cobot_med.commands.demo",
    "infer": "cobot_med.commands.infer",
    "sweep": "cobot_med.commands.sweep",
    "compare": "cobot_med.commands.compare",
}


def _available() -> dict[str, object]:
    modules = {}
    for name, path in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(path)
        except ModuleNotFoundError as err:
            if err.name != path:  # a real missing dependency inside the command: surface it
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cobot-med", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in _available().items():
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
