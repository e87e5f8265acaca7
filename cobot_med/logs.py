"""Quiet logs: what informs a user stays, what other libraries say that does not goes, unless ``--debug``.

Silenced (each says nothing a user can act on, or says something wrong about this run):

- ignite's "Engine run resuming from iteration 0, epoch 0 ..." at every engine start (the project says
  "resumed ... at epoch N" itself when it resumes, and ignite's line says epoch 0 right before it);
- MLflow's "Creating initial MLflow database tables" / "Updating database tables" when a store is made;
- MONAI's notices that nvImageCodec (a GPU DICOM decoder) is not installed, twice per run;
- highdicom's INFO lines while it makes a DICOM-SEG (a dozen per case: "copy attributes of module ...");
- MONAI's "metric handler can only record the first value of result list" (the per-organ scores are
  recorded by the project's own handler: ``cobot_med.handlers.PerOrganMetrics``).

With ``--debug`` / ``COBOT_MED_DEBUG=1`` nothing is silenced.
"""

from __future__ import annotations

import logging
import warnings

from .errors import debug_enabled

SILENT_PREFIXES = ("Engine run resuming from", "Engine run starting with")
QUIET_LOGGERS = {"mlflow.store.db.utils": logging.WARNING, "alembic.runtime.migration": logging.WARNING,
                 "monai.data.nvimgcodec_pydicom_plugin": logging.ERROR, "highdicom": logging.WARNING}
IGNORED_WARNINGS = ("NvImgCodecPydicomReader", "metric handler can only record the first value")


class _DropEngineStarts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(SILENT_PREFIXES)


_DROP = _DropEngineStarts()


def quiet() -> None:
    """Apply the silences above (idempotent); nothing with debug on. ignite's engine loggers (one per engine
    class, made when the engine is built) print through the root logger's handlers (``bundles/logging.conf``),
    so the filter goes on those handlers."""
    if debug_enabled():
        return
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for message in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{message}")
    for handler in logging.getLogger().handlers:
        if _DROP not in handler.filters:
            handler.addFilter(_DROP)
