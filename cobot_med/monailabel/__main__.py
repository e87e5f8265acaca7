"""``python -m cobot_med.monailabel DIR``: prepare DIR as the MONAI Label app folder (docs/monailabel.md)."""

from __future__ import annotations

import argparse
import sys

from .folder import prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cobot_med.monailabel",
                                     description="Prepare a folder for the cobot-med MONAI Label app: MONAI Label "
                                     "keeps its model/, logs/ and bin/ there (never next to the code).")
    parser.add_argument("folder", help="the app's data folder (made if missing)")
    args = parser.parse_args(argv)
    try:
        folder = prepare(args.folder)
    except (ValueError, OSError) as err:
        print(f"cobot-med: {err}", file=sys.stderr)
        return 2
    print(f"prepared {folder}; start the server with:\n"
          f"  monailabel start_server --app {folder} --studies STUDIES --conf models lite_medsam")
    return 0


if __name__ == "__main__":
    sys.exit(main())
