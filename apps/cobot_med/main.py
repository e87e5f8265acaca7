"""The app MONAI Label loads: ``monailabel start_server --app apps/cobot_med --studies DIR``.

The code lives in the package (``cobot_med.monailabel``); settings: docs/monailabel.md.
"""

from cobot_med.monailabel.app import CobotMedApp  # noqa: F401  (MONAI Label looks up this subclass)
