"""The app's folder: where MONAI Label keeps its state, never next to the project's code.

``monailabel start_server --app DIR`` loads ``DIR/main.py`` and creates ``model/``, ``lib/``, ``logs/`` and
``bin/`` inside ``DIR`` (MONAI Label's own state and logs). So ``DIR`` is a data folder of the user's
choosing, prepared by ``python -m cobot_med.monailabel DIR`` (:func:`prepare`): it holds only the few lines
of ``main.py`` that load :class:`cobot_med.monailabel.app.CobotMedApp`. The app refuses to start from a
folder inside the installed package or the project's source tree (:func:`check_app_dir`). Training rounds,
served adapters and the MLflow store go to ``--conf output_dir`` (default ``STUDIES/cobot_med``).

Nothing here imports MONAI Label, so a folder can be prepared in any environment.
"""

from __future__ import annotations

from pathlib import Path

import cobot_med
from cobot_med.files import absolute

MAIN = '''"""The cobot-med MONAI Label app (prepared by `python -m cobot_med.monailabel`): MONAI Label keeps its
model/, logs/ and bin/ in this folder; the code is the installed package's (cobot_med.monailabel)."""

from cobot_med.monailabel.app import CobotMedApp  # noqa: F401  (MONAI Label looks up this subclass)
'''


def prepare(folder: str | Path) -> Path:
    """Make ``folder`` an app folder (its ``main.py``); refuses one inside the package or the source tree."""
    from ..files import write_text

    folder = absolute(folder)
    check_app_dir(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder")
    main = folder / "main.py"
    if main.is_file() and main.read_text() != MAIN:
        raise ValueError(f"{main} exists and is not the cobot-med app's; choose an empty or new folder")
    write_text(main, MAIN)
    return folder


def check_app_dir(app_dir: str | Path) -> None:
    """ValueError when ``app_dir`` lies inside the installed package or the project's source tree (MONAI Label
    would write its state and logs next to the code)."""
    folder = Path(app_dir).resolve()
    code = [Path(cobot_med.__file__).resolve().parent]
    try:
        from ..bundle import repository_root

        code.append(repository_root().resolve())
    except Exception:  # noqa: BLE001 - an install without the source tree has only the package to protect
        pass
    for place in code:
        if folder == place or place in folder.parents:
            raise ValueError(f"the MONAI Label app folder {folder} is inside {place}: MONAI Label would keep its "
                             "model/, logs/ and bin/ there, next to the code. Prepare a data folder of your own with "
                             "`python -m cobot_med.monailabel DIR` and start the server with --app DIR")
