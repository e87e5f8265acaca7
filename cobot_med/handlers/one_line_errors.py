"""An engine's errors reach the user once: as the edge's one line, or (a bug) as one traceback."""

from __future__ import annotations

import logging
import sys

from ignite.engine import Engine, Events

from ..errors import debug_enabled, explain


class OneLineErrors:
    """Attached first to each engine (training, validation, test): an exception ends the run straight away.

    ignite fires every ``EXCEPTION_RAISED`` handler in order until one raises; MONAI's ``StatsHandler`` logs the
    whole traceback there before re-raising, once per engine the error passes through (validation inside
    training: twice), and ignite logs "Engine run is terminating due to exception" on each. This handler
    re-raises first, so the traceback is printed once, at the edge (``cobot_med.errors``), which turns what
    it can explain (a project error, Ctrl-C, a full disk) into one line; and it holds back the engine's
    "terminating" record for those. With ``--debug`` / ``COBOT_MED_DEBUG=1`` everything is logged as before.
    """

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self.raise_now, Events.EXCEPTION_RAISED):
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.raise_now)
        logger = getattr(engine, "logger", None)
        if isinstance(logger, logging.Logger) and not any(isinstance(f, _Explained) for f in logger.filters):
            logger.addFilter(_Explained())

    @staticmethod
    def raise_now(_engine: Engine, err: BaseException) -> None:
        raise err


class _Explained(logging.Filter):
    """Drop an engine's error record about an exception the edge will say in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or debug_enabled():
            return True
        err = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return explain(err) is None
